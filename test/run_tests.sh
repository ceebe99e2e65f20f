#!/usr/bin/env bash
# Runs every test suite, each of which ends with "N passed, M failed", and prints the total.
# Exits non-zero if any suite fails or crashes. Called by `make test` (SUITES=emu: only the
# GPU code in the CUDA emulation, `make test-emu`; SUITES=san: the CPU suites built with
# ASan + UBSan, `make test-san`; SUITES=fuzz: the short fuzzing pass alone).
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EMU_DIR=${EMU_DIR:-build/emu}
SUITES=${SUITES:-all}
total_pass=0; total_fail=0; broken=()
t_all=$(date +%s)

suite() {  # suite NAME COMMAND...
  local name=$1; shift
  echo "=== $name: $*"
  local log; log=$(mktemp)
  local t0; t0=$(date +%s)
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local line; line=$(grep -E '^([A-Za-z]+: )?[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
  rm -f "$log"
  line=${line#*: }
  if [ -z "$line" ]; then
    echo "=== $name: no result line (exit code $rc)"; broken+=("$name"); total_fail=$((total_fail + 1)); return
  fi
  local p f; p=$(echo "$line" | awk '{print $1}'); f=$(echo "$line" | awk '{print $3}')
  total_pass=$((total_pass + p)); total_fail=$((total_fail + f))
  echo "=== $name: $line ($(( $(date +%s) - t0 )) s)"
  if [ "$rc" -ne 0 ] || [ "$f" -ne 0 ]; then broken+=("$name"); fi
}

# Can clang build a libFuzzer binary here? (.ci/run installs clang; elsewhere it is optional)
have_libfuzzer() {
  local probe; probe=$(mktemp -d)
  echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' >"$probe/p.cpp"
  "${FUZZ_CXX:-clang++}" -fsanitize=fuzzer,address,undefined -o "$probe/p" "$probe/p.cpp" >/dev/null 2>&1
  local rc=$?
  rm -rf "$probe"
  return $rc
}

# The CPU suites again, every binary built with AddressSanitizer + UBSan into build/san/
# (make test-san builds them first; make test builds them here, about 4 minutes on 2 cores,
# and runs them after the normal CPU suites, about 1 minute)
san_suites() {
  export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
  export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
  suite "CPU trainer (ASan+UBSan)" build/san/test_cpu build/san/train_moe
  suite "finite differences (ASan+UBSan)" build/san/test_gradcheck
  suite "upcycle (ASan+UBSan)" build/san/test_upcycle build/san/upcycle build/san/train_moe
}
[ "$SUITES" = san ] && san_suites

if [ "$SUITES" = all ]; then
  suite "CPU trainer" ./test/bin/test_cpu ./train_moe
  suite "finite differences" ./test/bin/test_gradcheck
  suite "CPU benchmark smoke run" bash -c "SMOKE=1 bash dev/bench/bench_cpu.sh | tee /dev/stderr | grep -q '^bench: ' && echo '1 passed, 0 failed' || { echo '0 passed, 1 failed'; exit 1; }"
  [ -x test/bin/test_upcycle ] && suite "upcycle" ./test/bin/test_upcycle ./upcycle ./train_moe
  suite "data" "$PYTHON" dev/data/test_data.py data/tiny
  suite "tokenizer: the C++ BPE encoder vs tokenizers" "$PYTHON" test/test_tokenizer.py data/tiny
  suite "generate (KV cache, batches, sampling)" bash test/test_generate.sh
  suite "crash safety (SIGKILL loop, full disk)" bash test/test_crash.sh ./train_moe
  echo "=== building the ASan+UBSan binaries (build/san/)"
  if make --no-print-directory -j"$(nproc)" san; then san_suites
  else echo "=== ASan+UBSan build failed"; broken+=("ASan+UBSan build"); total_fail=$((total_fail + 1)); fi
  if command -v "${NVCC:-nvcc}" >/dev/null 2>&1; then
    suite "CUDA compile" bash -c 'make --no-print-directory -j"$(nproc)" cuda-check && echo "1 passed, 0 failed" || { echo "0 passed, 1 failed"; exit 1; }'
  fi
fi

# The GPU code, run on the CPU through the CUDA emulation (docs/emulation.md)
if [ "$SUITES" != all ] && [ "$SUITES" != emu ]; then
  :  # a selection without the emulated suites
elif [ -x "$EMU_DIR/train_moe_gpu" ]; then
  fixture_dirs=()
  for d in test/fixtures/*/; do [ -f "$d/fixture.safetensors" ] && fixture_dirs+=("${d%/}"); done
  suite "CUDA emulator (emulated)" "$EMU_DIR/test_emu"
  suite "dev/cuda kernels (emulated)" env NOBUILD=1 BINDIR="$EMU_DIR/dev_cuda" LOGDIR="$EMU_DIR/dev_cuda_logs" bash dev/cuda/run_all.sh
  suite "generate_gpu (emulated)" env GEN="$EMU_DIR/generate_gpu" bash test/test_generate.sh
  suite "GPU trainer (emulated)" env GPU="$EMU_DIR/train_moe_gpu" FIXTURES="$EMU_DIR/test_gpu_fixtures" DEVCUDA=0 bash test/test_gpu.sh
  suite "data parallel, 1-4 ranks with the NCCL stand-in (emulated)" env GPU="$EMU_DIR/train_moe_gpu" bash test/test_dp.sh
  suite "GPU fixtures, reverse schedule (emulated)" env EMU_SCHED=reverse "$EMU_DIR/test_gpu_fixtures" --dtype both "${fixture_dirs[@]}"
  suite "GPU benchmark smoke run (emulated)" bash -c "'$EMU_DIR/bench_gpu' --data data/tiny --model tiny --experts 4 --topk 2 --batch 2 --seq 32 --steps 2 --warmup-steps 1 | tee /dev/stderr | grep -q '^bench: MoE' && echo '1 passed, 0 failed' || { echo '0 passed, 1 failed'; exit 1; }"
  suite "dev/gpu_session.sh (emulated)" env EMU=1 EMU_DIR="$EMU_DIR" PARTS="fixture" OUT="$EMU_DIR/gpu_session" bash dev/gpu_session.sh
elif [ "$SUITES" = emu ] || command -v "${NVCC:-nvcc}" >/dev/null 2>&1; then
  echo "=== emulated GPU suites: $EMU_DIR/train_moe_gpu is missing (make emu)"; broken+=("emulation"); total_fail=$((total_fail + 1))
fi

[ "$SUITES" = all ] && [ -f scripts/test_scripts.sh ] && suite "reproduction scripts (tiny)" bash scripts/test_scripts.sh

# The parsers of outside bytes under libFuzzer, FUZZ_SECONDS each (docs/reliability.md)
if [ "$SUITES" = all ] || [ "$SUITES" = fuzz ]; then
  if have_libfuzzer; then
    suite "fuzzing (${FUZZ_SECONDS:-20} s per parser)" make --no-print-directory fuzz FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
  else
    echo "=== fuzzing: SKIPPED: ${FUZZ_CXX:-clang++} with libFuzzer not found (apt-get install clang; .ci/run does)"
  fi
fi

echo
if [ ${#broken[@]} -gt 0 ]; then echo "failing suites: ${broken[*]}"; fi
echo "(all suites: $(( $(date +%s) - t_all )) s)"
echo "$total_pass passed, $total_fail failed"
[ ${#broken[@]} -eq 0 ] && [ "$total_fail" -eq 0 ]
