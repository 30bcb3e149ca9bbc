# Shared by the scripts: caches live outside the clone so fresh clones (CI)
# reuse the build and the models when they are there, and rebuild when not.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fusechat-target}"
export FUSECHAT_HOME="${FUSECHAT_HOME:-$HOME/.cache/fusechat}"
export FUSECHAT_BIN="${FUSECHAT_BIN:-$CARGO_TARGET_DIR/release/fusechat}"
# The prompt pools (GSM8K, MAWPS, ASDiv, MBPP+, AlpacaEval, Arena-Hard) ship
# in data/ (data/README.md); the configs find them there. FUSECHAT_DATA_DIR
# is only for a config whose relative data_dir does not exist.
