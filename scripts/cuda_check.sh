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

TK="$FUSECHAT_HOME/cuda-13.0"
C="$TK/nvidia/cu13"
if [ ! -x "$C/bin/nvcc" ] || [ ! -x "$C/nvvm/bin/cicc" ] || [ ! -f "$C/include/crt/host_config.h" ]; then
  echo "==> CUDA 13.0 toolkit wheels into $TK"
  mkdir -p "$TK/wheels"
  python3 -m pip download --no-deps --only-binary=:all: -d "$TK/wheels" \
    --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2010_x86_64 --platform manylinux_2_12_x86_64 \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*"
  for w in "$TK"/wheels/*.whl; do python3 -m zipfile -e "$w" "$TK"; done
  chmod +x "$C"/bin/* "$C"/nvvm/bin/*
fi
for l in libcublas libcublasLt libcudart libcurand libnvrtc; do
  f=$(cd "$C/lib" && ls $l.so.* 2>/dev/null | head -1 || true)
  [ -n "$f" ] || { echo "$l.so.* is missing in $C/lib: remove $TK and rerun" >&2; exit 1; }
  ln -sf "$f" "$C/lib/$l.so"
done
# Link-time stand-in for the driver library (libcuda.so.1 of the GPU machine).
STUB="$TK/stub"
if [ ! -f "$STUB/libcuda.so" ]; then
  mkdir -p "$STUB"
  gcc -E -I"$C/include" "$C/include/cuda.h" | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' \
    | sed 's/[[:space:](]//g' | sort -u | awk '{print "void " $1 "(void){}"}' > "$STUB/stub.c"
  gcc -shared -fPIC -o "$STUB/libcuda.so" "$STUB/stub.c" -Wl,-soname,libcuda.so.1
fi

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
