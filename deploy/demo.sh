#!/usr/bin/env bash
# make demo: the main job end to end on built-in defaults, on this machine.
#   synthetic ad logs -> validate -> Ray job (2 workers, embedded loopback-only Ray)
#   -> exported light tower -> C++ predictor built with CMake -> scores requests.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
OUT=${DEMO_OUT:-demo_out}
SPEC=feature_specs/ads_ctr.yaml
ROWS=${DEMO_ROWS:-300000}
rm -rf "$OUT"
mkdir -p "$OUT"
echo "== 1/6 synthetic ad logs ($ROWS training rows) for $SPEC"
$BIN/rocketrec synth --spec $SPEC --rows "$ROWS" --files 4 --row-group-size 16384 --seed 1 --out "$OUT/data/train" --quiet
$BIN/rocketrec synth --spec $SPEC --rows 50000 --row-group-size 16384 --seed 2 --out "$OUT/data/val" --quiet
echo "== 2/6 validate the spec against the data"
$BIN/rocketrec validate $SPEC --data "$OUT/data/train"
echo "== 3/6 train booster + light tower (rocket) on Ray, 2 workers"
$BIN/python jobs/ads_train.py --spec $SPEC --train "$OUT/data/train" --val "$OUT/data/val" \
  --out "$OUT/run" --workers 2 --epochs 1 --batch-size 1024 --eval-every 50 --checkpoint-every 100 \
  --log-every 25 --eval-batches 20 2>&1 | grep -E "^\[rocketrec\]|step |eval |checkpoint:|error" | grep -v "Successfully loaded" || true
test -f "$OUT/run/light.pt" || { echo "demo: training did not produce light.pt"; exit 1; }
echo "== 4/6 build the C++ predictor (CMake, libtorch from the torch wheel)"
cmake -S deploy/cpp -B deploy/cpp/build -DCMAKE_PREFIX_PATH="$($BIN/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  -DPython_EXECUTABLE="$BIN/python" >"$OUT/cmake.log" 2>&1
cmake --build deploy/cpp/build -j2 >>"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
echo "== 5/6 score requests in C++ and in Python"
$BIN/rocketrec requests --model "$OUT/run/light.pt" --data "$OUT/data/val" --rows 8 --out "$OUT/requests.jsonl"
# one user against 4 ads: a context+candidates request (the user's inputs once)
$BIN/rocketrec requests --model "$OUT/run/light.pt" --data "$OUT/data/val" --rows 4 --candidates 4 \
  --out - 2>/dev/null >>"$OUT/requests.jsonl"
deploy/cpp/build/rocketrec_predict "$OUT/run/light.pt" "$OUT/requests.jsonl" >"$OUT/scores_cpp.txt"
$BIN/rocketrec predict --model "$OUT/run/light.pt" --requests "$OUT/requests.jsonl" >"$OUT/scores_py.txt"
paste "$OUT/scores_cpp.txt" "$OUT/scores_py.txt" | awk 'BEGIN{print "   C++ score    Python score"; m=0} {d=$1-$2; if (d<0) d=-d; if (d>m) m=d; printf "  %.9f  %.9f\n", $1, $2} END{printf "max |C++ - Python| = %.3g\n", m; if (m > 1e-6) exit 1}'
echo "== 6/6 C++ serving latency of the light tower (1 intra-op thread)"
deploy/cpp/build/rocketrec_predict "$OUT/run/light.pt" --bench --seconds 0.5
$BIN/python - "$OUT/run/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
m = s["metrics"]
print(f"validation: booster AUC {m['booster_auc']:.4f} logloss {m['booster_logloss']:.4f} | "
      f"light AUC {m['light_auc']:.4f} logloss {m['light_logloss']:.4f} | base logloss {m['base_logloss']:.4f}")
print(f"run directory: {sys.argv[1].rsplit('/', 1)[0]} (metrics.jsonl, curves.png, checkpoints/, light.pt)")
PY
echo "demo: OK"
