#!/usr/bin/env bash
# dev/bench/bench_inference.sh: what an upcycled MoE costs at inference next to its dense
# parent (the question of arXiv 2411.08968: upcycling trains better but serves slower), on
# the CPU, in one run side by side. Three models of one shape (MODEL, default d512, the
# corpus's vocabulary; random weights: speed does not depend on them):
#   dense        the dense model (train_moe, one step)
#   MoE G=2      upcycle --method granular --granularity 2: 8 experts of F/2, top-2: the dense
#                model's active parameters, 4x its FFN parameters
#   MoE naive    upcycle --method naive: 8 experts of F, top-2 (sparse upcycling as published):
#                2x the dense model's active FFN parameters, 8x its FFN parameters
# each through ./generate (KV cache, greedy, --no-stop) at batch 1 and at a serving batch
# (SERVE prompts, default 16): prefill and decode tokens/s, weights, KV cache, peak memory.
# REPEAT rounds (default 2) alternate the models; the table shows the best of the rounds.
# Environment: MODEL, TOKENS (generated per prompt, default 32), SERVE, THREADS (default 1),
# REPEAT, OUT (keep the models there instead of a temporary directory), GEN (default
# ./generate; GEN=./generate_gpu measures the GPU build, GEN_ARGS e.g. "--dtype fp32").
set -eu
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-d512}; TOKENS=${TOKENS:-32}; SERVE=${SERVE:-16}; THREADS=${THREADS:-1}; REPEAT=${REPEAT:-2}
GEN=${GEN:-./generate}; GEN_ARGS=${GEN_ARGS:-}
for b in train_moe upcycle "$GEN"; do [ -x "./${b#./}" ] || make --no-print-directory "${b#./}" >/dev/null; done
[ -f data/tiny/tokenizer.json ] || make --no-print-directory data-tiny >/dev/null
dir=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/bench_inference.XXXXXX")}
[ -n "${OUT:-}" ] || trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir"
if [ ! -d "$dir/dense" ]; then
  ./train_moe --data data/tiny --model "$MODEL" --steps 1 --batch 1 --seq 64 --eval-batches 1 --sample-tokens 0 \
    --threads "$THREADS" --out "$dir/dense_run" >/dev/null
  mv "$dir/dense_run/step_000001" "$dir/dense"
  ./upcycle --method granular --granularity 2 --experts 8 --topk 2 --from "$dir/dense" --out "$dir/moe_g2" >/dev/null
  ./upcycle --method naive --experts 8 --topk 2 --from "$dir/dense" --out "$dir/moe_naive" >/dev/null
fi
tok=data/tiny/tokenizer.json
# prompts: the first SERVE lines of at least 20 characters of the corpus's English validation text
python3 - "$SERVE" "$dir/prompts.txt" <<'PY'
import struct, sys
from tokenizers import Tokenizer
n, out = int(sys.argv[1]), sys.argv[2]
raw = open("data/tiny/en_val_000.bin", "rb").read()
k = struct.unpack("<256i", raw[:1024])[2]
text = Tokenizer.from_file("data/tiny/tokenizer.json").decode(list(struct.unpack("<%dH" % k, raw[1024:1024 + 2 * k])))
lines = [l.strip()[:60] for l in text.split("\n") if len(l.strip()) >= 20]
open(out, "w").write("\n".join(lines[:n]) + "\n")
PY
head -n 1 "$dir/prompts.txt" >"$dir/prompt1.txt"
echo "bench_inference: $GEN $GEN_ARGS, $MODEL shape, $TOKENS tokens per prompt, $THREADS thread(s), best of $REPEAT rounds; $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg)"
declare -A best
for r in $(seq 1 "$REPEAT"); do
  for m in dense moe_g2 moe_naive; do
    for batch in 1 "$SERVE"; do
      p=$dir/prompt1.txt; [ "$batch" = 1 ] || p=$dir/prompts.txt
      line=$($GEN --model "$dir/$m" --tokenizer "$tok" --prompts "$p" --max-tokens "$TOKENS" --temperature 0 \
               --no-stop --threads "$THREADS" $GEN_ARGS 2>&1 >/dev/null | tail -n 1)
      key="$m $batch"
      pre=$(echo "$line" | sed -E 's/.*\(([0-9]+) tok\/s\); decode.*/\1/')
      dec=$(echo "$line" | sed -E 's/.*decode [0-9]+ tokens in [0-9.]+ s \(([0-9]+) tok\/s.*/\1/')
      # (generate: peak resident memory; generate_gpu: GPU memory in use at the end)
      mem=$(echo "$line" | sed -E 's/.*weights ([0-9.]+) MB, KV cache ([0-9.]+) MB, (peak memory|GPU memory in use) ([0-9.]+) MB.*/\1 \2 \4/')
      old=${best[$key]:-"0 0 0 0 0"}
      set -- $old
      [ "$pre" -gt "$1" ] && p1=$pre || p1=$1
      [ "$dec" -gt "$2" ] && d1=$dec || d1=$2
      best[$key]="$p1 $d1 $mem"
    done
  done
done
params() { python3 -c "import json,sys; c=json.load(open('$1/config.json')); print(c.get('num_local_experts', 0), c['intermediate_size'])"; }
printf '| model | experts x width, top-k | batch | prefill tok/s | decode tok/s | decode vs dense | weights MB | KV cache MB | peak MB |\n'
printf '|---|---|---:|---:|---:|---:|---:|---:|---:|\n'
for batch in 1 "$SERVE"; do
  set -- ${best["dense $batch"]}; dense_dec=$2
  for m in dense moe_g2 moe_naive; do
    set -- ${best["$m $batch"]}
    read -r E F < <(params "$dir/$m")
    shape=$([ "$E" = 0 ] && echo "dense, F $F" || echo "$E x $F, top-2")
    name=$(case $m in dense) echo "dense";; moe_g2) echo "MoE G=2 (equal active)";; moe_naive) echo "MoE naive (2x active FFN)";; esac)
    printf '| %s | %s | %d | %d | %d | %.2fx | %.0f | %.1f | %.0f |\n' "$name" "$shape" "$batch" "$1" "$2" \
      "$(python3 -c "print($2 / max($dense_dec, 1))")" "$3" "$4" "$5"
  done
done
