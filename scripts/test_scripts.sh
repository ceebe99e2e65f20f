#!/usr/bin/env bash
# test_scripts.sh: smoke test of the paper-table reproductions (run by `make test`).
# Runs every reproduction script with --smoke (the tiny preset with a few steps per stage, so
# every row, the table, the plots and the resume logic are exercised in a couple of
# minutes on 2 cores), then checks:
#   - scripts/scaling_fit.py --selftest: the scaling-law fits recover known parameters;
#   - each table has every row of its --list, its PNGs and results.json are valid; the wall-time
#     estimate is printed before the first stage; the grids' fits are in results.json and table.md;
#   - a second run redoes nothing (every stage reported "skipped", no run file rewritten);
#   - a row whose final checkpoint is gone resumes from its latest checkpoint with --resume
#     and ends at bit-identical losses; an upcycle or evaluation stage whose output is gone is
#     redone;
#   - a run interrupted by SIGINT exits 130 and the next run resumes it;
#   - a stage made by another command, missing data and a busy runs directory are clear errors.
# Ends with "N passed, M failed"; exits non-zero on any failure. Runs in a temp dir
# (KEEP=1 keeps it). Usage: bash scripts/test_scripts.sh
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TMP=$(mktemp -d /tmp/test_scripts.XXXXXX)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$TMP"' EXIT
RUNS=$TMP/runs
pass=0; fail=0
ok()  { echo "PASS $*"; pass=$((pass + 1)); }
bad() { echo "FAIL $*"; fail=$((fail + 1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }

if ! "$PY" -c "import matplotlib" 2>/dev/null; then
  echo "matplotlib is missing: $PY -m pip install -r requirements.txt"
  echo "0 passed, 1 failed"; exit 1
fi
make --no-print-directory train_moe upcycle >/dev/null || { echo "make train_moe upcycle failed"; echo "0 passed, 1 failed"; exit 1; }

smoke() {  # smoke TABLE SCRIPT [extra args]: runs one script's smoke preset into $TMP
  local table=$1 script=$2; shift 2
  "$PY" "scripts/$script" --smoke --trainer cpu --threads 2 --no-build --runs "$RUNS" --results "$TMP/res/$table" "$@"
}

table_ok() {  # table_ok TABLE SCRIPT: every --list row is in table.md; the PNGs it says it wrote and JSON are valid
  local table=$1 script=$2 out=$TMP/res/$1
  local want; want=$("$PY" "scripts/$script" --smoke --runs "$RUNS" --list | grep -c '^row ')
  local have; have=$(grep -c '^| ' "$out/table.md")
  have=$((have - 1))   # the header line
  [ "$want" -gt 0 ] && [ "$have" -eq "$want" ] || { echo "  $table: $have table rows, $want expected"; return 1; }
  local pngs; pngs=$(grep -o '[a-z_]*\.png' <(grep ' wrote .*table.md' "$TMP/$table.log") | sort -u)
  [ -n "$pngs" ] || { echo "  $table: no PNG written"; return 1; }
  for f in $pngs; do
    [ "$(head -c 8 "$out/$f" | od -An -tx1 | tr -d ' \n')" = "89504e470d0a1a0a" ] || { echo "  $out/$f is not a PNG"; return 1; }
  done
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); assert len(r['rows']) == $want" "$out/results.json" || return 1
  ! ls -a "$out" | grep -q '\.tmp$' || { echo "  temp files left in $out"; return 1; }
}

final_loss() {  # final_loss TABLE ROWKEY -> the row's final val_loss from results.json
  "$PY" -c "import json,sys; print(repr([r for r in json.load(open(sys.argv[1]))['rows'] if r['key']==sys.argv[2]][0]['val_loss']))" "$TMP/res/$1/results.json" "$2"
}

# 0. the scaling-law fits recover the parameters of data made from known ones
"$PY" scripts/scaling_fit.py --selftest > "$TMP/fit.log" 2>&1
check "scaling_fit.py --selftest ($(tail -n 1 "$TMP/fit.log"))" test $? -eq 0

# 1. every table, every row (the tables share one runs root: the dense base is trained once)
for spec in drop_upcycling:repro_drop_upcycling.py expert_upcycling:repro_expert_upcycling.py routing:repro_routing.py \
            shared_experts:repro_shared_experts.py upcycling_scaling:repro_upcycling_scaling.py \
            granularity:repro_granularity.py grove:repro_grove.py nexus:repro_nexus.py; do
  table=${spec%%:*}; script=${spec#*:}
  t0=$(date +%s)
  if smoke "$table" "$script" > "$TMP/$table.log" 2>&1; then
    ok "$table: smoke run ($(( $(date +%s) - t0 ))s)"
    check "$table: table has every row, its plots, results.json" table_ok "$table" "$script"
  else
    bad "$table: smoke run failed"; tail -n 20 "$TMP/$table.log"
  fi
done
grep -q 'dense_base: finished earlier, skipped' "$TMP/expert_upcycling.log" && ok "dense base shared between tables" \
  || bad "dense base shared between tables"
before_first() {  # before_first LOG: the wall-time estimate comes before the first stage starts
  local e s; e=$(grep -n 'wall time estimate: ' "$1" | head -n 1 | cut -d: -f1); s=$(grep -n '\] \[1/' "$1" | head -n 1 | cut -d: -f1)
  [ -n "$e" ] && [ -n "$s" ] && [ "$e" -lt "$s" ] && grep -q 'wall time estimate: .* about ' "$1"
}
for table in drop_upcycling upcycling_scaling granularity; do
  check "$table: wall-time estimate printed before the first stage" before_first "$TMP/$table.log"
done
check "granularity: the routing table's granular inits reused" grep -q 'g4_topk_softmax_init: finished earlier, skipped' "$TMP/granularity.log"
json_has() {  # json_has FILE PYTHON-EXPR: the expression on the results.json dict `r` is true
  "$PY" -c "import json,sys,math; r=json.load(open(sys.argv[1])); sys.exit(0 if ($2) else 1)" "$1"
}
check "upcycling_scaling: fit with and without the interaction, bootstrap, per-D1 exponents in results.json" \
  json_has "$TMP/res/upcycling_scaling/results.json" \
  "all(math.isfinite(r['analysis'][k]['rmse']) for k in ('fit', 'fit_no_interaction')) and 'a3' in r['analysis']['bootstrap'] and len(r['analysis']['per_d1_exponent']) == 2"
check "upcycling_scaling: the fit and the interaction's verdict are under the table" \
  grep -q 'Interaction term: a3' "$TMP/res/upcycling_scaling/table.md"
check "granularity: a fit per group, the direction said under the table" \
  json_has "$TMP/res/granularity/results.json" "all('fit' in r['analysis'][k] and 'fit_per_budget' in r['analysis'][k] for k in ('fs', 'up'))"
check "granularity: fitted change from G = 1 stated" grep -q 'fitted change from G = 1 to G = 4 at any budget' "$TMP/res/granularity/table.md"

# 2. a second run redoes nothing
find "$RUNS" -name metrics.jsonl -exec md5sum {} + | sort > "$TMP/before.md5"
sleep 1; touch "$TMP/marker"
smoke drop_upcycling repro_drop_upcycling.py > "$TMP/rerun.log" 2>&1
check "rerun: exit 0" test $? -eq 0
stamp=$(find "$RUNS" -path '*/_logs' -prune -o -type f ! -name .lock -newer "$TMP/marker" -print | head -n 1)
check "rerun: no stage run" grep -q 'stages run: 0 (none); skipped as finished: 28' "$TMP/rerun.log"
find "$RUNS" -name metrics.jsonl -exec md5sum {} + | sort > "$TMP/after.md5"
check "rerun: no metrics file rewritten" cmp -s "$TMP/before.md5" "$TMP/after.md5"
check "rerun: nothing in the runs newer than the last run" test -z "$stamp"

# 3. an unfinished row resumes from its latest checkpoint (bit-identical), a lost upcycle or
#    evaluation (the BTM ensemble) is redone
before=$(final_loss drop_upcycling du05)
before_ens=$(final_loss drop_upcycling btm_ens)
rm -rf "$RUNS/du05/step_000010"; echo step_000005 > "$RUNS/du05/latest"
rm -rf "$RUNS/rnu05_init" "$RUNS/btm_ensemble"
smoke drop_upcycling repro_drop_upcycling.py > "$TMP/resume.log" 2>&1
check "resume: exit 0" test $? -eq 0
check "resume: du05 resumed, rnu05_init and btm_ensemble redone, nothing else" \
  grep -q 'stages run: 3 (btm_ensemble ran, rnu05_init ran, du05 resumed)' "$TMP/resume.log"
check "resume: the ensemble's loss identical ($before_ens)" test "$before_ens" = "$(final_loss drop_upcycling btm_ens)"
check "resume: trainer resumed at step 5" grep -q 'resumed from .*du05/step_000005 at step 5' "$RUNS/_logs/du05.log"
after=$(final_loss drop_upcycling du05)
check "resume: final loss identical ($before vs $after)" test "$before" = "$after"

# 4. a real interruption (SIGINT while a row trains) and its resumption
before=$(final_loss routing g4_softmax_topk)
rm -rf "$RUNS/g4_softmax_topk" "$RUNS/_meta/g4_softmax_topk.json"
"$PY" scripts/repro_routing.py --smoke --trainer cpu --threads 2 --no-build --runs "$RUNS" --results "$TMP/res/routing" \
  > "$TMP/int.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do   # wait (at most 60 s) for the first checkpoint of the re-run row
  [ -f "$RUNS/g4_softmax_topk/latest" ] && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.1
done
kill -INT $pid 2>/dev/null; wait $pid; rc=$?
if [ $rc -eq 130 ]; then
  ok "interrupt: exit 130"
  check "interrupt: says how to continue" grep -q 'run the same command again' "$TMP/int.log"
  smoke routing repro_routing.py > "$TMP/int2.log" 2>&1
  check "interrupt: the next run finishes" test $? -eq 0
  check "interrupt: the row resumed or restarted, nothing else ran" \
    grep -Eq 'stages run: 1 \(g4_softmax_topk (resumed|ran)\)' "$TMP/int2.log"
  check "interrupt: final loss identical" test "$before" = "$(final_loss routing g4_softmax_topk)"
else
  # the row finished before the signal arrived (a very fast machine): the resume path is covered by 3.
  check "interrupt: row finished before the signal (exit $rc)" grep -q 'stages run: 1 (g4_softmax_topk ran)' "$TMP/int.log"
fi

# 5. clear errors
m="$RUNS/_meta/nu.json"
cp "$m" "$TMP/nu.json.bak"
"$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); d['cmd'].append('--other'); json.dump(d, open(sys.argv[1],'w'))" "$m"
smoke drop_upcycling repro_drop_upcycling.py > "$TMP/mismatch.log" 2>&1
rc=$?
check "changed command: refused" test $rc -eq 1
check "changed command: says which and what to do" grep -q 'was made by another command' "$TMP/mismatch.log"
cp "$TMP/nu.json.bak" "$m"
check "missing data: says make data-tiny" bash -c "cd scripts && '$PY' -c \"
import repro_lib as R
try:
    R.check_data('data/no_such_tiny'); raise SystemExit(1)
except R.ReproError as e:
    raise SystemExit(0 if 'make data-tiny' in str(e) else 1)\""
exec 9>"$RUNS/.lock"; flock -n 9
smoke drop_upcycling repro_drop_upcycling.py > "$TMP/lock.log" 2>&1
check "busy runs directory: refused" grep -q 'another reproduction is running' "$TMP/lock.log"
exec 9>&-
"$PY" scripts/repro_drop_upcycling.py --help > "$TMP/help.log" 2>&1
check "--help" grep -q -- '--preset' "$TMP/help.log"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
