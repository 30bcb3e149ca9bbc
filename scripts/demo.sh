#!/usr/bin/env bash
# The main job on the embedded default: fetch the three real models and serve
# them behind the OpenAI API on 127.0.0.1:8080 (Ctrl-C stops).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release --locked -p fusechat
"$FUSECHAT_BIN" models fetch
exec "$FUSECHAT_BIN" serve "$@"
