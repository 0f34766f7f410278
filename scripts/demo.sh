#!/usr/bin/env bash
# One command from a fresh Debian machine to a mounted image: installs what is
# needed, builds rimg, starts a local registry (Docker Hub is not reachable
# here), pushes the real Alpine 3.10.9 rootfs to it, then inspects, lists,
# mounts, greps, exports and inspects the history of the image with rimg.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release
rimg=$PWD/target/release/rimg
images=${RIMG_IMAGES:-$PWD/../shared/images}

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/registry.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$port
YML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
mnt=$work/mnt
cleanup() {
  "$rimg" umount "$mnt" 2>/dev/null || true
  kill "$registry_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done

scripts/push-image.sh "127.0.0.1:$port" library/alpine 3.10 amd64 \
  "$images/alpine-3.10.9/alpine-minirootfs-3.10.9-x86_64.tar.gz"
ref=127.0.0.1:$port/library/alpine:3.10
export RIMG_CACHE_DIR=$work/cache

set -x
"$rimg" inspect "$ref"
"$rimg" tags "127.0.0.1:$port/library/alpine"
"$rimg" ls -l "$ref" /etc | head -n 15
mkdir -p "$mnt"
"$rimg" mount "$ref" "$mnt"
"$rimg" mounts
cat "$mnt/etc/os-release"
grep -rl 'alpine' "$mnt/etc" | head -n 5
find "$mnt" -type f | wc -l
getfattr -n user.rimg.layer "$mnt/bin/busybox" 2>/dev/null || true
"$rimg" export "$ref" "$work/alpine.tar"
skopeo inspect "docker-archive:$work/alpine.tar" | head -n 12
# The exported file is itself an image source; forensics need no mount.
"$rimg" ls "docker-archive:$work/alpine.tar" /etc | head -n 5
"$rimg" grep -l alpine "$ref" /etc | head -n 5
"$rimg" log "$ref" /etc/os-release
"$rimg" deleted "$ref" | head -n 5
"$rimg" umount "$mnt"
# Publish a gzip checkpoint index; another cache that trusts it (--trust-index)
# then reads one file by range.
"$rimg" index push "$ref"
RIMG_CACHE_DIR=$work/cache-b "$rimg" -v cat --trust-index "$ref" /etc/alpine-release 2>&1 | grep -E "published gzip index|read by range|^[0-9]"
