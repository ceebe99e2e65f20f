#!/usr/bin/python3
"""Writes the float64 reference fixtures that the C++/CUDA trainer must match.

Run (from the repository root, Debian's python3 with python3-torch and python3-numpy):

    /usr/bin/python3 dev/reference/make_fixtures.py --out test/fixtures

Deterministic: running it twice gives byte-identical files (fixed torch.Generator seeds,
CPU float64, hand-written safetensors with sorted tensors and sorted JSON keys).

For each fixture NAME it writes test/fixtures/NAME/{config.json, model.safetensors,
fixture.safetensors}; the format is described in dev/reference/README.md.

Before writing anything it runs self-checks and exits non-zero if one fails:
  * autograd gradients vs central finite differences (float64) for random entries of
    every parameter of every fixture (router included; required for moe_topk_softmax);
  * an MoE whose experts are copies of the dense FFN (topk_softmax, F_e = F) reproduces
    the dense model's logits to 1e-12;
  * with aux on, the aux loss (and the z loss) alone give a non-zero router gradient, and
    the fixture's router gradient equals grad(ce) + aux_coef grad(aux) + z_coef grad(z);
  * the aux losses equal 1 (switch, seq) and K (pooled) at uniform router probabilities;
    the pooled loss equals a literal transcription of HF's load_balancing_loss_func;
  * every token's top-(K+1) router logits are separated by more than 1e-3 (adjacent
    gaps) at all 10 AdamW states, so fp32 implementations select the same experts;
  * at step 0, every token's top-K margin (K-th minus (K+1)-th logit) exceeds
    BF16_MARGIN x the layer's largest |logit|, so that a bf16 implementation, whose router
    logits test/test_gpu_fixtures.cu holds within eps = 6 u max|z| (u = 2^-8), must choose
    the same experts (a choice can only flip where the margin is below 2 eps);
  * moe_empty_expert has an expert with no token in layer 0;
  * dpsl: the Beta CDF matches its closed forms (a = 1, b = 1, a = b = 2); the dpsl loss alone
    gives every router a gradient; each expert's sorted probabilities are separated by more
    than DPSL_GAP_MIN relative at all 10 AdamW states (the sort order, and so the gradient,
    is the same in fp32).
"""

import argparse
import json
import os
import sys

try:
    import numpy as np
    import torch
except ImportError as e:  # --help works without PyTorch; anything else says what to install
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(print(__doc__))
    sys.exit(f"make_fixtures.py: {e}: it needs numpy and torch: apt-get install python3-torch (it brings numpy), then run it with /usr/bin/python3")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import (Config, AdamW, compute_losses, forward, write_safetensors,  # noqa: E402
                   read_safetensors, load_checkpoint, beta_cdf)

torch.set_default_dtype(torch.float64)

B, T = 2, 8
ADAMW_STEPS = 10
GAP_MIN = 1e-3
DPSL_GAP_MIN = 1e-4
BF16_MARGIN = 1.25 * 2 * 6 * 2.0 ** -8  # 2 eps of the bf16 router check, with 25% headroom
SEED_ATTEMPTS = 5000
OPT = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)

BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)

FIXTURES = [
    dict(name="dense", kv=4, F=64, tied=False, aux="none", aux_coef=0.0, z_coef=0.0, seed=1000,
         desc="dense Llama, MHA (Hkv=H=4), untied head, CE only"),
    dict(name="moe_topk_softmax", kv=4, F=32, E=4, K=2, routing="topk_softmax",
         aux="switch", aux_coef=0.01, z_coef=0.001, seed=2000,
         desc="Mixtral E4 K2 topk_softmax, switch aux 0.01, z 0.001"),
    dict(name="moe_softmax_topk", kv=4, F=32, E=4, K=2, routing="softmax_topk",
         aux="switch", aux_coef=0.01, z_coef=0.001, seed=3000,
         desc="Mixtral E4 K2 softmax_topk (no renormalization), switch aux 0.01, z 0.001"),
    dict(name="moe_pooled", kv=4, F=32, E=4, K=2, routing="topk_softmax",
         aux="pooled", aux_coef=0.02, z_coef=0.001, seed=4000,
         desc="Mixtral E4 K2 topk_softmax, pooled (HF Mixtral) aux 0.02, z 0.001"),
    dict(name="moe_seq_gqa", kv=2, F=32, E=4, K=2, routing="topk_softmax",
         aux="seq", aux_coef=0.01, z_coef=0.001, seed=5000,
         desc="Mixtral E4 K2 topk_softmax, GQA Hkv=2, per-sequence aux 0.01, z 0.001"),
    dict(name="dense_tied_gqa", kv=2, F=64, tied=True, aux="none", aux_coef=0.0, z_coef=0.0,
         seed=6000, desc="dense Llama, GQA Hkv=2, tied embeddings (no lm_head.weight), CE only"),
    dict(name="moe_empty_expert", kv=4, F=32, E=4, K=2, routing="topk_softmax",
         aux="switch", aux_coef=0.01, z_coef=0.001, seed=7000, empty_expert=True,
         desc="Mixtral E4 K2 topk_softmax, switch aux 0.01, z 0.001, layer 0 has an expert "
              "with no token"),
    dict(name="moe_e8_k1", kv=4, F=16, E=8, K=1, routing="topk_softmax",
         aux="switch", aux_coef=0.01, z_coef=0.001, seed=8000,
         desc="Mixtral E8 K1 F_e16 topk_softmax (gate weight is 1: router grad only from "
              "aux and z), switch aux 0.01, z 0.001"),
    dict(name="moe_shared", kv=2, F=16, E=4, K=2, Fs=32, routing="topk_softmax",
         aux="switch", aux_coef=0.01, z_coef=0.001, seed=10000,
         desc="Qwen2-MoE E4 K2 F_e16 topk_softmax (norm_topk_prob) + a sigmoid-gated shared expert "
              "of width 32 (S=2), GQA Hkv=2, switch aux 0.01, z 0.001"),
    dict(name="moe_shared_ungated", kv=4, F=16, E=4, K=2, Fs=16, shared_gate=False,
         routing="softmax_topk", aux="seq", aux_coef=0.01, z_coef=0.001, seed=11000, tied=True,
         desc="E4 K2 F_e16 softmax_topk + an ungated (DeepSeekMoE) shared expert of width 16 "
              "(S=1), tied embeddings, per-sequence aux 0.01, z 0.001"),
    dict(name="moe_grove", kv=2, F=16, E=4, K=2, G=2, Fa=8, grove_scale=0.5, routing="softmax_topk",
         aux="switch", aux_coef=0.01, z_coef=0.001, seed=12000,
         desc="Grove MoE E4 K2 F_e16 softmax_topk, 2 groups of 2 experts with adjugate experts of width 8, "
              "scale 0.5, GQA Hkv=2, switch aux 0.01, z 0.001"),
    dict(name="moe_xft", kv=2, F=16, E=4, K=3, Fs=16, shared_gate=False,
         routing="xft", aux="switch", aux_coef=0.01, z_coef=0.001, seed=12000,
         desc="XFT E4 K3 F_e16 xft routing (shared weight 1 - p(1), routed weights p(1) softmax of "
              "the top-3 probabilities) + a shared expert of width 16, GQA Hkv=2, switch aux 0.01, z 0.001"),
    dict(name="moe_nexus", kv=4, F=16, E=4, K=2, Fs=32, shared_gate=False, nexus=True,
         routing="topk_softmax", aux="switch", aux_coef=0.01, z_coef=0.001, seed=12000,
         desc="Nexus router (R = Emb P, Emb fixed, P learned) E4 K2 F_e16 topk_softmax + an ungated "
              "shared expert of width 32, switch aux 0.01, z 0.001"),
    dict(name="moe_dpsl", kv=4, F=32, E=4, K=2, routing="topk_softmax",
         aux="switch", aux_coef=0.01, z_coef=0.001, seed=9000,
         dpsl=dict(coef=0.1, alpha=[0.5, 1.0, 1.5, 2.0], distance="sq", ecdf="mid"),
         desc="Mixtral E4 K2 topk_softmax, switch aux 0.01 + dpsl 0.1 (asymmetric prior "
              "alpha 0.5,1,1.5,2; sq, mid), z 0.001"),
]


def spec_losses(P, cfg, inputs, targets, spec):
    """The fixture's total loss and its terms (compute_losses with the spec's settings)."""
    return compute_losses(P, cfg, inputs, targets, spec["aux"], spec["aux_coef"],
                          spec["z_coef"], spec.get("dpsl"))


def hf_config(spec):
    c = dict(BASE)
    moe = "E" in spec
    c.update(intermediate_size=spec["F"], num_key_value_heads=spec["kv"], rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=bool(spec.get("tied", False)),
             hidden_act="silu", torch_dtype="float32", attention_bias=False)
    if moe and spec.get("Fs"):  # Qwen2MoeConfig's keys (common/model.h writes the same)
        c.update(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
                 num_experts=spec["E"], num_experts_per_tok=spec["K"], moe_intermediate_size=spec["F"],
                 shared_expert_intermediate_size=spec["Fs"],
                 norm_topk_prob=spec["routing"] == "topk_softmax", decoder_sparse_step=1,
                 mlp_only_layers=[], use_sliding_window=False, moe_routing=spec["routing"],
                 shared_expert_gating="sigmoid" if spec.get("shared_gate", True) else "none")
    elif moe:
        c.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
                 num_local_experts=spec["E"], num_experts_per_tok=spec["K"],
                 moe_routing=spec["routing"])
        if spec.get("G"):  # Grove MoE: our keys (common/model.h writes the same)
            c.update(grove_groups=spec["G"], grove_intermediate_size=spec["Fa"],
                     grove_scale=spec["grove_scale"])
    else:
        c.update(architectures=["LlamaForCausalLM"], model_type="llama")
    if spec.get("nexus"):
        c.update(moe_router="nexus")
    return c


def init_params(cfg, seed):
    """fp32 weights (numpy) from a fixed generator: matrices N(0, 0.1^2), router N(0, 0.5^2),
    norm weights 1 + 0.1 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in cfg.param_shapes().items():
        r = torch.randn(shape, generator=g, dtype=torch.float64)
        if len(shape) == 1:
            w = 1.0 + 0.1 * r
        elif name.endswith("block_sparse_moe.gate.weight") or name.endswith("mlp.gate.weight"):
            w = 0.5 * r
        elif name.endswith("shared_expert_gate.weight"):  # a gate that varies over the tokens
            w = 0.3 * r
        elif name.endswith("router_domain_emb"):  # Nexus: R = Emb P spreads like the plain router
            w = 0.5 * r
        elif name.endswith("router_proj.weight"):  # R = Emb P entries ~ 0.5 * 0.18 * sqrt(d) = 0.5
            w = 0.18 * r
        else:
            w = 0.1 * r
        out[name] = w.to(torch.float32).numpy()
    for i in range(cfg.L if cfg.nexus else 0):  # the stored router = Emb P (of the fp32 values)
        emb, proj = cfg.nexus_names(i)
        R = torch.from_numpy(out[emb]).double() @ torch.from_numpy(out[proj]).double()
        out[cfg.router_name(i)] = R.to(torch.float32).numpy()
    return out


def make_batch(cfg, seed):
    g = torch.Generator().manual_seed(seed + 17)
    inputs = torch.randint(0, cfg.V, (B, T), generator=g)
    targets = torch.randint(0, cfg.V, (B, T), generator=g)
    return inputs, targets


def to64(np_params):
    return {n: torch.from_numpy(a.astype(np.float64)) for n, a in np_params.items()}


def min_router_gap(routing, K):
    """Smallest adjacent gap among each token's K+1 largest router logits (all layers)."""
    m = float("inf")
    for r in routing:
        z = r["router_logits"].detach()
        s = torch.sort(z, dim=-1, descending=True).values
        kk = min(K + 1, z.shape[1])
        if kk >= 2:
            m = min(m, float((s[:, :kk - 1] - s[:, 1:kk]).min()))
    return m


def min_sorted_prob_gap(routing):
    """Smallest relative gap (q_(r+1) - q_(r)) / q_(r+1) between two of an expert's sorted
    probabilities over the batch (all layers): dpsl sorts them, and its gradient depends on
    the order. Relative, since fp32 probabilities carry relative errors (many are tiny)."""
    m = float("inf")
    for r in routing:
        q = torch.sort(r["probs"].detach(), dim=0).values
        m = min(m, float(((q[1:] - q[:-1]) / q[1:]).min()))
    return m


def check_beta_cdf():
    """The reference's Beta CDF against closed forms: I_x(1, b) = 1 - (1-x)^b,
    I_x(a, 1) = x^a, I_x(2, 2) = 3x^2 - 2x^3."""
    x = torch.linspace(0.001, 0.999, 199)
    worst = 0.0
    for a, b, want in ((1.0, 3.5, 1 - (1 - x) ** 3.5), (0.5, 1.0, x ** 0.5),
                       (2.0, 2.0, 3 * x ** 2 - 2 * x ** 3)):
        worst = max(worst, float((beta_cdf(x, a, b) - want).abs().max()))
    if worst > 1e-14:
        fail(f"beta_cdf differs from its closed forms by {worst:.3e}")
    return worst


def min_topk_margin_rel(routing, K, first_matters=False):
    """Smallest top-K margin (K-th minus (K+1)-th largest logit) of any token, relative to
    its layer's largest |logit| (infinity when K = E). first_matters (xft routing, whose
    gradient jumps where the first choice changes): the 1st-2nd margin too."""
    m = float("inf")
    for r in routing:
        z = r["router_logits"].detach()
        s = torch.sort(z, dim=-1, descending=True).values
        if K < z.shape[1]:
            m = min(m, float((s[:, K - 1] - s[:, K]).min() / z.abs().max()))
        if first_matters and z.shape[1] > 1:
            m = min(m, float((s[:, 0] - s[:, 1]).min() / z.abs().max()))
    return m


def loss_and_grads(P, cfg, inputs, targets, spec):
    Pg = {n: p.detach().clone().requires_grad_(True) for n, p in P.items()}
    r = spec_losses(Pg, cfg, inputs, targets, spec)
    names = sorted(Pg)
    gs = torch.autograd.grad(r["loss"], [Pg[n] for n in names], allow_unused=True)
    grads = {n: (g if g is not None else torch.zeros_like(Pg[n])) for n, g in zip(names, gs)}
    for n in cfg.frozen_names():  # not parameters (the Nexus router's Emb and R): gradient 0
        grads[n] = torch.zeros_like(Pg[n])
    return r, grads


def run_adamw(P0, cfg, inputs, targets, spec):
    """Returns (step-0 result, step-0 grads, losses[10], grad_norms[10], min router gap over
    steps, min gap between an expert's sorted probabilities over steps (dpsl only))."""
    P = {n: p.clone() for n, p in P0.items()}
    opt = AdamW(P, OPT["lr"], OPT["beta1"], OPT["beta2"], OPT["eps"], OPT["weight_decay"],
                OPT["grad_clip"], cfg.frozen_names())
    losses, norms, gap, pgap = [], [], float("inf"), float("inf")
    first = None
    for _ in range(ADAMW_STEPS):
        r, grads = loss_and_grads(P, cfg, inputs, targets, spec)
        if first is None:
            first = (r, grads)
        losses.append(float(r["loss"]))
        if cfg.moe:
            gap = min(gap, min_router_gap(r["routing"], cfg.K))
        if spec.get("dpsl"):
            pgap = min(pgap, min_sorted_prob_gap(r["routing"]))
        norms.append(opt.step(P, grads))
    return first[0], first[1], losses, norms, gap, pgap


def fail(msg):
    print("CHECK FAILED: " + msg, file=sys.stderr)
    sys.exit(1)


# ----------------------------------------------------------------------------------------
# self-checks

def check_finite_differences(P, cfg, inputs, targets, spec, grads, n_entries=3, h=1e-5):
    g = torch.Generator().manual_seed(12345)
    ref_idx = [r["topk_idx"] for r in spec_losses(P, cfg, inputs, targets, spec)["routing"]]
    worst_abs, worst_rel, n = 0.0, 0.0, 0
    for name in sorted(set(P) - cfg.frozen_names()):
        flat = P[name].view(-1)
        picks = torch.randperm(flat.numel(), generator=g)[:n_entries].tolist()
        for j in picks:
            vals = []
            for sgn in (+1, -1):
                Q = dict(P)
                q = P[name].clone()
                q.view(-1)[j] += sgn * h
                Q[name] = q
                with torch.no_grad():
                    r = spec_losses(Q, cfg, inputs, targets, spec)
                for a, b in zip(ref_idx, [x["topk_idx"] for x in r["routing"]]):
                    if not torch.equal(a, b):
                        fail(f"{spec['name']}: FD step changed the routing at {name}[{j}]")
                vals.append(float(r["loss"]))
            fd = (vals[0] - vals[1]) / (2 * h)
            ag = float(grads[name].view(-1)[j])
            err = abs(fd - ag)
            worst_abs = max(worst_abs, err)
            if abs(ag) > 1e-6:
                worst_rel = max(worst_rel, err / abs(ag))
            if err > 1e-8 + 1e-6 * abs(ag):
                fail(f"{spec['name']}: FD mismatch {name}[{j}]: autograd {ag:.12e} fd {fd:.12e}")
            n += 1
    return n, worst_abs, worst_rel


def check_moe_copies_dense():
    dspec = FIXTURES[0]
    dcfg = Config(hf_config(dspec))
    Pd = to64(init_params(dcfg, 99))
    mspec = dict(dspec, E=4, K=2, routing="topk_softmax")
    mcfg = Config(hf_config(mspec))
    g = torch.Generator().manual_seed(98)
    Pm = {}
    for n, shp in mcfg.param_shapes().items():
        if ".block_sparse_moe.gate." in n:
            Pm[n] = 0.5 * torch.randn(shp, generator=g)
        elif ".block_sparse_moe.experts." in n:
            pre = n.split("block_sparse_moe")[0]
            src = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[n.split(".")[-2]]
            Pm[n] = Pd[pre + f"mlp.{src}.weight"].clone()
        else:
            Pm[n] = Pd[n].clone()
    inputs, _ = make_batch(dcfg, 99)
    with torch.no_grad():
        ld, _ = forward(Pd, dcfg, inputs)
        lm, routing = forward(Pm, mcfg, inputs)
    diff = float((ld - lm).abs().max())
    if diff > 1e-12:
        fail(f"MoE of dense copies differs from dense: max |dlogit| {diff:.3e}")
    spread = [r["counts"].tolist() for r in routing]
    return diff, spread


def check_shared_expert():
    """Shared experts (docs/METHODS.md 1.7): (a) S SwiGLU experts of width F_e summed equal
    one SwiGLU of width S F_e with the neurons concatenated; (b) a shared expert whose
    down projection is zero leaves the model equal to the same MoE without one (gated and
    ungated)."""
    from model import swiglu
    g = torch.Generator().manual_seed(97)
    d, Fe, S, N = 8, 5, 3, 7
    x = torch.randn(N, d, generator=g)
    parts = [(torch.randn(Fe, d, generator=g), torch.randn(Fe, d, generator=g), torch.randn(d, Fe, generator=g))
             for _ in range(S)]
    total = sum(swiglu(x, *p) for p in parts)
    cat = swiglu(x, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                 torch.cat([p[2] for p in parts], 1))
    da = float((total - cat).abs().max())
    if da > 1e-12:
        fail(f"S shared SwiGLUs != one of width S F_e: {da:.3e}")
    mspec = FIXTURES[1]
    mcfg = Config(hf_config(mspec))
    Pm = to64(init_params(mcfg, 96))
    inputs, _ = make_batch(mcfg, 96)
    with torch.no_grad():
        lm, _ = forward(Pm, mcfg, inputs)
    db = 0.0
    for gate in (True, False):
        scfg = Config(hf_config(dict(mspec, Fs=12, shared_gate=gate)))
        Ps = to64(init_params(scfg, 95))
        for i in range(mcfg.L):  # the same model, experts renamed, plus a shared expert
            for n in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                      "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"):
                Ps[f"model.layers.{i}.{n}"] = Pm[f"model.layers.{i}.{n}"]
            Ps[scfg.router_name(i)] = Pm[mcfg.router_name(i)]
            for e in range(mcfg.E):
                for a, b in zip(scfg.expert_names(i, e), mcfg.expert_names(i, e)):
                    Ps[a] = Pm[b]
            Ps[f"model.layers.{i}.mlp.shared_expert.down_proj.weight"].zero_()
        for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            Ps[n] = Pm[n]
        with torch.no_grad():
            ls, _ = forward(Ps, scfg, inputs)
        db = max(db, float((ls - lm).abs().max()))
    if db > 1e-12:
        fail(f"a shared expert with zero down_proj changes the model: {db:.3e}")
    return da, db


def check_grove():
    """Grove MoE (docs/METHODS.md 1.10): (a) the layer written token by token (each active
    group's adjugate once, weighted by lambda times the sum of its selected experts' weights)
    equals moe_ffn's group-by-group form; (b) adjugate experts with zero down projections
    leave the model equal to the same MoE without them (what upcycle --method grove keeps)."""
    from model import moe_ffn, swiglu
    spec = next(s for s in FIXTURES if s["name"] == "moe_grove")
    cfg = Config(hf_config(spec))
    P = to64(init_params(cfg, 94))
    g = torch.Generator().manual_seed(93)
    h2 = torch.randn(13, cfg.d, generator=g, dtype=torch.float64)
    y, r = moe_ffn(h2, P, 0, cfg)
    S, y2 = cfg.E // cfg.G, torch.zeros_like(h2)
    for n in range(h2.shape[0]):
        for k in range(cfg.K):
            e = int(r["topk_idx"][n, k])
            y2[n] += r["topk_weight"][n, k] * swiglu(h2[n:n + 1], *(P[x] for x in cfg.expert_names(0, e)))[0]
        for j in sorted({int(e) // S for e in r["topk_idx"][n]}):
            gw = sum(r["topk_weight"][n, k] for k in range(cfg.K) if int(r["topk_idx"][n, k]) // S == j)
            y2[n] += cfg.grove_scale * gw * swiglu(h2[n:n + 1], *(P[x] for x in cfg.adjugate_names(0, j)))[0]
    da = float((y - y2).abs().max())
    if da > 1e-12:
        fail(f"Grove layer, token by token != group by group: {da:.3e}")
    base = {k: v for k, v in spec.items() if k not in ("G", "Fa", "grove_scale")}
    mcfg = Config(hf_config(base))
    Pm = {n: v for n, v in P.items() if ".adjugate_experts." not in n}
    Pz = dict(P)
    for i in range(cfg.L):
        for j in range(cfg.G):
            Pz[cfg.adjugate_names(i, j)[2]] = torch.zeros_like(Pz[cfg.adjugate_names(i, j)[2]])
    inputs, _ = make_batch(cfg, 94)
    with torch.no_grad():
        lm, _ = forward(Pm, mcfg, inputs)
        lz, _ = forward(Pz, cfg, inputs)
    db = float((lm - lz).abs().max())
    if db > 0:
        fail(f"zero adjugate down projections change the model: {db:.3e}")
    return da, db


def check_xft_dense():
    """XFT routing (docs/METHODS.md 1.8): an MoE whose shared and routed experts are all the
    same FFN computes that FFN (shared weight 1 - p(1) plus routed weights summing to p(1)),
    whatever the router: its logits equal the dense model's."""
    dspec = dict(FIXTURES[0], F=16)
    dcfg = Config(hf_config(dspec))
    Pd = to64(init_params(dcfg, 94))
    xcfg = Config(hf_config(dict(FIXTURES[0], F=16, E=4, K=3, Fs=16, shared_gate=False, routing="xft")))
    assert xcfg.routing == "xft"
    Px = to64(init_params(xcfg, 93))  # keeps its random router
    for n in Pd:
        if ".mlp." not in n:
            Px[n] = Pd[n]
    for i in range(dcfg.L):
        ffn = [Pd[f"model.layers.{i}.mlp.{w}_proj.weight"] for w in ("gate", "up", "down")]
        for e in range(xcfg.E):
            for a, w in zip(xcfg.expert_names(i, e), ffn):
                Px[a] = w
        for w, t in zip(("gate", "up", "down"), ffn):
            Px[f"model.layers.{i}.mlp.shared_expert.{w}_proj.weight"] = t
    inputs, _ = make_batch(dcfg, 94)
    with torch.no_grad():
        ld, _ = forward(Pd, dcfg, inputs)
        lx, rx = forward(Px, xcfg, inputs)
    diff = float((ld - lx).abs().max())
    if diff > 1e-12:
        fail(f"XFT MoE of dense copies != dense: {diff:.3e}")
    return diff


def hf_load_balancing_loss(gate_logits, num_experts, top_k):
    """Literal transcription of transformers' Mixtral load_balancing_loss_func
    (attention_mask=None)."""
    concatenated = torch.cat(list(gate_logits), dim=0)
    routing_weights = torch.nn.functional.softmax(concatenated, dim=-1)
    _, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    expert_mask = torch.nn.functional.one_hot(selected_experts, num_experts)
    tokens_per_expert = torch.mean(expert_mask.float(), dim=0)
    router_prob_per_expert = torch.mean(routing_weights, dim=0)
    overall_loss = torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0))
    return overall_loss * num_experts


def check_aux_balance():
    """Uniform probabilities: switch = seq = 1 per layer, pooled = K (any selection)."""
    from model import aux_loss
    cfg = Config(hf_config(FIXTURES[1]))
    g = torch.Generator().manual_seed(7)
    routing = []
    for _ in range(cfg.L):
        N = B * T
        z = torch.zeros(N, cfg.E)
        idx = torch.stack([torch.randperm(cfg.E, generator=g)[:cfg.K] for _ in range(N)])
        counts = torch.bincount(idx.view(-1), minlength=cfg.E)
        routing.append(dict(router_logits=z, probs=torch.softmax(z, -1), topk_idx=idx,
                            counts=counts))
    vals = {a: float(aux_loss(routing, cfg, a, B, T)) for a in ("switch", "seq", "pooled")}
    want = {"switch": cfg.L, "seq": cfg.L, "pooled": cfg.K}
    for a in vals:
        if abs(vals[a] - want[a]) > 1e-12:
            fail(f"aux {a} at uniform probabilities = {vals[a]}, expected {want[a]}")
    return vals


def check_router_grads(P, cfg, inputs, targets, spec, grads):
    """aux alone and z alone reach every router; fixture grad = ce + a*aux + b*z grads."""
    Pg = {n: p.clone().requires_grad_(True) for n, p in P.items()}
    r = spec_losses(Pg, cfg, inputs, targets, spec)
    rn = [cfg.nexus_names(i)[1] if cfg.nexus else cfg.router_name(i) for i in range(cfg.L)]  # Nexus: P
    parts = {}
    terms = ("aux", "z", "dpsl") if spec.get("dpsl") else ("aux", "z")
    for term in ("ce",) + terms:
        gs = torch.autograd.grad(r[term], [Pg[n] for n in rn], retain_graph=True,
                                 allow_unused=True)
        parts[term] = [g if g is not None else torch.zeros_like(Pg[n]) for g, n in zip(gs, rn)]
    norms = {}
    for term in terms:
        norms[term] = [float(g.norm()) for g in parts[term]]
        if min(norms[term]) < 1e-8:
            fail(f"{spec['name']}: {term} loss gives no router gradient: {norms[term]}")
    lin = 0.0
    for i, n in enumerate(rn):
        comb = parts["ce"][i] + spec["aux_coef"] * parts["aux"][i] + spec["z_coef"] * parts["z"][i]
        if spec.get("dpsl"):
            comb = comb + spec["dpsl"]["coef"] * parts["dpsl"][i]
        lin = max(lin, float((comb - grads[n]).abs().max()))
    if lin > 1e-13:
        fail(f"{spec['name']}: router grad != ce + aux + z parts ({lin:.3e})")
    return norms, lin


# ----------------------------------------------------------------------------------------

def build(spec):
    """Finds a seed (deterministic search from spec['seed']) meeting the routing-gap and
    empty-expert conditions; returns everything needed to write the fixture."""
    cfg = Config(hf_config(spec))
    for attempt in range(SEED_ATTEMPTS):
        seed = spec["seed"] + attempt
        npP = init_params(cfg, seed)
        P = to64(npP)
        inputs, targets = make_batch(cfg, seed)
        if cfg.moe:  # the cheap step-0 conditions first
            with torch.no_grad():
                _, routing = forward(P, cfg, inputs)
            if spec.get("empty_expert") and int((routing[0]["counts"] == 0).sum()) == 0:
                continue
            if min_topk_margin_rel(routing, cfg.K, cfg.routing == "xft") <= BF16_MARGIN:
                continue
        r, grads, losses, norms, gap, pgap = run_adamw(P, cfg, inputs, targets, spec)
        if cfg.moe and gap <= GAP_MIN:
            continue
        if spec.get("dpsl") and pgap <= DPSL_GAP_MIN:
            continue
        return dict(cfg=cfg, seed=seed, npP=npP, P=P, inputs=inputs, targets=targets, r=r,
                    grads=grads, losses=losses, norms=norms, gap=gap)
    fail(f"{spec['name']}: no seed in {SEED_ATTEMPTS} attempts meets the routing conditions")


def write_fixture(outdir, spec, b):
    cfg, r = b["cfg"], b["r"]
    d = os.path.join(outdir, spec["name"])
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg.raw, f, indent=2, sort_keys=True)
        f.write("\n")
    write_safetensors(os.path.join(d, "model.safetensors"), b["npP"],
                      {"format": "pt", "description": spec["desc"]})
    t = {
        "inputs": b["inputs"].numpy().astype(np.int32),
        "targets": b["targets"].numpy().astype(np.int32),
        "logits": r["logits"].detach().numpy().astype(np.float64),
        "loss": np.array([float(r["loss"])]),
        "ce": np.array([float(r["ce"])]),
        "aux": np.array([float(r["aux"])]),
        "z": np.array([float(r["z"])]),
        "adamw_losses": np.array(b["losses"], dtype=np.float64),
        "adamw_grad_norms": np.array(b["norms"], dtype=np.float64),
    }
    for l, info in enumerate(r["routing"]):
        t[f"router_logits.{l}"] = info["router_logits"].detach().numpy()
        t[f"topk_idx.{l}"] = info["topk_idx"].numpy().astype(np.int32)
        t[f"topk_weight.{l}"] = info["topk_weight"].detach().numpy()
        t[f"expert_counts.{l}"] = info["counts"].numpy().astype(np.int32)
    for n, g in b["grads"].items():
        t["grad." + n] = g.detach().numpy().astype(np.float64)
    meta = {"aux_type": spec["aux"], "aux_coef": repr(float(spec["aux_coef"])),
            "z_coef": repr(float(spec["z_coef"])), "adamw_steps": str(ADAMW_STEPS),
            "seed": str(b["seed"]), "description": b["desc"]}
    for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip"):
        meta[k] = repr(float(OPT[k]))
    if spec.get("dpsl"):  # only here: the other fixtures' files stay as they were
        t["dpsl"] = np.array([float(r["dpsl"])])
        dp = spec["dpsl"]
        meta.update(dpsl_coef=repr(float(dp["coef"])), dpsl_alpha=",".join(repr(float(a)) for a in dp["alpha"]),
                    dpsl_distance=dp["distance"], dpsl_ecdf=dp["ecdf"])
    write_safetensors(os.path.join(d, "fixture.safetensors"), t, meta)
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="test/fixtures", help="output directory")
    ap.add_argument("--only", default=None, help="comma-separated fixture names")
    ap.add_argument("--skip-checks", action="store_true", help="skip the self-checks")
    args = ap.parse_args()
    specs = FIXTURES if not args.only else [s for s in FIXTURES if s["name"] in args.only.split(",")]

    if not args.skip_checks:
        diff, spread = check_moe_copies_dense()
        print(f"check: MoE of dense copies == dense: max |dlogit| {diff:.3e} "
              f"(expert counts {spread})")
        vals = check_aux_balance()
        print(f"check: aux at uniform probs {vals} (switch/seq = L, pooled = K)")
        print(f"check: Beta CDF vs closed forms: max err {check_beta_cdf():.1e}")
        da, db = check_shared_expert()
        print(f"check: S shared SwiGLUs == one of width S F_e: {da:.1e}; zero shared down_proj == "
              f"no shared expert: {db:.1e}")
        da, db = check_grove()
        print(f"check: Grove token by token == group by group: {da:.1e}; zero adjugate w2 == no adjugates: "
              f"{db:.1e}")
        print(f"check: XFT MoE of dense copies == dense: max |dlogit| {check_xft_dense():.1e}")

    built = []
    for spec in specs:
        b = build(spec)
        cfg, r = b["cfg"], b["r"]
        desc = spec["desc"] + f"; seed {b['seed']}"
        if spec.get("empty_expert"):
            empty = [e for e in range(cfg.E) if int(r["routing"][0]["counts"][e]) == 0]
            assert empty, "empty expert lost"
            desc += f"; layer 0 empty expert(s) {empty}, counts {r['routing'][0]['counts'].tolist()}"
            if any(float(b["grads"][f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"]
                         .abs().max()) != 0.0 for e in empty for w in ("w1", "w2", "w3")):
                fail("empty expert has a non-zero gradient")
        b["desc"] = desc
        line = (f"{spec['name']}: seed {b['seed']} loss {float(r['loss']):.10f} "
                f"ce {float(r['ce']):.10f} aux {float(r['aux']):.10f} z {float(r['z']):.10f}")
        if spec.get("dpsl"):
            line += f" dpsl {float(r['dpsl']):.10f}"
        if cfg.moe:
            line += f" min router gap {b['gap']:.3e} counts " + \
                    str([x["counts"].tolist() for x in r["routing"]])
        line += f"\n    adamw losses {[round(x, 6) for x in b['losses']]}" \
                f"\n    grad norms {[round(x, 4) for x in b['norms']]}"
        print(line)
        if not args.skip_checks:
            n, wa, wr = check_finite_differences(b["P"], cfg, b["inputs"], b["targets"], spec,
                                                 b["grads"])
            print(f"  check: FD vs autograd on {n} entries: max abs err {wa:.3e}, "
                  f"max rel err (|g|>1e-6) {wr:.3e}")
            if cfg.moe and spec["aux_coef"] > 0:
                norms, lin = check_router_grads(b["P"], cfg, b["inputs"], b["targets"], spec,
                                                b["grads"])
                extra = (f" from dpsl {[f'{x:.3e}' for x in norms['dpsl']]}"
                         if "dpsl" in norms else "")
                print(f"  check: router grad norms from aux {[f'{x:.3e}' for x in norms['aux']]}"
                      f" from z {[f'{x:.3e}' for x in norms['z']]}{extra}; linearity err {lin:.1e}")
            if spec["aux"] == "pooled":
                hf = float(hf_load_balancing_loss([x["router_logits"] for x in r["routing"]],
                                                  cfg.E, cfg.K))
                if abs(hf - float(r["aux"])) > 1e-12:
                    fail(f"pooled aux {float(r['aux'])} != HF transcription {hf}")
                print(f"  check: pooled aux == HF load_balancing_loss_func: {hf:.12f}")
            if cfg.moe and cfg.routing == "topk_softmax":
                s = max(float((x["topk_weight"].sum(-1) - 1).abs().max()) for x in r["routing"])
                if s > 1e-12:
                    fail("topk_softmax weights do not sum to 1")
        if float(r["loss"]) != b["losses"][0]:
            fail("adamw_losses[0] != loss")
        built.append((spec, b))

    for spec, b in built:
        d = write_fixture(args.out, spec, b)
        # read back and compare
        t, meta = read_safetensors(os.path.join(d, "fixture.safetensors"))
        m, _ = read_safetensors(os.path.join(d, "model.safetensors"))
        assert set(m) == set(b["cfg"].param_shapes()), "model.safetensors names"
        assert all(("grad." + n) in t for n in m), "missing grads"
        assert meta["adamw_steps"] == str(ADAMW_STEPS)
        # the files alone reproduce the fixture (what the C++ test sees)
        cfg2, P2 = load_checkpoint(d)
        dp2 = None
        if "dpsl_coef" in meta:
            dp2 = dict(coef=float(meta["dpsl_coef"]),
                       alpha=[float(a) for a in meta["dpsl_alpha"].split(",")],
                       distance=meta["dpsl_distance"], ecdf=meta["dpsl_ecdf"])
        with torch.no_grad():
            r2 = compute_losses(P2, cfg2, torch.from_numpy(t["inputs"]).long(),
                                torch.from_numpy(t["targets"]).long(), meta["aux_type"],
                                float(meta["aux_coef"]), float(meta["z_coef"]), dp2)
        if float(r2["loss"]) != float(t["loss"][0]) or \
                not torch.equal(r2["logits"], torch.from_numpy(t["logits"])):
            fail(f"{d}: reloading the written files does not reproduce the fixture")
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(f"wrote {d} ({size / 1024:.1f} KiB)")
    print("all checks passed")


if __name__ == "__main__":
    main()
