#!/usr/bin/env bash
# The fusion-data measurement of bench/results/data.md: `fusechat serve`
# (the embedded default, three models, 127.0.0.1:8080), then `fusechat
# sample`, `score` and `pair` with config/data-math100.toml (100
# training-side math prompts, one response per source with the configured
# sampling). Resumable: rerun to continue a stopped run. Prints the sampling
# throughput (runs/data-math100/sample_stats.json) and the pass rates
# (runs/data-math100/report.json); the server is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
CONFIG="${CONFIG:-config/data-math100.toml}"
if curl -sf 127.0.0.1:8080/health >/dev/null 2>&1; then
  echo "something already listens on 127.0.0.1:8080; stop it first" >&2
  exit 1
fi
mkdir -p runs
"$FUSECHAT_BIN" serve > runs/data-serve.log 2>&1 &
SERVER=$!
stop() {
  kill "$SERVER" 2>/dev/null || return 0
  for _ in $(seq 20); do kill -0 "$SERVER" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$SERVER" 2>/dev/null || true
}
trap stop EXIT
for _ in $(seq 600); do
  curl -sf 127.0.0.1:8080/ready >/dev/null 2>&1 && break
  kill -0 $SERVER || { cat runs/data-serve.log; exit 1; }
  sleep 1
done
echo "server ready; load: $(cut -d' ' -f1-3 /proc/loadavg)"
"$FUSECHAT_BIN" sample --config "$CONFIG"
echo "load after sampling: $(cut -d' ' -f1-3 /proc/loadavg)"
"$FUSECHAT_BIN" score --config "$CONFIG"
"$FUSECHAT_BIN" pair --config "$CONFIG"
cat runs/data-math100/sample_stats.json
python3 - <<'PY'
import json
r = json.load(open("runs/data-math100/report.json"))
for src, x in r["domains"]["math"]["sources"].items():
    print(f"{src}: {x['passed']}/{x['checked']} correct ({x['samples']} samples, {x['truncated']} cut, {x['failed_requests']} failed)")
PY

