#!/usr/bin/env bash
# One command from a fresh Debian machine to a mounted image: installs what is
# needed, builds rimg, then inspects, lists, mounts, greps, exports and
# inspects the history of an image with rimg. The image, in order of choice:
# - the real Alpine 3.10.9 rootfs from ../shared/images (this project's
#   workspace; RIMG_IMAGES names another folder), pushed to a local registry;
# - alpine:3.10 from Docker Hub, when the network reaches it;
# - else an image built from what this machine has (busybox and its applet
#   links, the host's os-release), pushed to the local registry.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release
rimg=${CARGO_TARGET_DIR:-$PWD/target}/release/rimg
images=${RIMG_IMAGES:-$PWD/../shared/images}
alpine_gz=$images/alpine-3.10.9/alpine-minirootfs-3.10.9-x86_64.tar.gz

work=$(mktemp -d)
mnt=$work/mnt
registry_pid=
cleanup() {
  "$rimg" umount "$mnt" 2>/dev/null || true
  [ -z "$registry_pid" ] || kill "$registry_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
export RIMG_CACHE_DIR=$work/cache

# A local registry on a port it binds itself (port 0), read back from its log.
start_registry() {
  cat >"$work/registry.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:0
YML
  docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
  registry_pid=$!
  addr=
  for _ in $(seq 100); do
    addr=$(sed -n 's/.*msg="listening on \(127\.0\.0\.1:[0-9]*\)".*/\1/p' "$work/registry.log" | head -n 1)
    [ -n "$addr" ] && curl -sf "http://$addr/v2/" >/dev/null && return
    sleep 0.1
  done
  echo "demo: the local registry did not start: $(cat "$work/registry.log")" >&2
  exit 1
}

# A root filesystem from this machine: busybox with its applet links (or the
# host's own sh, ls and cat), the host's os-release, a passwd.
local_rootfs() {
  local root=$work/rootfs
  mkdir -p "$root"/{bin,etc,root,tmp}
  if command -v busybox >/dev/null; then
    cp "$(command -v busybox)" "$root/bin/busybox"
    for applet in $(busybox --list); do
      [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
  else
    for tool in sh ls cat; do cp -L "$(command -v $tool)" "$root/bin/"; done
  fi
  cp -L /etc/os-release "$root/etc/os-release"
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
  tar --numeric-owner --owner=0 --group=0 -C "$root" -czf "$work/rootfs.tar.gz" .
}

hub=false
if [ -f "$alpine_gz" ]; then
  start_registry
  scripts/push-image.sh "$addr" library/alpine 3.10 amd64 "$alpine_gz"
  repo=$addr/library/alpine ref=$addr/library/alpine:3.10
elif RIMG_TIMEOUT=15 RIMG_RETRIES=2 timeout 60 "$rimg" inspect alpine:3.10 >/dev/null 2>&1; then
  echo "demo: no $alpine_gz; using alpine:3.10 from Docker Hub"
  hub=true repo=alpine ref=alpine:3.10
else
  echo "demo: no $alpine_gz and no Docker Hub; building an image from this machine's files"
  start_registry
  local_rootfs
  scripts/push-image.sh "$addr" local/demo 1 amd64 "$work/rootfs.tar.gz"
  repo=$addr/local/demo ref=$addr/local/demo:1
fi
# A word the image's /etc holds (its os-release ID).
word=$("$rimg" cat "$ref" /etc/os-release | sed -n 's/^ID=//p' | tr -d '"')

set -x
"$rimg" inspect "$ref"
"$rimg" tags "$repo" | tail -n 5
"$rimg" ls -l "$ref" /etc | head -n 15
mkdir -p "$mnt"
"$rimg" mount "$ref" "$mnt"
"$rimg" mounts
cat "$mnt/etc/os-release"
grep -rl "$word" "$mnt/etc" | head -n 5
find "$mnt" -type f | wc -l
getfattr -n user.rimg.layer "$mnt/bin/busybox" 2>/dev/null || true
"$rimg" export "$ref" "$work/alpine.tar"
skopeo inspect "docker-archive:$work/alpine.tar" | head -n 12
# The exported file is itself an image source; forensics need no mount.
"$rimg" ls "docker-archive:$work/alpine.tar" /etc | head -n 5
"$rimg" grep -l "$word" "$ref" /etc | head -n 5
"$rimg" log "$ref" /etc/os-release
"$rimg" deleted "$ref" | head -n 5
"$rimg" umount "$mnt"
# Publish a gzip checkpoint index; another cache that trusts it (--trust-index)
# then reads one file by range (to the local registry only: Docker Hub takes
# no push from the demo).
if ! $hub; then
  "$rimg" index push "$ref"
  RIMG_CACHE_DIR=$work/cache-b "$rimg" -v cat --trust-index "$ref" /etc/os-release 2>&1 | grep -E "published gzip index|read by range|^VERSION"
fi
