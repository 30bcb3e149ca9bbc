#!/bin/bash
# Runs on the GPU machine, from the repository root, with .gpucheck/ staged
# by scripts/cuda_check.sh. Finds CUDA 13's cuBLAS, cuRAND and NVRTC (here:
# PyTorch's wheels), runs the check, and writes its log to $OUT if set.
set -o pipefail
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
LIBS=""
for l in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  p=$(find /opt /usr/local /usr/lib -name "$l" 2>/dev/null | head -1)
  echo "$l -> ${p:-not found}"
  [ -n "$p" ] && LIBS="$LIBS:$(dirname "$p")"
done
export LD_LIBRARY_PATH="${LIBS#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
WORK=$(mktemp -d)
timeout 420 .gpucheck/fusechat-cuda-check "$WORK" .gpucheck 2>&1 | tee "${OUT:-$WORK}/cuda-check.log"
