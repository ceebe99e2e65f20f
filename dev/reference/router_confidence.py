#!/usr/bin/python3
"""How confident an MoE checkpoint's routers are on validation text (docs/METHODS.md 1.6).

For each checkpoint directory: the first 8 x 64 tokens of every <domain>_val_000.bin of --data,
through the float64 reference model (model.py); per token and MoE layer the router
probabilities p = softmax(z); prints the mean over tokens, layers and domains of max_i p_i and
of the entropy -sum_i p_i log p_i (nats; log E for a uniform router).

    /usr/bin/python3 dev/reference/router_confidence.py --data data/tiny CKPT [CKPT ...]
"""
import argparse
import glob
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import load_checkpoint, forward  # noqa: E402

torch.set_default_dtype(torch.float64)


def val_tokens(path, B, T):
    raw = np.fromfile(path, dtype=np.uint16)
    toks = raw[512:].astype(np.int64)   # after the 256 x int32 header
    if toks.size < B * T:
        sys.exit(f"{path}: fewer than {B * T} tokens")
    return torch.from_numpy(toks[:B * T].copy()).view(B, T)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", nargs="+", help="MoE checkpoint directories")
    ap.add_argument("--data", default="data/tiny", help="token shard folder (its *_val_000.bin files)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    a = ap.parse_args()
    shards = sorted(glob.glob(os.path.join(a.data, "*_val_000.bin")))
    if not shards:
        sys.exit(f"no *_val_000.bin in {a.data}")
    for d in a.ckpt:
        cfg, P = load_checkpoint(d)
        if not cfg.moe:
            sys.exit(f"{d}: a dense model has no router")
        mx, ent = [], []
        for s in shards:
            with torch.no_grad():
                _, routing = forward(P, cfg, val_tokens(s, a.batch, a.seq))
            for r in routing:
                p = r["probs"]
                mx.append(float(p.max(-1).values.mean()))
                ent.append(float(-(p * p.log()).sum(-1).mean()))
        print(f"{d}: mean max p {np.mean(mx):.3f}, mean entropy {np.mean(ent):.3f} nats "
              f"(uniform {np.log(cfg.E):.3f}; E {cfg.E}, {len(shards)} domains)")


if __name__ == "__main__":
    main()
