#!/usr/bin/env python3
"""compare_runs.py A B [--tol REL] [--wtol REL] [--fields a,b] [--model-only] [--exact]: two runs' metrics.jsonl
records (step and eval) and final checkpoints, for test/test_dp.sh. Prints the largest
relative difference of the metrics and of the weights (||diff|| / ||value|| per tensor,
model and optimizer state); exits 1 when one exceeds its tolerance (--tol for metrics,
--wtol for weights, default --tol), or, with --exact, when any byte differs. --fields: only
the metrics whose path contains one of these names (default: all but tok_per_s and mfu).
A and B are run directories; B's records must be a subset of A's (a resumed run logs only
its own steps)."""
import json, struct, sys, os

def records(run):
    out = {}
    for line in open(os.path.join(run, "metrics.jsonl")):
        r = json.loads(line)
        for k in ("tok_per_s", "mfu"):
            r.pop(k, None)
        out[(r["step"], "val" in r)] = r
    return out

def tensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        body = f.read()
    out = {}
    for name, t in head.items():
        if name == "__metadata__" or t["dtype"] != "F32":
            continue
        a, b = t["data_offsets"]
        out[name] = struct.unpack("<%df" % ((b - a) // 4), body[a:b])
    return out

def flat(x, prefix=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from flat(v, prefix + "." + k)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from flat(v, prefix + "[%d]" % i)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield prefix, float(x)

def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-6)

def main():
    args = sys.argv[1:]
    tol, wtol, exact, fields = 0.0, None, False, None
    if "--tol" in args:
        i = args.index("--tol"); tol = float(args[i + 1]); del args[i:i + 2]
    if "--wtol" in args:
        i = args.index("--wtol"); wtol = float(args[i + 1]); del args[i:i + 2]
    files = ["model.safetensors", "optimizer.safetensors"]
    if "--model-only" in args:  # the weights, not the AdamW moments
        args.remove("--model-only"); files = files[:1]
    if "--fields" in args:
        i = args.index("--fields"); fields = args[i + 1].split(","); del args[i:i + 2]
    wtol = tol if wtol is None else wtol
    if "--exact" in args:
        args.remove("--exact"); exact = True
    A, B = args
    ra, rb = records(A), records(B)
    if not rb:
        print("no records in", B); return 1
    worst = {"metrics": (0.0, ""), "weights": (0.0, "")}
    for key, r in rb.items():
        if key not in ra:
            print("record", key, "missing in", A); return 1
        if exact and ra[key] != r:  # every field, numbers or not
            print("record", key, "differs:", ra[key], "vs", r); return 1
        fa, fb = dict(flat(ra[key])), dict(flat(r))
        if set(fa) != set(fb):
            print("record", key, "has other fields"); return 1
        for k in fb:
            if fields and not any(f in k for f in fields):
                continue
            d = rel(fa[k], fb[k])
            if exact and fa[k] != fb[k]:
                d = max(d, 1e-300)
            if d >= worst["metrics"][0] and (d > 0 or not worst["metrics"][1]):
                worst["metrics"] = (d, "step %d%s %s: %r vs %r" % (key[0], " eval" if key[1] else "", k, fa[k], fb[k]))
    last = max(s for s, _ in rb)
    ck = "step_%06d" % last
    for f in files:
        pa, pb = os.path.join(A, ck, f), os.path.join(B, ck, f)
        if not (os.path.exists(pa) and os.path.exists(pb)):
            print("missing", pa if not os.path.exists(pa) else pb); return 1
        if exact:
            if open(pa, "rb").read() != open(pb, "rb").read():
                worst["weights"] = (1.0, f + " differs")
            continue
        ta, tb = tensors(pa), tensors(pb)
        for name in tb:
            xa, xb = ta[name], tb[name]
            # ||a - b|| / ||a||: Adam moves an element whose gradient is noise by a whole step in
            # either direction, so the largest single difference says little; the norm does
            norm = max(sum(v * v for v in xa) ** 0.5, 1e-12)
            d = sum((p - q) ** 2 for p, q in zip(xa, xb)) ** 0.5 / norm
            if d >= worst["weights"][0]:
                worst["weights"] = (d, "%s %s (||diff|| / ||value||)" % (f, name))
    bad = False
    for kind, (d, where) in worst.items():
        t = tol if kind == "metrics" else wtol
        over = d > t or (exact and d > 0)
        bad |= over
        print("%s: largest relative difference %.3g (tolerance %s)%s" % (kind, d, "0: bit-identical" if exact else "%.1g" % t,
              (" at " + where) if where else ""))
    return 1 if bad else 0

sys.exit(main())
