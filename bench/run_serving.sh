#!/usr/bin/env bash
# Side-by-side serving benchmark: llama.cpp's llama-server and fusechat on the
# same GGUF file, same prompts, same settings, for each of the three models
# (SmolLM2-135M-Instruct Q4_1, Gemma-3-270M Q4_K_M, Qwen2.5-Coder-0.5B-Instruct
# Q4_K_M) or one given file. Each server is started on 127.0.0.1 on a free
# port, benchmarked with serving_bench.py (decode at each concurrency) and
# prefill_bench.py (prompts of about 240 to 2,000 tokens), and stopped; fusechat
# serves the file as a user gives it, `fusechat serve --only --model ID=FILE`
# (no config). Results: bench/results/serving.md (one table per model) and
# bench/results/serving.json, both servers from the same run (a server that
# fails is reported as failed, never replaced by an older result).
#
# Usage: bench/run_serving.sh [--model-file F.gguf --model-id ID]
#                             [--max-tokens N] [--concurrency 1,8,16]
#                             [-- extra serving_bench.py run args]
# Environment:
#   FUSECHAT_BIN          default /root/.cache/fusechat-target/release/fusechat
#   FUSECHAT_ARGS         extra arguments for `fusechat serve`
#   FUSECHAT_READY_TIMEOUT  seconds to wait for GET /ready (default 600)
#   LLAMACPP_ARGS         extra arguments for llama-server
#   LLAMACPP_THREADS      llama-server --threads (default: nproc)
#   LLAMACPP_PARALLEL     llama-server --parallel (default 16)
#   LLAMACPP_CTX          llama-server --ctx-size (default 32768, shared by the slots)
#   BENCH_VENV            python venv with httpx (default /root/.cache/fusechat/bench-venv)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
RESULTS="$HERE/results"

MODELS_DIR="${FUSECHAT_HOME:-/root/.cache/fusechat}/models"
# id=file, in the order of the report.
MODELS=(
  "smollm2=$MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
  "gemma=$MODELS_DIR/gemma-3-270m-q4_k_m.gguf"
  "qwen=$MODELS_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
)
MODEL_FILE=""
MODEL_ID=""
MAX_TOKENS=128
CONCURRENCY="1,8,16"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model-file) MODEL_FILE="$2"; shift 2 ;;
    --model-id) MODEL_ID="$2"; shift 2 ;;
    --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [[ -n "$MODEL_FILE" ]]; then
  MODELS=("${MODEL_ID:-model}=$MODEL_FILE")
fi
for entry in "${MODELS[@]}"; do
  [[ -f "${entry#*=}" ]] || { echo "model file not found: ${entry#*=} (fusechat models fetch)" >&2; exit 1; }
done

FUSECHAT_BIN="${FUSECHAT_BIN:-/root/.cache/fusechat-target/release/fusechat}"
BENCH_VENV="${BENCH_VENV:-/root/.cache/fusechat/bench-venv}"
HOST=127.0.0.1
WORK="$(mktemp -d /tmp/fusechat-serving.XXXXXX)"
mkdir -p "$RESULTS"

log() { echo "[run_serving] $*" >&2; }

# ---- cleanup: every server we start is killed on exit -----------------------
PIDS=()
stop_pid() {
  local pid="$1"
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  log "pid $pid did not stop on SIGTERM, sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  PIDS=()
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

# ---- python env with httpx --------------------------------------------------
if ! "$BENCH_VENV/bin/python" -c "import httpx" 2>/dev/null; then
  log "creating $BENCH_VENV with httpx"
  python3 -m venv "$BENCH_VENV"
  "$BENCH_VENV/bin/python" -m pip install -q "httpx==0.28.1"
fi
PY="$BENCH_VENV/bin/python"

free_port() {
  "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_http PID URL TIMEOUT_S LOGFILE: until URL answers 200 (server up and model loaded)
wait_http() {
  local pid="$1" url="$2" timeout="$3" logf="$4" t0 code
  t0=$(date +%s)
  while true; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "server exited before becoming ready; last log lines:"; tail -n 30 "$logf" >&2; return 1
    fi
    code=$(curl -s -o /dev/null -w '%{http_code}' --noproxy '*' --max-time 2 "$url" || true)
    [[ "$code" == 200 ]] && { log "ready after $(( $(date +%s) - t0 )) s ($url)"; return 0; }
    if (( $(date +%s) - t0 > timeout )); then
      log "not ready after ${timeout}s ($url, last HTTP $code); last log lines:"; tail -n 30 "$logf" >&2; return 1
    fi
    sleep 0.5
  done
}

# run_bench SERVER PORT SERVER_INFO_JSON (for $MODEL_ID, $MODEL_FILE)
run_bench() {
  local server="$1" port="$2" info="$3"
  "$PY" "$HERE/serving_bench.py" run \
    --base-url "http://$HOST:$port/v1" --model "$MODEL_ID" --server "$server" \
    --model-file "$MODEL_FILE" --server-info "$info" \
    --max-tokens "$MAX_TOKENS" --concurrency "$CONCURRENCY" \
    --json-out "$WORK/serving.$MODEL_ID.$server.json" "${EXTRA[@]}" >&2 || return 1
  # Then prompts of 240 to 2,000 tokens, one at a time (prefill).
  "$PY" "$HERE/prefill_bench.py" run \
    --base-url "http://$HOST:$port/v1" --model "$MODEL_ID" --server "$server" \
    --json-out "$WORK/prefill.$MODEL_ID.$server.json" >&2
}

# record_failure SERVER STATUS NOTE: a result file with no levels
record_failure() {
  "$PY" - "$WORK/serving.$MODEL_ID.$1.json" "$1" "$MODEL_ID" "$2" "$3" <<'EOF'
import json, sys, datetime
path, server, model, status, note = sys.argv[1:]
json.dump({"server": server, "model": model, "status": status, "note": note, "levels": [],
           "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
          open(path, "w"), indent=2)
EOF
}

RC=0
LLAMA_SERVER="$(bash "$HERE/llamacpp.sh" | tail -n 1)"
LLAMA_VERSION="$("$LLAMA_SERVER" --version 2>&1 | grep -m1 -i version || true)"

# bench_llamacpp: llama-server on $MODEL_FILE, benchmarked, stopped.
bench_llamacpp() {
  local port threads largs lpid info
  port=$(free_port)
  threads="${LLAMACPP_THREADS:-$(nproc)}"
  # --parallel N slots with continuous batching so N requests decode together;
  # --ctx-size is shared by the slots (32768 / 16 = 2048 tokens per request,
  # room for the longest prefill_bench.py prompt).
  largs=(-m "$MODEL_FILE" --host "$HOST" --port "$port" --alias "$MODEL_ID"
         --parallel "${LLAMACPP_PARALLEL:-16}" --cont-batching --ctx-size "${LLAMACPP_CTX:-32768}"
         --threads "$threads" --threads-batch "$threads")
  # shellcheck disable=SC2206
  if [[ -n "${LLAMACPP_ARGS:-}" ]]; then largs+=(${LLAMACPP_ARGS}); fi
  log "starting llama-server on $HOST:$port: ${largs[*]}"
  "$LLAMA_SERVER" "${largs[@]}" > "$WORK/llamacpp.$MODEL_ID.log" 2>&1 &
  lpid=$!; PIDS+=("$lpid")
  if wait_http "$lpid" "http://$HOST:$port/health" 300 "$WORK/llamacpp.$MODEL_ID.log"; then
    info=$("$PY" -c 'import json,sys; print(json.dumps({"binary": sys.argv[1], "version": sys.argv[2], "args": sys.argv[3:]}))' \
      "$LLAMA_SERVER" "$LLAMA_VERSION" "${largs[@]}")
    run_bench llamacpp "$port" "$info" || { RC=1; log "llama.cpp benchmark failed"; }
  else
    record_failure llamacpp failed "llama-server did not become ready"; RC=1
  fi
  cp "$WORK/llamacpp.$MODEL_ID.log" "$RESULTS/serving.llamacpp.$MODEL_ID.log" 2>/dev/null || true
  stop_pid "$lpid"
}

# bench_fusechat: `fusechat serve --only --model $MODEL_ID=$MODEL_FILE`, benchmarked, stopped.
bench_fusechat() {
  local port fargs fpid fversion info
  if [[ ! -x "$FUSECHAT_BIN" ]]; then
    log "fusechat binary not found at $FUSECHAT_BIN (set FUSECHAT_BIN)"
    record_failure fusechat failed "binary not found at $FUSECHAT_BIN"; RC=1
    return
  fi
  port=$(free_port)
  # The GGUF file as a user gives it, under llama.cpp's id; the model's
  # defaults (up to 16 sequences decode together, as llama.cpp's 16 slots).
  # shellcheck disable=SC2206
  fargs=(serve --only --model "$MODEL_ID=$MODEL_FILE" --host "$HOST" --port "$port" ${FUSECHAT_ARGS:-})
  log "starting fusechat on $HOST:$port: ${fargs[*]}"
  "$FUSECHAT_BIN" "${fargs[@]}" > "$WORK/fusechat.$MODEL_ID.log" 2>&1 &
  fpid=$!; PIDS+=("$fpid")
  if wait_http "$fpid" "http://$HOST:$port/ready" "${FUSECHAT_READY_TIMEOUT:-600}" "$WORK/fusechat.$MODEL_ID.log"; then
    fversion="$("$FUSECHAT_BIN" --version 2>/dev/null | head -n1 || true)"
    info=$("$PY" -c 'import json,sys; print(json.dumps({"binary": sys.argv[1], "version": sys.argv[2], "args": sys.argv[3:]}))' \
      "$FUSECHAT_BIN" "$fversion" "${fargs[@]}")
    run_bench fusechat "$port" "$info" || { RC=1; log "fusechat benchmark failed"; }
  else
    record_failure fusechat failed "server did not become ready (see bench/results/serving.fusechat.$MODEL_ID.log)"; RC=1
  fi
  cp "$WORK/fusechat.$MODEL_ID.log" "$RESULTS/serving.fusechat.$MODEL_ID.log" 2>/dev/null || true
  stop_pid "$fpid"
}

for entry in "${MODELS[@]}"; do
  MODEL_ID="${entry%%=*}"
  MODEL_FILE="${entry#*=}"
  bench_llamacpp
  bench_fusechat
done

# ---- report ------------------------------------------------------------------------
COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "none (no commit yet)")"
if [[ -n "$(git -C "$REPO" status --porcelain 2>/dev/null | grep -v '^?? bench/results/' || true)" ]]; then
  COMMIT="$COMMIT (working tree has uncommitted changes)"
fi
MACHINE=$("$PY" - "$COMMIT" <<'EOF'
import json, os, platform, sys, datetime
cpu = "unknown"
for line in open("/proc/cpuinfo"):
    if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip(); break
flags = ""
for line in open("/proc/cpuinfo"):
    if line.startswith("flags"):
        fl = line.split(":", 1)[1].split()
        flags = " ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile") if f in fl); break
mem = "?"
for line in open("/proc/meminfo"):
    if line.startswith("MemTotal"):
        mem = f"{int(line.split()[1]) / 1048576:.1f} GiB"; break
print(json.dumps({
    "cpu": cpu, "cores": os.cpu_count(), "cpu flags (subset)": flags, "memory": mem,
    "kernel": platform.release(),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "commit": sys.argv[1],
    "load average at report time": " ".join(f"{x:.2f}" for x in os.getloadavg()),
}))
EOF
)
INPUTS=()
PREFILL=()
for entry in "${MODELS[@]}"; do
  for s in llamacpp fusechat; do
    f="$WORK/serving.${entry%%=*}.$s.json"; [[ -f "$f" ]] && INPUTS+=("$f")
    f="$WORK/prefill.${entry%%=*}.$s.json"; [[ -f "$f" ]] && PREFILL+=("$f")
  done
done
NOTE="Same GGUF, prompts and settings against each server's OpenAI-compatible /v1/chat/completions (streaming), \
over HTTP on 127.0.0.1. Generated by bench/run_serving.sh; see bench/README.md for what the numbers mean, the earlier runs and what holds fusechat back. \
Both servers were measured one after the other in this one run (started_at and the load average before each level are in serving.json)."
"$PY" "$HERE/serving_bench.py" report "${INPUTS[@]}" --machine "$MACHINE" --note "$NOTE" \
  --json-out "$RESULTS/serving.json" --md-out "$RESULTS/serving.md" > /dev/null
if (( ${#PREFILL[@]} )); then
  "$PY" "$HERE/prefill_bench.py" report "${PREFILL[@]}" \
    --json-out "$RESULTS/prefill.json" --md-out "$WORK/prefill.md" --into "$RESULTS/serving.md" > /dev/null
fi
cat "$RESULTS/serving.md"
rm -rf "$WORK"
exit $RC
