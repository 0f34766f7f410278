#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the integration tests
# (real registries on loopback, real FUSE mounts). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# Integration tests start registries and mount filesystems; two at a time keeps
# a 2-core machine responsive.
cargo test --all-targets -- --test-threads=2
