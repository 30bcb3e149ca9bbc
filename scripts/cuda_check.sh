#!/usr/bin/env bash
# Builds the trainer's CUDA check (tests/cuda) on this machine, which needs no
# GPU, and stages it in .gpucheck/ for a machine that has one:
#   bash scripts/cuda_check.sh            # here: toolkit from pip, build, stage
#   bash .gpucheck/run.sh                 # there: prints CUDA CHECK: PASS|FAIL
# The CUDA 13.0 compiler, headers and libraries come from NVIDIA's pip wheels
# (cached in $FUSECHAT_HOME/cuda-13.0); the driver library is linked against
# a stub made from cuda.h, and the GPU machine's own libcuda is used at run
# time. CUDA_COMPUTE_CAP (default 90: H100/H200) picks the kernels' target.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

source scripts/cuda_toolkit.sh   # $C: the toolkit, $STUB: the driver stand-in

echo "==> building tests/cuda"
(
  cd tests/cuda
  PATH="$C/bin:$PATH" CUDA_ROOT="$C" CUDA_PATH="$C" CUDA_HOME="$C" \
    CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" LIBRARY_PATH="$C/lib:$STUB" \
    cargo build --release --locked
)

echo "==> staging .gpucheck/"
TOKDIR=$(ls -d "$FUSECHAT_HOME"/imported/SmolLM2-135M-Instruct.Q4_1-* 2>/dev/null | head -1 || true)
if [ -z "$TOKDIR" ] || [ ! -f "$TOKDIR/tokenizer.json" ]; then
  TOKDIR="$FUSECHAT_HOME/imported/cuda-check-smollm2"
  [ -x "$FUSECHAT_BIN" ] || cargo build --release --locked -p fusechat
  "$FUSECHAT_BIN" models fetch >/dev/null
  "$FUSECHAT_BIN" import "$FUSECHAT_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf" "$TOKDIR"
fi
rm -rf .gpucheck && mkdir -p .gpucheck
cp "$CARGO_TARGET_DIR/release/fusechat-cuda-check" .gpucheck/
strip .gpucheck/fusechat-cuda-check
cp "$TOKDIR/tokenizer.json" "$TOKDIR/tokenizer_config.json" .gpucheck/
cp tests/cuda/run.sh .gpucheck/run.sh
du -sh .gpucheck
