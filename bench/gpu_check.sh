#!/usr/bin/env bash
# The `--device cuda` checks (docs/reference-agent.md, "Device"), for a session lent a GPU: the CUDA
# test against the CPU, then `probe train` and `probe sweep` end to end with their outputs under $OUT.
# On the device machine, from the repository root (the device tool's run, carry [".whl"]):
#   bash bench/gpu_check.sh
# Its image has torch but not gymnasium; download the wheels here first:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gymnasium farama-notifications
# DEVICE=cpu runs the same commands on a machine without a GPU (the CUDA test then skips).
set -euo pipefail
device="${DEVICE:-cuda}"
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
python3 -c "import gymnasium" 2>/dev/null || python3 -m pip install --no-deps --no-index .whl/*.whl
export PYTHONPATH="$PWD"
probe() { python3 -c 'from cli.app import main; main()' "$@"; }
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
python3 -m pytest -q -p no:cacheprovider -rs tests/test_engine.py -k cuda
time probe train --env CartPole-v1 --device "$device" --steps 30000 --learning-starts 5000 -q --out "$out/runs"
time probe sweep --preset smoke --device "$device" -q --out "$out/smoke"
probe summarize "$out/smoke"
