#!/usr/bin/env python3
"""Routing variants of granular upcycling (NVIDIA, arXiv 2410.07524; docs/METHODS.md 2.7), small scale.

From the shared dense base, every row is a granular upcycle trained for the MoE phase's
budget with Table 1's recipe (aux pooled 0.02, no z-loss, fresh AdamW, warmup + cosine, the
same seed and data order); each routing is trained with its matching init (the weight scale
s = G for topk_softmax, s = E G / K for softmax_topk; every matrix times s^(1/3)):

  G = 1: 8 experts of width F, top-2                   (topk_softmax G = 1 is naive upcycling)
  G = 4: 32 experts of width F/4, top-8                (same total and active parameters)
  each with --routing topk_softmax (Mixtral: softmax, top-K, renormalize) and softmax_topk
  (Megatron: softmax over all E, top-K, no renormalization).
  Dense (continued) is the reference (the same stage as Table 1's).
  G = 1 topk_softmax (naive upcycling) again with the Dirichlet-prior shaping loss added to the
  balancing loss (arXiv 2510.01185, docs/METHODS.md 1.6; run by the CPU trainer): --aux-loss
  pooled+dpsl with the defaults --dpsl-coef 0.01 --dpsl-alpha 1 (sq, mid).

Run (from the repository root):
  python3 scripts/repro_routing.py                 # tiny preset (CPU, minutes)
  python3 scripts/repro_routing.py --preset small  # one H100 (./train_moe_gpu)
  python3 scripts/repro_routing.py --smoke --runs /tmp/r --results /tmp/r/out
  python3 scripts/repro_routing.py --list          # print every command and exit
Interrupted? Run the same command again: finished stages are skipped, the unfinished one resumes.
Output: docs/results/routing/[tiny/]{table.md,results.json,loss_curves.png,expert_load.png}.

Small-preset budget (d512, 32768 tokens/step; FLOP arithmetic in repro_drop_upcycling.py):
dense base and dense continued are shared with Table 1 (39.3M + 19.7M tokens, 25 PFLOP if run
here first); 4 MoE rows x 600 steps = 78.6M tokens x 0.65 GFLOP = 51 PFLOP (G = 4 has the same
FLOPs in its GEMMs but 4x the routed rows, so expect it slower): ~13 minutes at 100 TFLOP/s,
~25 minutes at 50 TFLOP/s for the MoE rows.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import repro_lib as R  # noqa: E402

VARIANTS = [(1, "topk_softmax"), (1, "softmax_topk"), (4, "topk_softmax"), (4, "softmax_topk")]


def build(cfg: dict, root: str) -> R.Table:
    base_stage, base_row, base = R.dense_base(root, cfg)
    cont_stage, cont_row = R.dense_continued(root, cfg, base)
    stages, rows = [base_stage, cont_stage], [base_row, cont_row]
    shape = {}
    for G, routing in VARIANTS:
        E, K = 8 * G, 2 * G
        key = f"g{G}_{routing}"
        init = R.upcycle_stage(root, f"{key}_init", cfg, ["--method", "granular", "--from", base, "--granularity",
                                                          str(G), "--experts", str(E), "--topk", str(K),
                                                          "--routing", routing], ["dense_base"])
        run = R.train_stage(root, key, cfg, ["--init", R.run_dir(root, init.name)], cfg["moe_steps"],
                            cfg["warmup_moe"], True, [init.name])
        stages += [init, run]
        label = f"granular G={G}, {routing}" + (" (= NU)" if (G, routing) == (1, "topk_softmax") else "")
        rows.append(R.Row(key, label, [init.name, run.name], run.name, before=["dense_base"]))
        shape[key] = [f"E {E}, top-{K}, F/{G}" if G > 1 else f"E {E}, top-{K}, F"]
    # naive upcycling (the G = 1 topk_softmax init) trained with the shaping loss on top of pooled 0.02;
    # the row runs on the CPU trainer, and not at all in the small preset (the GPU trainer has dpsl
    # too, but it has run only in the emulation: no GPU row until it has run on a GPU)
    if cfg["trainer"] != "gpu":
        dpsl_losses = ["--aux-loss", "pooled+dpsl", "--aux-coef", "0.02", "--z-coef", "0", "--dpsl-coef", "0.01",
                       "--dpsl-alpha", "1"]
        run = R.train_stage(root, "g1_topk_softmax_dpsl", cfg, ["--init", R.run_dir(root, "g1_topk_softmax_init")],
                            cfg["moe_steps"], cfg["warmup_moe"], True, ["g1_topk_softmax_init"], losses=dpsl_losses)
        run.cpu_only = True
        stages.append(run)
        rows.append(R.Row("g1_dpsl", "granular G=1, topk_softmax (= NU) + dpsl 0.01, alpha 1", [run.name], run.name,
                          before=["dense_base"]))
        shape["g1_dpsl"] = ["E 8, top-2, F"]

    def shape_col(res):
        return ["experts"], {k: v for k, v in shape.items()}, []

    return R.Table(
        "routing", "Routing variants and granularity (small-scale reproduction)", stages, rows,
        notes=[f"MoE phase: {cfg['moe_steps']} steps for every row after the dense base ({cfg['dense_steps']} steps); "
               "aux pooled 0.02, no z-loss, fresh AdamW, the same seed and data order.",
               "Expected (docs/METHODS.md 1.1, 2.7, 5): NVIDIA's upcycling prefers softmax_topk with its scaled init; the "
               "fine-grained scaling law finds G = 1 rarely optimal at equal active parameters.",
               "The + dpsl row starts from the same NU init (its wall time excludes the shared init) and adds the "
               "Dirichlet-prior shaping loss (docs/METHODS.md 1.6) with its defaults; the paper (arXiv 2510.01185) "
               "reports better downstream accuracy of upcycled vision-language MoEs, not a lower LM loss. Run by "
               "the CPU trainer (the GPU trainer's dpsl has run only in the CUDA emulation)."],
        extra_columns=shape_col)


if __name__ == "__main__":
    sys.exit(R.main(__doc__, build, "routing"))
