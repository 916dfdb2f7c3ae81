#!/usr/bin/env bash
# Start a real two-node Ray cluster on loopback (token auth on), submit jobs/ads_train.py
# through the job API, record ports and status, and stop the cluster it started.
# Usage: ray_two_node.sh BIN_DIR ROOT SPEC TRAIN VAL OUT
# Run under `unshare -n` (tests/test_ray.py does when it can): the namespace has only
# `lo`, so nothing Ray opens can be reached from beyond this machine's loopback.
set -uo pipefail
BIN=$1 ROOT=$2 SPEC=$3 TRAIN=$4 VAL=$5 OUT=$6
ip link set lo up 2>/dev/null || true
export PATH="$BIN:$PATH" RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
PORT=${RAY_TEST_PORT:-6391} DPORT=${RAY_TEST_DASHBOARD_PORT:-8291}
cleanup() { ray stop --force >/dev/null 2>&1 || true; }
trap cleanup EXIT
mkdir -p "$OUT"
ray start --head --node-ip-address=127.0.0.1 --port=$PORT --dashboard-host=127.0.0.1 \
  --dashboard-port=$DPORT --num-cpus=1 --disable-usage-stats >"$OUT/head.log" 2>&1 || { echo "HEAD FAILED"; cat "$OUT/head.log"; exit 3; }
ray start --address=127.0.0.1:$PORT --node-ip-address=127.0.0.1 --num-cpus=1 >"$OUT/worker.log" 2>&1 || { echo "WORKER FAILED"; cat "$OUT/worker.log"; exit 3; }
for _ in $(seq 30); do
  n=$(ray status --address 127.0.0.1:$PORT 2>/dev/null | grep -c "^ 1 node_")
  [ "$n" -ge 2 ] && break
  sleep 1
done
ray status --address 127.0.0.1:$PORT >"$OUT/status.txt" 2>&1
# without the token the job API must refuse
RAY_AUTH_TOKEN= RAY_AUTH_MODE=disabled timeout 60 ray job submit --address http://127.0.0.1:$DPORT --no-wait -- echo hi >"$OUT/noauth.log" 2>&1
echo "noauth_rc=$?" >>"$OUT/noauth.log"
python - "$DPORT" >>"$OUT/noauth.log" 2>&1 <<'PY'
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/jobs/", timeout=10)
    print("http_status=200")
except urllib.error.HTTPError as e:
    print(f"http_status={e.code}")
PY
ss -ltn >"$OUT/ports.txt" 2>&1
# every rank appends the row ids it trained (the spec's first feature is a unique id)
TRACE="{\"env_vars\": {\"ROCKETREC_TRACE_TRAINED_IDS\": \"$OUT/trace\"}}"
JOBS="--address http://127.0.0.1:$DPORT"
# submit NAME ARGS...: through the job API; wait for the job's end by polling its status
# (a log stream can drop under load: the job goes on), then keep its logs and status
submit() {
  local name=$1 id="$1-$$" st="" wd=()
  shift
  if [ "$1" = --working-dir ]; then wd=(--working-dir "$2"); shift 2; fi
  timeout 120 ray job submit $JOBS --submission-id "$id" --no-wait --runtime-env-json "$TRACE" \
    "${wd[@]}" -- "$@" >"$OUT/$name.submit" 2>&1 || { cat "$OUT/$name.submit" >"$OUT/$name.log"; return 1; }
  for _ in $(seq 600); do
    st=$(ray job status $JOBS "$id" 2>&1 | grep -o "succeeded\|failed\|was stopped" | head -1)
    [ -n "$st" ] && break
    sleep 1
  done
  ray job logs $JOBS "$id" >"$OUT/$name.log" 2>&1
  ray job status $JOBS "$id" >>"$OUT/$name.log" 2>&1
  [ "$st" = succeeded ]
}
# the first job runs in Ray's temporary copy of a working directory holding the spec
mkdir -p "$OUT/wd" && cp "$SPEC" "$OUT/wd/"
submit job --working-dir "$OUT/wd" "$BIN/python" "$ROOT/jobs/ads_train.py" \
  --spec "$(basename "$SPEC")" --train "$TRAIN" --val "$VAL" \
  --out "$OUT/run" --workers 2 --batch-size 256 --epochs 1 --max-steps 4 --checkpoint-every 10 \
  --eval-every 10 --log-every 1 \
  --sharding t_user=row_wise,t_ad=column_wise,t_tag=table_wise,t_ctx=data_parallel
rc=$?
cp "$OUT/run/summary.json" "$OUT/summary_2workers.json" 2>/dev/null || true
cp "$OUT/run/config.yaml" "$OUT/config_first.yaml" 2>/dev/null || true
# resume the run in the middle of its epoch at other worker counts, through the job API:
# 2 -> 1 (its settings come from RUN/config.yaml; each table keeps its kind;
# the rows no earlier worker trained are shared by the new ones)
n=1
for spec in "1 0"; do
  set -- $spec
  if [ $rc -eq 0 ]; then
    submit "resume$n" "$BIN/python" "$ROOT/jobs/ads_train.py" --resume "$OUT/run" --workers "$1" \
      --max-steps "$2" --log-every 1 --no-export
    rc=$?
  fi
  n=$((n + 1))
done
ss -ltn >>"$OUT/ports.txt" 2>&1
echo "job_rc=$rc"
exit $rc
