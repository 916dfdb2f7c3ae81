#!/usr/bin/env bash
# The daily loop of an ads team, on synthetic demo data: runs exactly the commands that
# docs/daily_loop.md shows (its ```bash block, but `tensorboard`), in OUT:
#   day 1: train; day 2: train today's run starting from yesterday's (--init-from);
#   day 3: evaluate both on the later day's logs, compare them side by side, export.
# Usage: deploy/daily_loop.sh [OUT]   (default: a new temporary directory, printed; never
# the repository; ~3 minutes on 2 cores)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$REPO/.venv/bin:$PATH"
OUT=${1:-$(mktemp -d -t rocketrec-daily.XXXXXX)}
ROWS=${DAILY_ROWS:-100000}
rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
echo "== daily loop in $OUT"
ln -s "$REPO/feature_specs" "$OUT/feature_specs"  # the doc's paths are relative to the repository
for d in 1 2 3; do  # three days of logs from one hidden world (--world-seed)
  rocketrec synth --spec feature_specs/ads_ctr.yaml --rows "$ROWS" --seed "$d" --world-seed 7 \
    --out "$OUT/logs/date=2026-11-0$d" --quiet
done
# the documented commands, verbatim
sed -n '/^```bash$/,/^```$/p' "$REPO/docs/daily_loop.md" | sed '1d;$d' | grep -v '^tensorboard' \
  >"$OUT/commands.sh"
cd "$OUT"
bash -euo pipefail -x commands.sh
echo "curves: tensorboard --logdir $OUT/runs"
