#!/usr/bin/env python3
"""Drop-Upcycling Table 1 at small scale (docs/METHODS.md sections 2-4; docs/REPRODUCTIONS.md).

A dense base is trained first; then, from it, every row trains for the same token budget with
the same MoE recipe (8 experts, top-2, topk_softmax, aux `pooled` 0.02, no z-loss, fresh
AdamW, linear warmup + cosine, the same --seed and so the same data order):

  Dense (base)        the dense model itself
  Dense (continued)   the dense base trained on for the MoE phase's budget
  FS                  an 8x MoE from scratch (./train_moe --model ... --experts 8 --topk 2)
  BTX                 three dense branches of the base trained on one domain each (en, code, de);
                      S = 4 sources = base (the seed model, as in the paper) + 3 branches, 2 experts
                      each; merged by ./upcycle --method btx, then the MoE phase
  BTM average         Branch-Train-Merge (arXiv 2208.03306) baselines on the same 3 branches:
                      their element-wise parameter average (./upcycle --method btm-average, a
                      dense model), then the MoE phase's budget as a dense model
  BTM ensemble        the uniform mixture of the 3 branches' next-token distributions, evaluated
                      without training (./train_moe --ensemble; CPU)
  NU                  ./upcycle --method naive
  RNU (r=0.5)         ./upcycle --method noise --ratio 0.5
  DU (r=0.5), (r=1.0) ./upcycle --method drop --ratio 0.5 / 1.0
  UpIT                ./upcycle --method upit from 4 checkpoints of the dense base's own run
                      (steps 1/4..4/4, or 5/8..8/8 for "late") into 8 experts: 4 checkpoint FFNs +
                      4 merged (arXiv 2410.01610); NU (from the final checkpoint) is its baseline.
                      Tiny and tiny_long presets only (not gpu_short or small: budget)

Run (from the repository root):
  python3 scripts/repro_drop_upcycling.py                 # tiny preset: CPU, ~5 min on 2 cores
  python3 scripts/repro_drop_upcycling.py --preset small  # one H100 (./train_moe_gpu), < 1 hour
  python3 scripts/repro_drop_upcycling.py --smoke --runs /tmp/r --results /tmp/r/out   # the smoke test
  python3 scripts/repro_drop_upcycling.py --list          # print every command and exit
Interrupted? Run the same command again: finished stages are skipped, the unfinished one resumes.
Output: docs/results/drop_upcycling/[tiny/]{table.md,results.json,loss_curves.png,expert_load.png}.

Small-preset budget (d512 = Drop-Upcycling's 152M shape with our vocab 16384: 67M dense
parameters, 8x: 332M total, 105M active; 32 x 1024 = 32768 tokens per step):
  dense base 1200 steps = 39.3M tokens; dense continued 600 = 19.7M; BTX branches 3 x 200 =
  19.7M; 6 MoE rows x 600 = 118M tokens. Training FLOPs ~ 6 x (non-embedding + LM-head params)
  x tokens + attention: dense ~0.43 GFLOP/token, MoE ~0.65 GFLOP/token, so 78.7M dense tokens
  = 34 PFLOP and 118M MoE tokens = 77 PFLOP, 111 PFLOP in all: 19 minutes at 100 TFLOP/s
  sustained (10% of the H100's bf16 peak), 37 minutes at 50 TFLOP/s; the hour holds down to
  ~31 TFLOP/s (about 70k tok/s dense, 48k tok/s MoE). The GPU trainer's speed is not measured
  yet: look at the first row's tok/s and the printed ETA, and lower dense_steps / moe_steps in
  scripts/repro_lib.py (PRESETS["small"]) if the hour does not hold.
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import repro_lib as R  # noqa: E402


def build(cfg: dict, root: str) -> R.Table:
    E, K = "8", "2"
    base_stage, base_row, base = R.dense_base(root, cfg)
    cont_stage, cont_row = R.dense_continued(root, cfg, base)
    stages, rows = [base_stage, cont_stage], [base_row, cont_row]
    moe_phase = dict(steps=cfg["moe_steps"], warmup=cfg["warmup_moe"], moe=True)

    # FS: the same MoE shape from scratch (every matrix N(0, 0.02), docs/METHODS.md 2.1)
    fs = R.train_stage(root, "fs", cfg, ["--model", cfg["model"], "--experts", E, "--topk", K,
                                         "--routing", "topk_softmax"], **moe_phase)
    stages.append(fs)
    # plotted over the MoE phase like the other MoE rows, although it does not start from the base
    rows.append(R.Row("fs", "FS (from scratch)", ["fs"], "fs", before=["dense_base"]))

    # BTX: branch, train on one domain each, merge (docs/METHODS.md 2.6)
    branches = []
    for dom in R.DOMAINS:
        mix = ",".join(f"{d}={1 if d == dom else 0}" for d in R.DOMAINS)
        b = R.train_stage(root, f"btx_branch_{dom}", cfg, ["--init", base, "--mix", mix], cfg["branch_steps"],
                          cfg["warmup_moe"], False, ["dense_base"])
        stages.append(b)
        branches.append(b)
    merge = R.upcycle_stage(root, "btx_init", cfg, ["--method", "btx", "--from", ",".join(
        [base] + [R.final_ckpt(root, b) for b in branches]), "--experts", E, "--topk", K],
        ["dense_base"] + [b.name for b in branches])
    btx = R.train_stage(root, "btx", cfg, ["--init", R.run_dir(root, "btx_init")], needs=["btx_init"], **moe_phase)
    stages += [merge, btx]
    rows.append(R.Row("btx", "BTX (base + en, code, de branches)", [b.name for b in branches] + ["btx_init", "btx"],
                      "btx", before=["dense_base"], extra=[b.name for b in branches]))

    # BTM: the same branches merged without a router (docs/METHODS.md 2.10); the branches' time is BTX's
    elms = [R.final_ckpt(root, b) for b in branches]
    avg = R.upcycle_stage(root, "btm_average_init", cfg, ["--method", "btm-average", "--from", ",".join(elms)],
                          [b.name for b in branches])
    avg_run = R.train_stage(root, "btm_average", cfg, ["--init", R.run_dir(root, avg.name)], cfg["moe_steps"],
                            cfg["warmup_moe"], False, [avg.name])
    ens = R.ensemble_stage(root, "btm_ensemble", cfg, elms, [b.name for b in branches])
    stages += [avg, avg_run, ens]
    rows.append(R.Row("btm_avg", "BTM average of the en, code, de branches (dense)", [avg.name, avg_run.name],
                      avg_run.name, moe=False, before=["dense_base"], extra=[b.name for b in branches]))
    rows.append(R.Row("btm_ens", "BTM ensemble of the en, code, de branches (no training)", [ens.name], ens.name,
                      moe=False, before=["dense_base"], extra=[b.name for b in branches]))

    # the upcycled rows: one ./upcycle call, then the MoE phase
    for key, label, margs in [("nu", "NU (naive)", ["--method", "naive"]),
                              ("rnu05", "RNU (r=0.5)", ["--method", "noise", "--ratio", "0.5"]),
                              ("du05", "DU (r=0.5)", ["--method", "drop", "--ratio", "0.5"]),
                              ("du10", "DU (r=1.0)", ["--method", "drop", "--ratio", "1.0"])]:
        init = R.upcycle_stage(root, f"{key}_init", cfg, margs + ["--from", base, "--experts", E, "--topk", K],
                               ["dense_base"])
        run = R.train_stage(root, key, cfg, ["--init", R.run_dir(root, init.name)], needs=[init.name], **moe_phase)
        stages += [init, run]
        rows.append(R.Row(key, label, [init.name, key], key, before=["dense_base"]))

    # UpIT: experts from checkpoints of the dense base's own run, 4 more by merging (docs/METHODS.md 2.12).
    # CPU presets only: on the GPU presets its rows (a rerun of the dense base + 4 MoE rows) would
    # push the table past its budget (gpu_short: the GPU session's 4 minutes; small: the hour)
    if cfg["preset"] in ("tiny", "tiny_long", "smoke"):
        st, rw = upit_rows(root, cfg, base_stage, E, K, moe_phase)
        stages += st
        rows += rw

    return R.Table(
        "drop_upcycling", "Drop-Upcycling Table 1 (small-scale reproduction)", stages, rows,
        notes=[f"MoE phase: {cfg['moe_steps']} steps for every row after the dense base ({cfg['dense_steps']} steps); "
               "8 experts, top-2, topk_softmax, aux pooled 0.02, no z-loss, fresh AdamW, the same seed and data order. "
               f"BTX branches: {cfg['branch_steps']} steps each on one domain (en, code, de) from the base; sources = "
               "base + 3 branches, 2 experts each. In loss_curves.png, FS is drawn over the MoE phase's tokens like "
               "the other MoE rows (x starts at the dense base's end) although it does not use the base.",
               "BTM (Branch-Train-Merge, arXiv 2208.03306), on the 3 domain branches alone (not the base): average = "
               "their element-wise parameter mean, a dense model (its step-0 loss is the merge itself), then the MoE "
               "phase's budget with the dense rows' recipe; ensemble = the uniform mixture of the branches' "
               "next-token distributions, -log((1/3) sum_k p_k(token)), evaluated on the same validation batches "
               "without training (the paper weights by an estimated domain posterior; uniform here).",
               "UpIT (arXiv 2410.01610, docs/METHODS.md 2.12): ./upcycle --method upit from 4 checkpoints of the dense "
               "base's own run (steps 1/4..4/4 of it, or 5/8..8/8 for the late row) into 8 experts top-2: the 4 "
               "checkpoints' FFNs + 4 merges of the farthest pairs with w ~ U[0.25, 0.75]; attention, embeddings and "
               "norms = the checkpoints' mean (the final checkpoint's in the rows marked so: --upit-shared last); the usual router init, "
               "or in the row marked seed router --upit-router seed (a closed-form stand-in for the paper's router "
               "pre-optimization on seed data: rows from the mean hidden state of the 64 sequences each checkpoint "
               "predicts best, docs/METHODS.md 2.12). Same MoE phase as NU, whose init is naive upcycling of the final checkpoint. Where "
               "dense_base kept too few checkpoints, dense_base_ckpts reruns it with a smaller --save-every (the same "
               "training: its final checkpoint is the base, bit for bit); its wall time is counted in every UpIT row.",
               "Paper (docs/METHODS.md 3-4): step-0 order NU = dense < RNU <~ DU0.5 < DU1.0 < FS; DU r=0.5 lowest at the end "
               "when the MoE phase is long enough."])


def upit_rows(root: str, cfg: dict, base_stage: R.Stage, E: str, K: str, moe_phase: dict):
    """UpIT (arXiv 2410.01610): 4 checkpoints of the dense base's run as 4 experts, 4 more merged
    from them (./upcycle --method upit), then the MoE phase; two choices of checkpoints:
      upit       steps 1/4, 2/4, 3/4, 4/4 of the dense run (evenly over the whole run)
      upit_late  the last four at spacing 1/8: 5/8, 6/8, 7/8, 8/8 (all well trained)
      upit_late_last  the same, with the non-FFN tensors from the final checkpoint (--upit-shared
                 last) instead of the checkpoints' mean
      upit_late_last_seed  and with the seed-data router (--upit-router seed: 8 batches of the
                 preset's batch x seq from its data)
    Both end with the base itself, so naive upcycling of the final checkpoint is the NU row. The
    checkpoints come from dense_base if its --save-every wrote them (tiny), else from a rerun of it
    that saves more often (dense_base_ckpts: the same command but --save-every and --out, so the
    same training; its tokens are the base's, not extra)."""
    n = cfg["dense_steps"]
    late = [n - k * (n // 8) for k in (3, 2, 1, 0)]
    variants = [("upit", "UpIT (ckpts 1/4..4/4 + 4 merged)", [n * i // 4 for i in (1, 2, 3, 4)], []),
                ("upit_late", "UpIT (ckpts 5/8..8/8 + 4 merged)", late, []),
                ("upit_late_last", "UpIT (ckpts 5/8..8/8 + 4 merged, non-FFN from the final)", late,
                 ["--upit-shared", "last"]),
                ("upit_late_last_seed", "UpIT (ckpts 5/8..8/8 + 4 merged, non-FFN from the final, seed router)", late,
                 ["--upit-shared", "last", "--upit-router", "seed", "--data", cfg["data"], "--utility-batches", "8",
                  "--batch", str(cfg["batch"]), "--seq", str(cfg["seq"])])]
    steps = sorted({s for _, _, v, _ in variants for s in v})
    stages, rows = [], []
    if all(s % cfg["save_every"] == 0 for s in steps):
        parent, own = base_stage, []
    else:
        every = 0
        for s in steps:
            every = math.gcd(every, s)
        parent = R.train_stage(root, "dense_base_ckpts", dict(cfg, save_every=every), ["--model", cfg["model"]], n,
                               cfg["warmup_dense"], False)
        stages.append(parent)
        own = [parent.name]
    for key, label, ck, more in variants:
        srcs = [os.path.join(R.run_dir(root, parent.name), f"step_{s:06d}") for s in ck]
        init = R.upcycle_stage(root, f"{key}_init", cfg, ["--method", "upit", "--from", ",".join(srcs), "--experts", E,
                                                          "--topk", K] + more, [parent.name])
        run = R.train_stage(root, key, cfg, ["--init", R.run_dir(root, init.name)], needs=[init.name], **moe_phase)
        stages += [init, run]
        rows.append(R.Row(key, label, own + [init.name, key], key, before=["dense_base"]))
    return stages, rows


if __name__ == "__main__":
    sys.exit(R.main(__doc__, build, "drop_upcycling"))
