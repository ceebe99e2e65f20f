#!/usr/bin/env bash
# Tries each class of bad input on ./train_moe and ./upcycle and prints the markdown table of
# docs/reliability.md: what was given, the exit code, the time, and the one error line.
# Usage: bash dev/reliability/bad_inputs.sh > /tmp/table.md   (needs data/tiny and test/fixtures)
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -u
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d /tmp/moe_bad_inputs.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
T="./train_moe --data data/tiny --model tiny --steps 2 --sample-tokens 0 --eval-batches 1"
U="./upcycle --method naive --from test/fixtures/dense --experts 4 --topk 2"

# prepared inputs: a model with a NaN weight, a config.json size beyond int, a non-empty dir
mkdir -p "$tmp/nan" "$tmp/big" "$tmp/mine"
cp test/fixtures/dense/config.json test/fixtures/dense/model.safetensors "$tmp/nan/"
python3 - "$tmp/nan/model.safetensors" <<'EOF'
import struct, sys
p = sys.argv[1]; b = bytearray(open(p, "rb").read()); b[-4:] = struct.pack("<f", float("nan")); open(p, "wb").write(b)
EOF
cp test/fixtures/dense/model.safetensors "$tmp/big/"
sed 's/"hidden_size": [0-9]*/"hidden_size": 4294967328/' test/fixtures/dense/config.json > "$tmp/big/config.json"
echo mine > "$tmp/mine/notes.txt"

row() {  # row CLASS COMMAND: runs it once
  local cls=$1 cmd=$2 t0 t1 out rc line
  t0=$(date +%s.%N)
  out=$(eval "$cmd" 2>&1); rc=$?
  t1=$(date +%s.%N)
  line=$(printf '%s\n' "$out" | grep -m1 '^error: ' | cut -c1-220)
  printf '| %s | `%s` | %s | %.2f s | %s |\n' "$cls" "${cmd//$tmp/\$tmp}" "$rc" "$(echo "$t1 - $t0" | bc)" "${line//$tmp/\$tmp}"
}

echo "| class | command | exit | time | message |"
echo "|---|---|---|---|---|"
row "non-finite option" "$T --lr nan --out $tmp/o1"
row "non-finite option" "$T --lr 1e999 --out $tmp/o1"
row "integer overflow" "$T --batch 4294967297 --out $tmp/o1"
row "integer overflow" "$T --steps 99999999999 --out $tmp/o1"
row "out of domain" "$T --beta1 1.5 --out $tmp/o1"
row "out of domain" "$T --grad-clip -1 --out $tmp/o1"
row "out of domain" "$T --threads -3 --out $tmp/o1"
row "not a number" "$T --lr 5x --out $tmp/o1"
row "mixture weight" "$T --mix en=nan --out $tmp/o1"
row "memory" "$T --seq 100000 --out $tmp/o1"
row "memory" "$T --batch 100000 --out $tmp/o1"
row "memory" "$T --experts 60000 --topk 2 --out $tmp/o1"
row "NaN weight" "$T --init $tmp/nan --out $tmp/o1"
row "config.json overflow" "$T --init $tmp/big --out $tmp/o1"
row "non-empty --out" "$T --out $tmp/mine"
row "--out is a file" "$T --out $tmp/mine/notes.txt"
row "--out inside input" "$T --out data/tiny/run"
row "divergence" "$T --lr 1e30 --lr-schedule constant --save-every 1 --out $tmp/o2"
row "upcycle: NaN weight" "./upcycle --method naive --from $tmp/nan --experts 4 --topk 2 --out $tmp/u1"
row "upcycle: absurd E" "$U --experts 1000000 --out $tmp/u1"
row "upcycle: non-empty --out" "$U --out $tmp/mine"
row "upcycle: --out parent of --from" "./upcycle --method naive --from $tmp/nan --experts 4 --topk 2 --out $tmp"
row "upcycle: config overflow" "./upcycle --method naive --from $tmp/big --experts 4 --topk 2 --out $tmp/u1"
echo
echo "afterwards: mine/ holds $(ls "$tmp/mine" | tr '\n' ' '); o1/ and u1/ exist: $( [ -e "$tmp/o1" ] || [ -e "$tmp/u1" ] && echo yes || echo no)"
