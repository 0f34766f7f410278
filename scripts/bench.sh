#!/usr/bin/env bash
# Benchmarks: installs what they need, builds rimg in release mode, builds (once,
# cached) a 3-layer Debian + Python image, pushes it to a local registry, and
# prints a table of rimg against baselines measured in the same run, then the
# range-lazy case: a cold `cat` of one file of the image as gzip, eStargz and
# zstd:chunked (converted once by ctr-remote and skopeo, kept beside the image)
# through a 20 MB/s proxy. `scripts/bench.sh range-lazy` runs only that case.
# `scripts/bench.sh gzindex` runs only the published-gzip-index case (issue 13).
# `scripts/bench.sh read-everything` runs only the cold read of every file,
# range-lazy vs whole layers, and `scripts/bench.sh idle-mounts` only the
# memory and threads of idle mounts (issue 28; scripts/bench_scan.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
command -v debootstrap >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; }
cargo build --release
exec python3 scripts/bench.py "$@"
