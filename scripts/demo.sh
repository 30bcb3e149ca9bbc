#!/usr/bin/env bash
# The main job on the embedded default (config/fuse-tiny.toml): fetch the
# three real models, then `fusechat fuse`: serve them on 127.0.0.1:8080
# (or use the server already there), sample every source, score, pair, SFT
# and DPO SmolLM2-135M, hot-swap it under the alias `target`, evaluate the
# base, SFT and fused targets, and write runs/fuse-tiny/report.md (40-60 minutes
# on 2 CPU cores, bench/results/fuse-tiny.md; rerun to resume). Extra arguments go to `fusechat fuse`
# (e.g. `--config config/fuse-gpu.toml`). To only serve: `fusechat serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release --locked -p fusechat
"$FUSECHAT_BIN" models fetch
exec "$FUSECHAT_BIN" fuse "$@"
