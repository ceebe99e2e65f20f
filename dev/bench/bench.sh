#!/usr/bin/env bash
# dev/bench/bench.sh (make bench): the GPU trainer's throughput table on one GPU.
# d768 preset (d 768, 12 layers, 12 heads, F 3072), seq 1024, bf16:
#   dense                           the GPT-2-small-shaped Llama
#   moe 8x top-2                    8 experts of width 3072 (2x the dense FFN FLOPs per token)
#   moe 8x top-2, F_e 1536          same active FLOPs as dense (docs/ARCHITECTURE.md, "Performance method")
# Each row is one ./train_moe_gpu --bench run: WARMUP untimed steps, then STEPS timed steps;
# it prints ms/step, tokens/s, MFU (docs/perf.md: 6 N_active + causal attention FLOPs per
# token over the device's dense bf16 peak; "n/a" on a device it does not know) and the GPU
# memory in use. Real shards from data/full when present, else synthetic tokens (vocab 16384).
# Environment: BATCH (8), SEQ (1024), STEPS (10), WARMUP (3), DTYPE (bf16), GPU (./train_moe_gpu).
set -u
cd "$(dirname "$0")/../.."
GPU=${GPU:-./train_moe_gpu}
BATCH=${BATCH:-8}; SEQ=${SEQ:-1024}; STEPS=${STEPS:-10}; WARMUP=${WARMUP:-3}; DTYPE=${DTYPE:-bf16}
[ -x "$GPU" ] || { echo "missing $GPU: make train_moe_gpu"; exit 1; }
if [ -f data/full/tokenizer.bin ]; then DATA=(--data data/full); else DATA=(--data /nonexistent-use-synthetic --vocab 16384); fi
common=(--model d768 --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --bench --bench-warmup "$WARMUP" --dtype "$DTYPE"
        --lr 3e-4 --warmup 0 "${DATA[@]}")
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
status=0
for row in "dense|" "moe 8x top-2|--experts 8 --topk 2" "moe 8x top-2 F_e 1536|--experts 8 --topk 2 --expert-width 1536"; do
  name=${row%%|*}; flags=${row#*|}
  line=$("$GPU" "${common[@]}" $flags 2>&1 | tee /dev/stderr | grep '^bench:' | tail -n 1)
  if [ -z "$line" ]; then echo "$name: FAILED"; status=1; continue; fi
  printf '%-24s %s\n' "$name" "${line#bench: }"
done
exit $status
