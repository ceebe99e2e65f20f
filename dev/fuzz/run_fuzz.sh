#!/usr/bin/env bash
# Runs each libFuzzer harness in build/fuzz/ for FUZZ_SECONDS (default 60) and prints, per
# harness, the executions and whether it found anything; ends with "N passed, M failed" and
# exits non-zero on any finding. Called by `make fuzz` (which builds the harnesses first).
#   FUZZ_SECONDS=600 HARNESSES="json config" bash dev/fuzz/run_fuzz.sh
# The committed seed corpus (dev/fuzz/corpus/<harness>/) is copied to a scratch directory
# that libFuzzer may grow; it never writes into the committed one. Findings (the input that
# crashed) are kept in build/fuzz/findings/ to reproduce with: build/fuzz/<harness> <file>
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -u
cd "$(dirname "$0")/../.."
SECONDS_EACH=${FUZZ_SECONDS:-60}
HARNESSES=${HARNESSES:-"json safetensors config shard tokenizer trainer_state"}
BIN=build/fuzz
FINDINGS=$BIN/findings
pass=0; fail=0
mkdir -p "$FINDINGS"
for h in $HARNESSES; do
  if [ ! -x "$BIN/$h" ]; then echo "fuzz $h: $BIN/$h is missing (make fuzz builds it)"; fail=$((fail + 1)); continue; fi
  work=$(mktemp -d "${TMPDIR:-/tmp}/fuzz_$h.XXXXXX")
  cp -r "dev/fuzz/corpus/$h" "$work/corpus"
  rm -f "$FINDINGS/$h"-*
  # -rss_limit_mb: the whole process; -malloc_limit_mb: any single allocation (a parser that
  # trusts a size field shows up here); -timeout: one input, catches infinite loops.
  # -max_len 8192: large enough for the 1 KiB headers plus a body. One job, one worker: the
  # CI machine has two cores.
  "$BIN/$h" "$work/corpus" -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 \
    -max_len=8192 -print_final_stats=1 -artifact_prefix="$FINDINGS/$h-" >"$work/log" 2>&1
  rc=$?
  execs=$(grep -E '^stat::number_of_executed_units:' "$work/log" | awk '{print $2}')
  corpus_n=$(ls "$work/corpus" | wc -l)
  found=$(ls "$FINDINGS/$h"-* 2>/dev/null | head -n 1)
  if [ "$rc" -eq 0 ] && [ -z "$found" ]; then
    echo "fuzz $h: ${execs:-?} executions in ${SECONDS_EACH} s, corpus $corpus_n inputs, no crash"
    pass=$((pass + 1))
  else
    echo "fuzz $h: FINDING after ${execs:-?} executions (exit $rc): ${found:-no artifact}"
    # the sanitizer or libFuzzer report that explains it
    grep -E -A 12 'ERROR: |runtime error|FUZZ_ASSERT|out-of-memory|malloc\(' "$work/log" | grep -vE '^(0x|Base64)' | head -n 16
    echo "  reproduce: $BIN/$h ${found:-<input>}"
    fail=$((fail + 1))
  fi
  rm -rf "$work"
done
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
