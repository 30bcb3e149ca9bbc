# Sourced by the CUDA build scripts (scripts/cuda_check.sh, scripts/cuda_serve_build.sh):
# NVIDIA's CUDA 13.0 compiler, headers and libraries from its pip wheels,
# cached in $FUSECHAT_HOME/cuda-13.0, and a link-time stand-in for the driver
# library (the GPU machine's own libcuda.so.1 is used at run time). Sets $C
# (the toolkit root) and $STUB (the folder of the stand-in libcuda.so).
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
# The name a binary linked against it asks the loader for (the checks here
# start the binary; no call reaches the stand-in).
ln -sf libcuda.so "$STUB/libcuda.so.1"

