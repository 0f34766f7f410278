#!/usr/bin/env bash
# Installs what rimg's demo, tests and benchmarks need from Debian: FUSE, a
# registry (CNCF distribution), skopeo and umoci as reference tools, podman,
# Go's archive/tar test corpus (golang-1.19-src), containerd and stargz-snapshotter
# (eStargz conversion for the TOC tests), Debian's docker engine (docker.io:
# a real client for exports and pulls in tests/docker.rs), busybox (the
# demo's image where neither ../shared/images nor Docker Hub is at hand), jq,
# and small utilities. Skips
# apt entirely when everything is already there.
set -euo pipefail
need=()
for pair in fusermount3:fuse3 docker-registry:docker-registry skopeo:skopeo umoci:umoci \
  htpasswd:apache2-utils openssl:openssl getfattr:attr curl:curl podman:podman python3:python3 \
  bzip2:bzip2 tar:tar containerd:containerd ctr-remote:stargz-snapshotter \
  dockerd:docker.io busybox:busybox jq:jq; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
# Go's archive/tar test corpus: rimg's tar reader is checked against it.
[ -d /usr/share/go-1.19/src/archive/tar/testdata ] || need+=(golang-1.19-src)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: need root to install: ${need[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian's package starts a registry on :5000; rimg's scripts use their own ports.
command -v cargo >/dev/null || { echo "install-deps: cargo (Rust toolchain) is required" >&2; exit 1; }
[ -e /dev/fuse ] || { echo "install-deps: /dev/fuse is missing; FUSE mounts cannot work here" >&2; exit 1; }
