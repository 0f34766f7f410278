#!/usr/bin/env bash
# Installs rimg's manual pages and shell completions, generated from the
# binary itself (`rimg man`, `rimg completions`). PREFIX defaults to
# /usr/local; RIMG names the binary (default: rimg on PATH, else a release build).
#   scripts/install-docs.sh [PREFIX]
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:-/usr/local}
rimg=${RIMG:-$(command -v rimg || true)}
if [ -z "$rimg" ]; then
  cargo build --release
  rimg=${CARGO_TARGET_DIR:-$PWD/target}/release/rimg
fi
"$rimg" man --dir "$prefix/share/man/man1"
install -d "$prefix/share/bash-completion/completions" "$prefix/share/zsh/site-functions" \
  "$prefix/share/fish/vendor_completions.d"
"$rimg" completions bash >"$prefix/share/bash-completion/completions/rimg"
"$rimg" completions zsh >"$prefix/share/zsh/site-functions/_rimg"
"$rimg" completions fish >"$prefix/share/fish/vendor_completions.d/rimg.fish"
echo "installed rimg's manual pages and completions under $prefix"
