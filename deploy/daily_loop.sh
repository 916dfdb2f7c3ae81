#!/usr/bin/env bash
# The daily loop of an ads team, on synthetic demo data (docs/daily_loop.md):
#   day 1: train; day 2: train today's run starting from yesterday's (--init-from);
#   day 3: evaluate both on the later day's logs, compare them side by side, export.
# Usage: deploy/daily_loop.sh [OUT]   (default daily_out/; ~3 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
OUT=${1:-daily_out}
SPEC=feature_specs/ads_ctr.yaml
ROWS=${DAILY_ROWS:-100000}
rm -rf "$OUT"
mkdir -p "$OUT"
for d in 1 2 3; do  # three days of logs from one hidden world (--world-seed)
  $BIN/rocketrec synth --spec $SPEC --rows "$ROWS" --seed "$d" --world-seed 7 --out "$OUT/logs/date=2026-11-0$d" --quiet
done
echo "== day 1: train"
$BIN/rocketrec train --spec $SPEC --train "$OUT/logs/date=2026-11-01" --val "$OUT/logs/date=2026-11-02" \
  --out "$OUT/runs/day1" --batch-size 1024 --log-every 50 | tail -2
echo "== day 2: today's run from yesterday's weights"
$BIN/rocketrec train --spec $SPEC --train "$OUT/logs/date=2026-11-02" --val "$OUT/logs/date=2026-11-03" \
  --out "$OUT/runs/day2" --init-from "$OUT/runs/day1" --batch-size 1024 --log-every 50 | tail -2
echo "== day 3: both runs on the later day's logs, side by side"
$BIN/rocketrec evaluate "$OUT/runs/day2" --data "$OUT/logs/date=2026-11-03" --out "$OUT/eval/day2.json"
$BIN/rocketrec compare "$OUT/runs/day1" "$OUT/runs/day2" --data "$OUT/logs/date=2026-11-03"
echo "== export today's light tower and score it as a server would"
$BIN/rocketrec export --checkpoint "$OUT/runs/day2" --out "$OUT/runs/day2/light.pt" --data "$OUT/logs/date=2026-11-03"
$BIN/rocketrec evaluate "$OUT/runs/day2/light.pt" --data "$OUT/logs/date=2026-11-03" --out "$OUT/eval/day2_light.json"
echo "curves: tensorboard --logdir $OUT/runs"
