#!/usr/bin/env bash
# Runs every test binary `cargo test --all-targets` runs (both packages' unit tests and each
# integration test file) at the same time, JOBS binaries at once (default 4), the
# longest first, instead of one after another: most of their time is spent waiting on timers,
# the API server or the emulator, not on the CPU. Each binary's output goes to
# target/integration/<binary>.log and is printed when it ends; a summary says how long each took
# and how many tests passed. Exit 1 if any binary failed, or ran longer than TEST_TIMEOUT
# seconds (default 1800: then it is killed and its output so far printed). Meant to run under
# xero-controlplane (`make test`), which provides the API server the tests use.
# ONLY="crd helm …" runs just those binaries (by name: a test file's, or the unit tests of the
# library or a binary of that name);
# LOGS=dir puts the logs elsewhere (the oldest supported release's run keeps its own).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
jobs="${JOBS:-4}"
test_timeout="${TEST_TIMEOUT:-1800}"
cargo="${CARGO:-cargo}"
logs="${LOGS:-target/integration}"
rm -rf "$logs" && mkdir -p "$logs"

# The binaries, built (already, by `make test`) and listed by cargo itself; a target that does
# not build fails the run here.
"$cargo" test --locked --all-targets --no-run --message-format=json >"$logs/build.json" \
  2>"$logs/build.log" || { cat "$logs/build.log" >&2; exit 1; }
mapfile -t binaries < <(
  grep '"test":true},"features"' "$logs/build.json" | grep -o '"executable":"[^"]*"' |
    cut -d'"' -f4 | sort -u
)
[ "${#binaries[@]}" -gt 0 ] || { echo "integration.sh: no test binaries found" >&2; exit 1; }

# The longest first (measured on the CI machine), so that the last to start is a short one;
# binaries not named here come after, in name order.
longest=(retry controller alerts protocol controller_ops model isolation apiserver_restart gitops
  consumer_trust xero_token trust kubectl_xero emulator helm crd)
ordered=()
for name in "${longest[@]}"; do
  for bin in "${binaries[@]}"; do
    [[ "$(basename "$bin")" == "$name"-* ]] && ordered+=("$bin")
  done
done
for bin in "${binaries[@]}"; do
  [[ " ${ordered[*]} " == *" $bin "* ]] || ordered+=("$bin")
done
if [ -n "${ONLY:-}" ]; then
  read -ra names <<<"$ONLY"
  chosen=()
  for bin in "${ordered[@]}"; do
    for name in "${names[@]}"; do
      [[ "$(basename "$bin")" == "$name"-* && " ${chosen[*]} " != *" $bin "* ]] && chosen+=("$bin")
    done
  done
  for name in "${names[@]}"; do
    [[ " ${chosen[*]} " == *"/$name-"* ]] || { echo "integration.sh: no test binary '$name'" >&2; exit 1; }
  done
  ordered=("${chosen[@]}")
fi

run_one() {
  local bin="$1" name start status=0
  name="$(basename "$bin")"
  start=$(date +%s)
  timeout -k 30 "$test_timeout" "$bin" >"$logs/$name.log" 2>&1 || status=$?
  [ "$status" = 124 ] && echo "integration.sh: $name ran longer than $test_timeout s: killed" \
    >>"$logs/$name.log"
  echo "$name $status $(( $(date +%s) - start ))" >>"$logs/summary"
  {
    echo "==== $name (exit $status, $(( $(date +%s) - start )) s)"
    cat "$logs/$name.log"
  } >"$logs/$name.done"
  # One binary's output at a time, whole.
  flock "$logs/.print" cat "$logs/$name.done"
}
export -f run_one
export logs test_timeout

started=$(date +%s)
status=0
printf '%s\n' "${ordered[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one "$@"' _ {} || status=$?

echo "==== test binaries run $jobs at a time: $(( $(date +%s) - started )) s in all"
passed=0
while read -r name code seconds; do
  count=$( (grep -ho 'test result: [a-zA-Z]*\. [0-9]* passed' "$logs/$name.log" || true) |
    awk '{s += $4} END {print s + 0}')
  passed=$(( passed + count ))
  printf '%-40s exit %-3s %5s s %4s passed\n' "$name" "$code" "$seconds" "$count"
done < <(sort -k3 -n -r "$logs/summary")
echo "$passed tests passed"
if [ "$status" != 0 ] || grep -qv ' 0 [0-9]*$' "$logs/summary"; then
  echo "integration.sh: a test binary failed (logs in $logs/)" >&2
  exit 1
fi
