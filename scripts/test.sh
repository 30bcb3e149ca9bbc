#!/usr/bin/env bash
# Every test: Rust unit and integration tests (the import checked on the real
# models), transformers loading the imported folders, then the real server
# with the real models driven by clients nobody here wrote (openai, curl).
# Installs what it needs; reuses the build and model caches outside the clone.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi
step() { printf '\n==> %s\n' "$*"; }
step "Prometheus and promtool (Debian's package, unpacked: no service started)"
# tests/python/test_prometheus.py runs the real Prometheus against the server.
PROM_DIR="$FUSECHAT_HOME/tools/prometheus"
if [ ! -x "$PROM_DIR/usr/bin/prometheus" ]; then
  deb_dir=$(mktemp -d)
  (cd "$deb_dir" && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; })
  mkdir -p "$PROM_DIR" && dpkg-deb -x "$deb_dir"/prometheus_*.deb "$PROM_DIR"
  rm -rf "$deb_dir"
fi
export PATH="$PROM_DIR/usr/bin:$PATH"
command -v kubectl >/dev/null || echo "note: kubectl is missing: tests/python/test_k8s.py needs it to render k8s/ with kustomize"
step "Python packages (openai, pytest, transformers, ...)"
python3 -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt

step "the shipped prompt pools are the published files (data/SHA256SUMS)"
(cd data && sha256sum --check --quiet SHA256SUMS)
step "build (release; target dir $CARGO_TARGET_DIR)"
# One profile and one feature set for the binary and the tests: every crate
# is compiled once.
cargo build --release --locked -p fusechat
cargo test --release --locked --workspace --no-run
step "an unchanged tree builds without compiling (scripts/check_rebuild.sh)"
bash scripts/check_rebuild.sh
step "vendor/ is upstream + the listed patches (scripts/check_vendor.sh)"
bash scripts/check_vendor.sh
step "models"
"$FUSECHAT_BIN" models fetch
step "Rust tests"
export FUSECHAT_IMPORTED_DIR="${FUSECHAT_IMPORTED_DIR:-$FUSECHAT_HOME/test-imported}"
mkdir -p "$FUSECHAT_IMPORTED_DIR"
# The trainer's tests read the imported folders; the import test rewrites them.
for pair in smollm2-135m-instruct:SmolLM2-135M-Instruct.Q4_1.gguf \
            gemma-3-270m:gemma-3-270m-q4_k_m.gguf \
            qwen2.5-coder-0.5b-instruct:qwen2.5-coder-0.5b-instruct-q4_k_m.gguf; do
  name="${pair%%:*}"; file="${pair#*:}"
  if [ ! -f "$FUSECHAT_IMPORTED_DIR/$name/model.safetensors" ]; then
    rm -rf "$FUSECHAT_IMPORTED_DIR/$name"
    "$FUSECHAT_BIN" import "$FUSECHAT_HOME/models/$file" "$FUSECHAT_IMPORTED_DIR/$name"
  fi
done
cargo test --release --locked --workspace -- --test-threads 1
step "alpaca-eval in its own venv (tests/python/test_alpaca_eval.py)"
export FUSECHAT_ALPACA_VENV="${FUSECHAT_ALPACA_VENV:-$FUSECHAT_HOME/alpaca-venv}"
if [ ! -x "$FUSECHAT_ALPACA_VENV/bin/alpaca_eval" ]; then
  python3 -m venv "$FUSECHAT_ALPACA_VENV"
  "$FUSECHAT_ALPACA_VENV/bin/pip" install -q --disable-pip-version-check alpaca-eval==0.6.6
fi
step "lm-evaluation-harness in its own venv (tests/python/test_lm_eval.py)"
export FUSECHAT_LMEVAL_VENV="${FUSECHAT_LMEVAL_VENV:-$FUSECHAT_HOME/lmeval-venv}"
if [ ! -x "$FUSECHAT_LMEVAL_VENV/bin/lm_eval" ]; then
  # System site packages: torch and transformers are not installed twice.
  python3 -m venv --system-site-packages "$FUSECHAT_LMEVAL_VENV"
  "$FUSECHAT_LMEVAL_VENV/bin/pip" install -q --disable-pip-version-check "lm-eval[api]==0.4.13"
fi
step "transformers on the imported folders, the server with openai and curl"
python3 -m pytest -q -p no:cacheprovider tests/python "$@"
