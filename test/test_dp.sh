#!/usr/bin/env bash
# test/test_dp.sh: data-parallel training (several GPUs through NCCL), run here with one
# process per emulated GPU and the NCCL stand-in (dev/emu/nccl_emu.h); make test runs it
# with GPU=build/emu/train_moe_gpu. On a machine with several GPUs the same script runs the
# real trainer and NCCL (GPU=./train_moe_gpu; the emulation variables are then ignored).
#   (a) N ranks x --batch B reproduce one process with --batch N*B: 1 (under a launcher: the
#       NCCL code with one rank), 2 and 4 ranks, MoE (switch
#       aux loss, z-loss, aux-loss-free bias) and dense, fp32 and bf16, with gradient
#       accumulation, the pooled balancing loss, a shared expert; metrics and final weights within tolerance (fp32: the only difference
#       is the order of the gradient sums; bf16: that, through stochastic rounding)
#   (b) bit-identical reruns at a fixed world size, and a resume at the same world size
#   (c) resume across world sizes 4 -> 2 -> 1 (global batch kept) vs the uninterrupted run;
#       a resume with another global batch is refused
#   (d) launchers and the id hand-out: torchrun, Slurm and Open MPI variables, --nccl-init
#       file; only rank 0 prints and writes
#   (e) failures: a rank killed mid-run makes the others stop with an error naming it; a
#       missing rank makes rank 0 stop after --nccl-timeout; a rank without rank 0 too;
#       --aux-loss dpsl refused (one GPU only)
#   (f) with Open MPI's mpirun and the trainer built with USE_MPI (GPU_MPI, default
#       ${GPU}_mpi; make emu builds it where mpicxx exists): --nccl-init mpi (else skipped)
# Prints "N passed, M failed"; exits non-zero on any failure. PARTS selects parts (default all);
# RANKS the world sizes of (a) (default "1 2 4"; the other cases of (a) use the largest): on
# a machine with one GPU, RANKS=1 PARTS=a runs real NCCL on one rank (dev/gpu_session.sh).
set -u
cd "$(dirname "$0")/.."
GPU=${GPU:-./train_moe_gpu}
PY=${PYTHON:-python3}
PARTS=${PARTS:-a b c d e f}
RANKS=${RANKS:-1 2 4}
NMAX=$(echo $RANKS | tr ' ' '\n' | sort -n | tail -n 1)
pass=0; fail=0
ok() { pass=$((pass + 1)); echo "PASS $*"; }
bad() { fail=$((fail + 1)); echo "FAIL $*"; }
want() { case " $PARTS " in *" $1 "*) return 0 ;; esac; return 1; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/test_dp.XXXXXX")
trap 'if [ -n "${KEEP_TMP:-}" ]; then echo "logs kept in $tmp"; else rm -rf "$tmp"; fi' EXIT
[ -x "$GPU" ] || { echo "missing $GPU (make emu)"; echo "0 passed, 1 failed"; exit 1; }
[ -f data/tiny/tokenizer.bin ] || { echo "missing data/tiny (make data-tiny)"; echo "0 passed, 1 failed"; exit 1; }
# each emulated rank is one process on this machine: one OpenMP thread each
export OMP_NUM_THREADS=1 NCCL_EMU_TIMEOUT_S=${NCCL_EMU_TIMEOUT_S:-120}
BASE="--data data/tiny --model tiny --seq 32 --eval-every 3 --eval-batches 2 --sample-tokens 0 --lr 3e-3 --seed 5"

# launch STYLE N OUT ARGS...: N ranks with the variables of launcher STYLE (torchrun, slurm,
# openmpi); rank r's output in OUT.rank<r>.log; returns non-zero if any rank failed
launch() {
  local style=$1 n=$2 out=$3; shift 3
  local port=$((20000 + (RANDOM * 7 + $$) % 30000)) pids=() r
  for r in $(seq 0 $((n - 1))); do
    case $style in
      torchrun) env EMU_DEVICE_COUNT=$n RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r LOCAL_WORLD_SIZE=$n MASTER_ADDR=127.0.0.1 \
                  MASTER_PORT=$port "$GPU" "$@" --out "$out" >"$out.rank$r.log" 2>&1 & ;;
      slurm) env EMU_DEVICE_COUNT=$n SLURM_PROCID=$r SLURM_STEP_NUM_TASKS=$n SLURM_LOCALID=$r \
               SLURM_STEP_TASKS_PER_NODE="$n(x1)" SLURM_JOB_ID=$$ SLURM_STEP_ID=0 MASTER_PORT=$port \
               "$GPU" "$@" --out "$out" >"$out.rank$r.log" 2>&1 & ;;
      openmpi) env EMU_DEVICE_COUNT=$n OMPI_COMM_WORLD_RANK=$r OMPI_COMM_WORLD_SIZE=$n OMPI_COMM_WORLD_LOCAL_RANK=$r \
                 OMPI_COMM_WORLD_LOCAL_SIZE=$n MASTER_PORT=$port "$GPU" "$@" --out "$out" >"$out.rank$r.log" 2>&1 & ;;
    esac
    pids+=($!)
  done
  local rc=0 p
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  if [ $rc -ne 0 ]; then for r in $(seq 0 $((n - 1))); do grep -h "error" "$out.rank$r.log" | head -n 2; done; fi
  return $rc
}
single() {  # single OUT ARGS...: one process, no launcher
  local out=$1; shift
  "$GPU" "$@" --out "$out" >"$out.log" 2>&1 || { tail -n 3 "$out.log"; return 1; }
}
compare() {  # compare NAME A B FLAGS...
  local name=$1 a=$2 b=$3; shift 3
  local res
  if res=$("$PY" test/compare_runs.py "$a" "$b" "$@" 2>&1); then ok "$name: $(echo $res)"; else bad "$name: $(echo $res)"; fi
}
FP32_TOL="--tol 1e-5 --wtol 1e-4"
# bf16: a master weight that differs in its last bit can round to another bf16 value, and
# then a token may pick another expert (see docs/perf.md), which changes that expert's AdamW
# moments a lot and its weights by about one step: losses to 1e-2, weights (not moments) to 3e-2
BF16_TOL="--tol 1e-2 --wtol 3e-2 --model-only --fields loss,ce,aux,z,grad_norm,val"

# ---------------------------------------------------------------------------
if want a; then
  MOE="$BASE --steps 6 --experts 4 --topk 2 --aux-free-bias 1e-3"
  single "$tmp/moe1" $MOE --dtype fp32 --batch 4 || bad "one rank, MoE fp32: run failed"
  for n in $RANKS; do  # (1: one process under a launcher: the NCCL code on one rank)
    if launch torchrun $n "$tmp/moe_r$n" $MOE --dtype fp32 --batch $((4 / n)); then
      compare "MoE fp32: $n rank(s) x batch $((4 / n)) vs one process x 4" "$tmp/moe1" "$tmp/moe_r$n" $FP32_TOL
    else bad "MoE fp32, $n ranks: run failed"; fi
  done
  # bf16 (no aux-loss-free bias here: one routing decision flipped by a rounding flips a
  # whole bias step)
  MOEB="$BASE --steps 6 --experts 4 --topk 2"
  single "$tmp/moeb1" $MOEB --dtype bf16 --batch 4 || bad "one rank, MoE bf16: run failed"
  n=$NMAX
  if launch torchrun $n "$tmp/moeb2" $MOEB --dtype bf16 --batch $((4 / n)); then
    compare "MoE bf16: $n ranks x $((4 / n)) vs 1 x 4" "$tmp/moeb1" "$tmp/moeb2" $BF16_TOL
  else bad "MoE bf16, $n ranks: run failed"; fi
  DENSE="$BASE --steps 6"
  single "$tmp/dense1" $DENSE --dtype fp32 --batch 4 || bad "one rank, dense: run failed"
  if launch torchrun $n "$tmp/dense2" $DENSE --dtype fp32 --batch $((4 / n)); then
    compare "dense fp32: $n ranks x $((4 / n)) vs 1 x 4" "$tmp/dense1" "$tmp/dense2" $FP32_TOL
  else bad "dense, $n ranks: run failed"; fi
  GA="$BASE --steps 4 --experts 4 --topk 2 --aux-loss seq --grad-accum 2 --dtype fp32"
  single "$tmp/ga1" $GA --batch 4 || bad "one rank, grad-accum: run failed"
  if launch torchrun $n "$tmp/ga2" $GA --batch $((4 / n)); then
    compare "MoE fp32 --grad-accum 2 --aux-loss seq: $n ranks x $((4 / n)) vs 1 x 4" "$tmp/ga1" "$tmp/ga2" $FP32_TOL
  else bad "grad-accum, $n ranks: run failed"; fi
  # the balancing loss's coefficients are computed on each rank's device from every rank's
  # counts (pooled: every layer's too); --aux-coef 1 so that rank-local counts would show
  # (planted: the coefficients from this rank's counts alone fail this comparison)
  POOL="$BASE --steps 4 --experts 4 --topk 2 --aux-loss pooled --aux-coef 1 --dtype fp32"
  single "$tmp/pool1" $POOL --batch 4 || bad "one rank, pooled: run failed"
  if launch torchrun $n "$tmp/pool2" $POOL --batch $((4 / n)); then
    compare "MoE fp32 --aux-loss pooled --aux-coef 1: $n ranks x $((4 / n)) vs 1 x 4" "$tmp/pool1" "$tmp/pool2" $FP32_TOL
  else bad "pooled, $n ranks: run failed"; fi
  # a shared expert (sigmoid-gated): its gradients are reduced with its layer's bucket
  SH="$BASE --steps 4 --experts 4 --topk 2 --shared-experts 1 --dtype fp32"
  single "$tmp/sh1" $SH --batch 4 || bad "one rank, shared expert: run failed"
  if launch torchrun $n "$tmp/sh2" $SH --batch $((4 / n)); then
    compare "MoE fp32 --shared-experts 1: $n ranks x $((4 / n)) vs 1 x 4" "$tmp/sh1" "$tmp/sh2" $FP32_TOL
  else bad "shared expert, $n ranks: run failed"; fi
  # the Nexus router (docs/METHODS.md 1.9): P's gradient (Emb^T dR) is reduced with its layer's
  # bucket, Emb and R are outside AdamW's slices, R = Emb P is rebuilt on every rank. The model:
  # ./upcycle --method nexus from a 1-step dense model (seed and both "branches" the same one)
  if [ ! -x ./train_moe ] || [ ! -x ./upcycle ]; then
    echo "skip: Nexus router (./train_moe and ./upcycle make its model; not built here)"
  elif ./train_moe --data data/tiny --model tiny --seq 32 --batch 2 --steps 1 --sample-tokens 0 --out "$tmp/nx_dense" \
       >"$tmp/nx_dense.log" 2>&1 &&
     ./upcycle --method nexus --from "$tmp/nx_dense/step_000001,$tmp/nx_dense/step_000001,$tmp/nx_dense/step_000001" \
       --nexus-domains en,code --data data/tiny --topk 1 --out "$tmp/nx_init" >"$tmp/nx_init.log" 2>&1; then
    NX="${BASE/--model tiny/--init $tmp/nx_init} --steps 4 --dtype fp32"
    single "$tmp/nx1" $NX --batch 4 || bad "one rank, Nexus router: run failed"
    if launch torchrun $n "$tmp/nx2" $NX --batch $((4 / n)); then
      compare "MoE fp32 with the Nexus router: $n ranks x $((4 / n)) vs 1 x 4" "$tmp/nx1" "$tmp/nx2" $FP32_TOL
    else bad "Nexus router, $n ranks: run failed"; fi
  else bad "Nexus router: making the model failed ($(tail -n 1 "$tmp/nx_init.log"))"; fi
fi

# ---------------------------------------------------------------------------
if want b; then
  RB="$BASE --steps 6 --experts 4 --topk 2 --dtype bf16 --batch 2 --save-every 3"
  if launch torchrun 2 "$tmp/rep_a" $RB && launch torchrun 2 "$tmp/rep_b" $RB; then
    compare "2 ranks, bf16: a rerun is bit-identical" "$tmp/rep_a" "$tmp/rep_b" --exact
    if launch torchrun 2 "$tmp/rep_c" $RB --resume "$tmp/rep_a/step_000003"; then
      compare "2 ranks, bf16: resumed at step 3 on 2 ranks is bit-identical" "$tmp/rep_a" "$tmp/rep_c" --exact
    else bad "resume on 2 ranks failed"; fi
  else bad "2-rank reruns failed"; fi
fi

# ---------------------------------------------------------------------------
if want c; then
  RC="$BASE --steps 6 --experts 4 --topk 2 --dtype fp32 --save-every 2"
  # the uninterrupted run: 4 ranks x 1; the other: its step 2 checkpoint, on 2 ranks x 2 to
  # step 4, then 1 x 4 to step 6
  if launch torchrun 4 "$tmp/ws4" $RC --batch 1; then
    if launch torchrun 2 "$tmp/wsr" $RC --batch 2 --resume "$tmp/ws4/step_000002" &&
       single "$tmp/wsr" $RC --batch 4 --resume "$tmp/wsr/step_000004"; then
      compare "resume 4 -> 2 -> 1 ranks (global batch 4) vs 4 ranks throughout" "$tmp/ws4" "$tmp/wsr" $FP32_TOL
    else bad "resume across world sizes: a run failed"; fi
    if launch torchrun 2 "$tmp/ws_bad" $RC --batch 1 --resume "$tmp/ws4/step_000002"; then
      bad "resume with another global batch was accepted"
    elif grep -q "global batch of 4 sequences (4 rank(s) x --batch 1).*use --batch 2 with 2 rank(s)" "$tmp/ws_bad.rank0.log"; then
      ok "resume with global batch 2 instead of 4 refused: $(grep -h -m1 error "$tmp/ws_bad.rank0.log" | cut -c1-160)"
    else bad "resume with another global batch: unclear error"; tail -n 2 "$tmp/ws_bad.rank0.log"; fi
  else bad "4-rank run with checkpoints failed"; fi
fi

# ---------------------------------------------------------------------------
if want d; then
  L="$BASE --steps 2 --experts 4 --topk 2 --dtype fp32 --batch 2"
  single "$tmp/l1" $L --batch 4 || bad "one rank: run failed"
  for style in slurm openmpi; do
    if launch $style 2 "$tmp/l_$style" $L; then
      compare "launched as by $style (its variables)" "$tmp/l1" "$tmp/l_$style" $FP32_TOL
    else bad "$style-style launch failed"; fi
  done
  if launch torchrun 2 "$tmp/l_file" $L --nccl-init file --nccl-init-file "$tmp/nccl_id"; then
    compare "--nccl-init file" "$tmp/l1" "$tmp/l_file" $FP32_TOL
    if ls "$tmp"/nccl_id* >/dev/null 2>&1; then bad "--nccl-init file: the id file was left behind"; else ok "--nccl-init file: rank 0 removed the id file"; fi
  else bad "--nccl-init file launch failed"; fi
  if [ -s "$tmp/l_slurm.rank0.log" ] && [ ! -s "$tmp/l_slurm.rank1.log" ] && grep -q "^data parallel: 2 ranks (slurm)" "$tmp/l_slurm.rank0.log"; then
    ok "rank 0 alone prints ($(grep -m1 '^data parallel' "$tmp/l_slurm.rank0.log" | cut -c1-120))"
  else bad "output: rank 1 printed, or rank 0 did not say it runs data parallel"; fi
  n_ck=$(ls "$tmp/l_slurm" | grep -c step_)
  [ "$n_ck" = 1 ] && [ -f "$tmp/l_slurm/metrics.jsonl" ] && ok "one checkpoint and one metrics.jsonl for the run" || bad "checkpoints/metrics: $(ls "$tmp/l_slurm")"
fi

# ---------------------------------------------------------------------------
if want e; then
  # a rank killed mid-run: the other stops with an error instead of hanging
  port=$((20000 + (RANDOM * 7 + $$) % 30000))
  K="$BASE --steps 400 --experts 4 --topk 2 --dtype fp32 --batch 2 --eval-every 0"
  for r in 0 1; do
    env EMU_DEVICE_COUNT=2 RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_PORT=$port "$GPU" $K --out "$tmp/kill" \
      >"$tmp/kill.rank$r.log" 2>&1 &
    eval "pid$r=\$!"
  done
  for i in $(seq 1 300); do grep -q "^step *3/" "$tmp/kill.rank0.log" 2>/dev/null && break; sleep 0.1; done
  { kill -9 "$pid1"; wait "$pid1"; } 2>/dev/null
  t0=$(date +%s)
  for i in $(seq 1 300); do kill -0 "$pid0" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid0" 2>/dev/null; then
    bad "rank 1 killed: rank 0 still running after 30 s"; kill -9 "$pid0"
  else
    wait "$pid0"; rc=$?
    if [ $rc -ne 0 ] && grep -q "error (rank 0 of 2):.*rank 1 .*exited or was killed" "$tmp/kill.rank0.log"; then
      ok "rank 1 killed mid-run: rank 0 stopped in $(( $(date +%s) - t0 )) s: $(grep -m1 error "$tmp/kill.rank0.log" | cut -c1-170)"
    else bad "rank 1 killed: rank 0 exit code $rc, message: $(tail -n 1 "$tmp/kill.rank0.log")"; fi
  fi
  # rank 1 never starts: rank 0 gives up after --nccl-timeout and names the missing rank
  port=$((20000 + (RANDOM * 7 + $$) % 30000))
  env EMU_DEVICE_COUNT=2 RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 MASTER_PORT=$port "$GPU" $K --nccl-timeout 2 --out "$tmp/alone0" \
    >"$tmp/alone0.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ] && grep -q "error (rank 0 of 2): waited 2 s.*missing rank(s) 1" "$tmp/alone0.log" && [ ! -e "$tmp/alone0" ]; then
    ok "rank 1 missing: $(grep -m1 error "$tmp/alone0.log" | cut -c1-150)"
  else bad "rank 1 missing: exit $rc: $(tail -n 1 "$tmp/alone0.log")"; fi
  env EMU_DEVICE_COUNT=2 RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_PORT=$port "$GPU" $K --nccl-timeout 2 --out "$tmp/alone1" \
    >"$tmp/alone1.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ] && grep -q "error (rank 1 of 2): no NCCL id from rank 0" "$tmp/alone1.log"; then
    ok "rank 0 missing: $(grep -m1 error "$tmp/alone1.log" | cut -c1-150)"
  else bad "rank 0 missing: exit $rc: $(tail -n 1 "$tmp/alone1.log")"; fi
  # more ranks per node than GPUs
  env EMU_DEVICE_COUNT=1 RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 "$GPU" $K --out "$tmp/nodev" >"$tmp/nodev.log" 2>&1
  if grep -q "local rank 1 (torchrun) but this node has 1 CUDA device" "$tmp/nodev.log"; then
    ok "more ranks than GPUs on a node refused"
  else bad "more ranks than GPUs: $(tail -n 1 "$tmp/nodev.log")"; fi
  # the Dirichlet-prior shaping loss ranks over the global batch: one GPU only (docs/METHODS.md 1.6)
  env EMU_DEVICE_COUNT=2 RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 "$GPU" $K --aux-loss switch+dpsl --out "$tmp/dpsl" \
    >"$tmp/dpsl.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ] && grep -q "error (rank 0 of 2): --aux-loss switch+dpsl: dpsl is not implemented with several GPUs" \
       "$tmp/dpsl.log" && [ ! -e "$tmp/dpsl" ]; then
    ok "--aux-loss dpsl under data parallelism refused: $(grep -m1 error "$tmp/dpsl.log" | cut -c1-150)"
  else bad "--aux-loss dpsl under data parallelism: exit $rc: $(tail -n 1 "$tmp/dpsl.log")"; fi
fi

# ---------------------------------------------------------------------------
if want f; then
  GPU_MPI=${GPU_MPI:-${GPU}_mpi}
  if [ -x "$GPU_MPI" ] && command -v mpirun >/dev/null; then
    M="$BASE --steps 2 --experts 4 --topk 2 --dtype fp32"
    root_flags=""; [ "$(id -u)" = 0 ] && root_flags="--allow-run-as-root"
    single "$tmp/m1" $M --batch 4 || bad "one process: run failed"
    if timeout 300 mpirun $root_flags --oversubscribe -np 2 -x EMU_DEVICE_COUNT=2 -x OMP_NUM_THREADS=1 \
         -x NCCL_EMU_TIMEOUT_S "$GPU_MPI" $M --batch 2 --nccl-init mpi --out "$tmp/m2" >"$tmp/m2.log" 2>&1; then
      compare "mpirun -np 2, --nccl-init mpi (MPI_Bcast of the id)" "$tmp/m1" "$tmp/m2" $FP32_TOL
    else bad "mpirun --nccl-init mpi failed: $(grep -m1 error "$tmp/m2.log")"; fi
  else
    echo "SKIP (f) --nccl-init mpi: needs mpirun and $GPU_MPI (apt-get install libopenmpi-dev openmpi-bin; make emu)"
  fi
fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
