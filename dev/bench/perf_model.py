#!/usr/bin/env python3
"""The GPU trainer's performance model: per kernel at the bench config, the FLOPs, the bytes
it moves, its roofline time on an H200 and its predicted share of the step, before any
measurement (docs/perf.md "Performance model"), then the memory-bound kernels' bytes per token
and share of the HBM bandwidth (docs/perf.md "Memory-bound kernels"). Prints markdown.

Roofline time of a kernel = max(FLOPs / compute peak, bytes / memory bandwidth), with the
measured-style ceilings of an H200: bf16 dense GEMM ~790 TFLOP/s (what cuBLAS reaches on
large GEMMs, not the 989 spec), ~4.3 TB/s copy bandwidth, fp32 CUDA-core FMA 67 TFLOP/s
(for the attention kernels as they are today: no tensor cores).

Bytes are the minimum a kernel must move (read its inputs, write its outputs once, bf16
activations, fp32 master weights / gradients / moments); FLOPs count a multiply-add as 2.
The model is a lower bound: real kernels reach 60-80% of the roofline when large, less when
small (the per-expert GEMMs) or launch-bound.

Usage: python3 dev/bench/perf_model.py [--batch 8 --seq 1024 --vocab 16384]
"""
import argparse

PEAK_TC = 790e12      # bf16 tensor-core GEMM, TFLOP/s as measured on dense GEMMs
PEAK_FP32 = 67e12     # fp32 CUDA cores (FMA), H100/H200 SXM spec
BW = 4.3e12           # HBM copy bandwidth, bytes/s
SPEC = 989e12         # the MFU denominator (bf16 dense spec)
A = 2                 # bytes per bf16 activation


def rows_for(d=768, L=12, H=12, hd=64, F=3072, V=16384, B=8, T=1024, E=0, K=0, Fe=None):
    """[(name, flops, bytes, peak)] for one training step (forward + backward + optimizer)."""
    N = B * T
    q = H * hd
    Fe = Fe or F
    r = []

    def gemm(name, m, n, k, count=1):
        # forward m x n = (m x k)(k x n); backward: dX (m x k) and dW (k x n), same FLOPs each
        f = 2 * m * n * k
        by = A * (m * k + k * n + m * n)
        r.append((name + " fwd", count * f, count * by, PEAK_TC))
        r.append((name + " bwd", count * 2 * f, count * 2 * by + count * 2 * k * n, PEAK_TC))  # + fp32 dW

    def elem(name, bytes_, flops=0, peak=PEAK_FP32):
        r.append((name, flops, bytes_, peak))

    P_layer_attn = 4 * d * q  # wq, wk, wv, wo (no GQA at the bench shape)
    # one layer's kernels; multiplied by L below
    elem("rmsnorm (attn) fwd+bwd", A * N * d * 2 + A * N * d * 3)
    gemm("qkv matmul", N, 3 * q, d)
    elem("rope fwd+bwd", A * N * 2 * q * 2)
    # causal attention: QK^T and PV, half the T x T tiles; backward is 2.5x the forward
    att_f = 2 * 2 * B * H * T * T * hd / 2
    att_b_tc = att_f * 2.5
    io_f = A * N * (3 * q + q)          # q, k, v in; out (+ lse) out
    io_b = A * N * (3 * q + q + q + 3 * q)  # q k v o do in; dq dk dv out
    r.append(("attention fwd (FA2 on tensor cores)", att_f, io_f, PEAK_TC))
    r.append(("attention bwd (FA2 on tensor cores)", att_b_tc, io_b, PEAK_TC))
    gemm("attn out matmul", N, d, q)
    elem("residual + rmsnorm (ffn) fwd+bwd", A * N * d * 3 + A * N * d * 4)
    if E == 0:
        gemm("ffn gate+up matmul", N, 2 * F, d)
        elem("swiglu fwd+bwd", A * N * F * 3 + A * N * F * 5)
        gemm("ffn down matmul", N, d, F)
    else:
        NK = N * K
        r.append(("router matmul fwd+bwd (fp32)", 3 * 2 * N * d * E, 4 * (N * d * 3 + N * E * 3), PEAK_FP32))
        elem("router softmax/top-K/losses", 4 * N * E * 4)
        elem("permute (gather) fwd+bwd", A * NK * d * 4)
        gemm("expert gate+up matmul (grouped)", NK, 2 * Fe, d)
        elem("swiglu fwd+bwd", A * NK * Fe * 3 + A * NK * Fe * 5)
        gemm("expert down matmul (grouped)", NK, d, Fe)
        elem("combine (weighted unpermute) fwd+bwd", A * (NK * d * 2 + N * d) + A * (NK * d * 3 + N * d))
    per_layer = [(n, f * L, b * L, p) for (n, f, b, p) in r]
    r = []
    elem("embedding fwd+bwd", A * N * d * 2 + 4 * N * d)
    elem("final rmsnorm fwd+bwd", A * N * d * 5)
    gemm("lm head matmul", N, V, d)
    elem("cross-entropy fwd+bwd (fused)", A * N * V * 2)
    tail = r
    # optimizer: params P; fp32 master, grad, m, v read; master, m, v, bf16 copy written
    P_layer = P_layer_attn + 2 * d + (3 * d * F if E == 0 else E * 3 * d * Fe + E * d)
    P = L * P_layer + V * d * 2 + d
    opt = [("adamw (fp32 state, bf16 copy)", 10 * P, P * (4 * 4 + 4 * 3 + 2), PEAK_FP32),
           ("global grad norm", 2 * P, 4 * P, PEAK_FP32)]
    return per_layer + tail + opt, P, N


def active_flops_per_token(d, L, H, hd, F, V, T, E, K, Fe):
    q = H * hd
    n_attn = d * q * 4
    n_ffn = 3 * d * F if E == 0 else K * 3 * d * (Fe or F) + d * E
    n_active = L * (n_attn + n_ffn) + V * d
    return 6 * n_active + 6 * L * T * q


def table(name, **cfg):
    rows, P, N = rows_for(**cfg)
    times = [(n, f, b, max(f / pk, b / BW), "compute" if f / pk >= b / BW else "memory") for (n, f, b, pk) in rows]
    total = sum(t for (_, _, _, t, _) in times)
    fpt = active_flops_per_token(cfg.get("d", 768), cfg.get("L", 12), cfg.get("H", 12), cfg.get("hd", 64),
                                 cfg.get("F", 3072), cfg.get("V", 16384), cfg.get("T", 1024), cfg.get("E", 0),
                                 cfg.get("K", 0), cfg.get("Fe"))
    out = [f"### {name}: {P / 1e6:.0f}M parameters, {N} tokens per step", "",
           "| kernel (whole step) | GFLOP | MB moved | bytes/token | bound | roofline ms | share |",
           "|---|---:|---:|---:|---|---:|---:|"]
    for n, f, b, t, bound in times:
        out.append(f"| {n} | {f / 1e9:.1f} | {b / 1e6:.1f} | {b / N:.0f} | {bound} | {t * 1e3:.3f} | {100 * t / total:.1f}% |")
    tok_s = N / total
    opt = sum(t for (n, _, _, t, _) in times if n.startswith(("adamw", "global")))
    acc = 4  # gradient accumulation: the optimizer once per 4 micro-batches (32k tokens)
    tok_s_acc = acc * N / (acc * (total - opt) + opt)
    out += ["", f"Roofline step: **{total * 1e3:.2f} ms**, {tok_s / 1e3:.0f}k tokens/s; model FLOPs per token "
            f"{fpt / 1e9:.2f} GFLOP, so the roofline MFU is {100 * fpt * tok_s / SPEC:.0f}% of the 989 TFLOP/s "
            f"spec ({100 * fpt * tok_s / PEAK_TC:.0f}% of the 790 measured GEMM peak). With --grad-accum {acc} "
            f"({acc * N} tokens per optimizer step) the optimizer's {opt * 1e3:.2f} ms is paid once per {acc} "
            f"micro-batches: {tok_s_acc / 1e3:.0f}k tokens/s, roofline MFU {100 * fpt * tok_s_acc / SPEC:.0f}% of spec.", ""]
    return "\n".join(out), total


def elementwise_table(name, **cfg):
    """The memory-bound kernels of one step (everything but the tensor-core GEMMs and
    attention): bytes per token, and the share of the HBM bandwidth each takes when the whole
    step runs at its roofline time (bytes / 4.3 TB/s over the roofline step). A model of the
    minimum traffic, not a measurement."""
    rows, P, N = rows_for(**cfg)
    total = sum(max(f / pk, b / BW) for (_, f, b, pk) in rows)
    B, T, E = cfg.get("B", 8), cfg.get("T", 1024), cfg.get("E", 0)
    L = cfg.get("L", 12)
    mem = [(n, b) for (n, f, b, pk) in rows if pk == PEAK_FP32]
    # the step's small device-side kernels of issue 12 (no host round trip): the CE sum, the
    # balancing-loss coefficients, the non-finite flag, the clip factor; and the all-gathered
    # statistics' copies to pinned host memory (PCIe, not HBM, but listed for completeness)
    if E:
        mem.append(("router_aux_coef (G [B, E] per layer, from the counts)", L * (B * E * 4 * (L + 1) + B * E * 4)))
    mem.append(("loss_sum + note_non_finite + adamw_scalars", N * 4 + (1 + L * B * (E + 1)) * 8 * 2 + 64))
    out = [f"### {name}: memory-bound kernels, {N} tokens per step (model)", "",
           "| kernel (whole step) | bytes/token | MB per step | ms at 4.3 TB/s | share of HBM bandwidth over the roofline step |",
           "|---|---:|---:|---:|---:|"]
    tot_b = 0
    for n, b in mem:
        tot_b += b
        out.append(f"| {n} | {b / N:.0f} | {b / 1e6:.2f} | {b / BW * 1e3:.3f} | {100 * b / BW / total:.2f}% |")
    out += [f"| **all of these** | {tot_b / N:.0f} | {tot_b / 1e6:.1f} | {tot_b / BW * 1e3:.3f} | "
            f"{100 * tot_b / BW / total:.1f}% |", "",
            f"(roofline step {total * 1e3:.2f} ms; AdamW moves 30 bytes per parameter: fp32 p, g, m, v read, p, m, v "
            f"written, the bf16 copy written; the norm 4; {P / 1e6:.0f}M parameters)", ""]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=16384)
    a = ap.parse_args()
    base = dict(B=a.batch, T=a.seq, V=a.vocab)
    parts = []
    dense, td = table("dense d768", **base)
    moe, tm = table("MoE 8x top-2, F_e 3072 (full width)", E=8, K=2, **base)
    eq, te = table("MoE 8x top-2, F_e 1536 (equal active FLOPs)", E=8, K=2, Fe=1536, **base)
    print(dense); print(moe); print(eq)
    print(f"Predicted MoE (equal active FLOPs) step / dense step: {te / td:.2f} (goal <= 1.10).")
    # what attention costs as it is today: fp32 CUDA cores, rows re-read per key/query
    rows, _, N = rows_for(**base)
    att = [r for r in rows if r[0].startswith("attention")]
    today = sum(f / PEAK_FP32 for (_, f, _, _) in att) / 0.5  # half the fp32 peak at best: shared-memory bound
    print(f"Attention today (fp32 CUDA cores, at best half their 67 TFLOP/s): >= {today * 1e3:.1f} ms per step, "
          f"against {sum(max(f / PEAK_TC, b / BW) for (_, f, b, _) in att) * 1e3:.1f} ms on tensor cores.")
    print()
    print(elementwise_table("dense d768", **base))
    print(elementwise_table("MoE 8x top-2, F_e 1536 (equal active FLOPs)", E=8, K=2, Fe=1536, **base))


if __name__ == "__main__":
    main()
