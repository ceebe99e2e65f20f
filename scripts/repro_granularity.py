#!/usr/bin/env python3
"""Granularity grid (Krajewski et al., arXiv 2402.07871; NVIDIA, arXiv 2410.07524; docs/METHODS.md 2.7, 5).

Granularity G = F / F_e: experts G times narrower than the dense FFN, G times more of them, G
times more chosen per token, so the total and the active parameters (and the expert FLOPs per
token) stay those of the 8-expert top-2 model:

  G = 1, 2, 4, 8:  E = 8G experts of width F/G, top-2G, topk_softmax
  FS G, D          from scratch (./train_moe --model M --experts 8G --topk 2G --expert-width F/G)
  granular G, D    from the shared dense base (the other tables' dense_base):
                   ./upcycle --method granular --granularity G --experts 8G --topk 2G (each expert
                   a 1/G shard of the dense FFN, weights x G^(1/3); G = 1 is naive upcycling)
  for every G, D in the preset's token budgets (each run its own warmup + cosine; the upcycled
  rows use seed + 1, so their data order differs from the dense base's, as in the scaling grid)

The fine-grained scaling law L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta at the
fixed N here is L(D, G) = c + g G^-gamma + b D^-beta; scripts/scaling_fit.py fits it to the final
losses of each group (FS, granular) with the sign of g free. The paper's direction: g > 0, so at a
fixed compute budget a higher G lowers the loss, with diminishing returns (G^-gamma flattens);
in compute-optimal terms the gain stops at a finite G because routing costs grow with G ("up to a
point"). The table checks the direction on the raw losses too: at each budget, the order of G.

Run (from the repository root):
  python3 scripts/repro_granularity.py --threads 1     # tiny, CPU: 8-14 min (1 thread)
  python3 scripts/repro_granularity.py --preset small  # one GPU (./train_moe_gpu), not run yet
  python3 scripts/repro_granularity.py --smoke --runs /tmp/r --results /tmp/r/out
  python3 scripts/repro_granularity.py --list          # every command, and the wall-time estimate
(Measured 2026-12-02 on this shared 2-core machine: 10.8 minutes at load 2-4 with its own dense
base, 13.6 at load 6-9 with the dense base reused; the estimate for an idle one is 7.7.)
Interrupted? Run the same command again: finished stages are skipped, the unfinished one resumes.
The wall-time estimate is printed before the first stage. Output:
docs/results/granularity/[tiny/]{table.md,results.json,granularity.png}.

Budgets: tiny 100, 300, 900 steps (51k, 154k, 461k tokens; 900 steps = 1.3 epochs of the tiny
train split) after the 400-step dense base;
small 150, 300, 600 steps (4.9M, 9.8M, 19.7M tokens) after the 1200-step base: 8 configurations
x 1050 steps = 8.4k MoE steps = 275M tokens x 0.65 GFLOP = 179 PFLOP plus the base's 17: ~65
minutes at 50 TFLOP/s, more for G = 8 (16 of 64 experts per token: more routing and smaller
GEMMs; not measured, the GPU trainer has not run on a GPU yet).
"""
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import repro_lib as R  # noqa: E402
import scaling_fit as F  # noqa: E402

GRIDS = {
    "smoke": dict(G=[1, 2, 4], steps=[4, 8]),
    "tiny": dict(G=[1, 2, 4, 8], steps=[100, 300, 900]),
    "small": dict(G=[1, 2, 4, 8], steps=[150, 300, 600]),
}
FFN = {"tiny": 256, "d512": 2048}   # the model presets' dense FFN width F (common/model.h)
KEEP_LAST = ["--keep-checkpoints", "last"]
# a G-granular step on the CPU trainer costs about 1 + 0.06 (G - 1) 8-expert top-2 steps (tiny, 1 thread:
# G = 8 took 19.2 s for 400 steps against 13.5 s for G = 1): for the wall-time estimate only
G_COST = 0.06


def warmup(cfg_warmup: int, steps: int) -> int:
    return min(cfg_warmup, max(1, steps // 5))


def build(cfg: dict, root: str) -> R.Table:
    grid = GRIDS[cfg["preset"]]
    tok = cfg["batch"] * cfg["seq"] * cfg["grad_accum"]
    Fw = FFN[cfg["model"]]
    base_stage, base_row, base = R.dense_base(root, cfg)
    stages, rows, info = [base_stage], [base_row], {"dense": dict(kind="dense", G=0, steps=cfg["dense_steps"])}
    for G in grid["G"]:
        if Fw % G:
            raise R.ReproError(f"granularity {G} does not divide the FFN width {Fw} of model {cfg['model']}")
        E, K = 8 * G, 2 * G
        cost = cfg["moe_cost"] * (1 + G_COST * (G - 1))
        shape = ["--experts", str(E), "--topk", str(K)]
        # the routing table's stage for G = 1 and 4 (same name, same command): made once per runs root
        init = R.upcycle_stage(root, f"g{G}_topk_softmax_init", cfg, ["--method", "granular", "--from", base,
                               "--granularity", str(G)] + shape + ["--routing", "topk_softmax"], ["dense_base"])
        stages.append(init)
        for steps in grid["steps"]:
            fs = R.train_stage(root, f"gr_fs_g{G}_{steps}", cfg, ["--model", cfg["model"]] + shape +
                               ["--expert-width", str(Fw // G), "--routing", "topk_softmax"], steps,
                               warmup(cfg["warmup_dense"], steps), True, tail=KEEP_LAST)
            up = R.train_stage(root, f"gr_up_g{G}_{steps}", cfg, ["--init", R.run_dir(root, init.name)], steps,
                               warmup(cfg["warmup_moe"], steps), True, [init.name], seed=cfg["seed"] + 1,
                               tail=KEEP_LAST)
            fs.cost = up.cost = cost
            stages += [fs, up]
            d = R.fmt_tokens(steps * tok)
            rows.append(R.Row(f"fs_g{G}_{steps}", f"FS G={G}, {d}", [fs.name], fs.name))
            rows.append(R.Row(f"up_g{G}_{steps}", f"granular G={G}, {d}", [up.name], up.name, before=["dense_base"]))
            info[f"fs_g{G}_{steps}"] = dict(kind="fs", G=G, steps=steps)
            info[f"up_g{G}_{steps}"] = dict(kind="up", G=G, steps=steps)
    # table order: FS rows, then granular rows, each by budget then G
    rows = [rows[0]] + sorted(rows[1:], key=lambda r: (info[r.key]["kind"] != "fs", info[r.key]["steps"],
                                                       info[r.key]["G"]))

    def params(stage_name):
        """'1.084M total, 0.363M active' from the stage's log (the trainer prints it at the start)."""
        try:
            m = re.findall(r"parameters: ([\d.]+[kMB]?) total, ([\d.]+[kMB]?) active", open(
                os.path.join(root, "_logs", stage_name + ".log")).read())
            return f"{m[-1][0]} / {m[-1][1]}" if m else "?"
        except OSError:
            return "?"

    def columns(res):
        cells = {}
        for r in res:
            i = info[r["key"]]
            if i["kind"] == "dense":
                cells[r["key"]] = ["", f"dense, F {Fw}", params("dense_base")]
            else:
                G = i["G"]
                cells[r["key"]] = [str(G), f"{8 * G} x F/{G} = {Fw // G}, top-{2 * G}",
                                   params(os.path.basename(r["run"]))]
        return (["G", "experts", "params total / active"], cells,
                ["Params: as the trainer counts them (embedding and LM head included; active = per token, "
                 "routers included)."])

    def groups(res):
        """{'fs': [(tokens, G, loss, key)], 'up': [...]} of the finished rows."""
        out = {"fs": [], "up": []}
        for r in res:
            i = info[r["key"]]
            if i["kind"] in out:
                out[i["kind"]].append((r["tokens"], i["G"], r["val_loss"], r["key"]))
        return out

    n_boot = 20 if cfg["preset"] == "smoke" else 200

    def analysis(res):
        notes, data = [], {}
        names = {"fs": "FS (from scratch)", "up": "granular upcycling"}
        for kind, pts in groups(res).items():
            if not pts:
                continue
            # the raw direction: at each budget, the final loss against G
            order = []
            for t in sorted({p[0] for p in pts}):
                byg = sorted((g, l) for tt, g, l, _ in pts if tt == t)
                best = min(byg, key=lambda x: x[1])[0]
                mono = all(b[1] < a[1] for a, b in zip(byg, byg[1:]))
                order.append(dict(tokens=t, losses={str(g): l for g, l in byg}, best_G=best, decreasing=mono,
                                  g1_minus_best=byg[0][1] - min(l for _, l in byg)))
            entry = dict(order=order)
            line = (f"{names[kind]}: best G per budget " + ", ".join(
                f"{R.fmt_tokens(o['tokens'])}: G={o['best_G']} ({o['g1_minus_best']:.4f} below G=1"
                f"{'; loss falls at every step up in G' if o['decreasing'] else ''})" for o in order) + ".")
            ok = len(pts) >= 6 and len({p[1] for p in pts}) >= 3 and len({p[0] for p in pts}) >= 2
            if ok:
                X = [(p[0] / 1e6, p[1]) for p in pts]
                y = [p[2] for p in pts]
                gmax = max(p[1] for p in pts)
                # the fitted change of the loss from G = 1 to the largest G at any fixed D: g (Gmax^-gamma - 1).
                # It is well determined even where g and gamma alone are not (gamma -> 0 with a large g is
                # the same curve, nearly linear in ln G, as a moderate g and gamma)
                delta = {"delta": lambda f: f["coef"]["g"] * (gmax ** -f["theta"]["gamma"] - 1.0)}
                # main: the G term with a free constant per budget (the law's D term is one constant per D)
                form_b = F.granularity_per_budget({x[0] for x in X})
                fit_b = F.fit(form_b, X, y)
                boot_b = F.bootstrap(form_b, X, y, fit_b, n=n_boot, seed=cfg["seed"], derived=delta)
                # and the whole law with b D^-beta, whose D-shape a tiny model far from convergence need not follow
                fit = F.fit(F.GRANULARITY, X, y)
                dl, bd = delta["delta"](fit_b), boot_b.get("delta", {})
                entry.update(fit_per_budget=fit_b, bootstrap_per_budget=boot_b, fit=fit,
                             fitted_change_g1_to_gmax=dl, gmax=gmax)
                th, co = fit["theta"], fit["coef"]
                line += (f" Fit of the G term with a constant per budget, L = c_D + g G^-gamma: g = "
                         f"{fit_b['coef']['g']:+.4f}, gamma = {fit_b['theta']['gamma']:.3f}, RMSE {fit_b['rmse']:.4f}; "
                         f"fitted change from G = 1 to G = {gmax} at any budget {dl:+.4f} "
                         f"({'lower: the paper' + chr(39) + 's direction' if dl < 0 else 'higher: against the paper'}), "
                         f"bootstrap ({n_boot} refits) 5-95% {bd.get('p05', math.nan):+.4f} .. "
                         f"{bd.get('p95', math.nan):+.4f}, below 0 in {1 - bd.get('frac_pos', math.nan):.0%}. "
                         f"The whole law c + g G^-gamma + b D^-beta (D in M tokens): c = {co['c']:.4f}, g = "
                         f"{co['g']:+.4f}, gamma = {th['gamma']:.3f}, b = {co['b']:.4f}, beta = {th['beta']:.3f}, "
                         f"RMSE {fit['rmse']:.4f}.")
            notes.append(line)
            data[kind] = entry
        data["form"] = "L(D, G) = c + g * G^-gamma + b * D^-beta at fixed N (D in millions of tokens)"
        data["source"] = ("Krajewski et al.: Scaling Laws for Fine-Grained Mixture of Experts, arXiv 2402.07871: "
                          "L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta")
        return {"notes": notes, "data": data}

    def plots(res, an, out_dir, sub):
        plt = R._pyplot()
        import numpy as np
        from matplotlib.ticker import NullFormatter
        data = an.get("data") or {}
        pts = groups(res)
        fig, axes = plt.subplots(2, 2, figsize=(14, 10))
        Gs = sorted({i["G"] for i in info.values() if i["G"]})
        for col, (kind, title) in enumerate((("fs", "FS (from scratch)"), ("up", "granular upcycling"))):
            # top: validation curves of the longest run per G, final losses of every budget, the whole law
            ax = axes[0][col]
            longest = max((i["steps"] for i in info.values() if i["kind"] == kind), default=0)
            for j, G in enumerate(Gs):
                r = next((r for r in res if info[r["key"]] == dict(kind=kind, G=G, steps=longest)), None)
                if r:   # the run's own tokens (the curve is stored after the dense base's for upcycled rows)
                    cur = [(t - r["offset_tokens"], v) for t, v in r["curve"] if t > r["offset_tokens"]]
                    ax.plot([t for t, _ in cur], [v for _, v in cur], "-", color=f"C{j}", lw=1.0, alpha=0.7,
                            label=f"G={G}: curve of the {R.fmt_tokens(r['tokens'])} run")
                fin = sorted((t, l) for t, g, l, _ in pts[kind] if g == G)
                if fin:
                    ax.plot([t for t, _ in fin], [l for _, l in fin], "o", color=f"C{j}", ms=6)
                fit = (data.get(kind) or {}).get("fit")
                if fit and fin:
                    xs = np.geomspace(min(t for t, _ in fin) / 1.2, max(t for t, _ in fin) * 1.2, 40)
                    X = np.stack([xs / 1e6, np.full_like(xs, G)], axis=1)
                    ax.plot(xs, F.predict(fit, F.GRANULARITY, X), "--", color=f"C{j}", lw=1.0, alpha=0.6)
            fins = [l for _, _, l, _ in pts[kind]]
            if fins:
                ax.set_ylim(min(fins) - 0.05, max(fins) + 0.25)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("tokens of the run" + (" (after the dense base)" if kind == "up" else ""))
            ax.set_ylabel("validation loss (mean over domains)")
            ax.set_title(f"{title}: curves of the longest runs, final losses (dots),\n"
                         "the whole law c + g G^-gamma + b D^-beta (dashed)", fontsize=9)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3, which="both")
            # bottom: the direction, final loss minus the same budget's G = 1, and the per-budget fit
            ax = axes[1][col]
            for j, t in enumerate(sorted({p[0] for p in pts[kind]})):
                byg = sorted((g, l) for tt, g, l, _ in pts[kind] if tt == t)
                ax.plot([g for g, _ in byg], [l - byg[0][1] for _, l in byg], "o-", color=f"C{j}",
                        label=f"{R.fmt_tokens(t)} tokens")
            fb = (data.get(kind) or {}).get("fit_per_budget")
            if fb:
                gs = np.geomspace(1, max(Gs), 40)
                g, gam = fb["coef"]["g"], fb["theta"]["gamma"]
                ax.plot(gs, g * (gs ** -gam - 1.0), "--", color="k", lw=1.5,
                        label=f"fit c_D + g G^-gamma: g {g:+.3f}, gamma {gam:.2f}")
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xscale("log", base=2)
            ax.set_xticks(Gs)
            ax.set_xticklabels([str(g) for g in Gs])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("granularity G (8G experts, top-2G, width F/G)")
            ax.set_ylabel("final loss minus the same budget's G = 1 loss")
            ax.set_title(f"{title}: below 0 = finer experts better\n(paper: falls with G, flattening)", fontsize=9)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3, which="both")
        fig.suptitle(f"Granularity at equal total and active parameters; {sub}", fontsize=10)
        fig.tight_layout()
        R.save_fig(fig, os.path.join(out_dir, "granularity.png"))
        plt.close(fig)
        return ["granularity.png"]

    return R.Table(
        "granularity", "Granularity G = 1, 2, 4, 8 at equal total and active parameters, from scratch and upcycled",
        stages, rows,
        notes=[f"Budgets {', '.join(map(str, grid['steps']))} steps ({tok} tokens per step) for every G; E = 8G experts "
               f"of width F/G (F = {Fw}), top-2G, topk_softmax, aux pooled 0.02, no z-loss. FS: seed {cfg['seed']}; "
               f"granular: from the dense base ({cfg['dense_steps']} steps), seed {cfg['seed'] + 1}. Every run its own "
               "warmup (min(preset, steps/5)) and cosine to LR/10."],
        extra_columns=columns, analysis=analysis, plots=plots, standard_plots=False)


if __name__ == "__main__":
    sys.exit(R.main(__doc__, build, "granularity", presets=("tiny", "small")))
