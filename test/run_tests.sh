#!/usr/bin/env bash
# Runs every test suite, each of which ends with "N passed, M failed", and prints the total.
# Exits non-zero if any suite fails or crashes. Called by `make test`.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
total_pass=0; total_fail=0; broken=()

suite() {  # suite NAME COMMAND...
  local name=$1; shift
  echo "=== $name: $*"
  local log; log=$(mktemp)
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local line; line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
  rm -f "$log"
  if [ -z "$line" ]; then
    echo "=== $name: no result line (exit code $rc)"; broken+=("$name"); total_fail=$((total_fail + 1)); return
  fi
  local p f; p=$(echo "$line" | awk '{print $1}'); f=$(echo "$line" | awk '{print $3}')
  total_pass=$((total_pass + p)); total_fail=$((total_fail + f))
  if [ "$rc" -ne 0 ] || [ "$f" -ne 0 ]; then broken+=("$name"); fi
}

suite "CPU trainer" ./test/bin/test_cpu ./train_moe
suite "finite differences" ./test/bin/test_gradcheck
[ -x test/bin/test_upcycle ] && suite "upcycle" ./test/bin/test_upcycle ./upcycle ./train_moe
suite "data" "$PYTHON" dev/data/test_data.py data/tiny
if command -v "${NVCC:-nvcc}" >/dev/null 2>&1; then
  suite "CUDA compile" bash -c 'make --no-print-directory cuda-check && echo "1 passed, 0 failed" || { echo "0 passed, 1 failed"; exit 1; }'
fi
[ -f scripts/test_scripts.sh ] && suite "reproduction scripts (tiny)" bash scripts/test_scripts.sh

echo
if [ ${#broken[@]} -gt 0 ]; then echo "failing suites: ${broken[*]}"; fi
echo "$total_pass passed, $total_fail failed"
[ ${#broken[@]} -eq 0 ] && [ "$total_fail" -eq 0 ]
