#!/usr/bin/env bash
# quickstart.sh: the README's first command (make quickstart). Builds the tiny corpus if it
# is missing, trains a tiny dense model and a tiny 4-expert top-2 MoE with the same recipe
# on it, and prints their validation losses and a generated sample from each.
# Takes a few minutes on a 2-core CPU. Runs land in runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-300}
OUT=${OUT:-runs/quickstart}
mkdir -p "$OUT"
[ -f data/tiny/tokenizer.bin ] || make --no-print-directory data-tiny
make --no-print-directory train_moe >/dev/null
common=(--data data/tiny --model tiny --steps "$STEPS" --batch 8 --seq 64 --lr 3e-3 --warmup 20
        --eval-every 100 --log-every 50 --sample-tokens 48 --seed 1337)
echo "== dense (tiny preset) =="
./train_moe "${common[@]}" --out "$OUT/dense" | tee "$OUT/dense.log"
echo "== MoE: 4 experts, top-2 (tiny preset) =="
./train_moe "${common[@]}" --experts 4 --topk 2 --out "$OUT/moe" | tee "$OUT/moe.log"
echo
echo "== summary: final validation loss per domain =="
for run in dense moe; do
  printf '%-6s %s\n' "$run" "$(grep '^eval step' "$OUT/$run.log" | tail -n 1)"
done
for run in dense moe; do
  printf '%-6s %s\n' "$run" "$(grep '^sample at step' "$OUT/$run.log" | tail -n 1 | cut -c1-160)"
done

