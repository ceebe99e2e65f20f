#!/usr/bin/env python3
"""scaling_fit.py: least-squares fits of the two scaling-law forms the grid reproductions test.

Not a trainer: numpy only, used by scripts/repro_upcycling_scaling.py and
scripts/repro_granularity.py. `python3 scripts/scaling_fit.py --selftest` fits data made from
known parameters and checks that they come back (run by scripts/test_scripts.sh).

The forms (each is linear in some parameters once the exponents are fixed, so the fit is
"variable projection": for given exponents theta the linear coefficients c come from an
ordinary least-squares solve, and theta is searched over a grid and then polished with
Nelder-Mead on the residual sum of squares):

  upcycling   L(D1, D2) = A * D1^(-a1) * D2^(-a2 + a3 ln D1) + E
              Scaling Laws for Upcycling Mixture-of-Experts Language Models (Liew, Kato, Takase;
              arXiv 2502.03009, ICML 2025): D1 = dense pre-training tokens, D2 = tokens after
              upcycling; a3 is the interaction term. Written out, ln(L - E) = ln A - a1 ln D1 -
              a2 ln D2 + a3 ln D1 ln D2, so at fixed D1 the loss is a power law in D2 with the
              exponent a2 - a3 ln D1: with a3 > 0 (the paper's finding) the longer the dense model
              was trained, the less each upcycling token buys. theta = (a1, a2, a3), c = (A, E),
              A > 0. The "no interaction" variant fixes a3 = 0.
  granularity L(D, G) = c + g * G^(-gamma) + b * D^(-beta)
              Scaling Laws for Fine-Grained Mixture of Experts (Krajewski et al., arXiv
              2402.07871) at a fixed model size: the paper's L(N, D, G) = c + (g / G^gamma + a) /
              N^alpha + b / D^beta with N (active parameters) held fixed, so a / N^alpha joins c
              and g / N^alpha becomes g. theta = (gamma, beta) with gamma > 0, c = (c, g, b), b > 0;
              the sign of g is left free: g > 0 means higher granularity lowers the loss (the
              paper's direction), g < 0 the opposite.
"""
from __future__ import annotations

import itertools
import math
import sys

import numpy as np


def nelder_mead(f, x0, step, iters: int = 2000, xtol: float = 1e-8):
    """Minimizes f from x0 (simplex with edges `step`); returns (x, f(x)). Standard coefficients."""
    n = len(x0)
    pts = [np.asarray(x0, float)]
    for i in range(n):
        p = np.array(x0, float)
        p[i] += step[i]
        pts.append(p)
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts = [pts[i] for i in order]
        vals = [vals[i] for i in order]
        if max(np.max(np.abs(p - pts[0])) for p in pts[1:]) < xtol:   # the simplex has shrunk to a point
            break
        centroid = np.mean(pts[:-1], axis=0)
        xr = centroid + (centroid - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = centroid + 2.0 * (centroid - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = centroid + 0.5 * (pts[-1] - centroid)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:   # shrink towards the best point
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    i = int(np.argmin(vals))
    return pts[i], vals[i]


class Form:
    """One scaling-law form: design(theta, X) -> [n, k] matrix whose columns the linear coefficients
    multiply; positive: indices of coefficients that must be > 0 (a theta where they are not is
    rejected); nonneg: indices of coefficients that must be >= 0 (the irreducible loss: where the
    unconstrained solve makes one negative, the constrained optimum has it at 0, so that column is
    dropped); bounds: per theta (lo, hi); grid: per theta, the values the search starts from."""

    def __init__(self, name, theta_names, coef_names, design, positive, nonneg, bounds, grid):
        self.name, self.theta_names, self.coef_names = name, theta_names, coef_names
        self.design, self.positive, self.nonneg, self.bounds, self.grid = design, positive, nonneg, bounds, grid

    def solve(self, theta, X, y):
        """Linear coefficients and residual sum of squares at theta (inf where a constraint fails)."""
        if any(t < lo or t > hi for t, (lo, hi) in zip(theta, self.bounds)):
            return None, math.inf
        M = self.design(theta, X)
        if not np.all(np.isfinite(M)):
            return None, math.inf
        best_c, best = None, math.inf
        # the unconstrained solve first, then with every subset of the nonneg coefficients held at 0
        for drop in itertools.chain.from_iterable(itertools.combinations(self.nonneg, r)
                                                  for r in range(len(self.nonneg) + 1)):
            keep = [j for j in range(M.shape[1]) if j not in drop]
            ck, *_ = np.linalg.lstsq(M[:, keep], y, rcond=None)
            c = np.zeros(M.shape[1])
            c[keep] = ck
            if any(c[i] <= 0 for i in self.positive) or any(c[i] < 0 for i in self.nonneg):
                continue
            r = y - M @ c
            if float(r @ r) < best:
                best_c, best = c, float(r @ r)
            if not drop:   # the unconstrained solution is feasible: it is the optimum
                break
        return best_c, best

    def predict(self, theta, c, X):
        return self.design(theta, X) @ c


def _upcycling_design(fix_a3: bool):
    def design(theta, X):
        a1, a2 = theta[0], theta[1]
        a3 = 0.0 if fix_a3 else theta[2]
        D1, D2 = X[:, 0], X[:, 1]
        f = np.exp(-a1 * np.log(D1) + (-a2 + a3 * np.log(D1)) * np.log(D2))
        return np.stack([f, np.ones_like(f)], axis=1)
    return design


UPCYCLING = Form("upcycling (Liew et al. 2025)", ["a1", "a2", "a3"], ["A", "E"], _upcycling_design(False), [0], [1],
                 [(-2.0, 4.0), (-2.0, 4.0), (-1.0, 1.0)],
                 [np.linspace(-0.5, 2.0, 11), np.linspace(-0.5, 2.0, 11), np.linspace(-0.3, 0.3, 13)])
UPCYCLING_NO_INTERACTION = Form("upcycling without the interaction term (a3 = 0)", ["a1", "a2"], ["A", "E"],
                                _upcycling_design(True), [0], [1], [(-2.0, 4.0), (-2.0, 4.0)],
                                [np.linspace(-0.5, 2.0, 26), np.linspace(-0.5, 2.0, 26)])


def _granularity_design(theta, X):
    gamma, beta = theta
    D, G = X[:, 0], X[:, 1]
    return np.stack([np.ones_like(D), G ** (-gamma), D ** (-beta)], axis=1)


GRANULARITY = Form("fine-grained MoE at fixed N (Krajewski et al. 2024)", ["gamma", "beta"], ["c", "g", "b"],
                   _granularity_design, [2], [0], [(1e-3, 4.0), (1e-3, 4.0)],
                   [np.linspace(0.05, 2.0, 40), np.linspace(0.05, 2.0, 40)])


def granularity_per_budget(budgets) -> Form:
    """The fine-grained law's G term with a free constant per budget: L(D, G) = c_D + g * G^(-gamma).
    At fixed N the paper's D-term b / D^beta is one constant per budget, so this is the same law with
    the D-dependence left free: the G term is fitted against the spread of G within each budget
    only, whatever shape the loss has in D. X = [(D, G)], D matched exactly against `budgets`."""
    budgets = sorted(budgets)

    def design(theta, X):
        cols = [(X[:, 0] == d).astype(float) for d in budgets]
        return np.stack(cols + [X[:, 1] ** (-theta[0])], axis=1)
    return Form("fine-grained MoE at fixed N, a constant per budget", ["gamma"],
                [f"c_{i}" for i in range(len(budgets))] + ["g"], design, [], [], [(1e-3, 4.0)],
                [np.linspace(0.02, 3.0, 150)])


def fit(form: Form, X, y, theta0=None) -> dict:
    """Least-squares fit of `form` to (X, y): a grid over theta (or theta0), then Nelder-Mead.
    Returns theta, coefficients, rss, rmse, aic (n ln(rss/n) + 2k), n and k as plain floats."""
    X, y = np.asarray(X, float), np.asarray(y, float)
    if theta0 is None:
        best, theta0 = math.inf, None
        for th in itertools.product(*form.grid):
            _, rss = form.solve(np.array(th), X, y)
            if rss < best:
                best, theta0 = rss, np.array(th)
        if theta0 is None:
            raise ValueError(f"{form.name}: no point of the grid satisfies the constraints")
    steps = [0.05 * (hi - lo) / 6 + 1e-3 for lo, hi in form.bounds]
    theta, rss = theta0, form.solve(np.asarray(theta0), X, y)[1]
    for _ in range(3):   # restarts: Nelder-Mead can stall on a ridge
        theta, rss = nelder_mead(lambda t: form.solve(t, X, y)[1], theta, steps)
        steps = [s / 4 for s in steps]
    c, rss = form.solve(theta, X, y)
    n, k = len(y), len(theta) + len(c)
    return dict(form=form.name, theta={nm: float(v) for nm, v in zip(form.theta_names, theta)},
                coef={nm: float(v) for nm, v in zip(form.coef_names, c)}, rss=rss, rmse=math.sqrt(rss / n),
                aic=n * math.log(max(rss, 1e-300) / n) + 2 * k, n=n, k=k)


def theta_of(res: dict, form: Form) -> np.ndarray:
    return np.array([res["theta"][nm] for nm in form.theta_names])


def coef_of(res: dict, form: Form) -> np.ndarray:
    return np.array([res["coef"][nm] for nm in form.coef_names])


def predict(res: dict, form: Form, X) -> np.ndarray:
    return form.predict(theta_of(res, form), coef_of(res, form), np.asarray(X, float))


def bootstrap(form: Form, X, y, res: dict, n: int = 200, seed: int = 0, derived: dict | None = None) -> dict:
    """Residual bootstrap: refits to (prediction + resampled residuals) n times, each from the fit's
    own theta. Returns per parameter, and per derived quantity (name -> fn(fit result) -> float),
    the 5th / 50th / 95th percentiles and the fraction > 0."""
    X, y = np.asarray(X, float), np.asarray(y, float)
    yhat = predict(res, form, X)
    resid = y - yhat
    rng = np.random.default_rng(seed)
    derived = derived or {}
    draws = {nm: [] for nm in form.theta_names + form.coef_names + list(derived)}
    for _ in range(n):
        yb = yhat + rng.choice(resid, size=len(y), replace=True)
        try:
            rb = fit(form, X, yb, theta0=theta_of(res, form))
        except ValueError:
            continue
        if not math.isfinite(rb["rss"]):
            continue
        for nm in form.theta_names:
            draws[nm].append(rb["theta"][nm])
        for nm in form.coef_names:
            draws[nm].append(rb["coef"][nm])
        for nm, fn in derived.items():
            draws[nm].append(fn(rb))
    out = {}
    for nm, v in draws.items():
        if v:
            a = np.array(v)
            out[nm] = dict(p05=float(np.percentile(a, 5)), p50=float(np.percentile(a, 50)),
                           p95=float(np.percentile(a, 95)), frac_pos=float(np.mean(a > 0)), n=len(v))
    return out


# ---------------------------------------------------------------------------------------------
# self-test: parameters made up for the test, on grids shaped like the reproductions'


def _selftest() -> int:
    fails, passes = 0, 0

    def check(what, ok):
        nonlocal fails, passes
        print(("PASS " if ok else "FAIL ") + what)
        fails += not ok
        passes += bool(ok)

    rng = np.random.default_rng(1)
    # upcycling: D in millions of tokens, the tiny grid's shape (4 x 5 points)
    D1s, D2s = [0.05, 0.1, 0.2, 0.4], [0.025, 0.05, 0.1, 0.2, 0.4]
    X = np.array([(a, b) for a in D1s for b in D2s])
    true = dict(a1=0.12, a2=0.35, a3=0.06, A=1.3, E=3.0)
    y = (true["A"] * X[:, 0] ** -true["a1"] * X[:, 1] ** (-true["a2"] + true["a3"] * np.log(X[:, 0])) + true["E"])
    r = fit(UPCYCLING, X, y)
    err = max(abs(r["theta"][k] - true[k]) for k in ("a1", "a2", "a3"))
    check(f"upcycling form, exact data: exponents back to {err:.1e} (rmse {r['rmse']:.1e})", err < 1e-3)
    check("upcycling form, exact data: A, E back", abs(r["coef"]["A"] - true["A"]) < 1e-3 and
          abs(r["coef"]["E"] - true["E"]) < 1e-3)
    yn = y + rng.normal(0, 0.002, len(y))
    rn = fit(UPCYCLING, X, yn)
    check(f"upcycling form, noise 0.002: a3 = {rn['theta']['a3']:.3f} (true 0.06) keeps its sign",
          rn["theta"]["a3"] > 0.02)
    r0 = fit(UPCYCLING_NO_INTERACTION, X, y)
    check(f"no-interaction form is worse on data with an interaction (rss {r0['rss']:.2e} > {r['rss']:.2e})",
          r0["rss"] > 100 * max(r["rss"], 1e-12))
    # data without an interaction: the full form's a3 comes back ~0
    y0 = 1.3 * X[:, 0] ** -0.12 * X[:, 1] ** -0.3 + 3.0
    rz = fit(UPCYCLING, X, y0)
    check(f"upcycling form, no interaction in the data: a3 = {rz['theta']['a3']:.1e}", abs(rz["theta"]["a3"]) < 1e-3)
    # bootstrap: with 0.01 noise the interval is wide but still excludes 0; on data without an
    # interaction it straddles 0
    yb = y + rng.normal(0, 0.01, len(y))
    rb = fit(UPCYCLING, X, yb)
    b = bootstrap(UPCYCLING, X, yb, rb, n=100)
    lo, hi = b["a3"]["p05"], b["a3"]["p95"]
    check(f"bootstrap, noise 0.01: a3 > 0 in {b['a3']['frac_pos']:.0%} of refits, 5-95% {lo:.4f}..{hi:.4f}, "
          f"width > 0", b["a3"]["frac_pos"] > 0.95 and 0 < lo < hi and hi - lo > 1e-3)
    y0b = y0 + rng.normal(0, 0.01, len(y))
    r0b = fit(UPCYCLING, X, y0b)
    b0 = bootstrap(UPCYCLING, X, y0b, r0b, n=100)
    check(f"bootstrap, no interaction, noise 0.01: 5-95% of a3 {b0['a3']['p05']:.4f}..{b0['a3']['p95']:.4f} holds 0",
          b0["a3"]["p05"] < 0 < b0["a3"]["p95"])

    # granularity: 4 G x 3 budgets, both signs of g
    Xg = np.array([(d, g) for d in (0.05, 0.1, 0.2) for g in (1, 2, 4, 8)], float)
    for gsign in (+1, -1):
        tg = dict(gamma=0.6, beta=0.4, c=3.5, g=0.08 * gsign, b=0.25)
        yg = tg["c"] + tg["g"] * Xg[:, 1] ** -tg["gamma"] + tg["b"] * Xg[:, 0] ** -tg["beta"]
        rg = fit(GRANULARITY, Xg, yg)
        err = max(abs(rg["theta"][k] - tg[k]) for k in ("gamma", "beta"))
        errc = max(abs(rg["coef"][k] - tg[k]) for k in ("c", "g", "b"))
        check(f"granularity form, g = {tg['g']:+.2f}: exponents back to {err:.1e}, coefficients to {errc:.1e}",
              err < 1e-3 and errc < 1e-3)
    # per-budget constants: any shape in D, the G term comes back
    cD = {0.05: 5.3, 0.1: 5.0, 0.2: 4.45}
    yp = np.array([cD[d] + 0.05 * g ** -0.7 for d, g in Xg])
    fp = granularity_per_budget(cD)
    rp = fit(fp, Xg, yp)
    check(f"granularity per budget: gamma {rp['theta']['gamma']:.4f} (0.7), g {rp['coef']['g']:.4f} (0.05)",
          abs(rp["theta"]["gamma"] - 0.7) < 1e-3 and abs(rp["coef"]["g"] - 0.05) < 1e-4)
    print(f"{passes} passed, {fails} failed")
    return 1 if fails else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--selftest"]:
        sys.exit(_selftest())
    print(__doc__)
    sys.exit(0)
