#!/usr/bin/env bash
# dev/bench/bench.sh (make bench): the GPU trainer's throughput table on one GPU, side by side
# with PyTorch on the same shapes, in one run.
# d768 preset (d 768, 12 layers, 12 heads, F 3072), seq 1024, bf16, 8 x 1024 x 4 micro-batches
# = 32768 tokens per optimizer step (so that the optimizer is not what is measured):
#   dense                           the GPT-2-small-shaped Llama
#   moe 8x top-2 F/2               F_e = F/2: same active FLOPs as dense (docs/ARCHITECTURE.md, "Performance method")
#   moe 8x top-2                    8 experts of width 3072 (2x the dense FFN FLOPs per token)
# First the GEMM ceiling: `bench_gpu --gemm-peak 8192`, a bf16 cuBLAS GEMM, whose TFLOP/s is
# the "GEMM peak" the second MFU column divides by. Each of our rows is one
# dev/bench/bench_gpu.cu run (the trainer's own model and step): WARMUP untimed steps, then
# STEPS timed steps; it prints ms/step, tokens/s, MFU over the device's spec bf16 peak (989
# TFLOP/s for H100/H200 SXM; docs/perf.md: 6 N_active + causal attention FLOPs per token),
# MFU over the measured GEMM peak, and the GPU memory in use. Then, where PyTorch sees a GPU,
# dev/bench/torch_baseline.py runs the same three rows eager and with torch.compile.
# The table at the end gives each row's tokens/s, both MFUs and memory, and the ratios the
# goals are stated in (docs/perf.md; a benchmark, never a test): MoE >= 50% MFU of the spec
# peak, >= 2x PyTorch eager and >= 1.3x torch.compile, MoE (equal active FLOPs) step time
# <= 1.10x the dense step.
# Real shards from data/full when present, else synthetic tokens (vocab 16384).
# Environment: MODEL (d768), BATCH (8), SEQ (1024), GRAD_ACCUM (4), STEPS (10), WARMUP (3),
# DTYPE (bf16), BENCH (build/cuda-check/bench_gpu), GEMM_N (8192; 0 skips it), TORCH (1; 0
# skips the PyTorch rows), PYTHON (python3). The first MoE row runs twice: with CUDA graphs
# (the default) and with --cuda-graphs off.
set -u
cd "$(dirname "$0")/../.."
BENCH=${BENCH:-build/cuda-check/bench_gpu}
MODEL=${MODEL:-d768}; BATCH=${BATCH:-8}; SEQ=${SEQ:-1024}; GRAD_ACCUM=${GRAD_ACCUM:-4}; STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}; DTYPE=${DTYPE:-bf16}; GEMM_N=${GEMM_N:-8192}; TORCH=${TORCH:-1}; PYTHON=${PYTHON:-python3}
[ -x "$BENCH" ] || { echo "missing $BENCH: make build/cuda-check/bench_gpu"; exit 1; }
if [ -f data/full/tokenizer.bin ]; then DATA=(--data data/full); VOCAB=$($PYTHON -c "
import struct; print(struct.unpack('<256i', open('data/full/tokenizer.bin','rb').read(1024))[2])" 2>/dev/null || echo 16384)
else DATA=(--data /nonexistent-use-synthetic --vocab 16384); VOCAB=16384; fi
# the presets' shapes (common/model.h), for torch_baseline.py: d layers heads kv_heads ffn
case $MODEL in
  tiny) shape=(64 2 4 4 256) ;; small) shape=(256 4 8 8 1024) ;; d512) shape=(512 12 8 8 2048) ;;
  d768) shape=(768 12 12 12 3072) ;; *) shape=() ;;
esac
common=(--model "$MODEL" --batch "$BATCH" --seq "$SEQ" --grad-accum "$GRAD_ACCUM" --steps "$STEPS"
        --warmup-steps "$WARMUP" --dtype "$DTYPE" --lr 3e-4 --warmup 0 "${DATA[@]}")
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
status=0

gemm_peak=0
if [ "$GEMM_N" -gt 0 ]; then
  echo "== GEMM peak"
  out=$("$BENCH" --gemm-peak "$GEMM_N" 2>&1); echo "$out"
  gemm_peak=$(echo "$out" | sed -n -E 's/^gemm: .* \| ([0-9.]+) TFLOP\/s$/\1/p' | tail -n 1)
  [ -n "$gemm_peak" ] || { echo "GEMM peak: no result"; gemm_peak=0; status=1; }
fi

have_torch=0
if [ "$TORCH" = 1 ] && [ ${#shape[@]} -eq 5 ]; then
  $PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 && have_torch=1 ||
    echo "(no PyTorch with a GPU for $PYTHON: the PyTorch rows are skipped)"
fi

# rows: name | our flags | torch_baseline flags
rows=("dense||"
      "moe 8x top-2 F/2|--experts 8 --topk 2 --expert-width $((shape[4] / 2))|--experts 8 --topk 2 --expert-width $((shape[4] / 2))"
      "moe 8x top-2|--experts 8 --topk 2|--experts 8 --topk 2")
[ ${#shape[@]} -eq 5 ] || rows=("dense||" "moe 8x top-2|--experts 8 --topk 2|--experts 8 --topk 2")
declare -A res  # "row|impl" -> "ms tok/s mfu mfu_gemm mem"
parse() {  # one bench line -> "ms tok/s mfu mfu_gemm mem" (n/a where absent)
  echo "$1" | sed -E 's/n\/a \([^)]*\)/n\/a/g' |
    sed -E 's/.*\| ([0-9.]+) ms\/step \| ([0-9]+) tok\/s \| MFU ([^ |]*) \| MFU of GEMM peak ([^ |]*) \| [^0-9]*([0-9.]+) GiB.*/\1 \2 \3 \4 \5/'
}
for row in "${rows[@]}"; do
  IFS='|' read -r name flags tflags <<<"$row"
  echo "== $name"
  out=$("$BENCH" "${common[@]}" --measured-peak "$gemm_peak" $flags 2>&1); rc=$?
  echo "$out"
  line=$(echo "$out" | grep '^bench:' | tail -n 1)
  if [ "$rc" -ne 0 ] || [ -z "$line" ]; then echo "FAILED (exit code $rc)"; status=1; else res["$name|ours"]=$(parse "$line"); fi
  if [ "$name" = "${rows[1]%%|*}" ]; then  # the first MoE row again without CUDA graphs: what they save
    out=$("$BENCH" "${common[@]}" --measured-peak "$gemm_peak" $flags --cuda-graphs off 2>&1); rc=$?
    echo "$out" | grep '^bench:'
    line=$(echo "$out" | grep '^bench:' | tail -n 1)
    if [ "$rc" -ne 0 ] || [ -z "$line" ]; then echo "no-graphs run FAILED (exit code $rc)"; status=1
    else res["$name|ours, no graphs"]=$(parse "$line"); fi
  fi
  if [ "$have_torch" = 1 ]; then
    for mode in eager compile; do
      cflag=(); [ "$mode" = compile ] && cflag=(--compile)
      out=$($PYTHON dev/bench/torch_baseline.py --d "${shape[0]}" --layers "${shape[1]}" --heads "${shape[2]}" \
              --kv-heads "${shape[3]}" --ffn "${shape[4]}" --vocab "$VOCAB" --batch "$BATCH" --seq "$SEQ" \
              --grad-accum "$GRAD_ACCUM" --steps "$STEPS" --warmup "$WARMUP" --measured-peak "$gemm_peak" \
              "${cflag[@]}" $tflags 2>&1); rc=$?
      echo "$out" | tail -n 3
      line=$(echo "$out" | grep '^torch' | tail -n 1)
      if [ "$rc" -ne 0 ] || [ -z "$line" ]; then echo "torch $mode FAILED (exit code $rc)"; status=1
      else res["$name|torch $mode"]=$(parse "$line"); fi
    done
  fi
done

echo
echo "== bench table ($MODEL, seq $SEQ, $((BATCH * SEQ * GRAD_ACCUM)) tokens per step, $DTYPE; GEMM peak ${gemm_peak} TFLOP/s)"
printf '%-24s %-16s %10s %10s %8s %12s %9s\n' row impl ms/step tok/s MFU "MFU(GEMM)" "mem GiB"
for row in "${rows[@]}"; do
  name=${row%%|*}
  for impl in ours "ours, no graphs" "torch eager" "torch compile"; do
    v=${res["$name|$impl"]:-}; [ -n "$v" ] || continue
    set -- $v
    printf '%-24s %-16s %10s %10s %8s %12s %9s\n' "$name" "$impl" "$1" "$2" "$3" "$4" "$5"
  done
done
echo
echo "== goals (docs/perf.md; measured here, not asserted)"
ms() { local v=${res["$1"]:-}; [ -n "$v" ] && echo "${v%% *}"; }
ratio() { [ -n "$1" ] && [ -n "$2" ] && awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }' || echo "n/a"; }
d=$(ms "dense|ours"); m=$(ms "moe 8x top-2 F/2|ours")
echo "MoE (equal active FLOPs) step / dense step: $(ratio "$m" "$d") (goal <= 1.10x)"
r1=${rows[1]%%|*}
echo "$r1 without / with CUDA graphs: $(ratio "$(ms "$r1|ours, no graphs")" "$(ms "$r1|ours")") (the launches the graphs save)"
for row in "${rows[@]}"; do
  name=${row%%|*}; o=$(ms "$name|ours")
  v=${res["$name|ours"]:-}; mfu=$( [ -n "$v" ] && echo "$v" | awk '{print $3}' || echo n/a)
  echo "$name: MFU $mfu (MoE goal >= 50%); vs torch eager $(ratio "$(ms "$name|torch eager")" "$o") (goal >= 2x), vs torch.compile $(ratio "$(ms "$name|torch compile")" "$o") (goal >= 1.3x)"
done
exit $status
