#!/usr/bin/python3
"""Float64 PyTorch reference of the Llama / Mixtral / Qwen2-MoE model trained by the C++/CUDA trainer.

This file is the executable spec of the model (docs/ARCHITECTURE.md, "The model") and of
docs/METHODS.md section 1 (routing, load-balancing, z and Dirichlet-prior shaping losses). It is deliberately plain:
no nn.Module, no fused kernels, attention written out, top-K written out (ties -> lower
expert index). Everything is computed in float64 from the checkpoint's fp32/bf16 values
upcast to float64.

Importable:
    from model import load_checkpoint, forward, compute_losses, adamw_step
Command line (cross-check any checkpoint the C++ programs write):
    /usr/bin/python3 dev/reference/model.py CKPT_DIR --tokens 1,2,3,4
  prints a logits summary and the next-token loss over the given token sequence
  (inputs = tokens[:-1], targets = tokens[1:]).

Checkpoint directory: config.json + model.safetensors, or a sharded
model.safetensors.index.json ("weight_map": name -> shard file). Tensors F32, BF16, F16 or F64.
"""

import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import torch

# ----------------------------------------------------------------------------------------
# safetensors, by hand (8-byte LE header length, JSON header, raw LE data)

_ST_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BF16": np.dtype("<u2"),  # raw bits, converted below
}
_NP_TO_ST = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<i4"): "I32",
             np.dtype("<i8"): "I64", np.dtype("<f2"): "F16", np.dtype("u1"): "U8"}


def read_safetensors(path):
    """Returns (dict name -> numpy array, metadata dict). BF16 is returned as float32."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    base = 8 + n
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, info in header.items():
        dt = info["dtype"]
        if dt not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name}: unsupported dtype {dt}")
        a, b = info["data_offsets"]
        arr = np.frombuffer(raw[base + a:base + b], dtype=_ST_DTYPES[dt]).reshape(info["shape"])
        if dt == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr.copy()
    return out, meta


def write_safetensors(path, tensors, metadata=None):
    """tensors: dict name -> numpy array (F64/F32/I32/...). Written sorted by name, header
    JSON with sorted keys, padded with spaces to a multiple of 8 bytes. Deterministic."""
    header = {}
    blobs = []
    off = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        key = arr.dtype.newbyteorder("<")
        if key not in _NP_TO_ST:
            raise ValueError(f"{name}: unsupported numpy dtype {arr.dtype}")
        data = arr.astype(key, copy=False).tobytes()
        header[name] = {"dtype": _NP_TO_ST[key], "shape": list(arr.shape),
                        "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hj = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((8 - len(hj) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# config and checkpoint

class Config:
    """The HF config.json keys we use, with derived sizes."""

    def __init__(self, d):
        self.raw = dict(d)
        self.V = d["vocab_size"]
        self.d = d["hidden_size"]
        self.qwen = d.get("model_type") == "qwen2_moe"  # MoE + shared expert, Qwen2-MoE's names
        # dense width, or expert width F_e for MoE
        self.F = d["moe_intermediate_size"] if self.qwen else d["intermediate_size"]
        self.L = d["num_hidden_layers"]
        self.H = d["num_attention_heads"]
        self.Hkv = d.get("num_key_value_heads", self.H)
        self.hd = d.get("head_dim", self.d // self.H)
        self.eps = float(d.get("rms_norm_eps", 1e-5))
        self.theta = float(d.get("rope_theta", 10000.0))
        self.tied = bool(d.get("tie_word_embeddings", False))
        self.E = int(d.get("num_experts" if self.qwen else "num_local_experts", 0) or 0)
        self.K = int(d.get("num_experts_per_tok", 0) or 0)
        self.routing = d.get("moe_routing", "topk_softmax")
        # shared expert (docs/METHODS.md 1.7): one SwiGLU FFN of width Fs over every token,
        # its output times sigmoid(x . g) when gated (HF Qwen2-MoE always gates)
        self.Fs = int(d.get("shared_expert_intermediate_size", 0) or 0) if self.qwen else 0
        self.shared_gate = d.get("shared_expert_gating", "sigmoid") == "sigmoid"
        # Grove MoE (docs/METHODS.md 1.10): G groups of E/G consecutive experts, one adjugate
        # SwiGLU of width Fa per group, scaled by lam * (sum of the group's selected weights)
        self.G = int(d.get("grove_groups", 0) or 0)
        self.Fa = int(d.get("grove_intermediate_size", 0) or 0)
        self.grove_scale = float(d.get("grove_scale", 0.05))
        if self.G:
            assert not self.qwen and self.E % self.G == 0 and self.Fa > 0, "grove config"
        # Nexus router (docs/METHODS.md 1.9): router weight R = Emb P, Emb [E, d] fixed domain
        # embeddings, P [d, d] learned; the stored gate.weight (R) and Emb are never trained
        self.nexus = d.get("moe_router", "linear") == "nexus"
        assert d.get("moe_router", "linear") in ("linear", "nexus"), d.get("moe_router")
        if self.qwen:
            self.routing = "topk_softmax" if d.get("norm_topk_prob", False) else "softmax_topk"
            # XFT (docs/METHODS.md 1.8): our own moe_routing value, with norm_topk_prob false
            if d.get("moe_routing") == "xft" and self.routing == "softmax_topk":
                self.routing = "xft"
                assert not self.shared_gate, "xft routing needs shared_expert_gating none"
            assert d.get("decoder_sparse_step", 1) == 1 and not d.get("mlp_only_layers"), "dense-MLP layers"
        assert self.H % self.Hkv == 0, "num_key_value_heads must divide num_attention_heads"
        assert self.routing in ("topk_softmax", "softmax_topk", "xft"), self.routing
        self.moe = self.E > 0

    def router_name(self, i):
        return f"model.layers.{i}." + ("mlp.gate.weight" if self.qwen else "block_sparse_moe.gate.weight")

    def nexus_names(self, i):
        """(Emb, P) tensor names of layer i's Nexus router."""
        m = f"model.layers.{i}." + ("mlp." if self.qwen else "block_sparse_moe.")
        return m + "router_domain_emb", m + "router_proj.weight"

    def frozen_names(self):
        """Tensors stored but never trained (no AdamW update, no weight decay)."""
        if not self.nexus:
            return set()
        return {n for i in range(self.L) for n in (self.router_name(i), self.nexus_names(i)[0])}

    def expert_names(self, i, j):
        """(gate, up, down) tensor names of expert j of layer i (Mixtral w1/w3/w2 or Qwen2-MoE)."""
        if self.qwen:
            q = f"model.layers.{i}.mlp.experts.{j}."
            return q + "gate_proj.weight", q + "up_proj.weight", q + "down_proj.weight"
        q = f"model.layers.{i}.block_sparse_moe.experts.{j}."
        return q + "w1.weight", q + "w3.weight", q + "w2.weight"

    def adjugate_names(self, i, j):
        """(gate, up, down) tensor names of Grove adjugate expert j (group j) of layer i."""
        q = f"model.layers.{i}.block_sparse_moe.adjugate_experts.{j}."
        return q + "w1.weight", q + "w3.weight", q + "w2.weight"

    def param_shapes(self):
        """name -> shape, in a fixed (init) order."""
        d, hd, V = self.d, self.hd, self.V
        s = {"model.embed_tokens.weight": (V, d)}
        for i in range(self.L):
            p = f"model.layers.{i}."
            s[p + "input_layernorm.weight"] = (d,)
            s[p + "self_attn.q_proj.weight"] = (self.H * hd, d)
            s[p + "self_attn.k_proj.weight"] = (self.Hkv * hd, d)
            s[p + "self_attn.v_proj.weight"] = (self.Hkv * hd, d)
            s[p + "self_attn.o_proj.weight"] = (d, self.H * hd)
            s[p + "post_attention_layernorm.weight"] = (d,)
            if self.moe:
                s[self.router_name(i)] = (self.E, d)
                if self.nexus:
                    emb, proj = self.nexus_names(i)
                    s[emb] = (self.E, d)
                    s[proj] = (d, d)
                for j in range(self.E):
                    g, u, dn = self.expert_names(i, j)
                    s[g] = (self.F, d)
                    s[u] = (self.F, d)
                    s[dn] = (d, self.F)
                for j in range(self.G):
                    g, u, dn = self.adjugate_names(i, j)
                    s[g] = (self.Fa, d)
                    s[u] = (self.Fa, d)
                    s[dn] = (d, self.Fa)
                if self.Fs:
                    q = p + "mlp.shared_expert."
                    s[q + "gate_proj.weight"] = (self.Fs, d)
                    s[q + "up_proj.weight"] = (self.Fs, d)
                    s[q + "down_proj.weight"] = (d, self.Fs)
                    if self.shared_gate:
                        s[p + "mlp.shared_expert_gate.weight"] = (1, d)
            else:
                s[p + "mlp.gate_proj.weight"] = (self.F, d)
                s[p + "mlp.up_proj.weight"] = (self.F, d)
                s[p + "mlp.down_proj.weight"] = (d, self.F)
        s["model.norm.weight"] = (d,)
        if not self.tied:
            s["lm_head.weight"] = (V, d)
        return s


def load_checkpoint(ckpt_dir, dtype=torch.float64):
    """Returns (Config, dict name -> float64 tensor). Checks names and shapes."""
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        cfg = Config(json.load(f))
    idx = os.path.join(ckpt_dir, "model.safetensors.index.json")
    arrays = {}
    if os.path.exists(idx):
        with open(idx) as f:
            wm = json.load(f)["weight_map"]
        for shard in sorted(set(wm.values())):
            t, _ = read_safetensors(os.path.join(ckpt_dir, shard))
            arrays.update(t)
    else:
        arrays, _ = read_safetensors(os.path.join(ckpt_dir, "model.safetensors"))
    shapes = cfg.param_shapes()
    if cfg.tied and "lm_head.weight" in arrays:
        arrays.pop("lm_head.weight")  # some HF exports store the tied copy too
    for n in [n for n in arrays if cfg.qwen and n.endswith("_proj.bias") and ".self_attn." in n]:
        if np.any(arrays[n] != 0):  # Qwen2-MoE's attention biases: our model has none
            raise ValueError(f"{n}: nonzero attention bias (the model has no biases)")
        arrays.pop(n)
    missing = [n for n in shapes if n not in arrays]
    extra = [n for n in arrays if n not in shapes and "rotary_emb" not in n]
    if missing or extra:
        raise ValueError(f"checkpoint mismatch: missing {missing[:5]} extra {extra[:5]}")
    params = {}
    for n, shp in shapes.items():
        a = arrays[n]
        if tuple(a.shape) != tuple(shp):
            raise ValueError(f"{n}: shape {a.shape} != expected {shp}")
        params[n] = torch.from_numpy(np.asarray(a, dtype=np.float64)).to(dtype)
    return cfg, params


# ----------------------------------------------------------------------------------------
# the model

def rmsnorm(u, w, eps):
    return u / torch.sqrt((u * u).mean(-1, keepdim=True) + eps) * w


def rope_cos_sin(T, hd, theta, dtype=torch.float64):
    """HF rotate-half RoPE tables [T, hd]: inv_freq_i = theta^(-2i/hd), cos/sin = cat(f, f)."""
    i = torch.arange(hd // 2, dtype=dtype)
    inv_freq = theta ** (-(2.0 * i) / hd)
    pos = torch.arange(T, dtype=dtype)
    f = pos[:, None] * inv_freq[None, :]
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(u):
    h = u.shape[-1] // 2
    return torch.cat([-u[..., h:], u[..., :h]], dim=-1)


def attention(h, P, p, cfg, cos, sin):
    B, T, _ = h.shape
    H, Hkv, hd = cfg.H, cfg.Hkv, cfg.hd
    q = (h @ P[p + "self_attn.q_proj.weight"].T).view(B, T, H, hd).transpose(1, 2)
    k = (h @ P[p + "self_attn.k_proj.weight"].T).view(B, T, Hkv, hd).transpose(1, 2)
    v = (h @ P[p + "self_attn.v_proj.weight"].T).view(B, T, Hkv, hd).transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    rep = H // Hkv                       # query head j uses kv head j // rep
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)          # [B, H, T, T]
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    s = s.masked_fill(mask, float("-inf"))
    a = torch.softmax(s, dim=-1)
    o = (a @ v).transpose(1, 2).reshape(B, T, H * hd)
    return o @ P[p + "self_attn.o_proj.weight"].T


def swiglu(h, wg, wu, wd):
    g = h @ wg.T
    return (torch.nn.functional.silu(g) * (h @ wu.T)) @ wd.T


def topk_stable(z, K):
    """Indices [N, K] of the K largest entries of each row of z, in descending order of z,
    ties broken by the lower index (stable sort on (-z, index)). Done in numpy on purpose."""
    zn = z.detach().cpu().numpy()
    order = np.argsort(-zn, axis=-1, kind="stable")
    return torch.from_numpy(order[:, :K].copy()).long()


def moe_ffn(h2, P, i, cfg):
    """h2: [N, d] (layer i). Returns y [N, d] and routing info (router logits, probs, topk
    idx/weights, counts). Dropless: every (token, slot) pair is computed. The shared expert,
    if any, is added to y: y += [sigmoid(h2 . g)] * swiglu_shared(h2), or with XFT's routing
    (docs/METHODS.md 1.8) y += (1 - p_(1)) * swiglu_shared(h2), where p_(1) is the first chosen
    expert's probability and the routed weights are p_(1) * softmax(the chosen probabilities)."""
    N = h2.shape[0]
    if cfg.nexus:  # R = Emb P [E, d]; the stored gate.weight is not read
        emb, proj = cfg.nexus_names(i)
        R = P[emb] @ P[proj]
    else:
        R = P[cfg.router_name(i)]
    z = h2 @ R.T                                                 # [N, E]
    prob = torch.softmax(z, dim=-1)
    idx = topk_stable(z, cfg.K)                                  # [N, K]
    psel = prob.gather(1, idx)                                   # [N, K]
    if cfg.routing == "topk_softmax":
        w = psel / psel.sum(-1, keepdim=True)
    elif cfg.routing == "xft":
        w = psel[:, :1] * torch.softmax(psel, dim=-1)
    else:
        w = psel
    y = torch.zeros_like(h2)
    counts = torch.zeros(cfg.E, dtype=torch.long)
    for e in range(cfg.E):
        rows, slots = (idx == e).nonzero(as_tuple=True)
        counts[e] = rows.numel()
        if rows.numel() == 0:
            continue
        g, u, dn = cfg.expert_names(i, e)
        out = swiglu(h2[rows], P[g], P[u], P[dn])
        y = y.index_add(0, rows, w[rows, slots].unsqueeze(-1) * out)
    if cfg.G:  # Grove: adjugate j once per token with any of its K experts in group j
        S = cfg.E // cfg.G
        for j in range(cfg.G):
            in_group = (idx // S) == j                                    # [N, K]
            rows = in_group.any(-1).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            gw = (w * in_group).sum(-1)[rows]                             # [n_j] summed gate weights
            out = swiglu(h2[rows], *(P[n] for n in cfg.adjugate_names(i, j)))
            y = y.index_add(0, rows, cfg.grove_scale * gw.unsqueeze(-1) * out)
    if cfg.Fs:
        q = f"model.layers.{i}.mlp.shared_expert."
        ys = swiglu(h2, P[q + "gate_proj.weight"], P[q + "up_proj.weight"], P[q + "down_proj.weight"])
        if cfg.routing == "xft":
            ys = (1 - psel[:, :1]) * ys                          # [N, 1] * [N, d]
        elif cfg.shared_gate:
            ys = torch.sigmoid(h2 @ P[f"model.layers.{i}.mlp.shared_expert_gate.weight"].T) * ys  # [N, 1] * [N, d]
        y = y + ys
    return y, dict(router_logits=z, probs=prob, topk_idx=idx, topk_weight=w, counts=counts)


def forward(P, cfg, tokens):
    """tokens: LongTensor [B, T]. Returns (logits [B, T, V], list of per-layer routing dicts;
    empty for dense). Token rows of the router tensors are in [B, T] row-major order."""
    B, T = tokens.shape
    cos, sin = rope_cos_sin(T, cfg.hd, cfg.theta, dtype=P["model.norm.weight"].dtype)
    x = P["model.embed_tokens.weight"][tokens]
    routing = []
    for i in range(cfg.L):
        p = f"model.layers.{i}."
        h = rmsnorm(x, P[p + "input_layernorm.weight"], cfg.eps)
        x = x + attention(h, P, p, cfg, cos, sin)
        h = rmsnorm(x, P[p + "post_attention_layernorm.weight"], cfg.eps)
        if cfg.moe:
            y, info = moe_ffn(h.reshape(B * T, cfg.d), P, i, cfg)
            x = x + y.view(B, T, cfg.d)
            routing.append(info)
        else:
            x = x + swiglu(h, P[p + "mlp.gate_proj.weight"], P[p + "mlp.up_proj.weight"],
                           P[p + "mlp.down_proj.weight"])
    x = rmsnorm(x, P["model.norm.weight"], cfg.eps)
    head = P["model.embed_tokens.weight"] if cfg.tied else P["lm_head.weight"]
    return x @ head.T, routing


def aux_loss(routing, cfg, aux_type, B, T):
    """Unweighted load-balancing loss (docs/METHODS.md 1.2). Counts/masks are constants."""
    zero = torch.zeros((), dtype=torch.float64)
    if not routing or aux_type == "none":
        return zero
    E, K = cfg.E, cfg.K
    if aux_type == "switch":
        tot = zero
        for r in routing:
            N = r["probs"].shape[0]
            f = r["counts"].to(torch.float64) / (N * K)
            tot = tot + E * (f * r["probs"].mean(0)).sum()
        return tot
    if aux_type == "seq":
        tot = zero
        for r in routing:
            prob = r["probs"].view(B, T, E)
            idx = r["topk_idx"].view(B, T, K)
            onehot = torch.nn.functional.one_hot(idx, E).to(torch.float64)   # [B,T,K,E]
            f = onehot.sum((1, 2)) / (T * K)                                   # [B, E]
            Pm = prob.mean(1)                                                   # [B, E]
            tot = tot + (E * (f * Pm).sum(-1)).mean()
        return tot
    if aux_type == "pooled":
        # HF transformers MixtralForCausalLM load_balancing_loss_func (no attention mask)
        z = torch.cat([r["router_logits"] for r in routing], 0)                # [L*N, E]
        prob = torch.softmax(z, dim=-1)
        idx = torch.cat([r["topk_idx"] for r in routing], 0)                   # [L*N, K]
        mask = torch.nn.functional.one_hot(idx, E).to(torch.float64)           # [L*N, K, E]
        tokens_per_expert = mask.mean(0)                                        # [K, E]
        Pm = prob.mean(0)                                                       # [E]
        return E * (tokens_per_expert * Pm.unsqueeze(0)).sum()
    raise ValueError(f"unknown aux_type {aux_type}")


def z_loss(routing):
    tot = torch.zeros((), dtype=torch.float64)
    for r in routing:
        tot = tot + (torch.logsumexp(r["router_logits"], dim=-1) ** 2).mean()
    return tot


def beta_cdf(x, a, b, terms=120):
    """CDF of Beta(a, b) at x (a tensor in (0, 1)), differentiable in x by autograd (its
    derivative is the Beta density). Computed from the hypergeometric series
    I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * sum_n [(a+b)_n / (a+1)_n] x^n, whose terms are all
    positive, on x <= 1/2, and from I_x(a, b) = 1 - I_{1-x}(b, a) above: so the series
    never runs at a ratio above 1/2 (120 terms: error below 2^-120 of the sum). A different
    method from the C++ continued fraction, on purpose."""
    def series(y, a, b):
        lognorm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
        n = torch.arange(terms, dtype=y.dtype)
        # log of (a+b)_n / (a+1)_n, the coefficient of y^n
        logc = torch.cat([torch.zeros(1, dtype=y.dtype),
                          torch.cumsum(torch.log((a + b + n[:-1]) / (a + 1 + n[:-1])), 0)])
        s = (torch.exp(logc) * y.unsqueeze(-1) ** n).sum(-1)
        return torch.exp(a * torch.log(y) + b * torch.log1p(-y) + lognorm) / a * s
    low = x <= 0.5
    xl = torch.where(low, x, torch.full_like(x, 0.25))        # the branch not taken stays finite
    xh = torch.where(low, torch.full_like(x, 0.75), x)
    return torch.where(low, series(xl, a, b), 1 - series(1 - xh, b, a))


def dpsl_loss(routing, cfg, alpha, distance="sq", ecdf="mid"):
    """Dirichlet-prior shaping loss (docs/METHODS.md 1.6), unweighted. Per layer and expert
    i: the N probabilities p_{t,i} of the micro-batch sorted ascending (stable: ties keep row
    order), F_i = CDF of Beta(alpha_i, A - alpha_i), A = sum(alpha), u_r = (r - 1/2)/N (mid)
    or r/N (right); D = (F_i(p_(r)) - u_r)^2 (sq) or |.| (abs); mean over r, mean over the
    experts, summed over layers. alpha: one value for every expert or a list of E."""
    tot = torch.zeros((), dtype=torch.float64)
    if not routing:
        return tot
    E = cfg.E
    al = [float(alpha[0])] * E if len(alpha) == 1 else [float(a) for a in alpha]
    assert len(al) == E, "alpha: one value or one per expert"
    A = sum(al)
    for r in routing:
        p = r["probs"]                                             # [N, E]
        N = p.shape[0]
        q = torch.sort(p, dim=0, stable=True).values               # each column ascending
        rank = torch.arange(1, N + 1, dtype=torch.float64)
        u = (rank - 0.5) / N if ecdf == "mid" else rank / N
        for i in range(E):
            d = beta_cdf(q[:, i], al[i], A - al[i]) - u
            tot = tot + (d * d if distance == "sq" else d.abs()).mean() / E
    return tot


def compute_losses(P, cfg, inputs, targets, aux_type="none", aux_coef=0.0, z_coef=0.0, dpsl=None):
    """Returns dict: loss (weighted total), ce, aux, z, dpsl (unweighted), logits, routing.
    dpsl: None (off) or dict(coef, alpha (list), distance, ecdf) (see dpsl_loss)."""
    B, T = inputs.shape
    logits, routing = forward(P, cfg, inputs)
    logp = torch.log_softmax(logits.reshape(B * T, cfg.V), dim=-1)
    ce = -logp.gather(1, targets.reshape(B * T, 1)).mean()
    aux = aux_loss(routing, cfg, aux_type, B, T)
    zl = z_loss(routing)
    dl = torch.zeros((), dtype=torch.float64)
    if dpsl is not None:
        dl = dpsl_loss(routing, cfg, dpsl["alpha"], dpsl["distance"], dpsl["ecdf"])
        loss = ce + aux_coef * aux + dpsl["coef"] * dl + z_coef * zl
    else:
        loss = ce + aux_coef * aux + z_coef * zl
    return dict(loss=loss, ce=ce, aux=aux, z=zl, dpsl=dl, logits=logits, routing=routing)


# ----------------------------------------------------------------------------------------
# AdamW (as the C++ trainer does it)

class AdamW:
    """Global-norm clip (multiply by clip/norm when norm > clip, no epsilon), then
    m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; mhat = m/(1-b1^t); vhat = v/(1-b2^t);
    p -= lr * (mhat / (sqrt(vhat) + eps) + wd_p * p), wd_p = weight_decay for 2-D tensors,
    0 for 1-D. t starts at 1. Both terms use p before the update."""

    def __init__(self, params, lr, beta1, beta2, eps, weight_decay, grad_clip, frozen=()):
        self.frozen = set(frozen)  # stored, never updated (the Nexus router's Emb and R)
        self.lr, self.b1, self.b2, self.eps = lr, beta1, beta2, eps
        self.wd, self.clip = weight_decay, grad_clip
        self.m = {n: torch.zeros_like(p) for n, p in params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in params.items()}
        self.t = 0

    @torch.no_grad()
    def step(self, params, grads):
        """Updates params in place. Returns the global gradient norm before clipping."""
        self.t += 1
        names = sorted(params)
        norm = math.sqrt(sum(float((grads[n] ** 2).sum()) for n in names))
        scale = self.clip / norm if (self.clip > 0 and norm > self.clip) else 1.0
        bc1 = 1.0 - self.b1 ** self.t
        bc2 = 1.0 - self.b2 ** self.t
        for n in names:
            if n in self.frozen:
                continue
            p, g = params[n], grads[n] * scale
            self.m[n].mul_(self.b1).add_((1 - self.b1) * g)
            self.v[n].mul_(self.b2).add_((1 - self.b2) * g * g)
            mhat = self.m[n] / bc1
            vhat = self.v[n] / bc2
            wd = self.wd if p.dim() == 2 else 0.0
            p.sub_(self.lr * (mhat / (vhat.sqrt() + self.eps) + wd * p))
        return norm


# ----------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description="Float64 reference forward of a Llama/Mixtral "
                                 "checkpoint directory (config.json + model.safetensors).")
    ap.add_argument("ckpt", help="checkpoint directory")
    ap.add_argument("--tokens", required=True,
                    help="comma-separated token ids; inputs = tokens[:-1], targets = tokens[1:]")
    ap.add_argument("--aux-type", default=None, choices=["none", "switch", "pooled", "seq"],
                    help="load-balancing loss kind (MoE; default switch)")
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--z-coef", type=float, default=0.001)
    args = ap.parse_args(argv)
    cfg, P = load_checkpoint(args.ckpt)
    toks = [int(t) for t in args.tokens.split(",") if t.strip() != ""]
    if len(toks) < 2:
        sys.exit("need at least 2 tokens")
    if max(toks) >= cfg.V or min(toks) < 0:
        sys.exit(f"token id out of range [0, {cfg.V})")
    t = torch.tensor(toks, dtype=torch.long)
    inputs, targets = t[:-1].unsqueeze(0), t[1:].unsqueeze(0)
    aux_type = args.aux_type or ("switch" if cfg.moe else "none")
    with torch.no_grad():
        r = compute_losses(P, cfg, inputs, targets, aux_type, args.aux_coef, args.z_coef)
    lg = r["logits"][0]
    kind = f"MoE E={cfg.E} K={cfg.K} {cfg.routing}" if cfg.moe else "dense"
    print(f"model: {kind}, V={cfg.V} d={cfg.d} L={cfg.L} H={cfg.H} Hkv={cfg.Hkv} "
          f"F={cfg.F} tied={cfg.tied}, params={sum(p.numel() for p in P.values())}")
    print(f"logits [{lg.shape[0]}, {lg.shape[1]}]: mean {lg.mean().item():.9g} "
          f"std {lg.std().item():.9g} min {lg.min().item():.9g} max {lg.max().item():.9g}")
    for ti in range(lg.shape[0]):
        top = torch.topk(lg[ti], min(3, cfg.V))
        s = " ".join(f"{int(i)}:{v:.6f}" for v, i in zip(top.values.tolist(), top.indices))
        print(f"  pos {ti}: first logits {lg[ti, :4].tolist()} top3 {s}")
    print(f"ce   {r['ce'].item():.12g}")
    if cfg.moe:
        print(f"aux  {r['aux'].item():.12g} ({aux_type}, coef {args.aux_coef})")
        print(f"z    {r['z'].item():.12g} (coef {args.z_coef})")
        for i, info in enumerate(r["routing"]):
            print(f"  layer {i} expert counts {info['counts'].tolist()}")
    print(f"loss {r['loss'].item():.12g}")


if __name__ == "__main__":
    main()
