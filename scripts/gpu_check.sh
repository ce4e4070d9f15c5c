#!/usr/bin/env bash
# The CUDA half of issue 4, prepared for a session that has a GPU: under 10 minutes on one H100/H200.
#
#   OUT=/some/folder scripts/gpu_check.sh      # results go to $OUT (default: ./gpu-check)
#
# Runs `depthbench bench` on CUDA (bf16 autocast, channels_last, cudnn.benchmark) against the usual
# DataLoader pipeline for ResNet-110 (eager and compiled, compile time apart) and ResNet-1001 (without
# checkpointing, with one segment per unit and with 14 segments per stage; paper_run_h extrapolates the
# paper's 64k steps), a scaling table up to depth 1001, and the CUDA tests of tests/test_bench.py.
# Each result is one JSON file in $OUT; summary.txt has one line per result. The timeouts add up to
# 9 minutes. Data: the shared CIFAR-10 tarball when ../shared/data has it, else synthetic images (each
# JSON's "data" says which).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check}"
mkdir -p "$OUT"
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# Decoded datasets are cached outside $OUT, so that only the results come back.
export DEPTHBENCH_DATA="${DEPTHBENCH_DATA:-${TMPDIR:-/tmp}/depthbench-data}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA GPU visible to $PY: nothing to check" | tee -a "$SUMMARY"
    exit 1
fi

# bench NAME LIMIT_S ARGS...: one `depthbench bench --json` into $OUT/NAME.json (stderr into NAME.err).
bench() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$PY" -m depthbench bench --device cuda --json "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - start)) s ($*)" | tee -a "$SUMMARY"
}

bench r110          60 --version v2 --depth 110  --batch-size 128 --steps 50
bench r110_compile 120 --version v2 --depth 110  --batch-size 128 --steps 50 --compile
bench r1001         90 --version v2 --depth 1001 --batch-size 128 --steps 10
bench r1001_ckpt    60 --version v2 --depth 1001 --batch-size 128 --steps 10 --checkpointing
bench r1001_seg14   60 --version v2 --depth 1001 --batch-size 128 --steps 10 --checkpointing --segments 14
bench scaling       90 --version v2 --depths 20,56,110,164,1001 --batch-size 128 --steps 10

start=$SECONDS
timeout 60 "$PY" -m pytest -q tests/test_bench.py -k cuda > "$OUT/pytest_cuda.txt" 2>&1
echo "pytest tests/test_bench.py -k cuda: rc=$? in $((SECONDS - start)) s" | tee -a "$SUMMARY"

# One line per bench for the reader: speed against the usual pipeline, MFU, memory, 64k-step hours.
"$PY" - "$OUT" <<'PYEOF' | tee -a "$SUMMARY"
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        r = json.loads(path.read_text())
    except ValueError:
        print(f"{path.stem}: no result (see {path.stem}.err)")
        continue
    if r["mode"] == "scaling":
        for row in r["rows"]:
            print(f"{path.stem} depth {row['depth']}: {1000 * row['step_s']:.1f} ms/step, {row['img_per_s']:.0f} img/s, "
                  f"MFU {100 * row['mfu']:.1f}%, memory {row['peak_mem_mb']:.0f} MB, "
                  f"with checkpointing {row['peak_mem_mb_ckpt']:.0f} MB / {1000 * row['step_s_ckpt']:.1f} ms")
        continue
    print(f"{path.stem}: {r['img_per_s']:.0f} img/s vs usual {r['baseline_img_per_s']:.0f} ({r['speedup']:.2f}x), "
          f"MFU {100 * r['mfu']:.1f}% of {r['matmul_peak_flops'] / 1e12:.0f} TFLOP/s ({r['precision']}), "
          f"memory {r['peak_mem_mb']:.0f} MB, compile {r['compile_s']:.1f} s, 64k steps = {r['paper_run_h']:.2f} h")
PYEOF
