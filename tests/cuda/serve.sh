#!/usr/bin/env bash
# The server's GPU check, one script for a lent GPU machine:
#   1. the binary: $FUSECHAT_BIN if given (scripts/cuda_serve_build.sh builds
#      one with CUDA), else `cargo build --release --features cuda`;
#   2. the batching and OpenAI tests (tests/python/test_batching.py,
#      test_openai_api.py) against that binary: their servers load the three
#      models with no placement given, so a CUDA build puts them on cuda:0
#      behind the paged KV cache;
#   3. decode throughput at concurrency 1, 16 and 64 (bench/serving_bench.py),
#      fusechat and vLLM in turn on the same weights (the GGUF files imported
#      to float folders, served in bf16 by both), one table;
#   4. `fusechat fuse --config config/fuse-gpu.toml` end to end, timed.
# With no GPU (`--cpu`, or no nvidia-smi) it runs the same steps on the CPU
# build as far as a CPU allows: the tests as they are, the benchmark on the
# GGUF files with fewer tokens and no vLLM (it needs a GPU), and
# config/fuse-gpu.toml shrunk (4 prompts a pool, one answer each, two for
# math so that DPO finds pairs, answers of at most 320 tokens, 3 evaluation
# prompts a benchmark) so that it ends in minutes.
#
# Needs the three model files in $FUSECHAT_HOME/models (`fusechat models
# fetch`), Python with pytest, httpx, openai and prometheus_client, and for
# the vLLM rows `vllm` importable. Writes serve-check.log, decode.md,
# decode.json and fuse-report.md to $OUT (the device tool's folder) or
# bench/results/gpu-serve/; ends with "SERVE CHECK: PASS" or names the steps
# that failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
GIVEN_BIN="${FUSECHAT_BIN:-}"   # scripts/env.sh names the CPU build's path otherwise
source scripts/env.sh
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 || MODE=cpu
RESULTS="${OUT:-$REPO/bench/results/gpu-serve}"
mkdir -p "$RESULTS"
WORK=$(mktemp -d /tmp/fusechat-serve-check.XXXXXX)
exec > >(tee "$RESULTS/serve-check.log") 2>&1
FAILED=()
step() { printf '\n==> %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
fail() { echo "FAILED: $*"; FAILED+=("$*"); }
verdict() {
  if [ ${#FAILED[@]} -eq 0 ]; then echo "SERVE CHECK: PASS ($MODE)"; return 0; fi
  printf 'SERVE CHECK: FAIL (%s): %s\n' "$MODE" "$(IFS=';'; echo "${FAILED[*]}")"
  return 1
}
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; PIDS=(); }
trap cleanup EXIT

step "machine ($MODE)"
uname -a; nproc
[ "$MODE" = gpu ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

step "binary"
if [ -n "$GIVEN_BIN" ]; then
  FUSECHAT_BIN="$GIVEN_BIN"
  echo "given: $FUSECHAT_BIN"
elif [ "$MODE" = gpu ]; then
  export CARGO_TARGET_DIR="$CARGO_TARGET_DIR-cuda"
  cargo build --release --locked -p fusechat --features cuda || { fail "cuda build"; verdict; exit 1; }
  FUSECHAT_BIN="$CARGO_TARGET_DIR/release/fusechat"
else
  cargo build --release --locked -p fusechat || { fail "build"; verdict; exit 1; }
  FUSECHAT_BIN="$CARGO_TARGET_DIR/release/fusechat"
fi
export FUSECHAT_BIN
if [ "$MODE" = gpu ]; then
  # CUDA's libraries where the image keeps them (PyTorch's wheels).
  for l in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    p=$(find /usr/local/cuda* /opt /usr/lib -name "$l" 2>/dev/null | head -1)
    [ -n "$p" ] && export LD_LIBRARY_PATH="$(dirname "$p")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
fi
"$FUSECHAT_BIN" --version || { fail "the binary does not start"; verdict; exit 1; }
M="$FUSECHAT_HOME/models"
MODELS=(
  "smollm2-135m-instruct=SmolLM2-135M-Instruct.Q4_1.gguf"
  "gemma-3-270m=gemma-3-270m-q4_k_m.gguf"
  "qwen2.5-coder-0.5b-instruct=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
)
for m in "${MODELS[@]}"; do
  [ -f "$M/${m#*=}" ] || { fail "$M/${m#*=} is missing (fusechat models fetch)"; verdict; exit 1; }
done

step "batched answers equal lone answers; the OpenAI API (pytest)"
# test_batching.py also serves SmolLM2's float folder, imported as scripts/test.sh does.
export FUSECHAT_IMPORTED_DIR="${FUSECHAT_IMPORTED_DIR:-$FUSECHAT_HOME/test-imported}"
if [ ! -f "$FUSECHAT_IMPORTED_DIR/smollm2-135m-instruct/model.safetensors" ]; then
  "$FUSECHAT_BIN" import "$M/SmolLM2-135M-Instruct.Q4_1.gguf" "$FUSECHAT_IMPORTED_DIR/smollm2-135m-instruct" \
    || fail "import SmolLM2 for test_batching.py"
fi
python3 -m pytest -q -p no:cacheprovider tests/python/test_batching.py tests/python/test_openai_api.py \
  || fail "tests/python/test_batching.py or test_openai_api.py"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() {  # PID URL LOG
  for _ in $(seq 1 1200); do
    kill -0 "$1" 2>/dev/null || { tail -30 "$3"; return 1; }
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$2")" = 200 ] && return 0
    sleep 0.5
  done
  tail -30 "$3"; return 1
}

step "decode throughput at concurrency 1, 16, 64"
if [ "$MODE" = gpu ]; then TOKENS=256; ROUNDS=2; else TOKENS=32; ROUNDS=1; fi
bench() {  # SERVER PORT MODEL WEIGHTS
  python3 bench/serving_bench.py run --base-url "http://127.0.0.1:$2/v1" --model "$3" --server "$1" \
    --model-file "$4" --concurrency 1,16,64 --max-tokens "$TOKENS" --rounds "$ROUNDS" \
    --json-out "$WORK/decode.$3.$1.json"
}
for m in "${MODELS[@]}"; do
  id="${m%%=*}"; gguf="$M/${m#*=}"; weights="$gguf"
  if [ "$MODE" = gpu ]; then
    # The same float weights for both servers: the GGUF imported once.
    weights="$WORK/$id"
    "$FUSECHAT_BIN" import "$gguf" "$weights" >/dev/null || { fail "import $id"; continue; }
  fi
  port=$(free_port)
  "$FUSECHAT_BIN" serve --only --model "$id=$weights" --host 127.0.0.1 --port "$port" \
    >"$WORK/fusechat.$id.log" 2>&1 & PIDS+=($!)
  if wait_ready $! "http://127.0.0.1:$port/ready" "$WORK/fusechat.$id.log"; then
    grep -m1 'placement' "$WORK/fusechat.$id.log" || true
    bench fusechat "$port" "$id" "$weights" || fail "fusechat decode benchmark, $id"
  else
    fail "fusechat serve $id"
  fi
  cleanup
  if [ "$MODE" = gpu ] && python3 -c "import vllm" 2>/dev/null; then
    port=$(free_port)
    python3 -m vllm.entrypoints.openai.api_server --model "$weights" --served-model-name "$id" \
      --host 127.0.0.1 --port "$port" --dtype bfloat16 --max-num-seqs 64 --gpu-memory-utilization 0.5 \
      >"$WORK/vllm.$id.log" 2>&1 & PIDS+=($!)
    if wait_ready $! "http://127.0.0.1:$port/v1/models" "$WORK/vllm.$id.log"; then
      bench vllm "$port" "$id" "$weights" || fail "vLLM decode benchmark, $id"
    else
      fail "vllm serve $id"
    fi
    cleanup
  elif [ "$MODE" = gpu ]; then
    fail "vLLM is not importable: the GPU check compares with it (pip install vllm, or carry its wheels)"
  else
    echo "vLLM: not run for $id (it needs a GPU)"
  fi
done
python3 bench/serving_bench.py report "$WORK"/decode.*.json --json-out "$RESULTS/decode.json" --md-out "$RESULTS/decode.md" \
  --note "tests/cuda/serve.sh, $MODE, $TOKENS tokens per answer" && cat "$RESULTS/decode.md" \
  || fail "decode report"

step "fusechat fuse --config config/fuse-gpu.toml"
FUSE_CONFIG="$REPO/config/fuse-gpu.toml"
if [ "$MODE" = cpu ]; then
  # The GPU recipe at a CPU's size: every pool, source and stage, few prompts.
  FUSE_CONFIG="$WORK/fuse-gpu-cpu-check.toml"
  python3 - "$REPO/config/fuse-gpu.toml" "$FUSE_CONFIG" <<'EOF'
import re, sys
from pathlib import Path
config = Path(sys.argv[1]).parent
text = open(sys.argv[1]).read()
# Paths the config gives relative to its own folder.
text = text.replace('config = "serve-gpu.toml"', f'config = "{config / "serve-gpu.toml"}"')
text = text.replace('data_dir = "../data"', f'data_dir = "{config.parent / "data"}"')
# Each rule must still match the config it shrinks (pools, sampling and
# evaluation answers, evaluation sizes, SFT epochs).
for pattern, repl, least in [
    (r"(?m)^limit = \d+\b", "limit = 4", 5),
    (r"(?m)^n = \{[^}]*\}", "n = { instruction = 1, math = 2, code = 1 }", 1),
    (r"(?m)^max_tokens = 768\b", "max_tokens = 320", 2),
    (r"(?m)^(gsm8k|mawps|asdiv|mbpp_plus|alpaca_eval) = \d+\b", r"\1 = 3", 5),
    (r"(?m)^epochs = 3\b", "epochs = 1", 1),
]:
    text, count = re.subn(pattern, repl, text)
    assert count >= least, f"config/fuse-gpu.toml changed: `{pattern}` matched {count} times, not {least}"
assert str(config / "serve-gpu.toml") in text and str(config.parent / "data") in text, "its paths changed"
open(sys.argv[2], "w").write(text)
EOF
fi
start=$(date +%s)
"$FUSECHAT_BIN" fuse --config "$FUSE_CONFIG" --output "$WORK/fuse" || fail "fusechat fuse"
echo "fuse wall time: $(( $(date +%s) - start )) s"
cp "$WORK/fuse/report.md" "$RESULTS/fuse-report.md" 2>/dev/null || fail "no fuse report"

verdict
