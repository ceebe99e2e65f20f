#!/usr/bin/env bash
# dev/gpu_session.sh: the one call to make when a session is lent a GPU (H100/H200). It tells
# everything a CPU cannot: in this order, each part under its own time limit and all of them
# under one deadline (DEADLINE, default 510 s: a 9-minute budget with room to pack the logs):
#   build      train_moe (g++), and with nvcc: train_moe_gpu, test_gpu_fixtures, bench_gpu and
#              every dev/cuda program, in parallel (make -j when make exists, else the same
#              commands directly: the GPU machine's image may have no make)
#   fixture    one fp32 fixture (the quickest signal that the GPU code runs at all)
#   fixtures   every fixture, fp32 and bf16, and the planted bugs (test/test_gpu.sh part a)
#   trainer    bit-identical resume and 20 steps GPU vs CPU (test/test_gpu.sh parts b, c)
#   dp         the data-parallel code on real NCCL with one rank (a launcher's variables,
#              world size 1) against the plain run (test/test_dp.sh part a, RANKS=1: NCCL
#              refuses two ranks on one GPU, so more ranks need more GPUs)
#   generate   generate_gpu (KV cache, batches, seeds; fp32 greedy text = the CPU build's):
#              test/test_generate.sh with GEN=generate_gpu
#   dev_cuda   every dev/cuda kernel check and benchmark (dev/cuda/run_all.sh)
#   bench      the throughput table (dev/bench/bench.sh)
#   memcheck   (not in the default PARTS) one fp32 fixture under compute-sanitizer
#   repro      (not in the default PARTS) Table 1 at the gpu_short preset (scripts/
#              repro_drop_upcycling.py --preset gpu_short: <= 4 minutes predicted); needs
#              data/pack/corpus-full.tar.xz carried (make data && make data-pack here)
#   inference  (not in the default PARTS) dev/bench/bench_inference.sh with generate_gpu, bf16
#              (dense vs its upcycled MoEs at batch 1 and 16; needs python3 `tokenizers`)
# Every binary runs under `timeout`. What comes back is two files in $OUT: summary.txt (each
# part's result, every FAIL line, the largest error ratios, the bench table) and logs.tar.gz
# (every log). The summary is printed last.
#
# From the development machine, through the device tool (the GPU machine has no network):
#   run(command="bash dev/gpu_session.sh", carry=["data/tiny"], timeout_s=600)
# Then log the result in docs/gpu-log.md (and the bench numbers in docs/perf.md).
#
# The same script runs here in the CUDA emulation (make test runs its fixture part):
#   EMU=1 bash dev/gpu_session.sh        (binaries from $EMU_DIR, default build/emu)
#
# Environment: OUT (default build/gpu_session), DEADLINE (seconds, default 510), PARTS
# (default "fixture fixtures trainer dp generate dev_cuda bench"; the build always runs first), EMU (1:
# emulated binaries), JOBS (parallel builds, default nproc), NO_MAKE (1: build with the direct
# commands even where make exists), NVCC (default nvcc).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu_session}
DEADLINE=${DEADLINE:-510}
PARTS=${PARTS:-fixture fixtures trainer dp generate dev_cuda bench}
EMU=${EMU:-0}
EMU_DIR=${EMU_DIR:-build/emu}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 4)}
LOGS=$OUT/logs
mkdir -p "$LOGS"
rm -f "$OUT/summary.txt" "$OUT/logs.tar.gz"
t_start=$(date +%s)
summary=()

if [ "$EMU" = 1 ]; then
  GPU=$EMU_DIR/train_moe_gpu; FIXTURES=$EMU_DIR/test_gpu_fixtures; BENCH=$EMU_DIR/bench_gpu; GEN=$EMU_DIR/generate_gpu
  DEVCUDA_BINDIR=$EMU_DIR/dev_cuda
  BENCH_ENV=(MODEL=tiny BATCH=2 SEQ=64 GRAD_ACCUM=2 STEPS=1 WARMUP=0 GEMM_N=64)  # the script's logic, not a measurement
else
  GPU=./train_moe_gpu; FIXTURES=build/cuda-check/test_gpu_fixtures; BENCH=build/cuda-check/bench_gpu; GEN=./generate_gpu
  DEVCUDA_BINDIR=build/cuda-check
  BENCH_ENV=()
fi

# part NAME LIMIT CMD...: CMD with its output in $LOGS/NAME.log, under min(LIMIT, time left)
part() {
  local name=$1 lim=$2; shift 2
  local left=$(( DEADLINE - ($(date +%s) - t_start) ))
  if [ "$left" -lt 20 ]; then summary+=("$(printf '%-9s skipped: deadline reached' "$name")"); return 1; fi
  [ "$lim" -gt "$left" ] && lim=$left
  echo "== $name (limit ${lim}s)"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$lim" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local res; res=$(grep -E '^([A-Za-z]+: )?[0-9]+ passed, [0-9]+ failed' "$LOGS/$name.log" | tail -n 1)
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && res="TIMED OUT at ${lim}s. $res"
  # a test part that printed no result line tested nothing
  if [ -z "$res" ] && [ "$rc" -eq 0 ] && [ "$name" != build ] && [ "$name" != bench ]; then rc=1; res="no result line"; fi
  summary+=("$(printf '%-9s rc %-3d %4ds  %s' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$res")")
  grep -E '^FAIL' "$LOGS/$name.log" | head -n 20
  tail -n 3 "$LOGS/$name.log"
  return "$rc"
}

# NCCL's headers and library: the CUDA toolkit's, else the pip wheel's (nvidia-nccl-cu*,
# which has libnccl.so.2 without the libnccl.so link)
nccl_flags() {
  local cuda=$(dirname "$(dirname "$(command -v "${NVCC:-nvcc}")")")
  if [ -f "$cuda/include/nccl.h" ] || [ -f /usr/include/nccl.h ]; then echo "-lnccl"; return; fi
  local d=$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null)
  if [ -n "$d" ] && [ -f "$d/include/nccl.h" ]; then
    local lib=-lnccl; [ -f "$d/lib/libnccl.so" ] || lib=-l:libnccl.so.2
    echo "-I$d/include -L$d/lib -Xlinker -rpath=$d/lib $lib"
  else echo "-lnccl"; fi
}
# the build without make: the Makefile's commands, run directly, in parallel
build_direct() {
  local arch=${GPU_ARCH:--gencode arch=compute_90,code=sm_90}
  local nv="${NVCC:-nvcc} -std=c++17 -O3 $arch --expt-relaxed-constexpr -Xcompiler -fopenmp -Xcompiler -Wall"
  local libs="-lcublas -lcublasLt -lgomp $(nccl_flags)"
  mkdir -p build/cuda-check
  local cxx="g++ -std=c++17 -O3 -march=native -fopenmp -fno-math-errno -fno-trapping-math -fno-plt"
  $cxx -o train_moe train_moe.cpp && $cxx -o generate generate.cpp && $cxx -x c++ -o upcycle upcycle.cu || return 1
  {
    echo "$nv -o train_moe_gpu train_moe.cu $libs"
    echo "$nv -x cu -DGENERATE_GPU -o generate_gpu generate.cpp $libs"
    echo "$nv -o build/cuda-check/test_gpu_fixtures test/test_gpu_fixtures.cu $libs"
    echo "$nv -o build/cuda-check/bench_gpu dev/bench/bench_gpu.cu $libs"
    for f in dev/cuda/*.cu; do echo "$nv -o build/cuda-check/$(basename "$f" .cu) $f $libs"; done
  } | xargs -P "$JOBS" -I{} bash -c '{} || { echo "BUILD FAILED: {}"; exit 255; }'
}
build() {
  if [ "$EMU" = 1 ]; then make -j"$JOBS" train_moe generate upcycle emu
  elif command -v make >/dev/null && [ "${NO_MAKE:-0}" != 1 ]; then
    make -j"$JOBS" train_moe generate upcycle train_moe_gpu generate_gpu cuda-check NCCL_FLAGS="$(nccl_flags)"
  else echo "no make on this machine: building with direct commands"; build_direct
  fi
}

# `timeout` runs programs, not shell functions: hand it the functions through the environment
export -f build build_direct nccl_flags
export EMU JOBS NO_MAKE NVCC

finish() {
  {
    echo "== gpu_session summary: commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$( [ "$EMU" = 1 ] && echo ', CUDA EMULATION (not a GPU)'), $(date -u '+%Y-%m-%d %H:%M UTC'), $(( $(date +%s) - t_start )) s"
    head -n 3 "$LOGS/machine.txt" 2>/dev/null
    printf '%s\n' "${summary[@]}"
    echo
    echo "== every FAIL line"
    grep -rh --include='*.log' --exclude=fixtures.log --exclude='plant_*' -E '^FAIL' "$LOGS" 2>/dev/null | head -n 200
    echo
    echo "== the 15 largest error ratios among the checks (ratio = error / tolerance; <= 1 passes)"
    grep -rh --include='*.log' --exclude=fixtures.log --exclude='plant_*' -E '^(PASS|FAIL) .*ratio [0-9.eE+-]+$' "$LOGS" 2>/dev/null | grep -v 'planted bug' |
      awk '{print $NF "\t" $0}' | sort -g -r | head -n 15 | cut -f2-
    echo
    echo "== bench"
    grep -h -E '^(dense|moe)' "$LOGS/bench.log" 2>/dev/null
    echo
    echo "== every check line (PASS/FAIL with its error ratio)"
    grep -rh --include='*.log' --exclude=fixtures.log --exclude='plant_*' -E '^(PASS|FAIL) ' "$LOGS" 2>/dev/null
  } > "$OUT/summary.txt"
  find "$LOGS" -name '*.safetensors' -delete 2>/dev/null  # logs come back, not weights
  tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
  sed -n '1,/^== every check line/p' "$OUT/summary.txt" | head -n 150
  echo "(summary: $OUT/summary.txt, logs: $OUT/logs.tar.gz)"
}
trap finish EXIT

{ echo "commit $(git rev-parse HEAD 2>/dev/null)"; date -u
  if [ "$EMU" = 1 ]; then echo "CUDA emulation on $(nproc) CPU cores"; else nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
  nvcc --version | tail -n 2; nproc; command -v make || echo "no make"; nvidia-smi; } > "$LOGS/machine.txt" 2>&1

part build 240 bash -c build || exit 1
for p in $PARTS; do
  case $p in
    fixture)  part fixture 60 "$FIXTURES" --dtype fp32 test/fixtures/moe_topk_softmax ;;
    fixtures) part fixtures 120 env GPU="$GPU" FIXTURES="$FIXTURES" PARTS=a KEEP_TMP=1 TMPDIR="$LOGS" bash test/test_gpu.sh ;;
    trainer)  part trainer 150 env GPU="$GPU" FIXTURES="$FIXTURES" PARTS="b c" KEEP_TMP=1 TMPDIR="$LOGS" bash test/test_gpu.sh ;;
    dp)       part dp 90 env GPU="$GPU" PARTS=a RANKS=1 KEEP_TMP=1 TMPDIR="$LOGS" bash test/test_dp.sh ;;
    generate) part generate 90 env GEN="$GEN" bash test/test_generate.sh ;;
    repro)    part repro 300 bash -c 'mkdir -p data/full && { [ -f data/full/tokenizer.bin ] || tar -xJf data/pack/corpus-full.tar.xz -C data/full; } &&
                python3 scripts/repro_drop_upcycling.py --preset gpu_short --trainer gpu --no-build --runs "'"$LOGS"'/repro_runs" \
                  --results "'"$LOGS"'/repro_results" $(python3 -c "import matplotlib" 2>/dev/null || echo --no-plots)' ;;
    inference) part inference 150 env GEN="$GEN" REPEAT=1 bash dev/bench/bench_inference.sh ;;
    dev_cuda) part dev_cuda 200 env LOGDIR="$LOGS/dev_cuda" BINDIR="$DEVCUDA_BINDIR" NOBUILD=1 bash dev/cuda/run_all.sh ;;
    bench)    part bench 150 env "${BENCH_ENV[@]}" BENCH="$BENCH" bash dev/bench/bench.sh ;;
    memcheck) part memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 3 \
                "$FIXTURES" --dtype fp32 test/fixtures/moe_empty_expert ;;
    *)        echo "unknown part $p"; exit 2 ;;
  esac
done
# the closing line the test runner reads: parts that ended with rc 0 vs the others
n_ok=0; n_bad=0
for s in "${summary[@]}"; do case $s in *" rc 0 "*) n_ok=$((n_ok + 1)) ;; *) n_bad=$((n_bad + 1)) ;; esac; done
echo "parts: $n_ok passed, $n_bad failed"
[ "$n_bad" -eq 0 ]
