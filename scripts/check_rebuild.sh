#!/usr/bin/env bash
# Fails when an unchanged tree would compile anything again, or when a change
# to the evaluation crate alone would recompile the serving engine.
#
# Run after `cargo build --release --locked -p fusechat` and
# `cargo test --release --locked --workspace --no-run` (scripts/test.sh does
# both, then calls this). A build script that names a file that does not
# exist, or that depends on something outside the crate (the enclosing git
# commit), makes cargo rerun it on every build and recompile everything above
# it; the fingerprint log printed on failure names the culprit.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

log="$(mktemp)"
trap 'rm -f "$log"' EXIT

# compiled COMMAND...: the crates the command compiles, one per line.
compiled() {
  CARGO_LOG=cargo::core::compiler::fingerprint=info "$@" >"$log" 2>&1 || { cat "$log"; return 1; }
  { grep -oE '^ *Compiling [^ ]+' "$log" || true; } | awk '{print $2}' | sort -u
}

fail=0
for cmd in "cargo build --release --locked -p fusechat" \
           "cargo test --release --locked --workspace --no-run"; do
  again="$(compiled $cmd)"
  if [[ -n "$again" ]]; then
    echo "check_rebuild: \`$cmd\` on an unchanged tree compiled: $(echo $again)" >&2
    grep -E 'dirty: ' "$log" | sed -E 's/.*dirty: /  dirty: /' | sort -u | head -20 >&2 || true
    fail=1
  else
    echo "check_rebuild: \`$cmd\` again: nothing compiled"
  fi
done

# A change to trainer/eval alone (its mtime, as an edit or a checkout would
# leave it) rebuilds the crates above it, never mistralrs.
touch trainer/eval/src/lib.rs
after_eval="$(compiled cargo build --release --locked -p fusechat)"
echo "check_rebuild: after touching trainer/eval: compiled $(echo $after_eval)"
unexpected="$(echo "$after_eval" | grep -vxE 'fusechat|fusechat-eval|fusechat-fuse' || true)"
if [[ -n "$unexpected" ]]; then
  echo "check_rebuild: a change to trainer/eval recompiled $(echo $unexpected)" >&2
  grep -E 'dirty: ' "$log" | sed -E 's/.*dirty: /  dirty: /' | sort -u | head -20 >&2 || true
  fail=1
fi
# Leave the test binaries current too, so that the next run (or the test
# step after this one, which would rebuild them anyway) starts from a tree
# with nothing stale.
cargo test --release --locked --workspace --no-run >/dev/null 2>&1
exit $fail
