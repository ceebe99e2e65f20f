#!/usr/bin/env python3
"""PyTorch baseline of the same model, for side-by-side throughput with ./train_moe_gpu --bench.

Same shapes as the trainer's d768 preset (Llama/Mixtral-style decoder: RMSNorm, RoPE,
causal GQA attention through F.scaled_dot_product_attention, SwiGLU FFN or top-K MoE of
SwiGLU experts with a per-expert loop, untied LM head), bf16 autocast with fp32 master
weights, fused AdamW. Synthetic uniform tokens. Prints one line in the same form as the
C++ bench: ms/step, tok/s, MFU (same FLOP count as docs/perf.md) and peak GPU memory.

  python3 dev/bench/torch_baseline.py                      # dense, eager
  python3 dev/bench/torch_baseline.py --experts 8 --topk 2 --compile
  (dev/bench/bench.sh runs it beside the trainer's rows: --grad-accum 4, --measured-peak)

Status: never run on a GPU. `--device cpu` smoke-runs it on a small size (done 2026-11-30 with
Debian's PyTorch 1.13 CPU build, dense and MoE: it runs, and on uniform random tokens the loss
stays at ln(vocab) as it must).
"""
import argparse
import sys
import math
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError as e:  # --help works without PyTorch; anything else says what to install
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(print(__doc__))
    sys.exit(f"torch_baseline.py: {e}: it needs torch: apt-get install python3-torch (it brings numpy), then run it with /usr/bin/python3")



def causal_attention(q, k, v):
    """Fused attention where PyTorch has it (2.0+); written out otherwise (e.g. Debian's 1.13,
    for the --device cpu smoke run: slower, so not a baseline)."""
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T = q.shape[-2]
    att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return att.softmax(dim=-1) @ v

class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.w


def rope(x, cos, sin):  # x [B, H, T, hd], HF rotate-half
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class SwiGLU(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate = nn.Linear(d, f, bias=False)
        self.up = nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    def __init__(self, d, f, E, K):
        super().__init__()
        self.router = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([SwiGLU(d, f) for _ in range(E)])
        self.K = K

    def forward(self, x):
        B, T, d = x.shape
        h = x.reshape(-1, d)
        p = torch.softmax(self.router(h).float(), dim=-1)
        w, idx = torch.topk(p, self.K, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            out.index_add_(0, tok, expert(h[tok]) * w[tok, slot, None])
        return out.view(B, T, d)


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        d, self.H, self.Hkv, self.hd = a.d, a.heads, a.kv_heads, a.d // a.heads
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.q = nn.Linear(d, self.H * self.hd, bias=False)
        self.k = nn.Linear(d, self.Hkv * self.hd, bias=False)
        self.v = nn.Linear(d, self.Hkv * self.hd, bias=False)
        self.o = nn.Linear(self.H * self.hd, d, bias=False)
        f = a.expert_width if a.experts and a.expert_width else a.ffn
        self.ffn = MoE(d, f, a.experts, a.topk) if a.experts else SwiGLU(d, f)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.n1(x)
        q = self.q(h).view(B, T, self.H, self.hd).transpose(1, 2)
        k = self.k(h).view(B, T, self.Hkv, self.hd).transpose(1, 2)
        v = self.v(h).view(B, T, self.Hkv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if self.Hkv != self.H:
            k = k.repeat_interleave(self.H // self.Hkv, dim=1)
            v = v.repeat_interleave(self.H // self.Hkv, dim=1)
        y = causal_attention(q, k, v)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, -1))
        return x + self.ffn(self.n2(x))


class Model(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.emb = nn.Embedding(a.vocab, a.d)
        self.blocks = nn.ModuleList([Block(a) for _ in range(a.layers)])
        self.norm = RMSNorm(a.d)
        self.head = nn.Linear(a.d, a.vocab, bias=False)
        hd = a.d // a.heads
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).double() / hd))
        ang = torch.arange(a.seq).double()[:, None] * inv[None, :]
        ang = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, tgt):
        T = idx.shape[1]
        cos, sin = self.cos[:T].to(torch.bfloat16), self.sin[:T].to(torch.bfloat16)
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x, cos, sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tgt.view(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--experts", type=int, default=0)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--expert-width", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--measured-peak", type=float, default=0,
                    help="TFLOP/s: also report the MFU over this (bench_gpu --gemm-peak's result)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a smoke run of the script itself at a small size (no meaningful speed)")
    a = ap.parse_args()

    torch.manual_seed(0)
    dev = a.device
    gpu = dev == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("torch_baseline.py: no CUDA device visible to PyTorch (--device cpu for a smoke run)")
    model = Model(a).to(dev)
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if gpu else {}))
    fwd = torch.compile(model) if a.compile else model

    def step():
        for _ in range(a.grad_accum):
            idx = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
            tgt = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = fwd(idx, tgt)
            (loss / a.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup):
        step()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    sync()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(a.steps):
        loss = step()
    sync()
    dt = (time.time() - t0) / a.steps

    # FLOPs as docs/perf.md: 6 N_active + 6 L T (H hd) per token; N_active without the input embedding
    hd = a.d // a.heads
    f = a.expert_width if a.experts and a.expert_width else a.ffn
    attn = a.d * (a.heads * hd) * 2 + a.d * (a.kv_heads * hd) * 2 + 2 * a.d
    ffn = (a.topk if a.experts else 1) * 3 * a.d * f + (a.experts * a.d if a.experts else 0)
    n_active = a.layers * (attn + ffn) + a.d + a.vocab * a.d
    tokens = a.batch * a.seq * a.grad_accum
    flops = (6 * n_active + 6 * a.layers * a.seq * a.heads * hd) * tokens
    name = torch.cuda.get_device_name() if gpu else "cpu"
    # the same table as train_moe.cu device_peak_flops (H100 NVL is 835, not the SXM 989)
    peak = (756e12 if ("H100" in name and "PCIe" in name) else 835e12 if ("H100" in name and "NVL" in name)
            else 989e12 if ("H100" in name or "H200" in name) else 312e12 if "A100" in name else 0)
    mfu = f"{100 * flops / dt / peak:.1f}%" if peak else "n/a (unknown device)"
    mfu_gemm = f"{100 * flops / dt / (a.measured_peak * 1e12):.1f}%" if a.measured_peak > 0 else "n/a"
    if not hasattr(F, "scaled_dot_product_attention"):
        print(f"note: PyTorch {torch.__version__} has no fused attention: written-out attention, not a fair baseline")
    print(f"torch{' compile' if a.compile else ' eager'}: {'MoE' if a.experts else 'dense'} | {a.steps} steps of "
          f"{tokens} tokens | {dt * 1e3:.1f} ms/step | {tokens / dt:.0f} tok/s | MFU {mfu} | MFU of GEMM peak {mfu_gemm} | "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30 if gpu else float('nan'):.2f} GiB | last loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
