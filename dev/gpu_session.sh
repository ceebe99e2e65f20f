#!/usr/bin/env bash
# dev/gpu_session.sh: the one call to make when a session is lent a GPU (H100/H200).
# Builds everything in parallel, then runs, each part under its own time limit and all of
# them under one deadline: a first fp32 fixture check (the quickest signal), make test-gpu's
# checks (test/test_gpu.sh: fixtures fp32 + bf16, bit-identical resume, 20 steps GPU vs CPU),
# every dev/cuda kernel check + benchmark (dev/cuda/run_all.sh), and make bench; `memcheck`
# (not in the default PARTS) runs one fp32 fixture check under compute-sanitizer (seen working
# on the Firecracker machines, refused on gVisor: docs in the device tool's KINDS.md).
# Logs go under $OUT (they come back with the device tool's reply); the summary is printed last.
#
# From the development machine, through the device tool (the GPU machine has no network, so
# carry the tiny corpus; without it test_gpu.sh falls back to synthetic shards):
#   run(command="bash dev/gpu_session.sh", carry=["data/tiny"], timeout_s=600)
# Then write what passed and the numbers into docs/gpu-log.md (and docs/perf.md for bench).
#
# Environment: OUT (default build/gpu_session), DEADLINE (seconds for everything, default 540),
# PARTS (default "fixture test_gpu dev_cuda bench"; the build always runs first).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu_session}
DEADLINE=${DEADLINE:-540}
PARTS=${PARTS:-fixture test_gpu dev_cuda bench}
mkdir -p "$OUT"
t_start=$(date +%s)
summary=()

# part NAME LIMIT CMD...: run CMD with its output in $OUT/NAME.log, under min(LIMIT, time left)
part() {
  local name=$1 lim=$2; shift 2
  local left=$(( DEADLINE - ($(date +%s) - t_start) ))
  if [ "$left" -lt 20 ]; then summary+=("$(printf '%-12s skipped: deadline reached' "$name")"); return 1; fi
  [ "$lim" -gt "$left" ] && lim=$left
  echo "== $name (limit ${lim}s)"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$lim" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local res; res=$(grep -E '^(TOTAL: )?[0-9]+ passed, [0-9]+ failed' "$OUT/$name.log" | tail -n 1)
  [ "$rc" -eq 124 ] && res="TIMED OUT at ${lim}s. $res"
  summary+=("$(printf '%-12s rc %-3d %4ds  %s' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$res")")
  tail -n 15 "$OUT/$name.log"
  return "$rc"
}
finish() {
  echo
  echo "== gpu_session summary ($(git rev-parse --short HEAD 2>/dev/null || echo '?'), logs in $OUT)"
  printf '%s\n' "${summary[@]}"
  [ -f "$OUT/bench.log" ] && grep -E '^(dense|moe)' "$OUT/bench.log"
}
trap finish EXIT

{ echo "commit $(git rev-parse HEAD 2>/dev/null)"; date -u; nvidia-smi; nvcc --version; nproc; } > "$OUT/machine.txt" 2>&1
head -n 14 "$OUT/machine.txt" | tail -n 10

part build 240 make -j"$(nproc)" train_moe upcycle train_moe_gpu cuda-check || exit 1
for p in $PARTS; do
  case $p in
    fixture)  part fixture 60 ./train_moe_gpu --check-fixture test/fixtures/moe_topk_softmax --dtype fp32 ;;
    test_gpu) mkdir -p "$OUT/test_gpu"
              part test_gpu 240 env DEVCUDA=0 KEEP_TMP=1 TMPDIR="$OUT/test_gpu" bash test/test_gpu.sh
              find "$OUT/test_gpu" -name '*.safetensors' -delete 2>/dev/null ;;  # logs come back, not weights
    dev_cuda) part dev_cuda 240 env LOGDIR="$OUT/dev_cuda" BINDIR=build/cuda-check bash dev/cuda/run_all.sh ;;
    bench)    part bench 150 bash dev/bench/bench.sh ;;
    memcheck) part memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 3 \
                ./train_moe_gpu --check-fixture test/fixtures/moe_empty_expert --dtype fp32 ;;
    *)        echo "unknown part $p"; exit 2 ;;
  esac
done
exit 0
