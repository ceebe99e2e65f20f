#!/usr/bin/env bash
# dev/cuda/run_all.sh: build (if needed) and run every dev/cuda kernel check on this GPU (or the
# emulated binaries on the CPU, see below),
# then print one line per file and the total. Exits non-zero if any file failed to build,
# crashed, or reported a failed check.
#   bash dev/cuda/run_all.sh              all files, all versions
#   bash dev/cuda/run_all.sh rmsnorm 2    one file, one version
# Full logs go to $LOGDIR (default build/dev_cuda_logs; on the device machine set
# LOGDIR=$OUT/dev_cuda so that they come back). Binaries: $BINDIR (default build).
# Emulated binaries (CUDA on the CPU, `make emu`; sizes capped, benchmarks skipped):
#   BINDIR=build/emu/dev_cuda bash dev/cuda/run_all.sh
#   EMU_SCHED=reverse BINDIR=build/emu/dev_cuda bash dev/cuda/run_all.sh
# NOBUILD=1: never build, run the binaries that are in $BINDIR (a file without one is listed
# as not built, not run). It is the default when $BINDIR is an emulation build directory
# (its path has an "emu" component), which nvcc must not overwrite; NOBUILD=0 forces builds.
set -u
cd "$(dirname "$0")/../.."
NVCC=${NVCC:-nvcc}
FLAGS="-std=c++17 -O3 -gencode arch=compute_90,code=sm_90 --expt-relaxed-constexpr -Xcompiler -fopenmp -Xcompiler -Wall"
LIBS="-lcublas -lcublasLt -lgomp"
LOGDIR=${LOGDIR:-build/dev_cuda_logs}
BINDIR=${BINDIR:-build}  # build/cuda-check after `make -j cuda-check` (rebuilt here only if stale)
case "/$BINDIR/" in
    */emu/* | */emu-*/*) NOBUILD=${NOBUILD:-1} ;;
    *) NOBUILD=${NOBUILD:-0} ;;
esac
mkdir -p "$BINDIR" "$LOGDIR"

files=()
if [ $# -ge 1 ]; then files=("dev/cuda/$1.cu"); else files=(dev/cuda/*.cu); fi
version=${2:-}

total_pass=0; total_fail=0; bad_files=()
summary=""
for f in "${files[@]}"; do
    name=$(basename "$f" .cu)
    bin=$BINDIR/$name
    if [ "$NOBUILD" = 1 ]; then
        if [ ! -x "$bin" ]; then
            if [ $# -ge 1 ]; then  # asked for by name: its absence is a failure
                summary+=$(printf "%-16s NO BINARY in %s\n" "$name" "$BINDIR")$'\n'
                bad_files+=("$name"); total_fail=$((total_fail + 1))
            else
                summary+=$(printf "%-16s not built in %s, not run\n" "$name" "$BINDIR")$'\n'
            fi
            continue
        fi
    # rebuild when the source, common.h, train_moe.cpp or any kernels/ header is newer
    elif [ ! -x "$bin" ] || [ -n "$(find "$f" dev/cuda/common.h train_moe.cpp common kernels -newer "$bin" 2>/dev/null | head -1)" ]; then
        echo "== build $name"
        if ! $NVCC $FLAGS -o "$bin" "$f" $LIBS > "$LOGDIR/$name.build.log" 2>&1; then
            cat "$LOGDIR/$name.build.log"
            summary+=$(printf "%-16s BUILD FAILED\n" "$name")$'\n'
            bad_files+=("$name"); total_fail=$((total_fail + 1)); continue
        fi
    fi
    echo "== run $name $version${EMU_SCHED:+ (EMU_SCHED=$EMU_SCHED)}"
    start=$(date +%s)
    "$bin" $version > "$LOGDIR/$name.log" 2>&1  # $bin has a slash: no PATH lookup
    rc=$?
    secs=$(( $(date +%s) - start ))
    # the tables at the end of each run
    sed -n '/ checks$/,$p' "$LOGDIR/$name.log"
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$LOGDIR/$name.log" | tail -1)
    if [ -z "$line" ]; then  # crashed before its summary: show the end of its log
        tail -20 "$LOGDIR/$name.log"
        summary+=$(printf "%-16s CRASHED (rc %d, %ds), see %s\n" "$name" "$rc" "$secs" "$LOGDIR/$name.log")$'\n'
        bad_files+=("$name"); total_fail=$((total_fail + 1)); continue
    fi
    p=$(echo "$line" | awk '{print $1}'); m=$(echo "$line" | awk '{print $3}')
    total_pass=$((total_pass + p)); total_fail=$((total_fail + m))
    if [ "$rc" -ne 0 ] || [ "$m" -ne 0 ]; then bad_files+=("$name"); fi
    summary+=$(printf "%-16s %s (rc %d, %ds)\n" "$name" "$line" "$rc" "$secs")$'\n'
done

echo
echo "== dev/cuda summary ($BINDIR${EMU_SCHED:+, EMU_SCHED=$EMU_SCHED}; logs in $LOGDIR)"
printf "%s" "$summary"
echo "TOTAL: $total_pass passed, $total_fail failed"
if [ ${#bad_files[@]} -gt 0 ]; then echo "FAILED: ${bad_files[*]}"; exit 1; fi
exit 0
