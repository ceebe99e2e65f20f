#!/usr/bin/env python3
"""Shared experts (DeepSeekMoE arXiv 2401.06066; Qwen2-MoE arXiv 2407.10671; docs/METHODS.md
1.7 and 2.11), small scale: upcycling a dense model into an MoE with an always-on shared expert.

From the shared dense base, every MoE row trains for the MoE phase's budget with Table 1's
recipe (aux pooled 0.02, no z-loss, fresh AdamW, warmup + cosine, topk_softmax, the same seed
and data order):

  NU                    ./upcycle --method naive, 8 experts top-2 (Table 1's row; no shared expert)
  DU (r=0.5)            ./upcycle --method drop --ratio 0.5 (Table 1's row)
  shared, sigmoid gate  ./upcycle --method shared: the dense FFN as the shared expert (Qwen2-MoE's
                        sigmoid gate, vector 0) + 8 routed copies top-2; the dense function at step 0
  shared, no gate       the same, DeepSeekMoE-style (shared down_proj x 1/2 instead of the gate)
  Qwen2 recipe          ./upcycle --method qwen2 --granularity 4 --ratio 0.5: 32 routed experts of
                        width F/4 top-8 (the same routed total and active width as NU), each a shard
                        of a shuffled copy of the FFN with half its neurons re-initialized, + the
                        shared expert with its sigmoid gate
  XFT                   ./upcycle --method xft: the dense FFN as an ungated shared expert + 8 routed
                        copies top-2 with XFT's routing-weight normalization (shared weight 1 - p(1),
                        routed weights p(1) softmax of the top-2 probabilities; arXiv 2404.15247,
                        docs/METHODS.md 1.8, 2.13): the dense function at step 0
  XFT merged            XFT's learnable merge of the trained XFT MoE back into a dense model
                        (./upcycle --method merge, lambda 0.75, alpha trained for merge_steps Adam
                        steps on training batches, all else frozen), evaluated as is (no training):
                        dense compute, to compare with Dense (continued); "uniform alpha" is the same
                        merge with 0 steps (every expert weighted 1/8)
  FS + shared           the same shape as "shared, sigmoid gate" from scratch (./train_moe
                        --experts 8 --topk 2 --shared-experts 1)
  Dense (continued) is the dense reference (the same stage as Table 1's).
The shared rows have one more FFN of width F per layer active on every token than NU (3 F
active neurons per token instead of 2 F): compare them at equal tokens, not equal compute.

Run (from the repository root):
  python3 scripts/repro_shared_experts.py --preset tiny_long   # CPU, ~15 min on 2 cores
  python3 scripts/repro_shared_experts.py                      # tiny preset (CPU, minutes)
  python3 scripts/repro_shared_experts.py --smoke --runs /tmp/r --results /tmp/r/out
  python3 scripts/repro_shared_experts.py --list          # print every command and exit
Interrupted? Run the same command again: finished stages are skipped, the unfinished one resumes.
Output: docs/results/shared_experts/[tiny/|tiny_long/]{table.md,results.json,loss_curves.png,expert_load.png}.
"""
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
    shape = {}
    # the upcycled rows: one ./upcycle call, then the MoE phase; nu and du05 are Table 1's stages
    # (repro_drop_upcycling.py), so their arguments are in its order
    ek = ["--experts", E, "--topk", K]
    for key, label, margs, sh in [
            ("nu", "NU (naive)", ["--method", "naive", "--from", base] + ek, "E 8, top-2, F"),
            ("du05", "DU (r=0.5)", ["--method", "drop", "--ratio", "0.5", "--from", base] + ek, "E 8, top-2, F"),
            ("shared_sigmoid", "shared (dense FFN), sigmoid gate + 8 copies",
             ["--method", "shared", "--from", base] + ek + ["--shared-gate", "sigmoid"],
             "E 8, top-2, F; shared F, gated"),
            ("shared_none", "shared (dense FFN), no gate + 8 copies",
             ["--method", "shared", "--from", base] + ek + ["--shared-gate", "none"],
             "E 8, top-2, F; shared F"),
            ("qwen2_g4", "Qwen2 recipe (G=4, r=0.5) + shared, sigmoid gate",
             ["--method", "qwen2", "--from", base, "--experts", "32", "--topk", "8", "--granularity", "4",
              "--ratio", "0.5"],
             "E 32, top-8, F/4; shared F, gated")]:
        init = R.upcycle_stage(root, f"{key}_init", cfg, margs, ["dense_base"])
        run = R.train_stage(root, key, cfg, ["--init", R.run_dir(root, init.name)], needs=[init.name], **moe_phase)
        stages += [init, run]
        rows.append(R.Row(key, label, [init.name, key], key, before=["dense_base"]))
        shape[key] = [sh]
    # XFT (arXiv 2404.15247): upcycle, train the MoE, merge back into a dense model, evaluate it
    xi = R.upcycle_stage(root, "xft_init", cfg, ["--method", "xft", "--from", base] + ek, ["dense_base"])
    xr = R.train_stage(root, "xft", cfg, ["--init", R.run_dir(root, xi.name)], needs=[xi.name], **moe_phase)
    stages += [xi, xr]
    rows.append(R.Row("xft", "XFT (dense FFN shared, xft routing) + 8 copies", [xi.name, "xft"], "xft",
                      before=["dense_base"]))
    shape["xft"] = ["E 8, top-2, F; shared F, xft weights"]
    merge_steps = cfg.get("merge_steps", 200 if cfg["moe_steps"] >= 100 else 2)
    for key, label, steps in [("xft_merged", f"XFT merged into a dense model (lambda 0.75, alpha {merge_steps} steps)",
                               merge_steps),
                              ("xft_merged_uniform", "XFT merged, uniform alpha (no merge training)", 0)]:
        mg = R.upcycle_stage(root, f"{key}_model", cfg,
                             ["--method", "merge", "--from", R.final_ckpt(root, xr), "--merge-lambda", "0.75",
                              "--merge-steps", str(steps), "--merge-lr", "0.05", "--data", cfg["data"],
                              "--batch", str(cfg["batch"]), "--seq", str(cfg["seq"])], [xr.name])
        ev = R.ensemble_stage(root, f"{key}_eval", cfg, [R.run_dir(root, mg.name)], [mg.name])
        stages += [mg, ev]
        rows.append(R.Row(key, label, [mg.name, ev.name], ev.name, moe=False, before=["dense_base"], extra=[xr.name]))
        shape[key] = ["dense, F (from the XFT MoE)"]
    fs = R.train_stage(root, "fs_shared", cfg, ["--model", cfg["model"], "--experts", E, "--topk", K,
                                                "--shared-experts", "1", "--routing", "topk_softmax"], **moe_phase)
    stages.append(fs)
    rows.append(R.Row("fs_shared", "FS + shared (from scratch), sigmoid gate", ["fs_shared"], "fs_shared",
                      before=["dense_base"]))
    shape["fs_shared"] = ["E 8, top-2, F; shared F, gated"]

    def shape_col(res):
        return ["experts"], dict(shape), []

    return R.Table(
        "shared_experts", "Shared experts: upcycling with a shared expert (small-scale reproduction)", stages, rows,
        notes=[f"MoE phase: {cfg['moe_steps']} steps for every row after the dense base ({cfg['dense_steps']} steps); "
               "aux pooled 0.02 (the routed experts only), no z-loss, fresh AdamW, the same seed and data order.",
               "shared rows: 3 F neurons active per token (shared F + 2 routed F, or 8 of F/4), NU/DU: 2 F: equal "
               "tokens, not equal compute. shared/qwen2 split the FFN output evenly between the shared expert and the "
               "routed ones (docs/METHODS.md 2.11), so `shared` starts at the dense model's loss (like NU).",
               "XFT rows (arXiv 2404.15247): the MoE row trains like the others; the merged rows are evaluated "
               "without further training (the merge's alpha steps use training batches); their tokens are the XFT "
               "MoE's. XFT's paper fine-tunes a 1.3B code model on instruction data; this is a small-scale check of "
               "the mechanics, not of its claims.",
               "Qwen2 (arXiv 2407.10671) reports its upcycled 57B-A14B MoE, not an ablation of these inits; "
               "DeepSeekMoE (arXiv 2401.06066) reports shared-expert isolation helping models trained from scratch."],
        extra_columns=shape_col)


if __name__ == "__main__":
    sys.exit(R.main(__doc__, build, "shared_experts"))
