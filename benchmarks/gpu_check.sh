#!/usr/bin/env bash
# Prepared GPU check (see benchmarks/gpu_check.py): run on the lent device machine with
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=300)
# The device image has torch; rocketrec's torch-only modules are imported from this tree.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python benchmarks/gpu_check.py --steps 300 --batch-size 4096 | tee "${OUT:-/tmp}/gpu_check.txt"
