#!/usr/bin/env bash
# dev/bench/bench.sh (make bench): the GPU trainer's throughput table on one GPU.
# d768 preset (d 768, 12 layers, 12 heads, F 3072), seq 1024, bf16:
#   dense                           the GPT-2-small-shaped Llama
#   moe 8x top-2                    8 experts of width 3072 (2x the dense FFN FLOPs per token)
#   moe 8x top-2, F_e 1536          same active FLOPs as dense (docs/ARCHITECTURE.md, "Performance method")
# Each row is one dev/bench/bench_gpu.cu run (the trainer's own model and step): WARMUP untimed
# steps, then STEPS timed steps;
# it prints ms/step, tokens/s, MFU (docs/perf.md: 6 N_active + causal attention FLOPs per
# token over the device's dense bf16 peak; "n/a" on a device it does not know) and the GPU
# memory in use. Real shards from data/full when present, else synthetic tokens (vocab 16384).
# Environment: MODEL (d768), BATCH (8), SEQ (1024), STEPS (10), WARMUP (3), DTYPE (bf16),
# BENCH (build/cuda-check/bench_gpu).
set -u
cd "$(dirname "$0")/../.."
BENCH=${BENCH:-build/cuda-check/bench_gpu}
MODEL=${MODEL:-d768}; BATCH=${BATCH:-8}; SEQ=${SEQ:-1024}; STEPS=${STEPS:-10}; WARMUP=${WARMUP:-3}; DTYPE=${DTYPE:-bf16}
[ -x "$BENCH" ] || { echo "missing $BENCH: make build/cuda-check/bench_gpu"; exit 1; }
if [ -f data/full/tokenizer.bin ]; then DATA=(--data data/full); else DATA=(--data /nonexistent-use-synthetic --vocab 16384); fi
common=(--model "$MODEL" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --warmup-steps "$WARMUP" --dtype "$DTYPE"
        --lr 3e-4 --warmup 0 "${DATA[@]}")
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
status=0; table=()
for row in "dense|" "moe 8x top-2|--experts 8 --topk 2" "moe 8x top-2 F_e 1536|--experts 8 --topk 2 --expert-width 1536"; do
  name=${row%%|*}; flags=${row#*|}
  echo "== $name"
  out=$("$BENCH" "${common[@]}" $flags 2>&1); rc=$?
  echo "$out"
  line=$(echo "$out" | grep '^bench:' | tail -n 1)
  if [ "$rc" -ne 0 ] || [ -z "$line" ]; then table+=("$(printf '%-24s FAILED (exit code %d)' "$name" "$rc")"); status=1; continue; fi
  table+=("$(printf '%-24s %s' "$name" "${line#bench: }")")
done
echo
echo "== bench table"
printf '%s\n' "${table[@]}"
exit $status
