#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh: run this on a machine with internet, carry the folder to the GPU machine.
#
#   scripts/gpu_wheels.sh .whl                         # for the GPU image: CPython 3.12, manylinux x86-64
#   scripts/gpu_wheels.sh --python-version 3.11 DIR    # for another CPython (the rehearsal asks for its own)
#
# The GPU machine's stock image (Python 3.12, torch, torchvision, typer, rich, pandas, pyyaml, scipy,
# scikit-learn, matplotlib, filelock, pytest, tensorboard) has no internet and no pydantic. This downloads
# what depthbench needs beyond it, as binary wheels for the target Python whatever Python runs pip here:
# pydantic and its own dependencies, pytest-timeout (pyproject's pytest settings use `timeout`), and
# setuptools, the build backend that `pip install --no-index -e .` needs offline. `.whl/` is git-ignored,
# so the folder can be copied to the GPU machine with the checkout without being committed.
# pydantic and pytest-timeout take their versions from constraints.txt, as CI does; the others are the
# versions .venv holds (pydantic-core is the one version that pydantic release accepts). Nothing else in DIR
# is touched; an existing wheel is not downloaded again.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: scripts/gpu_wheels.sh [--python-version X.Y] DIR"
python_version=3.12
dir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --python-version) python_version=${2:?$usage}; shift 2 ;;
        --python-version=*) python_version=${1#*=}; shift ;;
        -h|--help) echo "$usage"; exit 0 ;;
        -*) echo "$usage" >&2; exit 2 ;;
        *) [ -z "$dir" ] || { echo "$usage" >&2; exit 2; }; dir=$1; shift ;;
    esac
done
[ -n "$dir" ] || { echo "$usage" >&2; exit 2; }

pin() {  # the version constraints.txt gives NAME
    local line
    line=$(grep -E "^$1==" constraints.txt) || { echo "constraints.txt pins no $1" >&2; exit 2; }
    echo "${line#*==}"
}

wheels=(
    "pydantic==$(pin pydantic)"
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    "pytest-timeout==$(pin pytest-timeout)"
    setuptools==84.2.1
)

# pip matches manylinux_2_N tags exactly, so name each glibc level a wheel may be built for.
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done

mkdir -p "$dir"
"${PYTHON:-python3}" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --implementation cp --python-version "$python_version" "${platforms[@]}" -d "$dir" "${wheels[@]}"
echo "wheels for CPython $python_version in $dir: ${wheels[*]}"
