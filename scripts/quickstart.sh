#!/usr/bin/env bash
# quickstart.sh: the README's first command (make quickstart): the tiny Drop-Upcycling
# Table 1 reproduction (scripts/repro_drop_upcycling.py --preset tiny). Builds the tiny
# corpus if it is missing, trains a tiny dense base, then from it, with the same MoE recipe
# and token budget: dense continued, from scratch, BTX, naive, random-noise (r = 0.5) and
# Drop-Upcycling (r = 0.5, 1.0) 8-expert top-2 MoEs; prints the table at the end.
# On a machine with a GPU (nvidia-smi works and ./train_moe_gpu builds) it uses the GPU
# trainer, otherwise the CPU one (a few minutes on 2 cores).
# Runs land in runs/quickstart/<cpu|gpu>/, the table and plots in runs/quickstart/<cpu|gpu>/results/.
# Interrupted? Run it again: finished rows are skipped, the unfinished one resumes.
# Environment: THREADS (CPU threads, default: all cores), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-$(nproc 2>/dev/null || echo 2)}

[ -f data/tiny/tokenizer.bin ] || make --no-print-directory data-tiny
make --no-print-directory train_moe upcycle >/dev/null

trainer=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  if make --no-print-directory train_moe_gpu >/dev/null 2>&1 && [ -x ./train_moe_gpu ]; then
    trainer=gpu
  else
    echo "quickstart: a GPU is present but ./train_moe_gpu does not build; using the CPU trainer"
  fi
fi

plots=()
if ! "$PYTHON" -c "import matplotlib" >/dev/null 2>&1; then
  echo "quickstart: installing matplotlib for the plots (requirements.txt)"
  "$PYTHON" -m pip install -q "$(grep '^matplotlib==' requirements.txt)" >/dev/null 2>&1 || true
  if ! "$PYTHON" -c "import matplotlib" >/dev/null 2>&1; then
    echo "quickstart: matplotlib could not be installed; writing the table without plots"
    plots=(--no-plots)
  fi
fi

out=runs/quickstart/$trainer
echo "quickstart: tiny Drop-Upcycling Table 1 with the $trainer trainer; runs in $out/"
"$PYTHON" scripts/repro_drop_upcycling.py --preset tiny --trainer "$trainer" --threads "$THREADS" --no-build \
  --runs "$out" --results "$out/results" ${plots[@]+"${plots[@]}"}
