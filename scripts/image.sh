#!/usr/bin/env bash
# `make image`: the operator image, built without Docker. Two fully static binaries
# (`xero-operator`, the entrypoint, and `xero-token`, for sidecars and jobs), nothing else, run as
# 65532:65532 - the same entrypoint and arguments as the Dockerfile. Xero's CA roots are compiled
# into the binaries (webpki-roots), so the image needs no CA bundle.
#   scripts/image.sh [TAG]  -> target/image/xero-operator-TAG.oci.tar (TAG: the crate version)
# Prints "NAME:TAG DIGEST PATH". Building twice from the same tree gives the same digest.
set -euo pipefail
# Files in the image get 0644/0755 whatever the caller's umask (and so the same digest).
umask 022
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version="$(awk -F'"' '/^version = / {print $2; exit}' Cargo.toml)"
tag="${1:-$version}"
repository="${IMAGE_REPOSITORY:-ghcr.io/xero-operator/xero-operator}"
target=x86_64-unknown-linux-gnu
# crt-static links glibc statically: the binaries run in an empty image. The path prefixes are
# remapped so the binaries (and so the digest) do not depend on where the tree was cloned.
export RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$PWD=/src --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo"
cargo build --release --locked --target "$target" -p xero-operator --bin xero-operator --bin xero-token >&2
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
for bin in xero-operator xero-token; do
  install -m 0755 "target/$target/release/$bin" "$rootfs/$bin"
done
bash scripts/oci-pack.sh "$rootfs" "$repository:$tag" "target/image/xero-operator-$tag.oci.tar" '["/xero-operator"]'
