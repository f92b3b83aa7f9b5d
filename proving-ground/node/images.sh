#!/usr/bin/env bash
# The test node's own images, built here without a registry (OCI tarballs under target/node-images):
# - xero.local/pause:1: the sandbox process of every pod (pause.c, linked static);
# - xero.local/busybox:1: a shell with wget (Debian's busybox-static), the test consumer's app
#   container that reads the mounted token Secret.
# Prints the tarballs' paths, one per line.
set -euo pipefail
# Files in the image get 0644/0755 whatever the caller's umask (and so the same digest).
umask 022
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$root/target/node-images"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/pause"
gcc -static -O2 -o "$work/pause/pause" "$here/pause.c"
bash "$root/scripts/oci-pack.sh" "$work/pause" xero.local/pause:1 "$out/pause.oci.tar" '["/pause"]' 65535:65535 >&2

mkdir -p "$work/busybox/bin" "$work/busybox/tmp"
chmod 1777 "$work/busybox/tmp"
install -m 0755 /bin/busybox "$work/busybox/bin/busybox"
for applet in sh wget cat sleep date echo printf test tr cut sha256sum; do ln -s busybox "$work/busybox/bin/$applet"; done
bash "$root/scripts/oci-pack.sh" "$work/busybox" xero.local/busybox:1 "$out/busybox.oci.tar" '["/bin/sh"]' 65532:65532 >&2

echo "$out/pause.oci.tar"
echo "$out/busybox.oci.tar"
