#!/usr/bin/env bash
# A launcher killed with SIGKILL (no teardown) leaves its node's containers, shims, mounts,
# cgroups and kernel settings behind; the next start of any launcher must clean all of it up.
#   killed-launcher.sh BIN_DIR
# Fails if killing left nothing (the check could not tell) or if the host differs afterwards.
set -euo pipefail
bin_dir="$1"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
launcher="$root/target/debug/xero-controlplane"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
bash "$here/host-state.sh" > "$work/before"
"$launcher" --bin-dir "$bin_dir" --node --secret-sync 10s \
  --node-image "$root/target/node-images/pause.oci.tar" \
  --node-image "$root/target/node-images/busybox.oci.tar" \
  -- bash -c 'kubectl run bb --image=xero.local/busybox:1 --image-pull-policy=Never --command -- sleep 3600 >/dev/null &&
              kubectl wait --for=condition=Ready pod/bb --timeout=90s >/dev/null && echo POD-READY && sleep 300' \
  > "$work/log" 2>&1 &
pid=$!
for _ in $(seq 1 150); do
  grep -q POD-READY "$work/log" && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 1
done
if ! grep -q POD-READY "$work/log"; then
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  cat "$work/log" >&2
  echo "killed-launcher: the node never ran its pod" >&2
  exit 1
fi
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
sleep 2
bash "$here/host-state.sh" > "$work/killed"
left="$(diff "$work/before" "$work/killed" | grep -c '^>' || true)"
if [ "$left" = 0 ]; then
  echo "killed-launcher: killing the launcher left nothing behind, so this check cannot tell" >&2
  exit 1
fi
"$launcher" --bin-dir "$bin_dir" --no-controller-manager -- true > "$work/second" 2>&1
bash "$here/host-state.sh" > "$work/after"
if ! diff -u "$work/before" "$work/after"; then
  echo "killed-launcher: the next start did not clean up after the killed launcher (above)" >&2
  exit 1
fi
echo "killed launcher: $left things left on the host, all removed by the next start"
