#!/usr/bin/env python3
"""Grove MoE (arXiv 2508.07785; docs/METHODS.md 1.10 and 2.15), small scale: an upcycled MoE
against the same MoE with Grove's adjugate experts added.

From the shared dense base, every MoE row trains for the MoE phase's budget with Table 1's
recipe (aux pooled 0.02, no z-loss, fresh AdamW, warmup + cosine, topk_softmax, the same seed
and data order):

  NU                    ./upcycle --method naive, 8 experts top-2 (Table 1's row)
  NU + grove (lambda)   the same step-0 MoE, then ./upcycle --method grove --grove-groups 4
                        --grove-width F/4: 4 groups of 2 experts, one adjugate SwiGLU of width F/4
                        each, w2 = 0 (the step-0 function is NU's exactly), scaled by lambda =
                        0.05 (GroveMoE's released code) or 0.5 times the group's summed gate weight
  Dense (continued) is the dense reference (the same stage as Table 1's).
A grove token runs its 2 routed experts (2 F neurons) plus one adjugate per group its experts
fall in: 1 or 2 of width F/4 (2.25 F or 2.5 F active neurons): compare at equal tokens, not
equal compute.

Run (from the repository root):
  python3 scripts/repro_grove.py --preset tiny_long   # CPU, a few minutes on 2 cores
  python3 scripts/repro_grove.py                      # tiny preset (CPU, about a minute)
  python3 scripts/repro_grove.py --smoke --runs /tmp/r --results /tmp/r/out
  python3 scripts/repro_grove.py --list          # print every command and exit
Interrupted? Run the same command again: finished stages are skipped, the unfinished one resumes.
Output: docs/results/grove/[tiny/|tiny_long/]{table.md,results.json,loss_curves.png,expert_load.png}.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import repro_lib as R  # noqa: E402

DENSE_F = {"tiny": 256, "small": 1024, "d512": 2048, "d768": 3072}   # the presets' dense FFN width F


def build(cfg: dict, root: str) -> R.Table:
    E, K, G = "8", "2", "4"
    Fa = str(DENSE_F[cfg["model"]] // 4)
    base_stage, base_row, base = R.dense_base(root, cfg)
    cont_stage, cont_row = R.dense_continued(root, cfg, base)
    stages, rows = [base_stage, cont_stage], [base_row, cont_row]
    moe_phase = dict(steps=cfg["moe_steps"], warmup=cfg["warmup_moe"], moe=True)
    shape = {}
    # NU: Table 1's stages (repro_drop_upcycling.py), its arguments in that script's order
    nu_init = R.upcycle_stage(root, "nu_init", cfg, ["--method", "naive", "--from", base, "--experts", E, "--topk", K],
                              ["dense_base"])
    nu = R.train_stage(root, "nu", cfg, ["--init", R.run_dir(root, nu_init.name)], needs=[nu_init.name], **moe_phase)
    stages += [nu_init, nu]
    rows.append(R.Row("nu", "NU (naive)", [nu_init.name, "nu"], "nu", before=["dense_base"]))
    shape["nu"] = ["2 F"]
    for key, lam in [("grove_l005", "0.05"), ("grove_l05", "0.5")]:
        init = R.upcycle_stage(root, f"{key}_init", cfg,
                               ["--method", "grove", "--from", R.run_dir(root, nu_init.name), "--grove-groups", G,
                                "--grove-width", Fa, "--grove-scale", lam], [nu_init.name])
        run = R.train_stage(root, key, cfg, ["--init", R.run_dir(root, init.name)], needs=[init.name], **moe_phase)
        stages += [init, run]
        rows.append(R.Row(key, f"NU + grove (G {G} of 2, F_a F/4, lambda {lam})", [init.name, key], key,
                          before=["dense_base"]))
        shape[key] = ["2 F + 1-2 x F/4"]

    def shape_col(res):
        return ["active FFN per token"], dict(shape), []

    return R.Table(
        "grove", "Grove MoE: adjugate experts on an upcycled MoE (small-scale reproduction)", stages, rows,
        notes=[f"MoE phase: {cfg['moe_steps']} steps for every row after the dense base ({cfg['dense_steps']} steps); "
               "aux pooled 0.02 (the routed experts' router), no z-loss, fresh AdamW, the same seed and data order.",
               "grove rows start from NU's step-0 model plus zero-output adjugates (upcycle --method grove): the "
               "same step-0 loss as NU. Their tokens run 1 or 2 adjugates of width F/4 beside the 2 routed experts: "
               "equal tokens, not equal compute.",
               "GroveMoE (arXiv 2508.07785) upcycles Qwen3-30B-A3B (128 experts, 64 groups, adjugates of width 128, "
               "lambda 0.05 in its released code) in mid-training; this table is a small-scale check of the "
               "mechanism, not of the paper's numbers."],
        extra_columns=shape_col)


if __name__ == "__main__":
    sys.exit(R.main(__doc__, build, "grove"))
