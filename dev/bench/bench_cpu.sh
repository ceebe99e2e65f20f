#!/usr/bin/env bash
# bench_cpu.sh: CPU trainer throughput (make bench-cpu). Prints the machine's single-core peak
# (an FMA loop), then tokens/s and effective GFLOP/s for dense and MoE at the d768 shape
# (GPT-2 small: d 768, 12 layers, 12 heads, V 50304, B 4, T 64) and at the tiny
# reproductions' shape (d 64, 2 layers, V 2048, B 8, T 64, 8 experts top-2), at 1 and 2
# threads. LLMC=<path to llm.c checkout>: also llm.c's train_gpt2.c at the d768 shape
# (dev/bench/llmc_bench.c; built in $TMPDIR, nothing of llm.c enters this repository).
# Environment: STEPS (timed steps per config, default 2; the min is reported), THREADS
# (default "1 2"), SMOKE=1 (tiny shape, 1 step, 1 thread: the test suite's smoke run).
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "$0")/../.."
CXX=${CXX:-g++}; CC=${CC:-gcc}
STEPS=${STEPS:-2}; THREADS=${THREADS:-"1 2"}
tmp=${TMPDIR:-/tmp}/bench_cpu.$$; mkdir -p "$tmp"; trap 'rm -rf "$tmp"' EXIT
$CXX -std=c++17 -O3 -march=native -fopenmp -fno-math-errno -fno-trapping-math -fno-plt -o "$tmp/bench_cpu" dev/bench/bench_cpu.cpp
if [ "${SMOKE:-0}" = 1 ]; then
  "$tmp/bench_cpu" --model tiny --vocab 2048 --batch 8 --seq 64 --experts 8 --topk 2 --steps 1 --threads 1
  exit 0
fi
"$tmp/bench_cpu" --peak
if [ -n "${LLMC:-}" ]; then
  $CC -Ofast -march=native -fopenmp -Wno-unused-result -DLLMC_TRAIN_GPT2="\"$LLMC/train_gpt2.c\"" \
      -o "$tmp/llmc_bench" dev/bench/llmc_bench.c -lm
fi
for th in $THREADS; do
  [ -n "${LLMC:-}" ] && "$tmp/llmc_bench" --steps "$STEPS" --threads "$th" | grep '^bench'
  "$tmp/bench_cpu" --name dense --model d768 --steps "$STEPS" --threads "$th"
  "$tmp/bench_cpu" --name "moe 8x1536 k2" --model d768 --experts 8 --topk 2 --expert-width 1536 --steps "$STEPS" --threads "$th"
  "$tmp/bench_cpu" --name dense --model tiny --vocab 2048 --batch 8 --seq 64 --steps $((STEPS * 5)) --threads "$th"
  "$tmp/bench_cpu" --name "moe 8x256 k2" --model tiny --vocab 2048 --batch 8 --seq 64 --experts 8 --topk 2 --steps $((STEPS * 5)) --threads "$th"
done
