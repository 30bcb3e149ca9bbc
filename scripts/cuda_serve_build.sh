#!/usr/bin/env bash
# Builds the whole fusechat binary with CUDA on this machine, which needs no
# GPU, and checks what a CPU can check of it:
#   bash scripts/cuda_serve_build.sh                       # --features cuda
#   FEATURES="cuda flash-attn" bash scripts/cuda_serve_build.sh   # or nccl
# The CUDA toolkit comes from NVIDIA's pip wheels (scripts/cuda_toolkit.sh);
# CUDA_COMPUTE_CAP (default 90: H100/H200) picks the kernels' target. The
# build has a target folder of its own ($CARGO_TARGET_DIR-cuda), so the CPU
# build stays warm. Run with the stand-in driver library, which no check
# here calls into, the binary must start, print the OpenAPI document the
# CPU build checks in (openapi/openapi.json), and accept
# config/serve-gpu.toml with each model on cuda:0 behind a paged KV cache.
# Ends with "CUDA BUILD CHECK: PASS" or the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source scripts/cuda_toolkit.sh   # $C: the toolkit, $STUB: the driver stand-in

FEATURES="${FEATURES:-cuda}"
export CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-$CARGO_TARGET_DIR-cuda}"
echo "==> cargo build --release --locked -p fusechat --features \"$FEATURES\" (into $CARGO_TARGET_DIR)"
start=$(date +%s)
PATH="$C/bin:$PATH" CUDA_ROOT="$C" CUDA_PATH="$C" CUDA_HOME="$C" \
  CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" LIBRARY_PATH="$C/lib:$STUB" \
  cargo build --release --locked -p fusechat --features "$FEATURES"
echo "==> built in $(( $(date +%s) - start )) s"

BIN="$CARGO_TARGET_DIR/release/fusechat"
run() { LD_LIBRARY_PATH="$C/lib:$STUB" "$BIN" "$@"; }
echo "==> the binary links CUDA"
LD_LIBRARY_PATH="$C/lib:$STUB" ldd "$BIN" | grep -E "libcuda|libcublas|libcudart" || { echo "CUDA BUILD CHECK: FAIL (no CUDA library linked)"; exit 1; }
run --version
echo "==> OpenAPI document"
run openapi | diff -q - openapi/openapi.json \
  || { echo "CUDA BUILD CHECK: FAIL (the OpenAPI document differs from the CPU build's)"; exit 1; }
echo "==> config/serve-gpu.toml"
out=$(run serve --config config/serve-gpu.toml --check-config)
echo "$out"
for id in smollm2-135m-instruct gemma-3-270m qwen2.5-coder-0.5b-instruct; do
  grep -qF "$id (cuda:0, paged KV cache" <<<"$out" \
    || { echo "CUDA BUILD CHECK: FAIL ($id is not placed on cuda:0 with a paged KV cache)"; exit 1; }
done
echo "CUDA BUILD CHECK: PASS"
