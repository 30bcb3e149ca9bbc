#!/bin/bash
# Runs on the GPU machine with .gpucheck/ staged by scripts/cuda_check.sh.
# Finds CUDA 13's cuBLAS, cuRAND and NVRTC (there: PyTorch's wheels), runs
# the check, and writes the whole output to cuda-check.log in $OUT if set.
set -o pipefail
cd "$(dirname "$0")/.."   # the repository root (this file is .gpucheck/run.sh there)
WORK=$(mktemp -d)
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  LIBS=""
  for l in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    p=$(find /opt /usr /root /home -name "$l" 2>/dev/null | head -1)
    echo "$l -> ${p:-not found}"
    [ -n "$p" ] && LIBS="$LIBS:$(dirname "$p")"
  done
  export LD_LIBRARY_PATH="${LIBS#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  timeout 420 .gpucheck/fusechat-cuda-check "$WORK" .gpucheck
} 2>&1 | tee "${OUT:-$WORK}/cuda-check.log"
