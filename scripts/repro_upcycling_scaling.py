#!/usr/bin/env python3
"""Upcycling scaling-law grid (Liew, Kato, Takase, arXiv 2502.03009; docs/METHODS.md 5), small scale.

The paper fits the loss of an upcycled MoE as a function of D1, the tokens its dense parent was
trained on, and D2, the tokens trained after upcycling, in the form (fitted here as written)

    L(D1, D2) = A * D1^(-a1) * D2^(-a2 + a3 ln D1) + E

with an interaction term a3: at fixed D1 the loss is a power law in D2 whose exponent
a2 - a3 ln D1 shrinks as D1 grows when a3 > 0, the paper's finding (the more the dense model was
trained, the less each upcycling token buys). This grid measures it at small scale:

  dense D1   for each D1 in the grid: a dense model trained D1 tokens (its own warmup + cosine;
             the D1 equal to the preset's dense_steps is the shared dense base of the other tables)
  NU D1, D2  each dense model naively upcycled (8 experts, top-2, ./upcycle --method naive) and
             trained D2 tokens, for each D2 in the grid (its own warmup + cosine over D2; seed + 1,
             so the MoE phase reads the data in a new order rather than replaying the dense one)
  FS T       an 8-expert top-2 MoE from scratch trained T = D1 + D2 tokens, for every total T of
             the grid: the from-scratch model at the same number of training tokens

MoE recipe as in the other tables (topk_softmax, aux pooled 0.02, no z-loss, fresh AdamW);
warmup = min(the preset's, steps / 5) so the shortest runs are not all warmup. Fits (numpy,
scripts/scaling_fit.py): the form above on the NU points (D in millions of tokens), the same
without the interaction (a3 = 0), a residual bootstrap of a3, and per D1 the D2-exponent of a
power law with the joint fit's E, against the line a2 - a3 ln D1.

Run (from the repository root):
  python3 scripts/repro_upcycling_scaling.py --threads 1     # tiny grid, CPU: 10-20 min (1 thread)
  python3 scripts/repro_upcycling_scaling.py --preset small  # one GPU (./train_moe_gpu), not run yet
  python3 scripts/repro_upcycling_scaling.py --smoke --runs /tmp/r --results /tmp/r/out
  python3 scripts/repro_upcycling_scaling.py --list          # every command, and the wall-time estimate
(Measured 2026-12-02 on this shared 2-core machine: 12.8 minutes at load 2-4, 20.5 at load 6-9;
the estimate for an idle one is 10.4.)
Interrupted? Run the same command again: finished stages are skipped, the unfinished one resumes.
The wall-time estimate is printed before the first stage. Output:
docs/results/upcycling_scaling/[tiny/]{table.md,results.json,scaling.png}.

Grids (steps; 512 tokens per step at tiny, 32768 at small):
  tiny   D1 in 100, 200, 400, 800 (51k..410k tokens), D2 in 50, 100, 200, 400, 800 (26k..410k):
         4 dense + 20 NU runs + 14 FS totals (150..1600 steps). 17.2k steps in all, of which
         15.4k MoE; the tiny train split is 350k tokens, so the longest runs repeat it ~2x.
  small  D1 in 300, 600, 1200 (9.8M..39M tokens), D2 in 150, 300, 600, 1200 (4.9M..39M):
         3 dense + 12 NU + 9 FS totals (450..2400 steps). 2.1k dense steps = 69M tokens x 0.43
         GFLOP = 30 PFLOP; 6.75k NU + 11k FS steps = 580M MoE tokens x 0.65 GFLOP = 377 PFLOP:
         ~2.3 hours at 50 TFLOP/s sustained, ~1.1 hours at 100 (not measured: the GPU trainer has
         not run on a GPU yet; the estimate printed before the start uses 50 TFLOP/s).
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import repro_lib as R  # noqa: E402
import scaling_fit as F  # noqa: E402

GRIDS = {
    "smoke": dict(d1=[10, 20], d2=[4, 6, 10]),
    "tiny": dict(d1=[100, 200, 400, 800], d2=[50, 100, 200, 400, 800]),
    "small": dict(d1=[300, 600, 1200], d2=[150, 300, 600, 1200]),
}
KEEP_LAST = ["--keep-checkpoints", "last"]   # the grid's runs keep only their newest checkpoint (resume needs no more)


def warmup(cfg_warmup: int, steps: int) -> int:
    return min(cfg_warmup, max(1, steps // 5))


def build(cfg: dict, root: str) -> R.Table:
    grid = GRIDS[cfg["preset"]]
    tok = cfg["batch"] * cfg["seq"] * cfg["grad_accum"]
    stages, rows, info = [], [], {}   # info: row key -> dict(kind, d1, d2, total) in steps

    # dense models at each D1 (the preset's dense base is one of them when the step counts match)
    dense = {}
    for d1 in grid["d1"]:
        if d1 == cfg["dense_steps"] and warmup(cfg["warmup_dense"], d1) == cfg["warmup_dense"]:
            s, _, _ = R.dense_base(root, cfg)
        else:
            s = R.train_stage(root, f"us_dense_{d1}", cfg, ["--model", cfg["model"]], d1,
                              warmup(cfg["warmup_dense"], d1), False, tail=KEEP_LAST)
        stages.append(s)
        dense[d1] = s
        rows.append(R.Row(f"dense{d1}", f"dense, D1 = {R.fmt_tokens(d1 * tok)}", [s.name], s.name, moe=False))
        info[f"dense{d1}"] = dict(kind="dense", d1=d1, d2=0, total=d1)

    # NU at each (D1, D2)
    for d1 in grid["d1"]:
        base = R.final_ckpt(root, dense[d1])
        name = "nu_init" if dense[d1].name == "dense_base" else f"us_nu_{d1}_init"   # nu_init: Table 1's stage
        init = R.upcycle_stage(root, name, cfg, ["--method", "naive", "--from", base, "--experts", "8", "--topk", "2"],
                               [dense[d1].name])
        stages.append(init)
        for d2 in grid["d2"]:
            key = f"nu_{d1}_{d2}"
            s = R.train_stage(root, f"us_nu_{d1}_{d2}", cfg, ["--init", R.run_dir(root, init.name)], d2,
                              warmup(cfg["warmup_moe"], d2), True, [init.name], seed=cfg["seed"] + 1, tail=KEEP_LAST)
            stages.append(s)
            rows.append(R.Row(key, f"NU, D1 = {R.fmt_tokens(d1 * tok)}, D2 = {R.fmt_tokens(d2 * tok)}",
                              [s.name], s.name, before=[dense[d1].name]))
            info[key] = dict(kind="nu", d1=d1, d2=d2, total=d1 + d2)

    # FS at every total D1 + D2
    for t in sorted({d1 + d2 for d1 in grid["d1"] for d2 in grid["d2"]}):
        s = R.train_stage(root, f"us_fs_{t}", cfg, ["--model", cfg["model"], "--experts", "8", "--topk", "2",
                                                    "--routing", "topk_softmax"], t, warmup(cfg["warmup_dense"], t),
                          True, tail=KEEP_LAST)
        stages.append(s)
        rows.append(R.Row(f"fs{t}", f"FS, {R.fmt_tokens(t * tok)}", [s.name], s.name))
        info[f"fs{t}"] = dict(kind="fs", d1=0, d2=0, total=t)

    n_boot = 20 if cfg["preset"] == "smoke" else 200   # residual-bootstrap refits of the fit

    def points(res):
        """(D1 tokens, D2 tokens, loss) of the finished NU rows; D1 tokens from the dense run's metrics."""
        by = {r["key"]: r for r in res}
        pts = []
        for k, i in info.items():
            if i["kind"] == "nu" and k in by and f"dense{i['d1']}" in by:
                pts.append((by[f"dense{i['d1']}"]["tokens"], by[k]["tokens"], by[k]["val_loss"], k))
        return pts

    def columns(res):
        by = {r["key"]: r for r in res}
        cells = {}
        for r in res:
            i = info[r["key"]]
            fs = by.get(f"fs{i['total']}")
            d1 = R.fmt_tokens(i["d1"] * tok) if i["d1"] else ""
            d2 = R.fmt_tokens(i["d2"] * tok) if i["d2"] else ""
            tot = R.fmt_tokens(i["total"] * tok)
            if i["kind"] == "nu":
                cells[r["key"]] = [d1, d2, tot, f"{fs['val_loss']:.4f}" if fs else "-",
                                   f"{r['val_loss'] - fs['val_loss']:+.4f}" if fs else "-"]
            else:
                cells[r["key"]] = [d1, "", tot, "", ""]
        return (["D1", "D2", "D1 + D2", "FS at D1 + D2", "NU minus FS"], cells,
                ["D1, D2: grid values (steps x tokens per step). NU minus FS: the upcycled row's final loss minus "
                 "the from-scratch MoE's trained on the same total number of tokens (negative: upcycling wins)."])

    def analysis(res):
        pts = points(res)
        if len(pts) < 6 or len({p[0] for p in pts}) < 2:
            return {"notes": ["Too few finished NU points for the fit."], "data": {}}
        X = [(p[0] / 1e6, p[1] / 1e6) for p in pts]
        y = [p[2] for p in pts]
        full = F.fit(F.UPCYCLING, X, y)
        null = F.fit(F.UPCYCLING_NO_INTERACTION, X, y)
        boot = F.bootstrap(F.UPCYCLING, X, y, full, n=n_boot, seed=cfg["seed"])
        # robustness: the same fit without the shortest D2, whose runs are mostly warmup (and where a
        # well-trained parent first gets worse as the learning rate re-warms)
        d2min = min(p[1] for p in pts)
        rest = [i for i, p in enumerate(pts) if p[1] > d2min]
        trim = F.fit(F.UPCYCLING, [X[i] for i in rest], [y[i] for i in rest]) if len(rest) >= 6 else None
        resid = [yy - pp for yy, pp in zip(y, F.predict(full, F.UPCYCLING, X))]
        th, co = full["theta"], full["coef"]
        # per D1: the exponent of L - E = B D2^-a, E the joint fit's (least squares in log space)
        per = []
        for d1 in sorted({p[0] for p in pts}):
            sub = [(p[1] / 1e6, p[2]) for p in pts if p[0] == d1]
            if len(sub) >= 3 and all(l > co["E"] for _, l in sub):
                lx = [math.log(d) for d, _ in sub]
                ly = [math.log(l - co["E"]) for _, l in sub]
                mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
                slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
                per.append(dict(d1_tokens=d1, exponent=-slope,
                                joint=th["a2"] - th["a3"] * math.log(d1 / 1e6)))
        by = {r["key"]: r for r in res}
        vs_fs = []
        for d1t, d2t, loss, k in pts:
            fs = by.get(f"fs{info[k]['total']}")
            if fs:
                vs_fs.append(dict(key=k, d1_tokens=d1t, d2_tokens=d2t, nu=loss, fs=fs["val_loss"],
                                  diff=loss - fs["val_loss"]))
        b3 = boot.get("a3", {})
        sign = "a3 > 0: the paper's sign" if th["a3"] > 0 else "a3 <= 0: the opposite of the paper's sign"
        held = (b3 and (b3["p05"] > 0 or b3["p95"] < 0))
        notes = [
            "Fit (scripts/scaling_fit.py, least squares on the final mean validation loss of the "
            f"{len(pts)} NU rows, D in millions of tokens): L = A D1^-a1 D2^(-a2 + a3 ln D1) + E (Liew et al., "
            f"arXiv 2502.03009) with A = {co['A']:.4f}, a1 = {th['a1']:.4f}, a2 = {th['a2']:.4f}, "
            f"a3 = {th['a3']:+.4f}, E = {co['E']:.4f}; RMSE {full['rmse']:.4f} nats.",
            f"Interaction term: {sign}. Residual bootstrap ({n_boot} refits): a3 5-95% {b3.get('p05', math.nan):+.4f} .. "
            f"{b3.get('p95', math.nan):+.4f}, positive in {b3.get('frac_pos', math.nan):.0%} of refits; the interval "
            f"{'excludes' if held else 'includes'} 0. Without the interaction (a3 = 0): RMSE {null['rmse']:.4f}, "
            f"AIC {null['aic']:.1f} against {full['aic']:.1f} with it (lower is better; 2 per extra parameter).",
            (f"Without the shortest D2 ({R.fmt_tokens(d2min)}; {len(rest)} points): a3 = {trim['theta']['a3']:+.4f}, "
             f"E = {trim['coef']['E']:.4f}, RMSE {trim['rmse']:.4f}." if trim else "") +
            f" Largest residual of the full fit: {max(resid, key=abs):+.4f} nats.",
            "D2-exponent per D1 (power law in D2 with the joint E, against the joint fit's a2 - a3 ln D1): " +
            "; ".join(f"D1 = {R.fmt_tokens(p['d1_tokens'])}: {p['exponent']:.4f} (joint {p['joint']:.4f})"
                      for p in per) + ".",
        ]
        if vs_fs:
            wins = sum(v["diff"] < 0 for v in vs_fs)
            notes.append(f"NU below FS at the same total tokens in {wins} of {len(vs_fs)} grid points (NU minus FS "
                         f"from {min(v['diff'] for v in vs_fs):+.4f} to {max(v['diff'] for v in vs_fs):+.4f}).")
        return {"notes": notes, "data": dict(
            form="L = A * D1^-a1 * D2^(-a2 + a3 ln D1) + E, D in millions of tokens",
            source="Liew, Kato, Takase: Scaling Laws for Upcycling Mixture-of-Experts Language Models, arXiv 2502.03009",
            fit=full, fit_no_interaction=null, bootstrap=boot, fit_without_shortest_d2=trim,
            residuals=resid, per_d1_exponent=per, nu_vs_fs=vs_fs,
            points=[dict(key=k, d1_tokens=a, d2_tokens=b, loss=l) for a, b, l, k in pts])}

    def plots(res, an, out_dir, sub):
        data = an.get("data") or {}
        if not data:
            return []
        plt = R._pyplot()
        import numpy as np
        fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
        full, null = data["fit"], data["fit_no_interaction"]
        pts = data["points"]
        d1s = sorted({p["d1_tokens"] for p in pts})
        ax = axes[0]
        for i, d1 in enumerate(d1s):
            sub_pts = sorted((p["d2_tokens"], p["loss"]) for p in pts if p["d1_tokens"] == d1)
            x = [a for a, _ in sub_pts]
            ax.plot(x, [b for _, b in sub_pts], "o", color=f"C{i}", label=f"D1 = {R.fmt_tokens(d1)}")
            xs = np.geomspace(min(x) / 1.3, max(x) * 1.3, 60)
            X = np.stack([np.full_like(xs, d1 / 1e6), xs / 1e6], axis=1)
            ax.plot(xs, F.predict(full, F.UPCYCLING, X), "-", color=f"C{i}", lw=1.3)
            ax.plot(xs, F.predict(null, F.UPCYCLING_NO_INTERACTION, X), ":", color=f"C{i}", lw=1.0)
        ax.set_xscale("log")
        ax.set_xlabel("D2: tokens after upcycling")
        ax.set_ylabel("final validation loss (mean over domains)")
        t, c = full["theta"], full["coef"]
        ax.set_title(f"NU: loss vs D2 per D1; solid: A D1^-a1 D2^(-a2 + a3 ln D1) + E\n"
                     f"a1 {t['a1']:.3f}, a2 {t['a2']:.3f}, a3 {t['a3']:+.4f}, E {c['E']:.3f} (D in M tokens); "
                     f"dotted: a3 = 0", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax = axes[1]
        per = data["per_d1_exponent"]
        if per:
            ax.plot([p["d1_tokens"] for p in per], [p["exponent"] for p in per], "o", color="k",
                    label="per D1: exponent of L - E in D2")
        xs = np.geomspace(min(d1s) / 1.3, max(d1s) * 1.3, 50)
        ax.plot(xs, t["a2"] - t["a3"] * np.log(xs / 1e6), "-", color="C3", label="joint fit: a2 - a3 ln D1")
        ax.axhline(null["theta"]["a2"], color="C7", ls=":", label="fit without interaction: a2")
        ax.set_xscale("log")
        ax.set_xlabel("D1: dense tokens")
        ax.set_ylabel("D2 exponent")
        ax.set_title("the interaction term: how the D2 exponent moves with D1\n(paper: it falls as D1 grows, a3 > 0)",
                     fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax = axes[2]
        for i, d1 in enumerate(d1s):
            sub_pts = sorted((p["d1_tokens"] + p["d2_tokens"], p["loss"]) for p in pts if p["d1_tokens"] == d1)
            ax.plot([a for a, _ in sub_pts], [b for _, b in sub_pts], "o-", color=f"C{i}", ms=4,
                    label=f"NU from D1 = {R.fmt_tokens(d1)}")
        fs = sorted((r["tokens"], r["val_loss"]) for r in res if info[r["key"]]["kind"] == "fs")
        if fs:
            ax.plot([a for a, _ in fs], [b for _, b in fs], "s-", color="k", ms=4, label="FS (from scratch)")
        dn = sorted((r["tokens"], r["val_loss"]) for r in res if info[r["key"]]["kind"] == "dense")
        if dn:
            ax.plot([a for a, _ in dn], [b for _, b in dn], "x--", color="C7", label="dense at D1")
        ax.set_xscale("log")
        ax.set_xlabel("total training tokens (NU: D1 + D2)")
        ax.set_ylabel("final validation loss")
        ax.set_title("NU against FS at the same total tokens", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        from matplotlib.ticker import NullFormatter
        for a in axes:
            a.xaxis.set_minor_formatter(NullFormatter())
        fig.suptitle(f"Upcycling scaling grid; {sub}", fontsize=10)
        R.save_fig(fig, os.path.join(out_dir, "scaling.png"))
        plt.close(fig)
        return ["scaling.png"]

    return R.Table(
        "upcycling_scaling", "Upcycling scaling-law grid: loss against dense tokens D1 and upcycling tokens D2",
        stages, rows,
        notes=[f"Preset grid: D1 = {', '.join(map(str, grid['d1']))} dense steps, D2 = "
               f"{', '.join(map(str, grid['d2']))} MoE steps ({tok} tokens per step); NU = naive upcycling to 8 "
               f"experts top-2, trained with seed {cfg['seed'] + 1} (a new data order); FS = 8x top-2 from scratch, "
               f"seed {cfg['seed']}. Every run has its own warmup (min(preset, steps/5)) and cosine to LR/10. One "
               "seed: differences of a few 0.01 are within the seed-to-seed spread of the tiny tables "
               "(docs/REPRODUCTIONS.md, Seed variation)."],
        extra_columns=columns, analysis=analysis, plots=plots, standard_plots=False)


if __name__ == "__main__":
    sys.exit(R.main(__doc__, build, "upcycling_scaling", presets=("tiny", "small")))
