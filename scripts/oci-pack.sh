#!/usr/bin/env bash
# Packs a root filesystem directory into an OCI image layout tarball, without Docker:
#   oci-pack.sh ROOTFS_DIR IMAGE_NAME:TAG OUT.tar ENTRYPOINT_JSON [USER]
# One gzipped tar layer, a config, a manifest and an index whose `io.containerd.image.name`
# annotation names the image, every blob named by its sha256. Reproducible: file order, times,
# owners and the gzip header are fixed, so the same rootfs gives the same digest every time.
# `ctr -n k8s.io images import OUT.tar` loads it into containerd; `skopeo copy
# oci-archive:OUT.tar docker://REGISTRY/NAME:TAG` pushes it to a registry.
set -euo pipefail
# Files in the image get 0644/0755 whatever the caller's umask (and so the same digest).
umask 022
rootfs="$1" name="$2" out="$3" entrypoint="$4" user="${5:-65532:65532}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/blobs/sha256"

deterministic_tar() { # DIR OUT: a tar of DIR's contents with fixed order, times and owners
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$1" -cf "$2" .
}
blob() { # FILE: moves FILE into blobs/ under its digest; prints "sha256:HEX SIZE"
  local hex size
  hex="$(sha256sum "$1" | cut -d' ' -f1)"
  size="$(stat -c %s "$1")"
  mv "$1" "$work/blobs/sha256/$hex"
  echo "sha256:$hex $size"
}

# The root directory itself is in the layer: it must be traversable by the non-root user.
chmod 0755 "$rootfs"
deterministic_tar "$rootfs" "$work/layer.tar"
diff_id="sha256:$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
gzip -n -9 "$work/layer.tar"
read -r layer_digest layer_size < <(blob "$work/layer.tar.gz")

printf '{"architecture":"amd64","os":"linux","config":{"User":"%s","Entrypoint":%s,"Env":["PATH=/:/bin"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["%s"]}}' \
  "$user" "$entrypoint" "$diff_id" > "$work/config.json"
read -r config_digest config_size < <(blob "$work/config.json")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":%s}]}' \
  "$config_digest" "$config_size" "$layer_digest" "$layer_size" > "$work/manifest.json"
read -r manifest_digest manifest_size < <(blob "$work/manifest.json")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest_digest" "$manifest_size" "$name" "${name##*:}" > "$work/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$work/oci-layout"

mkdir -p "$(dirname "$out")"
mkdir "$work/layout" && mv "$work/blobs" "$work/index.json" "$work/oci-layout" "$work/layout/"
deterministic_tar "$work/layout" "$out.tmp" && mv "$out.tmp" "$out"
echo "$name $manifest_digest $out"
