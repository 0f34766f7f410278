#!/usr/bin/env bash
# Push layer blobs (.tar.gz) as one image to a plain-HTTP registry using only
# the distribution API (curl): no docker daemon needed.
#   push-image.sh HOST:PORT REPO TAG ARCH LAYER.tar.gz [LAYER.tar.gz...]
set -euo pipefail
reg=$1 repo=$2 tag=$3 arch=$4
shift 4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

upload() { # FILE DIGEST
  if curl -sf -o /dev/null -I "http://$reg/v2/$repo/blobs/$2"; then return; fi
  local loc
  loc=$(curl -sSf -X POST -D - -o /dev/null "http://$reg/v2/$repo/blobs/uploads/" |
    tr -d '\r' | awk 'tolower($1)=="location:"{print $2}')
  case $loc in http*) ;; *) loc="http://$reg$loc" ;; esac
  case $loc in *\?*) loc="$loc&digest=$2" ;; *) loc="$loc?digest=$2" ;; esac
  curl -sSf -X PUT -H 'Content-Type: application/octet-stream' --data-binary @"$1" "$loc" >/dev/null
}

diff_ids="" layers="" history=""
for layer in "$@"; do
  digest=sha256:$(sha256sum "$layer" | cut -d' ' -f1)
  size=$(stat -c%s "$layer")
  diff_id=sha256:$(gzip -dc "$layer" | sha256sum | cut -d' ' -f1)
  upload "$layer" "$digest"
  diff_ids+="${diff_ids:+,}\"$diff_id\""
  layers+="${layers:+,}{\"mediaType\":\"application/vnd.docker.image.rootfs.diff.tar.gzip\",\"size\":$size,\"digest\":\"$digest\"}"
  history+="${history:+,}{\"created_by\":\"ADD $(basename "$layer") /\"}"
done
cat >"$work/config.json" <<JSON
{"architecture":"$arch","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":[$diff_ids]},"history":[$history]}
JSON
config_digest=sha256:$(sha256sum "$work/config.json" | cut -d' ' -f1)
upload "$work/config.json" "$config_digest"
cat >"$work/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":$(stat -c%s "$work/config.json"),"digest":"$config_digest"},"layers":[$layers]}
JSON
curl -sSf -X PUT -H 'Content-Type: application/vnd.docker.distribution.manifest.v2+json' \
  --data-binary @"$work/manifest.json" "http://$reg/v2/$repo/manifests/$tag" >/dev/null
echo "pushed $reg/$repo:$tag"
