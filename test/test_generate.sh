#!/usr/bin/env bash
# test/test_generate.sh: ./generate on a briefly trained tiny MoE: a batch of prompts gives
# each prompt the text it gets alone (greedy and sampled: each prompt has its own random
# stream), a seed reproduces its text, --top-p 0 is greedy, and bad input is one clear error.
# (That cached decoding equals the full forward pass is test_cpu's "KV cache".)
# GEN=build/emu/generate_gpu runs the same checks on the GPU build (GEN_ARGS, e.g. "--dtype
# fp32", go to every run), plus: its greedy text in fp32 is the CPU build's.
# Prints "N passed, M failed".
set -u
cd "$(dirname "$0")/.."
pass=0; fail=0
ok() { pass=$((pass + 1)); echo "PASS $*"; }
bad() { fail=$((fail + 1)); echo "FAIL $*"; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/test_generate.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
GEN=${GEN:-./generate}; GEN_ARGS=${GEN_ARGS:-}
[ -x "$GEN" ] && [ -x ./generate ] && [ -x ./train_moe ] || { echo "missing $GEN, ./generate or ./train_moe"; echo "0 passed, 1 failed"; exit 1; }
./train_moe --data data/tiny --model tiny --experts 4 --topk 2 --steps 40 --lr 3e-3 --threads 1 --sample-tokens 0 \
  --out "$tmp/run" >"$tmp/train.log" 2>&1 || { tail -n 3 "$tmp/train.log"; echo "0 passed, 1 failed"; exit 1; }
G="$GEN --model $tmp/run --max-tokens 24 --threads 1 $GEN_ARGS"
printf 'The king said\nOnce upon a time there\n\n' >"$tmp/prompts.txt"
for mode in "--temperature 0" "--temperature 0.9 --top-p 0.9 --seed 5"; do
  $G $mode --prompts "$tmp/prompts.txt" >"$tmp/batch.txt" 2>/dev/null || bad "batch run failed ($mode)"
  same=1
  i=0
  while IFS= read -r p; do
    i=$((i + 1))
    # prompt i alone, with the batch's seed for that prompt (seed + i - 1)
    extra=$mode
    case $mode in *--seed*) extra="--temperature 0.9 --top-p 0.9 --seed $((5 + i - 1))" ;; esac
    $G $extra --prompt "$p" >"$tmp/alone.txt" 2>/dev/null
    # the batch output marks prompt i as "i: [...]"; its lines run until the next marker
    awk -v i="$i" 'BEGIN{on=0} /^[0-9]+: \[/{on=($0 ~ "^" i ": \\[")} on' "$tmp/batch.txt" | sed "1s/^$i: //" >"$tmp/from_batch.txt"
    cmp -s "$tmp/alone.txt" "$tmp/from_batch.txt" || { same=0; echo "  prompt $i differs"; diff "$tmp/alone.txt" "$tmp/from_batch.txt" | head -n 4; }
  done <"$tmp/prompts.txt"
  [ $same = 1 ] && ok "a batch of 3 prompts = each prompt alone ($mode)" || bad "batch differs from single prompts ($mode)"
done
a=$($G --prompt "The" --seed 9 2>/dev/null); b=$($G --prompt "The" --seed 9 2>/dev/null); c=$($G --prompt "The" --seed 10 2>/dev/null)
[ "$a" = "$b" ] && ok "the same seed gives the same text" || bad "same seed, different text"
[ "$a" != "$c" ] && ok "another seed gives another text" || bad "seeds 9 and 10 gave the same text"
g=$($G --prompt "The" --temperature 0 2>/dev/null); p0=$($G --prompt "The" --top-p 0 --seed 3 2>/dev/null)
[ "$g" = "$p0" ] && ok "--top-p 0 keeps only the most likely token: greedy" || bad "--top-p 0 differs from greedy"
out=$($G --prompt "x" 2>&1 >/dev/null | tail -n 1)
case $out in prefill*tok/s*decode*tok/s*"KV cache"*) ok "speed line: $out" ;; *) bad "no speed line: $out" ;; esac
check_err() {  # check_err NEEDLE ARGS...: non-zero exit and one error line with NEEDLE
  local needle=$1; shift
  local o; o=$($GEN "$@" 2>&1); local rc=$?
  if [ $rc -ne 0 ] && echo "$o" | grep -q "error: .*$needle"; then ok "refused: $(echo "$o" | tail -n 1 | cut -c1-120)"
  else bad "expected an error with \"$needle\" (rc $rc): $o"; fi
}
if [ "$GEN" != ./generate ]; then
  # the GPU build in fp32 picks the CPU build's greedy tokens (the logits agree to rounding;
  # a tie within rounding would show here as a different text)
  for p in "The king said" "Once upon a time there"; do
    a=$(./generate --model "$tmp/run" --max-tokens 24 --threads 1 --temperature 0 --prompt "$p" 2>/dev/null)
    b=$($GEN --model "$tmp/run" --max-tokens 24 --threads 1 --dtype fp32 --temperature 0 --prompt "$p" 2>/dev/null)
    [ -n "$a" ] && [ "$a" = "$b" ] && ok "fp32 greedy text = the CPU build's ($p)" || bad "fp32 greedy text differs from the CPU build's ($p): [$a] vs [$b]"
  done
  check_err "--dtype must be" --model "$tmp/run" --dtype fp16
  check_err "CUDA device" --model "$tmp/run" --device 7
fi
check_err "--model is required"
check_err "no config.json" --model "$tmp"
check_err "tokenizer not found" --model "$tmp/run" --tokenizer "$tmp/none.json"
check_err "give one of them" --model "$tmp/run" --prompt a --prompts "$tmp/prompts.txt"
check_err "top-p" --model "$tmp/run" --top-p 1.5
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
