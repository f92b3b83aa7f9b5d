#!/usr/bin/env bash
# `make dist`: the kubectl plugin as krew installs it.
#   target/dist/kubectl-xero_VERSION_linux_amd64.tar.gz  kubectl-xero (static),
#                                                        kubectl_complete-xero (completion)
#                                                        and LICENSE (krew-index wants it)
#   target/dist/xero.yaml                                the krew manifest for that archive
# Built like the image (same flags, so a second build gives the same archive), then checked:
# the manifest's sha256 is the archive's, every file it installs is in the archive, and the
# plugin from the archive runs and says its version.
set -euo pipefail
umask 022
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version="$(awk -F'"' '/^version = / {print $2; exit}' Cargo.toml)"
target=x86_64-unknown-linux-gnu
export RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$PWD=/src --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo"
cargo build --release --locked --target "$target" -p xero-operator --bin kubectl-xero >&2
dist=target/dist
archive="$dist/kubectl-xero_${version}_linux_amd64.tar.gz"
mkdir -p "$dist"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
install -m 0755 "target/$target/release/kubectl-xero" "$stage/kubectl-xero"
install -m 0755 deploy/krew/kubectl_complete-xero "$stage/kubectl_complete-xero"
install -m 0644 LICENSE "$stage/LICENSE"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$stage" -cf - \
  LICENSE kubectl-xero kubectl_complete-xero | gzip -n -9 >"$archive"
sha="$(sha256sum "$archive" | cut -d' ' -f1)"
sed -e "s/@VERSION@/$version/g" -e "s/@SHA256@/$sha/" deploy/krew/xero.yaml >"$dist/xero.yaml"

# The checks krew makes when it installs, and that the plugin runs.
check="$stage/check"
mkdir "$check"
tar -xzf "$archive" -C "$check"
[ "$(awk -F'"' '/sha256:/ {print $2}' "$dist/xero.yaml")" = "$sha" ] || {
  echo "dist: the manifest's sha256 is not the archive's" >&2; exit 1; }
for file in $(awk '/- from:/ {print $3}' "$dist/xero.yaml"); do
  [ -f "$check/$file" ] || { echo "dist: $file is not in $archive" >&2; exit 1; }
done
for file in $(awk '/^ *bin:/ {print $2}' "$dist/xero.yaml") kubectl_complete-xero; do
  [ -x "$check/$file" ] || { echo "dist: $file is not an executable in $archive" >&2; exit 1; }
done
said="$("$check/kubectl-xero" --version)"
[ "$said" = "kubectl xero $version" ] || { echo "dist: the plugin says \"$said\"" >&2; exit 1; }
echo "$archive $sha"
echo "$dist/xero.yaml"
