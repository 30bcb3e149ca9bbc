#!/usr/bin/env bash
# The vendored crates are their published upstream plus the changes listed in
# vendor/README.md. This recomputes that: it fetches the pristine crates from
# crates.io (checksummed, cached under $FUSECHAT_HOME/vendor-pristine), diffs
# each against vendor/<crate>/, and fails when
#   - the diff differs from the committed patch vendor/<crate>.patch (a
#     vendored file changed without its patch being refreshed), or
#   - a changed file is not named in vendor/README.md, or the README names a
#     file of the crate that is no longer changed.
# `scripts/check_vendor.sh --update` rewrites the patches from the tree; the
# README is always edited by hand (each change with its reason).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

declare -A VERSION=(
  [candle-core]=0.10.2
  [mistralrs-core]=0.8.1
  [mistralrs-quant]=0.8.1
)
declare -A SHA256=(
  [candle-core]=6bd9895436c1ba5dc1037a19935d084b838db066ff4e15ef7dded020b7c12a4a
  [mistralrs-core]=a2b8b9e5c94491d9ceeded3a30291cb6af6ae74810a5776dd55e3bbb8b3429d4
  [mistralrs-quant]=980715493d252e9aaf0779c4c101576d67ef4dd9812bfd77a54987f6f17526f4
)
update=false
[[ "${1:-}" == "--update" ]] && update=true

cache="$FUSECHAT_HOME/vendor-pristine"
mkdir -p "$cache"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
status=0

for crate in candle-core mistralrs-core mistralrs-quant; do
  version="${VERSION[$crate]}"
  archive="$cache/$crate-$version.crate"
  if [[ ! -f "$archive" ]] || ! echo "${SHA256[$crate]}  $archive" | sha256sum -c --status; then
    curl -sSfL --retry 3 -o "$archive.part" "https://static.crates.io/crates/$crate/$version/download"
    mv "$archive.part" "$archive"
  fi
  echo "${SHA256[$crate]}  $archive" | sha256sum -c --status \
    || { echo "check_vendor: $archive does not have the pinned sha256" >&2; exit 1; }

  # Same layout on both sides: upstream/ and fusechat/ in one folder, only the
  # files git tracks on our side (builds leave nothing in vendor/, but be sure).
  mkdir -p "$work/$crate/upstream" "$work/$crate/fusechat"
  tar xzf "$archive" -C "$work/$crate/upstream" --strip-components=1
  rm -f "$work/$crate/upstream/Cargo.lock" "$work/$crate/upstream/.cargo_vcs_info.json" \
        "$work/$crate/upstream/Cargo.toml.orig"
  git ls-files -z "vendor/$crate" | while IFS= read -r -d '' f; do
    rel="${f#vendor/$crate/}"
    mkdir -p "$work/$crate/fusechat/$(dirname "$rel")"
    cp "$f" "$work/$crate/fusechat/$rel"
  done
  rm -f "$work/$crate/fusechat/.cargo-ok" "$work/$crate/fusechat/Cargo.toml.orig" \
        "$work/$crate/fusechat/.cargo_vcs_info.json"
  # Pinned diff settings, so that nobody's git config changes the patch text;
  # exit 1 means "differs", anything above is an error.
  rc=0
  (cd "$work/$crate" && git -c diff.context=3 -c diff.interHunkContext=0 -c diff.suppressBlankEmpty=false \
     diff --no-index --no-color --no-ext-diff --no-textconv --no-renames --diff-algorithm=myers \
     --src-prefix=a/ --dst-prefix=b/ upstream fusechat > "$work/$crate.patch") || rc=$?
  if (( rc > 1 )); then
    echo "check_vendor: git diff failed (exit $rc) on $crate" >&2
    exit 1
  fi
  # upstream/x and fusechat/x -> x, so the patch applies with -p1 inside the crate.
  sed -i -E -e '/^(diff --git|--- |\+\+\+ )/s#([ab])/(upstream|fusechat)/#\1/#g' "$work/$crate.patch"

  committed="vendor/$crate.patch"
  if $update; then
    cp "$work/$crate.patch" "$committed"
    echo "check_vendor: wrote $committed ($(grep -c '^diff --git' "$committed") files)"
  elif ! cmp -s "$work/$crate.patch" "$committed"; then
    echo "check_vendor: vendor/$crate differs from pristine $crate $version + $committed:" >&2
    diff -u "$committed" "$work/$crate.patch" | head -n 40 >&2 || true
    echo "check_vendor: describe the change in vendor/README.md, then run scripts/check_vendor.sh --update" >&2
    status=1
  fi

  # Every changed file named in the crate's section of vendor/README.md, and
  # every file named there changed.
  section="$(awk -v c="## $crate " 'index($0, c) == 1 {on = 1; next} /^## / {on = 0} on' vendor/README.md)"
  changed="$(sed -n 's#^diff --git a/\(.*\) b/.*#\1#p' "$work/$crate.patch" | sort -u)"
  while IFS= read -r f; do
    [[ -z "$f" ]] && continue
    grep -qF "\`$f\`" <<<"$section" || grep -qF "\`$f\`," <<<"$section" || {
      echo "check_vendor: vendor/$crate/$f is changed but vendor/README.md (## $crate) does not name \`$f\`" >&2
      status=1
    }
  done <<<"$changed"
  for f in $(grep -o '`\(src/[^` ]*\.rs\|build\.rs\|Cargo\.toml\)`' <<<"$section" | tr -d '`' | sort -u); do
    grep -qxF "$f" <<<"$changed" || {
      echo "check_vendor: vendor/README.md (## $crate) names \`$f\`, which is not changed" >&2
      status=1
    }
  done
done

[[ $status -eq 0 ]] && ! $update && echo "check_vendor: vendor/ is pristine upstream + the committed patches, each file listed in vendor/README.md"
exit $status
