# Shared by the scripts: caches live outside the clone so fresh clones (CI)
# reuse the build and the models when they are there, and rebuild when not.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fusechat-target}"
export FUSECHAT_HOME="${FUSECHAT_HOME:-$HOME/.cache/fusechat}"
export FUSECHAT_BIN="${FUSECHAT_BIN:-$CARGO_TARGET_DIR/release/fusechat}"
# The prompt pools (GSM8K, MAWPS, ASDiv, MBPP+, AlpacaEval): ../shared/data
# next to the clone; set FUSECHAT_DATA_DIR to use another copy.
if [ -z "${FUSECHAT_DATA_DIR:-}" ]; then
  for candidate in "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/../shared/data" /work/shared/data; do
    if [ -f "$candidate/README.md" ]; then
      FUSECHAT_DATA_DIR="$(cd "$candidate" && pwd)"
      export FUSECHAT_DATA_DIR
      break
    fi
  done
fi
