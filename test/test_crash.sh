#!/usr/bin/env bash
# Crash safety of the CPU trainer's checkpoints (docs/reliability.md):
#  1. SIGKILL at random moments, KILLS times (default 50), many of them inside a checkpoint
#     write (every step saves): after each kill the latest checkpoint must be complete, the
#     next run resumes from it, and the finished run's weights and optimizer state must be
#     byte-identical to an uninterrupted run's.
#  2. A full disk (a file-size limit, ulimit -f) during a checkpoint write: one clear error,
#     exit 1, the previous checkpoint intact and still the latest, no temporary left.
# Usage: test/test_crash.sh [./train_moe]   (KILLS=50 SEED=1 environment)
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -u
cd "$(dirname "$0")/.."
BIN=${1:-./train_moe}
KILLS=${KILLS:-50}
RANDOM=${SEED:-1}
tmp=$(mktemp -d /tmp/moe_test_crash.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
pass=0; fail=0
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "  FAIL $*"; }

data=data/tiny
[ -f "$data/tokenizer.bin" ] || { echo "test_crash: $data is missing (make data-tiny)"; echo "0 passed, 1 failed"; exit 1; }
STEPS=40
run=("$BIN" --data "$data" --model tiny --experts 4 --topk 2 --batch 2 --seq 32 --steps $STEPS --save-every 1
     --eval-batches 1 --sample-tokens 0 --threads 1)

# complete: `latest` names a directory holding every file of a checkpoint
complete() {
  local d=$1 name
  [ -f "$d/latest" ] || return 0   # killed before the first checkpoint: nothing to check yet
  name=$(tr -d '\n' < "$d/latest")
  for f in config.json model.safetensors optimizer.safetensors trainer_state.json; do
    [ -s "$d/$name/$f" ] || { echo "missing $d/$name/$f"; return 1; }
  done
}

# --- the reference: one uninterrupted run
"${run[@]}" --out "$tmp/ref" > "$tmp/ref.log" 2>&1 || { bad "reference run failed"; tail -3 "$tmp/ref.log"; }
last=$(printf 'step_%06d' $STEPS)

# --- KILLS runs killed at random moments, each resuming the previous one
echo "crash loop: $KILLS SIGKILLs at random moments of a $STEPS-step run that saves every step"
d=$tmp/crash; kills=0; in_write=0; resumed=0; finished_early=0; i=0
# until KILLS kills have hit a live run (a run resumed near its end may finish first: then
# it starts over, and that try does not count); at most 3 x KILLS tries
while [ "$kills" -lt "$KILLS" ] && [ "$i" -lt $((3 * KILLS)) ]; do
  i=$((i + 1))
  if [ -f "$d/latest" ] && [ "$(tr -d '\n' < "$d/latest")" = "$last" ]; then
    finished_early=$((finished_early + 1)); rm -rf "$d"
  fi
  if [ -f "$d/latest" ]; then args=(--resume "$d"); resumed=$((resumed + 1)); else rm -rf "$d"; args=(--out "$d"); fi
  "${run[@]}" "${args[@]}" > "$tmp/kill_$i.log" 2>&1 &
  pid=$!
  # 20-400 ms: the start (data, model), steps, and checkpoint writes (fsync) all get hit
  sleep "0.$(printf '%03d' $((20 + RANDOM % 380)))"
  if kill -9 "$pid" 2>/dev/null; then kills=$((kills + 1)); fi
  wait "$pid" 2>/dev/null; rc=$?
  if [ "$rc" -ne 137 ] && [ "$rc" -ne 0 ]; then bad "run $i exited by itself with $rc"; tail -3 "$tmp/kill_$i.log"; fi
  # an unfinished checkpoint left behind: the kill landed inside a write
  ls "$d" 2>/dev/null | grep -q '\.tmp\.' && in_write=$((in_write + 1))
  if msg=$(complete "$d"); then ok; else bad "after kill $i: $msg"; fi
done
echo "  $kills kills in $i runs ($in_write inside a checkpoint write, $resumed resumed runs, $finished_early finished before the kill)"
[ "$kills" -ge "$KILLS" ] && ok || bad "only $kills of $KILLS runs were still alive to be killed"

# --- finish the interrupted run; it must end where the uninterrupted one did, bit for bit
if [ -f "$d/latest" ]; then args=(--resume "$d"); else rm -rf "$d"; args=(--out "$d"); fi
if "${run[@]}" "${args[@]}" > "$tmp/final.log" 2>&1; then
  for f in model.safetensors optimizer.safetensors; do
    if cmp -s "$tmp/ref/$last/$f" "$d/$last/$f"; then ok; else bad "$f after $KILLS kills differs from the uninterrupted run"; fi
  done
  if ls "$d" | grep -q '\.tmp\.\|\.old\.'; then bad "temporaries of killed runs remain: $(ls "$d" | grep '\.tmp\.\|\.old\.' | head -3)"; else ok; fi
else
  bad "the final resume failed"; tail -3 "$tmp/final.log"
fi

# --- a full disk during a checkpoint write
echo "full disk: a file-size limit below the optimizer file's size"
f=$tmp/full
"${run[@]}" --steps 2 --out "$f" > "$tmp/full1.log" 2>&1 || bad "full disk: first run failed"
size_kb=$(( $(stat -c %s "$f/step_000002/optimizer.safetensors") / 1024 ))
before=$(cd "$f/step_000002" && cat model.safetensors optimizer.safetensors trainer_state.json | cksum)
# SIGXFSZ ignored: a write past the limit fails with EFBIG, as on a full disk (ENOSPC)
( trap '' XFSZ; ulimit -f $((size_kb / 2)); exec "${run[@]}" --steps 4 --resume "$f" ) > "$tmp/full2.log" 2>&1
rc=$?
err=$(grep '^error: ' "$tmp/full2.log")
if [ "$rc" -eq 1 ] && echo "$err" | grep -q 'write failed\|File too large\|disk full'; then ok; else bad "full disk: rc $rc, error line: '$err'"; tail -3 "$tmp/full2.log"; fi
echo "  $err"
after=$(cd "$f/step_000002" && cat model.safetensors optimizer.safetensors trainer_state.json | cksum)
[ "$before" = "$after" ] && [ "$(tr -d '\n' < "$f/latest")" = step_000002 ] && ok || bad "full disk: the previous checkpoint changed or is no longer the latest"
if ls "$f" | grep -q '\.tmp\.'; then bad "full disk: a temporary was left: $(ls "$f")"; else ok; fi
# and the run goes on once there is room
if "${run[@]}" --steps 4 --resume "$f" > "$tmp/full3.log" 2>&1 && [ -f "$f/step_000004/model.safetensors" ]; then ok; else bad "full disk: resume after the fix failed"; fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
