#!/usr/bin/env python3
"""Nexus (arXiv 2408.15901; docs/METHODS.md 1.9 and 2.14), small scale: upcycling three domain
branches into an MoE whose router is a learned projection of domain embeddings, against BTX
from the same branches; then adding a fourth domain's expert with a short fine-tune.

Data: data/tiny4 = data/tiny (en, code, de; its files linked, unchanged) + a fourth domain `go`
(Go source files of a Debian package the tiny build already fetches, tokenized with the tiny
tokenizer: dev/data/build_extra_domain.py, run here when data/tiny4 is missing). Every stage
evaluates on all four domains' validation splits; the stages before the fourth domain train
on en, code, de only (--mix go=0), so their `val go` is an unseen domain.

  Dense (base)       a dense model on en, code, de (the preset's dense steps)
  branches           the base trained on one domain each (branch steps): en, code, de; and go
  BTX                ./upcycle --method btx from base + en, code, de branches: 4 experts top-2
                     (seed and branch FFNs), linear router; then the MoE phase on en, code, de
  Nexus              ./upcycle --method nexus from the same base + branches: shared expert = the
                     base's FFN (ungated), 3 routed experts = the branch FFNs, top-1; router
                     R = Emb P, Emb = each domain's mean FFN input under the base (4096 tokens),
                     P = I / mean |Emb row|; softmax_topk; then the same MoE phase. Both have 4 FFNs per layer, 2 active per token
  BTX + go expert    the trained BTX MoE + the go branch's FFN as a 5th expert (./upcycle
                     --method add-expert: its router row a fresh free row), then a short
                     fine-tune (a tenth of the MoE phase) on all four domains
  Nexus + go expert  the trained Nexus MoE + the go branch (./upcycle --method nexus-add: its
                     router row Emb_go P, Emb_go from the base on go tokens; no new free router
                     parameter), then the same fine-tune
  ... fine-tuned     the trained MoE fine-tuned the same way without a new expert (the control)

Run (from the repository root):
  python3 scripts/repro_nexus.py --preset tiny_long   # CPU, ~15 min on 2 cores
  python3 scripts/repro_nexus.py                      # tiny preset (CPU, minutes)
  python3 scripts/repro_nexus.py --smoke --runs /tmp/r --results /tmp/r/out
  python3 scripts/repro_nexus.py --list               # print every command and exit
Interrupted? Run the same command again: finished stages are skipped, the unfinished one resumes.
The Nexus stages always use the CPU trainer (./train_moe_gpu does not implement the Nexus router).
Output: docs/results/nexus/[tiny/|tiny_long/]{table.md,results.json,loss_curves.png,expert_load.png}.
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import repro_lib as R  # noqa: E402

DATA4 = "data/tiny4"
OLD = ["en", "code", "de"]
NEW = "go"
MIX3 = "en=1,code=1,de=1,go=0"
MIX4 = "en=1,code=1,de=1,go=1"
EMB_TOKENS = ["--utility-batches", "8", "--batch", "8", "--seq", "64"]   # 4096 tokens per domain embedding


def ensure_data(cfg: dict) -> None:
    """data/tiny4 from data/tiny (the base shards linked, unchanged) + the go domain."""
    if cfg["data"] != "data/tiny":
        raise R.ReproError(f"the Nexus table needs the tiny corpus (data/tiny), not {cfg['data']}: its fourth domain "
                           "is built on the tiny tokenizer")
    if os.path.exists(os.path.join(R.ROOT, DATA4, f"{NEW}_train_000.bin")):
        return
    R.check_data("data/tiny")
    r = subprocess.run([sys.executable, os.path.join(R.ROOT, "dev", "data", "build_extra_domain.py"),
                        "--base", os.path.join(R.ROOT, "data", "tiny"), "--out", os.path.join(R.ROOT, DATA4)])
    if r.returncode != 0:
        raise R.ReproError("dev/data/build_extra_domain.py failed (output above)")


def build(cfg: dict, root: str) -> R.Table:
    ensure_data(cfg)
    cfg = dict(cfg, data=DATA4)
    moe_steps, add_steps = cfg["moe_steps"], max(2, cfg["moe_steps"] // 10)
    warm = cfg["warmup_moe"]
    base_stage = R.train_stage(root, "nx_dense_base", cfg, ["--model", cfg["model"], "--mix", MIX3],
                               cfg["dense_steps"], cfg["warmup_dense"], False)
    base = R.final_ckpt(root, base_stage)
    stages = [base_stage]
    rows = [R.Row("dense", "Dense (base; en, code, de)", [base_stage.name], base_stage.name, moe=False)]
    br = {}
    for dom in OLD + [NEW]:
        b = R.train_stage(root, f"nx_branch_{dom}", cfg, ["--init", base, "--mix", f"{dom}=1"], cfg["branch_steps"],
                          warm, False, [base_stage.name])
        stages.append(b)
        br[dom] = b
    old_br = [br[d] for d in OLD]
    srcs = ",".join([base] + [R.final_ckpt(root, b) for b in old_br])
    old_names = [base_stage.name] + [b.name for b in old_br]

    def moe_run(name, init, steps, mix, needs, cpu_only=False):
        s = R.train_stage(root, name, cfg, ["--init", R.run_dir(root, init), "--mix", mix], steps, warm, True, needs)
        s.cpu_only = cpu_only
        return s

    # BTX: seed + 3 branches, one expert each, top-2 (2 of 4 FFNs active)
    btx_init = R.upcycle_stage(root, "nx_btx_init", cfg, ["--method", "btx", "--from", srcs, "--experts", "4",
                                                          "--topk", "2"], old_names)
    btx = moe_run("nx_btx", btx_init.name, moe_steps, MIX3, [btx_init.name])
    # Nexus: shared expert = seed FFN + 3 routed branch experts, top-1 (2 of 4 FFNs active)
    nx_init = R.upcycle_stage(root, "nx_nexus_init", cfg, ["--method", "nexus", "--from", srcs, "--nexus-domains",
                                                           ",".join(OLD), "--data", DATA4, "--topk", "1"] + EMB_TOKENS,
                              old_names)
    nx = moe_run("nx_nexus", nx_init.name, moe_steps, MIX3, [nx_init.name], cpu_only=True)
    stages += [btx_init, btx, nx_init, nx]
    extra3 = [b.name for b in old_br]
    rows.append(R.Row("btx", "BTX (seed + en, code, de branches; E4 top-2)", extra3 + [btx_init.name, btx.name],
                      btx.name, before=[base_stage.name], extra=extra3))
    rows.append(R.Row("nexus", "Nexus (shared seed FFN + en, code, de experts; top-1)", [nx_init.name, nx.name],
                      nx.name, before=[base_stage.name], extra=extra3))

    # the fourth domain: a new expert + a short fine-tune on all four domains, and the control
    go = R.final_ckpt(root, br[NEW])
    btx_go_init = R.upcycle_stage(root, "nx_btx_go_init", cfg, ["--method", "add-expert", "--from",
                                                                R.final_ckpt(root, btx) + "," + go],
                                  [btx.name, br[NEW].name])
    btx_go = moe_run("nx_btx_go", btx_go_init.name, add_steps, MIX4, [btx_go_init.name])
    nx_go_init = R.upcycle_stage(root, "nx_nexus_go_init", cfg, ["--method", "nexus-add", "--from",
                                                                 R.final_ckpt(root, nx) + "," + go, "--nexus-domains",
                                                                 NEW, "--data", DATA4] + EMB_TOKENS,
                                 [nx.name, br[NEW].name])
    nx_go = moe_run("nx_nexus_go", nx_go_init.name, add_steps, MIX4, [nx_go_init.name], cpu_only=True)
    btx_ft = R.train_stage(root, "nx_btx_ft", cfg, ["--init", R.final_ckpt(root, btx), "--mix", MIX4], add_steps,
                           warm, True, [btx.name])
    nx_ft = R.train_stage(root, "nx_nexus_ft", cfg, ["--init", R.final_ckpt(root, nx), "--mix", MIX4], add_steps,
                          warm, True, [nx.name])
    nx_ft.cpu_only = True
    stages += [btx_go_init, btx_go, nx_go_init, nx_go, btx_ft, nx_ft]
    rows.append(R.Row("btx_go", "BTX + go expert (fresh router row), fine-tuned",
                      [br[NEW].name, btx_go_init.name, btx_go.name], btx_go.name,
                      before=[base_stage.name, btx.name], extra=[br[NEW].name]))
    rows.append(R.Row("nexus_go", "Nexus + go expert (router row Emb_go P), fine-tuned",
                      [nx_go_init.name, nx_go.name], nx_go.name, before=[base_stage.name, nx.name],
                      extra=[br[NEW].name]))
    rows.append(R.Row("btx_ft", "BTX fine-tuned (no new expert)", [btx_ft.name], btx_ft.name,
                      before=[base_stage.name, btx.name]))
    rows.append(R.Row("nexus_ft", "Nexus fine-tuned (no new expert)", [nx_ft.name], nx_ft.name,
                      before=[base_stage.name, nx.name]))
    def extra_columns(res):
        """step-0 val go, and where go's tokens go: the share routed to the new expert (layers
        0 and 1, at the end of the row's run), or to each old domain's expert (Nexus, layer 0)."""
        cells = {}
        for r in res:
            s0 = r.get("step0_val") or {}
            load = (r.get("expert_load") or {}).get(NEW)
            share = "-"
            if load and r["key"] in ("btx_go", "nexus_go"):
                share = " / ".join(f"{100 * row[-1]:.1f}%" for row in load)
            cells[r["key"]] = [f"{s0[NEW]:.4f}" if NEW in s0 else "-", share]
        return (["step-0 val go", "go tokens to the new expert (per layer, end)"], cells,
                ["go tokens to the new expert: the share of (go token, slot) assignments the new expert gets at "
                 "the row's last evaluation, layer 0 / layer 1 (a uniform router would give 1/E per slot)."])

    return R.Table(
        "nexus", "Nexus vs BTX (small-scale), and adding a fourth domain's expert", stages, rows,
        notes=[f"Data `{DATA4}`: the tiny corpus's en, code, de (files linked, unchanged) + `go`, built by "
               "dev/data/build_extra_domain.py with the tiny tokenizer (Go sources of golang-github-pierrec-lz4-dev: "
               "33k train / 3.6k val tokens, a small fourth domain). Every row is evaluated on all four domains; "
               "Dense, branches, BTX and Nexus train on en, code, de only (`val go` is then an unseen domain).",
               f"BTX and Nexus: {moe_steps} MoE steps from the same base ({cfg['dense_steps']} steps) and the same "
               f"en, code, de branches ({cfg['branch_steps']} steps each; their wall time is counted in the BTX row), "
               "aux pooled 0.02, no z-loss, fresh AdamW, the same seed and data order. BTX: 4 experts (seed, en, code, "
               "de FFNs) top-2, topk_softmax, the usual router init; Nexus: the seed FFN as an ungated shared expert + "
               "3 routed branch experts top-1, softmax_topk (the routed expert's weight is its probability, so the "
               "language-model loss reaches the router), R = Emb P with Emb from 4096 tokens per domain (each layer's "
               "FFN input under the base), P = I / mean |Emb row| at init. Both: 4 FFNs per layer, 2 active per token; Nexus adds P "
               "(d x d per layer). The Nexus stages run on the CPU trainer.",
               f"Fourth domain: a go branch ({cfg['branch_steps']} steps from the base on go alone) becomes expert 5 "
               f"(BTX, ./upcycle --method add-expert: router row fresh) or expert 4 (Nexus, ./upcycle --method "
               f"nexus-add: router row Emb_go P with the trained P), then {add_steps} steps on all four domains "
               "(equal weights; warmup + cosine, fresh AdamW). The controls fine-tune the same way without a new "
               "expert. Step-0 of these rows = right after adding the expert (before the fine-tune).",
               "One seed (1337); differences of a few 0.01 nats are within the run-to-run spread measured for the "
               "tiny_long tables (docs/REPRODUCTIONS.md)."], extra_columns=extra_columns)


if __name__ == "__main__":
    sys.exit(R.main(__doc__, build, "nexus"))
