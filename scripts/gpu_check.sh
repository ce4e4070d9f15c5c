#!/usr/bin/env bash
# The GPU check: one command on a bare GPU machine (the stock image: Python 3.12, torch, torchvision,
# typer, rich, pandas, pyyaml, scipy, scikit-learn, matplotlib, filelock, pytest, tensorboard; no pydantic,
# no internet), under 8 minutes on an H100/H200.
#
#   scripts/gpu_wheels.sh .whl                                    # 1. online, once: the missing wheels
#   scripts/gpu_check.sh --wheels .whl --data DIR                 # 2. on the GPU machine, from the repo root
#   scripts/gpu_check.sh --rehearse                               # the same on this CPU (make rehearse)
#
# docs/gpu.md says the same step by step.
#
# --data names a folder holding cifar10-jpeg.tar.gz (or the file); without it the parts that train use
# synthetic images and the real-data run is skipped. Results go to --out, else $OUT, else ./gpu-check
# (--rehearse: ./gpu-check-rehearsal); it writes 5 files there, nothing else: summary.txt (one line per
# part: name, ok/FAIL/n/a/skip, seconds, numbers), results.jsonl (the same with every number, one JSON
# object per part), env.txt, pytest.txt, log.txt (each command and its output). Scratch (the venv, the
# generated configs, the run folders) goes to --work, else $TMPDIR/depthbench-gpu-check; decoded datasets
# are cached in $DEPTHBENCH_DATA, else $TMPDIR/depthbench-data: outside the output folder, which holds
# only results and stays small enough to copy back whole.
#
# What it does, each part with its own timeout (scripts/gpu_check.py has the table; a failed or
# timed-out part is recorded and the next one starts; exit 1 if any part failed):
#   venv      a fresh venv over the image's site-packages (a .pth file), without pydantic
#   install   pip install --no-index --find-links WHEELS pydantic pytest-timeout; pip install --no-deps -e .
#   env       GPU, driver, torch, CUDA and cuDNN versions (env.txt)
#   pytest    pytest -q -k cuda tests (pytest.txt)
#   bench     depthbench bench --device cuda --precision bf16 for v2 ResNet-20, 110, 164 and 1001, with
#             --cuda-graph and --no-cuda-graph: ms/step, images/s, peak memory, the paper's 64k-step hours,
#             host ms and kernels per step
#   agree     200 steps at depths 110 and 1001, same seed: graphed vs eager step and bf16 vs fp32,
#             compared on the train loss logged every 10 steps (two generated sweeps, all 6 runs at once)
#   concurrent  depthbench bench --concurrent 1,2,4 --depth 20: total images/s
#   resume    v2 ResNet-56: a sweep SIGKILLed mid-run and run again, against an uninterrupted one (CUDA
#             does not promise bit-exactness: the difference is reported)
#   realdata  v2 ResNet-20, 2,000 steps on the CIFAR-10 JPEGs (all 50,000 / 10,000): its test accuracy
# --rehearse runs all of it on CPU with tiny nets and steps, in a fresh venv whose copy of .venv lacks
# pydantic (and the other packages the image lacks), with wheels that scripts/gpu_wheels.sh fetches for this
# machine's Python (or --wheels DIR): it proves the install and everything but CUDA in a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
# The rehearsal's "image" is .venv (its Python and, less pydantic and co., its packages).
for arg in "$@"; do
    if [ "$arg" = --rehearse ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
done
exec "$python" scripts/gpu_check.py "$@"
