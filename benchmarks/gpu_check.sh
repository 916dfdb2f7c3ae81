#!/usr/bin/env bash
# Prepared GPU check: run on the lent device machine with
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=300)
# 1. torch-only (benchmarks/gpu_check.py): towers, loss, gradient block, EmbeddingBag
#    tables on CUDA against CPU in the same run.
# 2. The full TorchRec training path (sharded tables, fused fbgemm kernels,
#    TrainPipelineSparseDist with the preprocessing pipelined), when torchrec and
#    fbgemm-gpu import with CUDA; otherwise one line says why it is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUTDIR="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python benchmarks/gpu_check.py --steps 300 --batch-size 4096 | tee "$OUTDIR/gpu_check.txt"

if ! python - <<'PY' 2>&1 | tee -a "$OUTDIR/gpu_check.txt"
import sys
import torch
try:
    import fbgemm_gpu  # noqa: F401
    import pyarrow  # noqa: F401
    import torchrec  # noqa: F401
except Exception as e:  # the device image has torch only
    print(f"skipped: the full TorchRec training path: {type(e).__name__}: {e}")
    sys.exit(1)
if not torch.cuda.is_available():
    print("skipped: the full TorchRec training path: torch sees no CUDA device")
    sys.exit(1)
print(f"full TorchRec training path: torchrec {torchrec.__version__}, CUDA {torch.version.cuda}")
PY
then
  exit 0  # skipped, with the reason above
fi
T="$(mktemp -d)"
python -m rocketrec.cli synth --spec feature_specs/ads_ctr.yaml --rows 400000 --files 2 \
  --out "$T/data" --quiet
python -m rocketrec.cli train --spec feature_specs/ads_ctr.yaml --train "$T/data" \
  --out "$T/run" --batch-size 4096 --max-steps 80 --log-every 20 --no-export \
  | tee -a "$OUTDIR/gpu_check.txt"
grep -q "TorchRec pipelines ebc (input distribution) and featurize" "$T/run/train.log"
echo "ok: the full TorchRec path trained on CUDA with the sharded tables pipelined" \
  | tee -a "$OUTDIR/gpu_check.txt"
