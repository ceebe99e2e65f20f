#!/usr/bin/env bash
# test/test_gpu.sh: the GPU trainer's checks (make test-gpu on a GPU; make test runs them in
# the CUDA emulation with GPU=build/emu/train_moe_gpu FIXTURES=build/emu/test_gpu_fixtures).
#   (a) the reference fixtures (test/fixtures/*), fp32 and bf16, through test_gpu_fixtures
#       (what is checked and why: the top of test/test_gpu_fixtures.cu, docs/perf.md); then
#       each planted bug of test_gpu_fixtures --plant must be caught by the check named
#   (b) bit-identical resume: 6 steps with --save-every 3 vs 3 + resume 3; metrics records
#       (ignoring tok_per_s and mfu) and final model/optimizer bytes must be identical
#   (c) 20 training steps, GPU vs the CPU trainer, same flags: fp32 within 1e-4 relative
#       per step, bf16 within 3e-2 (see docs/perf.md for why); --aux-loss dpsl refused
#   (d) the dev/cuda kernel checks built by `make cuda-check` (build/cuda-check/*; DEVCUDA=0
#       skips them: under emulation and in dev/gpu_session.sh they run through dev/cuda/run_all.sh)
# Prints "N passed, M failed" and exits non-zero on any failure. PARTS (default "a b c d")
# selects parts.
set -u
cd "$(dirname "$0")/.."
GPU=${GPU:-./train_moe_gpu}
FIXTURES=${FIXTURES:-build/test_gpu_fixtures}
CPU=${CPU:-./train_moe}
PY=${PYTHON:-python3}
PARTS=${PARTS:-a b c d}
pass=0; fail=0
ok() { pass=$((pass + 1)); echo "PASS $*"; }
bad() { fail=$((fail + 1)); echo "FAIL $*"; }
want() { case " $PARTS " in *" $1 "*) return 0 ;; esac; return 1; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/test_gpu.XXXXXX")
# KEEP_TMP=1 keeps the logs (fixture runs, resume and curve runs) for the post-mortem
trap 'if [ -n "${KEEP_TMP:-}" ]; then echo "logs kept in $tmp"; else rm -rf "$tmp"; fi' EXIT

for b in "$GPU" "$CPU" "$FIXTURES"; do
  [ -x "$b" ] || { echo "missing $b (make train_moe train_moe_gpu build/test_gpu_fixtures)"; echo "0 passed, 1 failed"; exit 1; }
done

# Data: data/tiny when built (make data-tiny), else synthetic llm.c shards (vocab 256).
if [ -f data/tiny/tokenizer.bin ]; then
  DATA=data/tiny; VOCAB_FLAG=""
else
  DATA=$tmp/synth; VOCAB_FLAG="--vocab 256"
  "$PY" - "$DATA" <<'PYEOF'
import os, struct, sys
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
def shard(path, n, a, seed):
    x, toks = seed, []
    for i in range(n):  # a learnable sequence with some noise: next = (a*prev + 1) mod 256
        x = (x * 6364136223846793005 + 1442695040888963407) % 2**64
        toks.append((x >> 33) % 256 if (x >> 60) == 0 else (a * (toks[-1] if toks else 0) + 1) % 256)
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", 20240520, 1, n, *([0] * 253)))
        f.write(struct.pack("<%dH" % n, *toks))
for dom, a in (("aa", 3), ("bb", 5)):
    shard(f"{d}/{dom}_train_000.bin", 60000, a, 1)
    shard(f"{d}/{dom}_val_000.bin", 6000, a, 2)
PYEOF
fi
echo "data: $DATA"

# ---------------------------------------------------------------------------
# (a) fixtures: one run over every fixture directory, both precisions; its PASS/FAIL lines
# carry each check's error ratio (error / tolerance)
fixture_dirs=()
for dir in test/fixtures/*/; do
  dir=${dir%/}
  # hf_llama / hf_mixtral hold transformers' logits (hf_logits.safetensors), not a training
  # fixture (test_cpu checks those directories)
  [ -f "$dir/fixture.safetensors" ] && fixture_dirs+=("$dir")
done
if want a; then
  # skipping must never turn into testing nothing
  [ ${#fixture_dirs[@]} -gt 0 ] || bad "fixtures: no test/fixtures/*/fixture.safetensors found"
  # one process per fixture, JOBS at a time (the emulation is faster single-threaded on
  # these tiny grids: OMP_NUM_THREADS=1 for each)
  log=$tmp/fixtures.log; rc=0
  printf '%s\n' "${fixture_dirs[@]}" | xargs -P "${JOBS:-$(nproc)}" -I{} sh -c \
    'OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$0" --dtype both "$1" > "$2/fx_$(basename "$1").log" 2>&1 || echo "$1" >> "$2/fx_failed"' \
    "$FIXTURES" {} "$tmp"
  [ -f "$tmp/fx_failed" ] && rc=1
  p=0; f=0
  for dir in "${fixture_dirs[@]}"; do
    flog=$tmp/fx_$(basename "$dir").log
    cat "$flog" >> "$log"
    fl=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$flog" | tail -n 1)
    if [ -z "$fl" ]; then f=$((f + 1)); echo "FAIL fixture $(basename "$dir"): no result line"; tail -n 5 "$flog"; continue; fi
    p=$((p + $(echo "$fl" | awk '{print $1}'))); f=$((f + $(echo "$fl" | awk '{print $3}')))
  done
  grep -E '^(FAIL|    )' "$log"
  pass=$((pass + p)); fail=$((fail + f))
  echo "fixtures (${#fixture_dirs[@]} directories, fp32 + bf16): $p passed, $f failed"
  worst=$(grep -E '^PASS' "$log" | awk '{print $NF "\t" $0}' | sort -g | tail -n 1 | cut -f2-)
  echo "  largest error ratio among the passing checks: $worst"
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then bad "fixtures: a run exited non-zero with no failed check"; fi
  # planted bugs: each must fail the check named (the checks can fail); PLANTS=0 skips them
  [ "${PLANTS:-1}" = 0 ] || for spec in "router_swap|bf16|topk_set" "router_swap|fp32|topk_set" "no_router_loss_grad|bf16|gradients" \
              "no_router_loss_grad|fp32|gradients" "lr|bf16|AdamW update vs host" "lr|fp32|AdamW step losses" \
              "stale_copy|bf16|AdamW bf16 working copy"; do
    IFS='|' read -r plant dtype needle <<<"$spec"
    plog=$tmp/plant_${plant}_$dtype.log
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$FIXTURES" --dtype "$dtype" --plant "$plant" test/fixtures/moe_topk_softmax >"$plog" 2>&1
    rc=$?
    if [ "$rc" -ne 0 ] && grep -q "^FAIL .*\] $needle" "$plog"; then
      ok "planted bug $plant ($dtype) caught: $(grep -m1 "^FAIL .*\] $needle" "$plog" | cut -c1-150)"
    else
      bad "planted bug $plant ($dtype) NOT caught by \"$needle\" (exit code $rc)"; grep -E '^FAIL' "$plog" | head -n 3
    fi
  done
fi

# ---------------------------------------------------------------------------
# (b) bit-identical resume
resume_case() {  # resume_case NAME DTYPE EXTRA_FLAGS...
  local name=$1 dtype=$2; shift 2
  local flags="--data $DATA $VOCAB_FLAG --model tiny --steps 6 --batch 4 --seq 64 --lr 3e-3 --eval-every 3 --eval-batches 2 --sample-tokens 0 --seed 7 --dtype $dtype $*"
  local A=$tmp/resume_${name}_A B=$tmp/resume_${name}_B
  if ! "$GPU" $flags --save-every 3 --out "$A" >"$A.log" 2>&1; then bad "resume $name: first run failed"; tail -n 5 "$A.log"; return; fi
  if ! "$GPU" $flags --resume "$A/step_000003" --out "$B" >"$B.log" 2>&1; then bad "resume $name: resumed run failed"; tail -n 5 "$B.log"; return; fi
  # every record of the resumed run equals the first run's, and the final checkpoints are byte-identical
  local res
  if res=$("$PY" test/compare_runs.py "$A" "$B" --exact 2>&1); then ok "resume $name: $(echo $res)"
  else bad "resume $name: $(echo $res)"; fi
}
# CUDA graphs on (the default) vs off: the same records and final checkpoint, bit for bit
# (learning-rate warmup, gradient accumulation, evaluations and the aux-free bias between
# graph launches)
graphs_case() {  # graphs_case NAME DTYPE EXTRA_FLAGS...
  local name=$1 dtype=$2; shift 2
  local flags="--data $DATA $VOCAB_FLAG --model tiny --steps 6 --batch 2 --grad-accum 2 --seq 64 --lr 3e-3 --warmup 3 --eval-every 3 --eval-batches 2 --sample-tokens 0 --seed 5 --dtype $dtype $*"
  local A=$tmp/graphs_${name}_off B=$tmp/graphs_${name}_on
  if ! "$GPU" $flags --cuda-graphs off --out "$A" >"$A.log" 2>&1; then bad "graphs $name: run without graphs failed"; tail -n 5 "$A.log"; return; fi
  if ! "$GPU" $flags --cuda-graphs on --out "$B" >"$B.log" 2>&1; then bad "graphs $name: run with graphs failed"; tail -n 5 "$B.log"; return; fi
  if ! grep -q "CUDA graphs on" "$B.log" || grep -q "warning: capturing a CUDA graph" "$B.log"; then
    bad "graphs $name: graphs not used ($(grep -o 'CUDA graphs [^;]*' "$B.log" | head -n 1))"; return; fi
  local res
  if res=$("$PY" test/compare_runs.py "$A" "$B" --exact 2>&1); then ok "CUDA graphs on vs off, $name: $(echo $res)"
  else bad "CUDA graphs on vs off, $name: $(echo $res)"; fi
}
if want b; then
  graphs_case moe_bf16 bf16 --experts 4 --topk 2 --aux-free-bias 1e-3 --aux-loss seq --z-coef 1e-3
  graphs_case dense_fp32 fp32
  resume_case moe_bf16 bf16 --experts 4 --topk 2 --aux-free-bias 1e-3
  resume_case moe_fp32 fp32 --experts 4 --topk 2 --aux-loss seq
  resume_case dense_bf16 bf16
fi

# ---------------------------------------------------------------------------
# (c) GPU vs CPU training losses, 20 steps, same flags
compare_losses() {  # compare_losses CPU.jsonl GPU.jsonl RTOL
  "$PY" - "$1" "$2" "$3" <<'PYEOF'
import json, sys
def losses(p): return {r["step"]: r["loss"] for r in map(json.loads, open(p)) if "loss" in r}
a, b, tol = losses(sys.argv[1]), losses(sys.argv[2]), float(sys.argv[3])
worst = max((abs(b[s] - a[s]) / abs(a[s]), s) for s in a) if a and set(a) == set(b) else (float("inf"), -1)
print(f"{len(a)} steps; worst relative difference {worst[0]:.3g} at step {worst[1]} (tolerance {tol:g})")
sys.exit(0 if worst[0] <= tol else 1)
PYEOF
}
curve_case() {  # curve_case NAME MODEL_FLAGS...
  local name=$1; shift
  local flags="--data $DATA $VOCAB_FLAG --model tiny --steps 20 --batch 4 --seq 64 --lr 3e-3 --warmup 2 --eval-batches 1 --sample-tokens 0 --no-save --seed 11 $*"
  if ! "$CPU" $flags --out "$tmp/curve_${name}_cpu" >"$tmp/curve_${name}_cpu.log" 2>&1; then bad "curve $name: CPU run failed"; tail -n 5 "$tmp/curve_${name}_cpu.log"; return; fi
  for spec in fp32:1e-4 bf16:3e-2; do
    local dtype=${spec%%:*} tol=${spec##*:}
    local out=$tmp/curve_${name}_$dtype
    if ! "$GPU" $flags --dtype "$dtype" --out "$out" >"$out.log" 2>&1; then bad "curve $name $dtype: GPU run failed"; tail -n 5 "$out.log"; continue; fi
    if compare_losses "$tmp/curve_${name}_cpu/metrics.jsonl" "$out/metrics.jsonl" "$tol"; then ok "curve $name $dtype"; else bad "curve $name $dtype"; fi
  done
}
if want c; then
  curve_case dense
  curve_case moe --experts 4 --topk 2
  curve_case moe_softmax_topk_pooled --experts 4 --topk 2 --routing softmax_topk --aux-loss pooled
  # the Dirichlet-prior shaping loss is CPU-only (docs/METHODS.md 1.6): a clear refusal, no output
  out=$("$GPU" --data "$DATA" $VOCAB_FLAG --model tiny --experts 4 --aux-loss switch+dpsl --steps 1 --out "$tmp/gpu_dpsl" 2>&1)
  if [ $? -ne 0 ] && echo "$out" | grep -q "not implemented in the GPU trainer yet; use train_moe (CPU)" && [ ! -e "$tmp/gpu_dpsl" ]
  then ok "--aux-loss dpsl refused by the GPU trainer"; else bad "--aux-loss dpsl not refused clearly: $out"; fi
fi

# ---------------------------------------------------------------------------
# (d) dev/cuda kernel checks, if built (make cuda-check puts them in build/cuda-check/);
# DEVCUDA=0 skips them (dev/gpu_session.sh runs them through dev/cuda/run_all.sh instead)
for bin in build/cuda-check/*; do
  { [ "${DEVCUDA:-1}" = 0 ] || ! want d; } && break
  [ -x "$bin" ] || continue
  case $(basename "$bin") in train_moe|train_moe_gpu|test_gpu_fixtures|bench_gpu) continue ;; esac
  if "$bin" >"$tmp/devcuda.log" 2>&1; then ok "dev/cuda $(basename "$bin")"; else bad "dev/cuda $(basename "$bin")"; tail -n 10 "$tmp/devcuda.log"; fi
done

echo
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
