/*
train_moe.cpp: the CPU reference trainer. Dense (Llama) and Mixture-of-Experts (Mixtral, Qwen2-MoE)
language models, trained in fp32 with plain loops and OpenMP.

This is the readable version of the project: every layer's forward and backward sit side by
side, in model order, as free functions in the style of llm.c; the Model below strings them
together, and common/run.h runs the training loop around it (the GPU trainer, train_moe.cu,
runs the same loop around its own model). The tests hold both trainers to the PyTorch
reference in dev/reference/.

The model (N = B*T tokens, d = hidden size):
  x = embed[tokens]                                  [N, d]
  per layer:
    x = x + o_proj(attention(rope(q(rmsnorm(x))), rope(k(..)), v(..)))
    x = x + ffn(rmsnorm(x))          ffn = SwiGLU, or a top-K mixture of SwiGLU experts
                                     [+ a shared SwiGLU expert, optionally sigmoid-gated,
                                        or weighted 1 - p(1) by XFT's routing]
                                     [or + Grove adjugate experts: one small SwiGLU per
                                      group of experts, run once per token per active group]
  logits = lm_head(rmsnorm(x))                       [N, V]
  loss = CE + aux_coef * load_balancing [+ dpsl_coef * dpsl] + z_coef * router_z
                                                              (common/router_losses.h)

Names other files use (the tests, upcycle.cu and the dev/cuda programs include this file):
  real                            float, or double when built with -DTRAIN_MOE_DOUBLE
  layers, forward and backward    encoder_, rmsnorm_, matmul_, rope_, attention_, swiglu_,
                                  ffn_ (a whole SwiGLU FFN), crossentropy_; residual_forward
  MoE layer                       router_forward/_backward, moe_permute, moe_gather_forward/
                                  _backward, moe_combine_forward/_backward, router_stats,
                                  router_losses_backward; shared expert: shared_gate_forward/
                                  _backward, xft_shared_forward/_backward (its FFN is ffn_); Grove: grove_permute,
                                  grove_gather_forward/_backward, grove_combine_forward/
                                  _backward, grove_weights_backward
  optimizer                       global_norm, adamw_update
  Model                           load, init_scratch, forward, backward, forward_backward,
                                  zero_grad, step; cfg, layout, params, grads, m, v, acts
                                  (LayerActs per layer), logits, router_loss, expert_bias
Define TRAIN_MOE_NO_MAIN before including it to use it as a library (no main()).
*/
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "common/cli.h"            // defines: Cli
#include "common/model.h"          // defines: ModelConfig, ParamLayout (HF tensor names), init_from_scratch, load_model_dir
#include "common/router_losses.h"  // defines: the router losses' values and gradients, Losses, RouterLossSettings
#include "common/run.h"            // defines: run_training (and evaluate, sample_text), AdamWSettings, checkpoints, logging
#include "common/train_args.h"     // defines: TrainArgs (the shared command line)
#include "common/util.h"           // defines: Error, FAIL, strfmt

#ifdef TRAIN_MOE_DOUBLE
typedef double real;
#else
typedef float real;
#endif

// ----------------------------------------------------------------------------
// Small helpers

// exp for the softmaxes and the sigmoid: exp_real(x) = e^x, rounded to real. In double
// builds (TRAIN_MOE_DOUBLE) it is std::exp. For float it is written out here, rather than
// a call to libm's expf, because a loop of calls cannot vectorize: with the exps of the
// cross-entropy, attention, router and SwiGLU computed 8 or 16 at a time, a tiny-preset step
// is ~15% faster (docs/perf.md, CPU trainer). It computes in double and rounds once, so its
// float result is the correctly rounded e^x except where e^x lies within ~1e-14 of a
// rounding boundary (test_cpu compares it with expl over 23M floats; libm's expf differs
// from the correctly rounded value for about 1 float in 13000):
//   e^x = 2^n e^r,  n = round(x / ln 2),  r = x - n ln 2 in [-ln2/2, ln2/2]
//   e^r by its Taylor series to r^11 (truncation error below 1e-14, relative)
//   2^n from bits: n + 1023 in a double's exponent field
// n is read from the low bits of x / ln 2 + 1.5 * 2^52 (that addition rounds x / ln 2 to an
// integer), so no float-to-int conversion runs, and a NaN input gives NaN. The two clamps are
// comparisons that gcc turns into vector min/max only with -fno-trapping-math (Makefile).
static inline float exp_real(float xf) {
    double x = xf;
    x = std::max(x, -104.0);  // e^-104 < 2^-150: every float result below here is 0
    x = std::min(x, 89.0);    // e^89 > FLT_MAX: every float result above here is +inf
    const double shift = 0x1.8p52;
    const double kd = x * 1.4426950408889634 + shift;  // 1.5 * 2^52 + n
    const double n = kd - shift;
    const double r = x - n * 0.6931471805599453;
    double p = 1.0 / 39916800;  // 1/11!, then Horner down to 1/0!
    p = p * r + 1.0 / 3628800;
    p = p * r + 1.0 / 362880;
    p = p * r + 1.0 / 40320;
    p = p * r + 1.0 / 5040;
    p = p * r + 1.0 / 720;
    p = p * r + 1.0 / 120;
    p = p * r + 1.0 / 24;
    p = p * r + 1.0 / 6;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    uint64_t bits;
    memcpy(&bits, &kd, sizeof bits);  // the low bits hold n, two's complement
    bits = (bits + 1023) << 52;       // n + 1023 in the exponent field, a zero fraction
    double two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return (float)(p * two_n);
}
static inline double exp_real(double x) { return std::exp(x); }
// Dot product with 8 independent partial sums: the compiler can vectorize it without
// -ffast-math, and the result does not depend on the number of threads.
static inline real dot(const real* a, const real* b, int n) {
    real s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
    real r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}
static inline void axpy(real* y, real a, const real* x, int n) {  // y += a x
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}
// max of x[0 .. n): 16 running maxima, so that the compiler can vectorize it (a maximum is
// exact, so the order does not change it)
static inline real max_of(const real* x, int n) {
    if (n < 16) return *std::max_element(x, x + n);
    real m[16];
    for (int j = 0; j < 16; j++) m[j] = x[j];
    int i = 16;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) m[j] = std::max(m[j], x[i + j]);
    for (; i < n; i++) m[0] = std::max(m[0], x[i]);
    return *std::max_element(m, m + 16);
}

// ----------------------------------------------------------------------------
// Layers: forward and backward side by side. Backward functions ACCUMULATE (+=) into the
// gradients of their inputs and weights, so shared inputs (q, k and v all read the same
// normalized x) need no extra bookkeeping. Every parallel loop gives each thread whole
// output rows: no two threads ever add into the same number, so results are bit-identical
// whatever the thread count.

// x[n] = wte[token[n]]
void encoder_forward(real* out, const int* tokens, const real* wte, int N, int d) {
    for (int n = 0; n < N; n++)
        for (int i = 0; i < d; i++) out[n * d + i] = wte[(size_t)tokens[n] * d + i];
}
void encoder_backward(real* dwte, const real* dout, const int* tokens, int N, int d) {
    for (int n = 0; n < N; n++) axpy(dwte + (size_t)tokens[n] * d, 1, dout + n * d, d);
}

// out = x / sqrt(mean(x^2) + eps) * w, per row. rstd[n] is kept for the backward pass.
void rmsnorm_forward(real* out, real* rstd, const real* x, const real* w, int N, int d, real eps) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const real* xr = x + (size_t)n * d;
        real ms = dot(xr, xr, d) / d;
        real r = 1 / std::sqrt(ms + eps);
        rstd[n] = r;
        for (int i = 0; i < d; i++) out[(size_t)n * d + i] = xr[i] * r * w[i];
    }
}
// y_i = w_i x_i r, r = (mean x^2 + eps)^-1/2  =>  dx_i = r (w_i dy_i - x_i r^2 mean_j(w_j dy_j x_j))
void rmsnorm_backward(real* dx, real* dw, const real* dout, const real* x, const real* w, const real* rstd, int N,
                      int d) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const real* xr = x + (size_t)n * d;
        const real* dy = dout + (size_t)n * d;
        real r = rstd[n], s = 0;
        for (int i = 0; i < d; i++) s += w[i] * dy[i] * xr[i];
        s = s * r * r / d;
        for (int i = 0; i < d; i++) dx[(size_t)n * d + i] += r * (w[i] * dy[i] - xr[i] * s);
    }
    for (int i = 0; i < d; i++) {  // columns summed in row order: deterministic
        real s = 0;
        for (int n = 0; n < N; n++) s += dout[(size_t)n * d + i] * x[(size_t)n * d + i] * rstd[n];
        dw[i] += s;
    }
}

// ---- Matrix multiplication: where nearly all of the time goes ----
// Three products per linear layer, on row-major matrices with the Hugging Face [out, in]
// weight layout, all computed by ONE kernel, matmul_accumulate (out += A @ B):
//   forward      out [N, OC]  = inp [N, C] @ w^T [C, OC]        (B read transposed)
//   backward     dinp [N, C] += dout [N, OC] @ w [OC, C]
//                dw [OC, C]  += dout^T [OC, N] @ inp [N, C]      (dout transposed first)
// Speed comes from three things:
//   register tile    a 4 x 16 block of outputs stays in registers for the whole sum (gcc keeps
//                    it as four 16-wide AVX-512 registers), so each number loaded from A is
//                    used 16 times and each number of B 4 times, not once;
//   cache blocks     k and the columns go in blocks of 256; each block of B is first copied
//                    ("packed") into a contiguous 256 KB buffer that stays in L2, rows 1 KB
//                    apart instead of a whole matrix row apart (fewer cache sets and TLB
//                    pages), and each tile's slice of A stays in L1;
//   vector lanes     the innermost loop runs over 16 adjacent columns with constant bounds,
//                    which gcc -O3 -march=native turns into fused multiply-adds.
// Summation order: every output is out + sum over k, four k at a time,
// ((a0 b0 + a1 b1) + a2 b2) + a3 b3, then one k at a time for the last K % 4; the same for
// every output, tile, cache block and thread count. OpenMP hands whole output tiles to
// threads: no two threads add into the same number, so results are bit-identical whatever
// the thread count.

// out[0 .. RM, 0 .. CW] += A[0 .. RM, 0 .. K] @ B[0 .. K, 0 .. CW]; row strides ldo, lda, ldb.
template <int RM, int CW>
static inline void matmul_tile(real* out, int ldo, const real* A, int lda, const real* B, int ldb, int K) {
    real acc[RM][CW];
    for (int r = 0; r < RM; r++)
        for (int c = 0; c < CW; c++) acc[r][c] = out[(size_t)r * ldo + c];
    int k = 0;
    for (; k + 4 <= K; k += 4) {
        const real* b0 = B + (size_t)k * ldb;
        const real *b1 = b0 + ldb, *b2 = b1 + ldb, *b3 = b2 + ldb;
        for (int r = 0; r < RM; r++) {
            const real* ar = A + (size_t)r * lda + k;
            const real a0 = ar[0], a1 = ar[1], a2 = ar[2], a3 = ar[3];
            for (int c = 0; c < CW; c++) acc[r][c] += a0 * b0[c] + a1 * b1[c] + a2 * b2[c] + a3 * b3[c];
        }
    }
    for (; k < K; k++) {
        const real* bk = B + (size_t)k * ldb;
        for (int r = 0; r < RM; r++) {
            const real ak = A[(size_t)r * lda + k];
            for (int c = 0; c < CW; c++) acc[r][c] += ak * bk[c];
        }
    }
    for (int r = 0; r < RM; r++)
        for (int c = 0; c < CW; c++) out[(size_t)r * ldo + c] = acc[r][c];
}

// scratch buffers, one set per thread (thread_local: OpenMP threads each get their own)
static real* matmul_scratch(int which, size_t n) {
    static thread_local std::vector<real> s[2];
    if (s[which].size() < n) s[which].resize(n);
    return s[which].data();
}

// out[M, C] += A[M, K] @ B[K, C]: the one matmul kernel. A and out row-major; B row-major
// [K, C], or, with b_transposed, given as its transpose [C, K] (the forward's weight).
// Work is split into tasks of one block of CB = 256 columns and a range of 4-row tiles; a
// task runs k in chunks of KC = 256 (a multiple of 4, so the groups of four and hence the
// sums are those of one pass: the accumulators just go through `out` between chunks),
// packing its [KC, CB] block of B into its own scratch first (unless B is at most CB wide and
// not transposed: then its rows are the block's rows already), then running its tiles across
// it in stripes of 16 columns. Tasks share no writes, so one parallel loop (no barrier
// inside) does it all; how many tasks there are changes no sum.
void matmul_accumulate(real* out, const real* A, const real* B, int M, int K, int C, bool b_transposed = false) {
    const int TM = 4, TC = 16;     // register tile
    const int KC = 256, CB = 256;  // cache block of B
    const int i_tiles = (M + TM - 1) / TM, c_blocks = (C + CB - 1) / CB;
#ifdef _OPENMP
    const int i_groups = std::min(i_tiles, omp_get_max_threads());  // row ranges per column block
#else
    const int i_groups = 1;
#endif
#pragma omp parallel for schedule(static)
    for (int task = 0; task < c_blocks * i_groups; task++) {
        const int cb = task / i_groups, g = task % i_groups;
        const int it_begin = (int)((long)i_tiles * g / i_groups), it_end = (int)((long)i_tiles * (g + 1) / i_groups);
        const int c_start = cb * CB, cw = std::min(CB, C - c_start);
        real* p = matmul_scratch(0, (size_t)KC * CB);  // this thread's packed block of B
        for (int k0 = 0; k0 < K; k0 += KC) {
            const int kn = std::min(KC, K - k0);
            const real* pb = p;  // the block of B the tiles read: [kn, cw], rows cw apart
            if (!b_transposed && cw == C)  // B's rows are the block's rows already: no copy
                pb = B + (size_t)k0 * C;
            else if (!b_transposed)  // p[k, c] = B[k0 + k, c_start + c]
                for (int k = 0; k < kn; k++)
                    for (int c = 0; c < cw; c++) p[(size_t)k * cw + c] = B[(size_t)(k0 + k) * C + c_start + c];
            else  // B(k, c) = B[c * K + k]: a transposing copy, in 16 x 16 squares so that both
                  // the 16 rows read and the 16 rows written stay in L1 (written a whole column
                  // at a time, rows 1 KB apart, p's lines evicted one another and the copy cost
                  // as much as the tiny shape's products)
                for (int c1 = 0; c1 < cw; c1 += 16)
                    for (int k1 = 0; k1 < kn; k1 += 16)
                        for (int c = c1; c < std::min(cw, c1 + 16); c++)
                            for (int k = k1; k < std::min(kn, k1 + 16); k++)
                                p[(size_t)k * cw + c] = B[(size_t)(c_start + c) * K + k0 + k];
            for (int it = it_begin; it < it_end; it++) {
                const int i0 = it * TM, rows = std::min(TM, M - i0);
                const real* a = A + (size_t)i0 * K + k0;   // A[i0.., k0..]
                real* o = out + (size_t)i0 * C + c_start;  // out[i0.., c_start..]
                int c = 0;
                for (; c + TC <= cw; c += TC) {
                    if (rows == TM) matmul_tile<TM, TC>(o + c, C, a, K, pb + c, cw, kn);
                    else for (int r = 0; r < rows; r++) matmul_tile<1, TC>(o + (size_t)r * C + c, C, a + (size_t)r * K, K, pb + c, cw, kn);
                }
                for (; c < cw; c++)  // the last C % 16 columns, one at a time
                    for (int r = 0; r < rows; r++) matmul_tile<1, 1>(o + (size_t)r * C + c, C, a + (size_t)r * K, K, pb + c, cw, kn);
            }
        }
    }
}

// out[N, OC] = inp[N, C] @ w[OC, C]^T   (Hugging Face [out, in] weight layout)
void matmul_forward(real* out, const real* inp, const real* w, int N, int C, int OC) {
    std::fill(out, out + (size_t)N * OC, (real)0);
    matmul_accumulate(out, inp, w, N, C, OC, /*b_transposed=*/true);
}

// dst [cols, rows] = src [rows, cols]^T, in 16 x 16 blocks (both sides' lines stay in L1),
// each block written along dst's rows: written down dst's columns, 16 lines a long row apart
// (8 KB for dw [V, d]) fell into one cache set and evicted one another (10x slower)
static void transpose(real* dst, const real* src, int rows, int cols) {
#pragma omp parallel for schedule(static)
    for (int r0 = 0; r0 < rows; r0 += 16)
        for (int c0 = 0; c0 < cols; c0 += 16)
            for (int c = c0; c < std::min(cols, c0 + 16); c++)
                for (int r = r0; r < std::min(rows, r0 + 16); r++) dst[(size_t)c * rows + r] = src[(size_t)r * cols + c];
}

// dinp += dout @ w;  dw += dout^T @ inp   (either may be null)
// The kernel reads A by rows, so dw's product needs a transposed copy first: of dout [N, OC],
// or, where that is the larger copy, of inp [N, C] and of dw itself, taking the product the
// other way round, dw^T += inp^T @ dout (at the tiny shape the LM head's dlogits [N, V] is
// 4 times inp [N, d] and dw [V, d] together). Both give every element of dw the same sum,
// term for term: a product of two numbers does not depend on their order.
void matmul_backward(real* dinp, real* dw, const real* dout, const real* inp, const real* w, int N, int C, int OC) {
    if (dinp) matmul_accumulate(dinp, dout, w, N, OC, C);
    if (!dw) return;
    if ((size_t)N * OC <= (size_t)N * C + 2 * (size_t)OC * C) {
        real* dout_t = matmul_scratch(1, (size_t)N * OC);  // [OC, N]
        transpose(dout_t, dout, N, OC);
        matmul_accumulate(dw, dout_t, inp, OC, N, C);
    } else {
        real* inp_t = matmul_scratch(1, (size_t)N * C + (size_t)OC * C);  // [C, N], then dw^T [C, OC]
        real* dw_t = inp_t + (size_t)N * C;
        transpose(inp_t, inp, N, C);
        transpose(dw_t, dw, OC, C);
        matmul_accumulate(dw_t, inp_t, dout, C, N, OC);
        transpose(dw, dw_t, C, OC);
    }
}

// RoPE, Hugging Face "rotate half" convention: within each head the pair (i, i + hd/2) is
// rotated by angle pos * inv_freq[i]. x[N, nh * hd] in place; pos = n % T.
void rope_forward(real* x, const real* cosb, const real* sinb, int N, int T, int nh, int hd) {
    int h2 = hd / 2;
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const real* c = cosb + (size_t)(n % T) * h2;
        const real* s = sinb + (size_t)(n % T) * h2;
        for (int h = 0; h < nh; h++) {
            real* v = x + (size_t)n * nh * hd + h * hd;
            for (int i = 0; i < h2; i++) {
                real a = v[i], b = v[i + h2];
                v[i] = a * c[i] - b * s[i];
                v[i + h2] = b * c[i] + a * s[i];
            }
        }
    }
}
// the rotation is orthogonal: its backward is the rotation by -angle, also in place
void rope_backward(real* dx, const real* cosb, const real* sinb, int N, int T, int nh, int hd) {
    int h2 = hd / 2;
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const real* c = cosb + (size_t)(n % T) * h2;
        const real* s = sinb + (size_t)(n % T) * h2;
        for (int h = 0; h < nh; h++) {
            real* v = dx + (size_t)n * nh * hd + h * hd;
            for (int i = 0; i < h2; i++) {
                real a = v[i], b = v[i + h2];
                v[i] = a * c[i] + b * s[i];
                v[i + h2] = b * c[i] - a * s[i];
            }
        }
    }
}

// RoPE at explicit positions (decoding with a KV cache: row n sits at position pos[n]);
// the same arithmetic as rope_forward
void rope_forward_at(real* x, const real* cosb, const real* sinb, const int* pos, int N, int nh, int hd) {
    int h2 = hd / 2;
    for (int n = 0; n < N; n++) {
        const real* c = cosb + (size_t)pos[n] * h2;
        const real* s = sinb + (size_t)pos[n] * h2;
        for (int h = 0; h < nh; h++) {
            real* v = x + (size_t)n * nh * hd + h * hd;
            for (int i = 0; i < h2; i++) {
                real a = v[i], b = v[i + h2];
                v[i] = a * c[i] - b * s[i];
                v[i + h2] = b * c[i] + a * s[i];
            }
        }
    }
}

// Causal self-attention with grouped-query heads: query head h reads kv head h / (H/Hkv).
// q [N, H*hd], k and v [N, Hkv*hd], out [N, H*hd], att [B, H, T, T] softmax probabilities
// (row t holds weights for keys 0..t; the rest is unused).
void attention_forward(real* out, real* att, const real* q, const real* k, const real* v, int B, int T, int H,
                       int Hkv, int hd) {
    int group = H / Hkv, qd = H * hd, kvd = Hkv * hd;
    real scale = 1 / std::sqrt((real)hd);
#pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            int kh = h / group;
            for (int t = 0; t < T; t++) {
                const real* qt = q + (size_t)(b * T + t) * qd + h * hd;
                real* p = att + (((size_t)b * H + h) * T + t) * T;
                real mx = -INFINITY;
                for (int j = 0; j <= t; j++) {
                    p[j] = dot(qt, k + (size_t)(b * T + j) * kvd + kh * hd, hd) * scale;
                    if (p[j] > mx) mx = p[j];
                }
                real sum = 0;  // summed after the exps, in their own loop (as crossentropy_forward)
                for (int j = 0; j <= t; j++) p[j] = exp_real(p[j] - mx);
                for (int j = 0; j <= t; j++) sum += p[j];
                for (int j = 0; j <= t; j++) p[j] /= sum;
                real* o = out + (size_t)(b * T + t) * qd + h * hd;
                for (int i = 0; i < hd; i++) o[i] = 0;
            }
            // o_t = sum_j p_tj v_j, j in order, with the keys in the outer loop: one after the
            // other, the additions into one short o_t row each waited for the last one's store
            for (int j = 0; j < T; j++)
                for (int t = j; t < T; t++)
                    axpy(out + (size_t)(b * T + t) * qd + h * hd, att[(((size_t)b * H + h) * T + t) * T + j],
                         v + (size_t)(b * T + j) * kvd + kh * hd, hd);
        }
}
// dp_j = dout . v_j;  ds_j = p_j (dp_j - sum_i p_i dp_i);  dq += scale ds_j k_j;
// dk_j += scale ds_j q;  dv_j += p_j dout. Parallel over (b, kv head): the heads of a group
// all add into the same dk/dv rows, so they run in one thread, in order.
void attention_backward(real* dq, real* dk, real* dv, const real* dout, const real* att, const real* q,
                        const real* k, const real* v, int B, int T, int H, int Hkv, int hd) {
    int group = H / Hkv, qd = H * hd, kvd = Hkv * hd;
    real scale = 1 / std::sqrt((real)hd);
#pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int kh = 0; kh < Hkv; kh++) {
            std::vector<real> dp(T);
            for (int h = kh * group; h < (kh + 1) * group; h++)
                for (int t = 0; t < T; t++) {
                    const real* p = att + (((size_t)b * H + h) * T + t) * T;
                    const real* dot_ = dout + (size_t)(b * T + t) * qd + h * hd;
                    const real* qt = q + (size_t)(b * T + t) * qd + h * hd;
                    real* dqt = dq + (size_t)(b * T + t) * qd + h * hd;
                    real pdp = 0;
                    for (int j = 0; j <= t; j++) {
                        dp[j] = dot(dot_, v + (size_t)(b * T + j) * kvd + kh * hd, hd);
                        pdp += p[j] * dp[j];
                    }
                    for (int j = 0; j <= t; j++) {
                        real ds = p[j] * (dp[j] - pdp) * scale;
                        axpy(dqt, ds, k + (size_t)(b * T + j) * kvd + kh * hd, hd);
                        axpy(dk + (size_t)(b * T + j) * kvd + kh * hd, ds, qt, hd);
                        axpy(dv + (size_t)(b * T + j) * kvd + kh * hd, p[j], dot_, hd);
                    }
                }
        }
}

// Attention of n new tokens per sequence over a KV cache (decoding): sequence b's keys and
// values for positions 0 .. pos[b] + n - 1 are in kc / vc [rows, T_max, Hkv*hd] at cache row
// row0 + b (the new tokens' already written); its query t sits at position pos[b] + t and
// sees keys 0 .. pos[b] + t. The arithmetic of attention_forward, key by key in the same
// order, so cached decoding gives the full forward's numbers. q, out [B*n, H*hd].
void attention_forward_cached(real* out, const real* q, const real* kc, const real* vc, const int* pos, int row0, int B,
                              int n, int T_max, int H, int Hkv, int hd) {
    int group = H / Hkv, qd = H * hd, kvd = Hkv * hd;
    real scale = 1 / std::sqrt((real)hd);
#pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            int kh = h / group;
            const real* K = kc + (size_t)(row0 + b) * T_max * kvd + kh * hd;
            const real* V = vc + (size_t)(row0 + b) * T_max * kvd + kh * hd;
            std::vector<real> p(pos[b] + n);
            for (int t = 0; t < n; t++) {
                const int P = pos[b] + t;  // this query's position
                const real* qt = q + (size_t)(b * n + t) * qd + h * hd;
                real mx = -INFINITY;
                for (int j = 0; j <= P; j++) {
                    p[j] = dot(qt, K + (size_t)j * kvd, hd) * scale;
                    if (p[j] > mx) mx = p[j];
                }
                real sum = 0;
                for (int j = 0; j <= P; j++) { p[j] = exp_real(p[j] - mx); sum += p[j]; }
                for (int j = 0; j <= P; j++) p[j] /= sum;
                real* o = out + (size_t)(b * n + t) * qd + h * hd;
                for (int i = 0; i < hd; i++) o[i] = 0;
                for (int j = 0; j <= P; j++) axpy(o, p[j], V + (size_t)j * kvd, hd);
            }
        }
}

// SwiGLU: out = silu(g) * u, silu(g) = g * sigmoid(g). sig = sigmoid(g) is kept for the
// backward: recomputing it there cost an exp per element, and the backward's loop is then
// pure arithmetic that vectorizes.
void swiglu_forward(real* out, real* sig, const real* g, const real* u, size_t n) {
#pragma omp parallel for
    for (long i = 0; i < (long)n; i++) sig[i] = exp_real(-g[i]);
#pragma omp parallel for
    for (long i = 0; i < (long)n; i++) {
        real sg = 1 / (1 + sig[i]);
        sig[i] = sg;
        out[i] = g[i] * sg * u[i];
    }
}
// d silu(g)/dg = s (1 + g (1 - s))
void swiglu_backward(real* dg, real* du, const real* dout, const real* g, const real* u, const real* sig, size_t n) {
#pragma omp parallel for
    for (long i = 0; i < (long)n; i++) {
        real sg = sig[i];
        dg[i] += dout[i] * u[i] * sg * (1 + g[i] * (1 - sg));
        du[i] += dout[i] * g[i] * sg;
    }
}

void residual_forward(real* out, const real* a, const real* b, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

// The SwiGLU FFN, down(silu(gate x) * up x): the dense model's FFN, and every expert on its
// own rows. x [N, d]; g, u, h, s [N, F] are kept for the backward (h = silu(g) * u,
// s = sigmoid(g)); out [N, d].
void ffn_forward(real* out, real* g, real* u, real* h, real* s, const real* x, const real* w_gate, const real* w_up,
                 const real* w_down, int N, int d, int F) {
    matmul_forward(g, x, w_gate, N, d, F);
    matmul_forward(u, x, w_up, N, d, F);
    swiglu_forward(h, s, g, u, (size_t)N * F);
    matmul_forward(out, h, w_down, N, F, d);
}
// dx and the weight gradients +=; dh, dg, du [N, F] are scratch
void ffn_backward(real* dx, real* dw_gate, real* dw_up, real* dw_down, const real* dout, const real* x, const real* g,
                  const real* u, const real* h, const real* s, const real* w_gate, const real* w_up,
                  const real* w_down, real* dh, real* dg, real* du, int N, int d, int F) {
    std::fill(dh, dh + (size_t)N * F, 0);
    std::fill(dg, dg + (size_t)N * F, 0);
    std::fill(du, du + (size_t)N * F, 0);
    matmul_backward(dh, dw_down, dout, h, w_down, N, F, d);
    swiglu_backward(dg, du, dh, g, u, s, (size_t)N * F);
    matmul_backward(dx, dw_gate, dg, x, w_gate, N, d, F);
    matmul_backward(dx, dw_up, du, x, w_up, N, d, F);
}

// ----------------------------------------------------------------------------
// The MoE layer, in the order a token goes through it (docs/METHODS.md 1.1):
//   router logits z = ln2 W_r^T                 matmul_forward           [N, E]
//   router_forward      probabilities, top-K experts and their gate weights
//   moe_permute         the N*K (token, slot) pairs sorted by expert: each expert's rows
//                       are one contiguous block
//   moe_gather_forward  xe [N*K, d]: the tokens' rows in that order
//   ffn_forward         each expert on its block of rows (a block may be empty)
//   moe_combine_forward out[n] = sum_k w[n,k] y[row of (n, k)]
// plus router_stats, the sums the router losses read (common/router_losses.h), and every
// backward beside its forward.

// router_forward: probabilities p = softmax(z) of the router logits z [N, E],
// top-K selection by z + bias (bias: aux-loss-free balancing, 0 otherwise; ties go to the
// lower expert index), and the gate weights of the selected experts:
//   topk_softmax: w_k = p_{e_k} / sum_k' p_{e_k'}   (sum to 1; Mixtral)
//   softmax_topk: w_k = p_{e_k}                      (no renormalization; Megatron pre-softmax)
//   xft:          w_k = p_{e_1} softmax_k(p_{e_1}, .., p_{e_K})   (XFT, METHODS 1.8: a softmax over
//                 the chosen PROBABILITIES, scaled to sum to p_{e_1}; the shared expert gets
//                 the rest, 1 - p_{e_1}: xft_shared_forward)
void router_forward(real* probs, int* topk, real* topw, const real* logits, const float* bias, int N, int E, int K,
                    Routing routing) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const real* z = logits + (size_t)n * E;
        real* p = probs + (size_t)n * E;
        real mx = z[0];
        for (int i = 1; i < E; i++) mx = std::max(mx, z[i]);
        real sum = 0;
        for (int i = 0; i < E; i++) { p[i] = exp_real(z[i] - mx); sum += p[i]; }
        for (int i = 0; i < E; i++) p[i] /= sum;
        // selection: K rounds of "largest score not yet taken"; strict > keeps the lower index on ties
        int* sel = topk + (size_t)n * K;
        for (int k = 0; k < K; k++) {
            int best = -1;
            real best_s = 0;
            for (int i = 0; i < E; i++) {
                bool taken = false;
                for (int j = 0; j < k; j++) taken |= sel[j] == i;
                if (taken) continue;
                real s = z[i] + (bias ? (real)bias[i] : 0);
                if (best < 0 || s > best_s) { best = i; best_s = s; }
            }
            sel[k] = best;
        }
        real* w = topw + (size_t)n * K;
        if (routing == ROUTING_XFT) {  // softmax over the K probabilities (each in [0, 1]: no max shift needed)
            real esum = 0;
            for (int k = 0; k < K; k++) { w[k] = exp_real(p[sel[k]]); esum += w[k]; }
            for (int k = 0; k < K; k++) w[k] = p[sel[0]] * (w[k] / esum);
            continue;
        }
        real wsum = 0;
        for (int k = 0; k < K; k++) wsum += p[sel[k]];
        for (int k = 0; k < K; k++) w[k] = routing == ROUTING_TOPK_SOFTMAX ? p[sel[k]] / wsum : p[sel[k]];
    }
}
// dlogits += d(gate weights)/dz given dtopw [N, K].
//   softmax_topk: w_k = p_{e_k}            => dz_j = sum_k dw_k p_{e_k} (delta_{j,e_k} - p_j)
//   topk_softmax: w = softmax over the selected logits only
//                                          => dz_{e_k} = w_k (dw_k - sum_k' w_k' dw_k'), others 0
//   xft: with q_k = p_{e_k}, s = softmax(q), w_k = q_1 s_k and the shared weight c = 1 - q_1
//        (dshared [N] = dLoss/dc; nullptr for the other routings), gbar = sum_k s_k dw_k:
//        dq_k = w_k (dw_k - gbar) + delta_{k,1} (gbar - dshared),
//        then through p = softmax(z) as softmax_topk: dz_j = sum_k dq_k p_{e_k} (delta_{j,e_k} - p_j)
void router_backward(real* dlogits, const real* dtopw, const real* probs, const int* topk, const real* topw, int N,
                     int E, int K, Routing routing, const real* dshared = nullptr) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        real* dz = dlogits + (size_t)n * E;
        const real* p = probs + (size_t)n * E;
        const real* w = topw + (size_t)n * K;
        const real* dw = dtopw + (size_t)n * K;
        const int* sel = topk + (size_t)n * K;
        if (routing == ROUTING_TOPK_SOFTMAX) {
            real s = 0;
            for (int k = 0; k < K; k++) s += w[k] * dw[k];
            for (int k = 0; k < K; k++) dz[sel[k]] += w[k] * (dw[k] - s);
        } else if (routing == ROUTING_XFT) {
            const real q1 = p[sel[0]];
            real gbar = 0;  // sum_k s_k dw_k, s_k = w_k / q_1
            for (int k = 0; k < K; k++) gbar += w[k] * dw[k];
            gbar /= q1;
            real s = 0;  // sum_k dq_k p_{e_k}
            for (int k = 0; k < K; k++) {
                real dq = w[k] * (dw[k] - gbar) + (k == 0 ? gbar - dshared[n] : 0);
                dz[sel[k]] += dq * p[sel[k]];
                s += dq * p[sel[k]];
            }
            for (int j = 0; j < E; j++) dz[j] -= s * p[j];
        } else {
            real s = 0;  // sum_k dw_k p_{e_k}
            for (int k = 0; k < K; k++) s += dw[k] * p[sel[k]];
            for (int k = 0; k < K; k++) dz[sel[k]] += dw[k] * p[sel[k]];
            for (int j = 0; j < E; j++) dz[j] -= s * p[j];
        }
    }
}

// Counting sort of the N*K (token, slot) pairs p = n*K + k by expert: deterministic and
// dropless. It is stable (an expert's pairs keep increasing p), so every sum over rows that
// follows is in a fixed order. Outputs: counts [E]; seq_counts [B, E], the assignments per
// sequence (the router losses' counts); offsets [E+1], expert e owns rows
// offsets[e]..offsets[e+1]; row_token [N*K], the token of each row; row_of [N*K], the row of
// each pair. No backward: integers carry no gradient.
void moe_permute(int* counts, int* seq_counts, int* offsets, int* row_token, int* row_of, const int* topk, int B, int T,
                 int E, int K) {
    const int N = B * T;
    std::fill(counts, counts + E, 0);
    std::fill(seq_counts, seq_counts + (size_t)B * E, 0);
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            int e = topk[n * K + k];
            counts[e]++;
            seq_counts[(n / T) * E + e]++;
        }
    offsets[0] = 0;
    for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
    std::vector<int> fill(offsets, offsets + E);
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            int r = fill[topk[n * K + k]]++;
            row_token[r] = n;
            row_of[n * K + k] = r;
        }
}

// xe[r] = x[row_token[r]]: each token's row once per chosen expert
void moe_gather_forward(real* xe, const real* x, const int* row_token, int NK, int d) {
    for (int r = 0; r < NK; r++)
        for (int i = 0; i < d; i++) xe[(size_t)r * d + i] = x[(size_t)row_token[r] * d + i];
}
// each token collects its K rows' gradients, slots in order: dx[n] += sum_k dxe[row_of[n,k]]
void moe_gather_backward(real* dx, const real* dxe, const int* row_of, int N, int K, int d) {
#pragma omp parallel for
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) axpy(dx + (size_t)n * d, 1, dxe + (size_t)row_of[n * K + k] * d, d);
}

// out[n] = sum_k w[n,k] ey[row_of[n,k]], slots summed in order
void moe_combine_forward(real* out, const real* ey, const real* topw, const int* row_of, int N, int K, int d) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        real* o = out + (size_t)n * d;
        for (int i = 0; i < d; i++) o[i] = 0;
        for (int k = 0; k < K; k++) axpy(o, topw[n * K + k], ey + (size_t)row_of[n * K + k] * d, d);
    }
}
// r = row_of[n,k]:  dtopw[n,k] = dout[n] . ey[r];  dey[r] = w[n,k] dout[n]
// (both written: every row belongs to exactly one pair)
void moe_combine_backward(real* dey, real* dtopw, const real* dout, const real* ey, const real* topw, const int* row_of,
                          int N, int K, int d) {
#pragma omp parallel for
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            int r = row_of[n * K + k];
            dtopw[n * K + k] = dot(dout + (size_t)n * d, ey + (size_t)r * d, d);
            for (int i = 0; i < d; i++) dey[(size_t)r * d + i] = topw[n * K + k] * dout[(size_t)n * d + i];
        }
}

// ---- Grove MoE adjugate experts (arXiv 2508.07785; docs/METHODS.md 1.10) ----
// The E experts form G groups of S = E/G consecutive experts; group j has one small SwiGLU
// adjugate expert A_j of width F_a. A token n runs A_j ONCE when any of its K experts is in
// group j, and adds  lambda * gw[n,j] * A_j(x[n]),  gw[n,j] = sum of the gate weights of its
// slots whose expert is in group j. The (token, active group) pairs are the "grove rows",
// laid out like the routed experts' rows: group by group, tokens in increasing order.

// Outputs: gcounts [G] rows per group; goffsets [G+1], group j owns rows goffsets[j]..
// goffsets[j+1]; grow_token [R] the token of each row; grow_w [R] its summed gate weight
// gw (slots summed in order); grow_of [N*K] the row of each (token, slot) pair (slots in the
// same group share one row). R = goffsets[G] <= N min(K, G). No backward for the integers;
// grow_w's gradient goes back to the slots through grove_weights_backward.
void grove_permute(int* gcounts, int* goffsets, int* grow_token, real* grow_w, int* grow_of, const int* topk,
                   const real* topw, int N, int K, int G, int S) {
    std::fill(gcounts, gcounts + G, 0);
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            const int j = topk[n * K + k] / S;
            bool first = true;  // the token's first slot in group j makes its row
            for (int k2 = 0; k2 < k; k2++) first &= topk[n * K + k2] / S != j;
            if (first) gcounts[j]++;
        }
    goffsets[0] = 0;
    for (int j = 0; j < G; j++) goffsets[j + 1] = goffsets[j] + gcounts[j];
    std::vector<int> fill(goffsets, goffsets + G);
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            const int j = topk[n * K + k] / S;
            int r = -1;
            for (int k2 = 0; k2 < k && r < 0; k2++)
                if (topk[n * K + k2] / S == j) r = grow_of[n * K + k2];
            if (r < 0) {  // a new row
                r = fill[j]++;
                grow_token[r] = n;
                grow_w[r] = 0;
            }
            grow_of[n * K + k] = r;
            grow_w[r] += topw[n * K + k];
        }
}
// is slot k the first of token n's slots in its group (the one that owns the row)?
static inline bool grove_first_slot(const int* grow_of, int n, int K, int k) {
    for (int k2 = 0; k2 < k; k2++)
        if (grow_of[n * K + k2] == grow_of[n * K + k]) return false;
    return true;
}
// xa[r] = x[grow_token[r]]
void grove_gather_forward(real* xa, const real* x, const int* grow_token, int R, int d) {
    for (int r = 0; r < R; r++)
        for (int i = 0; i < d; i++) xa[(size_t)r * d + i] = x[(size_t)grow_token[r] * d + i];
}
// dx[n] += sum over token n's rows of dxa[r] (rows in the order of their first slots)
void grove_gather_backward(real* dx, const real* dxa, const int* grow_of, int N, int K, int d) {
#pragma omp parallel for
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++)
            if (grove_first_slot(grow_of, n, K, k)) axpy(dx + (size_t)n * d, 1, dxa + (size_t)grow_of[n * K + k] * d, d);
}
// out[n] += lambda * gw[r] * ya[r] over token n's rows (in the order of their first slots)
void grove_combine_forward(real* out, const real* ya, const real* grow_w, const int* grow_of, real lambda, int N, int K,
                           int d) {
#pragma omp parallel for
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++)
            if (grove_first_slot(grow_of, n, K, k)) {
                const int r = grow_of[n * K + k];
                axpy(out + (size_t)n * d, lambda * grow_w[r], ya + (size_t)r * d, d);
            }
}
// n = grow_token[r]:  dgw[r] = lambda dout[n] . ya[r];  dya[r] = lambda gw[r] dout[n]  (both written)
void grove_combine_backward(real* dya, real* dgw, const real* dout, const real* ya, const real* grow_w,
                            const int* grow_token, real lambda, int R, int d) {
#pragma omp parallel for
    for (int r = 0; r < R; r++) {
        const real* dor = dout + (size_t)grow_token[r] * d;
        dgw[r] = lambda * dot(dor, ya + (size_t)r * d, d);
        for (int i = 0; i < d; i++) dya[(size_t)r * d + i] = lambda * grow_w[r] * dor[i];
    }
}
// gw[r] is a sum of its slots' gate weights: each of them gets dgw[r]. dtopw [N, K] +=
void grove_weights_backward(real* dtopw, const real* dgw, const int* grow_of, int NK) {
    for (int p = 0; p < NK; p++) dtopw[p] += dgw[grow_of[p]];
}

// ---- Shared expert (DeepSeekMoE, Qwen2-MoE; docs/METHODS.md 1.7) ----
// S always-on experts of width F_e are ONE SwiGLU FFN of width Fs = S F_e (ffn_forward above)
// that every token goes through beside the routed ones. Qwen2-MoE scales its output per token
// by a learned sigmoid gate; this is that gate:
//   z[n] = x[n] . w,  gate[n] = sigmoid(z[n]),  out[n] += gate[n] y[n]
// x [N, d] the MoE layer's input (ln2), w [d] (HF's Linear(d, 1) weight), y [N, d] the shared
// FFN's output; gate [N] is kept for the backward pass.
void shared_gate_forward(real* out, real* gate, const real* x, const real* w, const real* y, int N, int d) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        real g = 1 / (1 + exp_real(-dot(x + (size_t)n * d, w, d)));
        gate[n] = g;
        axpy(out + (size_t)n * d, g, y + (size_t)n * d, d);
    }
}
// dy[n] = gate[n] dout[n] (written); dz[n] = (dout[n] . y[n]) gate (1 - gate);
// dx[n] += dz[n] w; dw += sum_n dz[n] x[n] (rows in order: deterministic)
void shared_gate_backward(real* dx, real* dw, real* dy, const real* dout, const real* x, const real* w, const real* y,
                          const real* gate, int N, int d) {
    std::vector<real> dz(N);
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const real g = gate[n], *dor = dout + (size_t)n * d;
        dz[n] = dot(dor, y + (size_t)n * d, d) * g * (1 - g);
        for (int i = 0; i < d; i++) dy[(size_t)n * d + i] = g * dor[i];
        axpy(dx + (size_t)n * d, dz[n], w, d);
    }
    for (int n = 0; n < N; n++) axpy(dw, dz[n], x + (size_t)n * d, d);
}

// ----------------------------------------------------------------------------
// Router losses (docs/METHODS.md 1.2, 1.3): the formulas are in common/router_losses.h,
// shared with the GPU trainer; here are the two pieces that read this trainer's arrays.

// The statistics the losses read (RoutingStats in common/router_losses.h), one segment of
// `seg` rows at a time, in double: psum [N/seg, E] = sum of p over the segment's rows,
// zsum [N/seg] = sum of lse^2 (lse recomputed from the logits in double). The trainer uses
// seg = 1, so that the sums over rows are taken in router_losses.h, in row order.
void router_stats(double* psum, double* zsum, const real* probs, const real* logits, int N, int E, int seg) {
    for (int s = 0; s < N / seg; s++) {
        for (int i = 0; i < E; i++) psum[(size_t)s * E + i] = 0;
        zsum[s] = 0;
        for (int n = s * seg; n < (s + 1) * seg; n++) {
            for (int i = 0; i < E; i++) psum[(size_t)s * E + i] += probs[(size_t)n * E + i];
            const real* zz = logits + (size_t)n * E;
            double mx = zz[0], sum = 0;
            for (int i = 1; i < E; i++) mx = std::max(mx, (double)zz[i]);
            for (int i = 0; i < E; i++) sum += exp_real(zz[i] - mx);
            double lse = mx + std::log(sum);
            zsum[s] += lse * lse;
        }
    }
}

// dlogits [N, E] += scale * (aux_coef dAux/dz + row_coef dRow/dz + z_coef dZ/dz).
// G [B, E]: dAux/dp, one row per sequence (aux_dp_per_seq), or null for no aux term;
// Grow [N, E]: dL/dp of a loss with one value per row (dpsl_dp_rows), or null; each goes
// through the softmax as dz_j = p_j (G_j - sum_i p_i G_i). z-loss: z_loss_dlogit with lse
// in `real`.
void router_losses_backward(real* dlogits, const real* probs, const real* logits, const real* G, double aux_coef,
                            double z_coef, real scale, int B, int T, int E, const real* Grow = nullptr,
                            double row_coef = 0) {
    const int N = B * T;
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const real* p = probs + (size_t)n * E;
        real* dz = dlogits + (size_t)n * E;
        if (G) {
            const real* g = G + (size_t)(n / T) * E;
            real s = 0;
            for (int i = 0; i < E; i++) s += p[i] * g[i];
            for (int j = 0; j < E; j++) dz[j] += scale * (real)aux_coef * p[j] * (g[j] - s);
        }
        if (Grow) {
            const real* g = Grow + (size_t)n * E;
            real s = 0;
            for (int i = 0; i < E; i++) s += p[i] * g[i];
            for (int j = 0; j < E; j++) dz[j] += scale * (real)row_coef * p[j] * (g[j] - s);
        }
        if (z_coef != 0) {
            const real* zz = logits + (size_t)n * E;
            real mx = zz[0], s = 0;
            for (int i = 1; i < E; i++) mx = std::max(mx, zz[i]);
            for (int i = 0; i < E; i++) s += exp_real(zz[i] - mx);
            real lse = mx + std::log(s);
            for (int j = 0; j < E; j++) dz[j] += z_loss_dlogit(scale * (real)z_coef, lse, p[j], N);
        }
    }
}

// ----------------------------------------------------------------------------
// Cross-entropy over the vocabulary, fused with its backward: mean over the N tokens.
real crossentropy_forward(real* lse, const real* logits, const int* targets, int N, int V) {
    double loss = 0;
    std::vector<real> row_loss(N);
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const real* z = logits + (size_t)n * V;
        real mx = max_of(z, V);
        // sum of exp(z - mx) in index order; the exponentials 16 at a time, in a loop of their
        // own that vectorizes (a sum in order does not: each addition waits for the last)
        real s = 0;
        for (int i0 = 0; i0 < V; i0 += 16) {
            const int m = std::min(16, V - i0);
            real e[16];
            for (int j = 0; j < m; j++) e[j] = exp_real(z[i0 + j] - mx);
            for (int j = 0; j < m; j++) s += e[j];
        }
        lse[n] = mx + std::log(s);
        row_loss[n] = lse[n] - z[targets[n]];
    }
    for (int n = 0; n < N; n++) loss += row_loss[n];
    return (real)(loss / N);
}
// dlogits = scale * (softmax(z) - onehot(target))
void crossentropy_backward(real* dlogits, const real* logits, const real* lse, const int* targets, int N, int V,
                           real scale) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const real* z = logits + (size_t)n * V;
        real* dz = dlogits + (size_t)n * V;
        for (int i = 0; i < V; i++) dz[i] = scale * exp_real(z[i] - lse[n]);
        dz[targets[n]] -= scale;
    }
}

// ----------------------------------------------------------------------------
// Optimizer: global-norm clipping and AdamW (docs/ARCHITECTURE.md: decay on matrices only)

// sqrt(sum g^2) in double, in index order
double global_norm(const real* g, size_t n) {
    double sq = 0;
    for (size_t i = 0; i < n; i++) sq += (double)g[i] * g[i];
    return std::sqrt(sq);
}

// One tensor's AdamW update, n elements; st from adamw_step (clip factor, bias corrections):
//   g' = g clip;  m = b1 m + (1-b1) g';  v = b2 v + (1-b2) g'^2
//   p -= lr (m/bc1 / (sqrt(v/bc2) + eps) + wd p)
// gcc vectorizes this loop only under -fno-math-errno (the Makefile's flags): else every
// std::sqrt keeps a branch to the library call that would set errno.
void adamw_update(real* p, const real* g, real* m, real* v, long n, const AdamWSettings& hp, const AdamWStep& st,
                  double lr, double weight_decay) {
    real wd = (real)weight_decay;
#pragma omp parallel for
    for (long i = 0; i < n; i++) {
        real gi = g[i] * (real)st.clip;
        m[i] = (real)hp.beta1 * m[i] + (real)(1 - hp.beta1) * gi;
        v[i] = (real)hp.beta2 * v[i] + (real)(1 - hp.beta2) * gi * gi;
        real mhat = m[i] / (real)st.bc1, vhat = v[i] / (real)st.bc2;
        p[i] -= (real)lr * (mhat / (std::sqrt(vhat) + (real)hp.eps) + wd * p[i]);
    }
}

// XFT's shared-expert weight (METHODS 1.8): c[n] = 1 - p_{e_1}, what the routed weights
// (router_forward, xft: they add up to p_{e_1}) leave of 1; out[n] += c[n] y[n].
// probs [N, E], topk [N, K]; c [N] is kept for the backward pass.
void xft_shared_forward(real* out, real* c, const real* y, const real* probs, const int* topk, int N, int E, int K,
                        int d) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        c[n] = 1 - probs[(size_t)n * E + topk[(size_t)n * K]];
        axpy(out + (size_t)n * d, c[n], y + (size_t)n * d, d);
    }
}
// dy[n] = c[n] dout[n] (written); dc[n] = dout[n] . y[n] (written; router_backward takes it)
void xft_shared_backward(real* dy, real* dc, const real* dout, const real* y, const real* c, int N, int d) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const real* dor = dout + (size_t)n * d;
        dc[n] = dot(dor, y + (size_t)n * d, d);
        for (int i = 0; i < d; i++) dy[(size_t)n * d + i] = c[n] * dor[i];
    }
}

// ----------------------------------------------------------------------------
// The model: parameters (one flat buffer, HF tensor names via ParamLayout), gradients,
// AdamW moments, and the activations kept for the backward pass.

struct LayerActs {
    std::vector<real> x;               // [N, d] layer input (residual stream)
    std::vector<real> ln1, ln1_rstd;   // [N, d], [N]
    std::vector<real> q, k, v;         // [N, H*hd], [N, Hkv*hd] x2; q and k after RoPE
    std::vector<real> att;             // [B, H, T, T] attention probabilities
    std::vector<real> atty;            // [N, H*hd] attention output before o_proj
    std::vector<real> x_mid;           // [N, d] after the attention residual
    std::vector<real> ln2, ln2_rstd;   // [N, d], [N]
    std::vector<real> g, u, h, s;      // dense FFN: [N, F] gate, up, h = silu(gate)*up, s = sigmoid(gate)
    // MoE
    std::vector<real> rlogits, rprobs; // [N, E]
    std::vector<int> topk;             // [N, K] selected experts, best first
    std::vector<real> topw;            // [N, K] their gate weights
    std::vector<int> counts;           // [E] assignments per expert
    std::vector<int> seq_counts;       // [B, E] assignments per sequence and expert
    std::vector<int> offsets;          // [E+1] expert e owns permuted rows offsets[e]..offsets[e+1]
    std::vector<int> row_token;        // [N*K] token of each permuted row
    std::vector<int> row_of;           // [N*K] permuted row of (token n, slot k) = row_of[n*K + k]
    std::vector<real> xe;              // [N*K, d] tokens gathered in expert order
    std::vector<real> eg, eu, eh, es;  // [N*K, F] expert gate, up, h, sigmoid(gate)
    std::vector<real> ey;              // [N*K, d] expert outputs
    std::vector<double> psum, zsum;    // [N, E], [N]: the router losses' statistics (router_stats)
    // shared expert (cfg.shared_dim = Fs > 0)
    std::vector<real> sg, su, sh, ss;  // [N, Fs] its gate, up, h, sigmoid(gate)
    std::vector<real> sy;              // [N, d] its output before the sigmoid gate
    std::vector<real> sgate;           // [N] sigmoid(ln2 . w_gate) (shared_gate), or 1 - p_{e_1} (xft routing)
    // Grove adjugate experts (cfg.grove_groups = G > 0); R <= N*Kg rows, Kg = min(K, G)
    std::vector<int> gcounts, goffsets;  // [G], [G+1] rows per group and where they start
    std::vector<int> grow_token, grow_of;  // [N*Kg] token of each row, [N*K] row of each slot
    std::vector<real> grow_w;            // [N*Kg] each row's summed gate weight
    std::vector<real> xa;                // [N*Kg, d] tokens gathered in group order
    std::vector<real> ag, au, ah, as;    // [N*Kg, F_a] adjugate gate, up, h, sigmoid(gate)
    std::vector<real> ya;                // [N*Kg, d] adjugate outputs
};

// The keys and values of every layer for `rows` sequences of up to T_max positions, and the
// RoPE tables for those positions: what decoding token by token reuses instead of running the
// whole context again (Model::forward_cached).
struct KVCache {
    int rows = 0, T_max = 0;
    std::vector<std::vector<real>> k, v;  // [L][rows, T_max, Hkv*hd], after RoPE (k)
    std::vector<real> rope_cos, rope_sin; // [T_max, hd/2]
    void init(const ModelConfig& c, int rows_, int T_max_) {
        rows = rows_;
        T_max = T_max_;
        k.assign(c.n_layer, std::vector<real>((size_t)rows * T_max * c.kv_dim()));
        v.assign(c.n_layer, std::vector<real>((size_t)rows * T_max * c.kv_dim()));
        c.rope_tables(T_max, &rope_cos, &rope_sin);
    }
};

struct Model {
    using Cache = KVCache;  // decoding with a KV cache (forward_cached; common/run.h sample_text)
    ModelConfig cfg;
    ParamLayout layout;
    std::vector<real> params, grads, m, v;
    std::vector<std::vector<float>> expert_bias;  // [L][E], aux-loss-free balancing
    std::vector<std::vector<long>> step_load;     // [L][E] assignments since the last optimizer step
    RouterLossSettings router_loss;
    long adam_t = 0;  // optimizer steps taken

    // activations for up to B_max x T_max tokens
    int B_max = 0, T_max = 0, B = 0, T = 0;
    std::vector<LayerActs> acts;  // per layer
    std::vector<real> x_final, lnf, lnf_rstd, logits, lse, rope_cos, rope_sin;
    std::vector<int> inputs, targets;  // of the last forward pass
    bool have_targets = false;
    Losses last;
    // set by forward_cached for the forward pass it runs: attention reads and writes this cache
    KVCache* kv = nullptr;
    int kv_row0 = 0;
    std::vector<int> kv_pos;  // [B*T]: the position of each row
    // scratch of forward and backward (gradients of activations), sized with the activations
    // and kept: a fresh multi-MB std::vector per step cost page faults and zeroing, a tenth
    // of a tiny-preset step. Nothing in them outlives the call that fills them.
    struct Scratch {
        std::vector<real> tmp;                        // [N, d] a block's output (forward)
        std::vector<real> dlogits, dx, dln;           // [N, V], [N, d], [N, d]
        std::vector<real> dq, dk, dv, datty;          // [N, H*hd], [N, Hkv*hd] x2, [N, H*hd]
        std::vector<real> dg, du, dh;                 // FFN: [N, F] dense, [N*K, F] experts
        std::vector<real> dtopw, dey, dxe, drouter;   // MoE: [N, K], [N*K, d] x2, [N, E]
        std::vector<real> dsg, dsu, dsh, dsy;         // shared expert: [N, Fs] x3, [N, d]
        std::vector<real> dag, dau, dah, dya, dxa, dgw; // Grove: [N*Kg, F_a] x3, [N*Kg, d] x2, [N*Kg]
        std::vector<real> dsc;                        // xft routing: [N] dLoss/d(shared weight)
    } scratch;

    // ---- making, loading and saving (common/run.h calls these) ----
    bool training = true;  // false (generate): no gradients or AdamW moments are allocated
    void init_layout() {
        layout = build_layout(cfg);
        if (training) {
            grads.assign(layout.total, 0);
            m.assign(layout.total, 0);
            v.assign(layout.total, 0);
        }
        expert_bias.assign(cfg.n_layer, std::vector<float>(cfg.n_experts, 0.0f));
        step_load.assign(cfg.n_layer, std::vector<long>(cfg.n_experts, 0));
    }
    void init_scratch(const ModelConfig& c, uint64_t seed, float std = 0.02f) {
        cfg = c;
        init_layout();
        params.assign(layout.total, 0);
        init_from_scratch(cfg, layout, params.data(), seed, std);
    }
    void load(const std::string& dir) {
        ParamLayout loaded;
        load_model_dir(dir, &cfg, &loaded, &params);
        init_layout();
        read_bias_tensors(dir, cfg, &expert_bias);  // aux-free routing biases, if saved
    }
    void load_optimizer(const std::string& path) { adam_t = read_optimizer_file(path, layout, m.data(), v.data()); }
    void load_training_state(const std::string& dir, TrainerState& state, size_t n_domains, Json* settings) {
        ::load_training_state(dir, layout, m.data(), v.data(), &adam_t, state, n_domains, settings);
    }
    template <typename F>
    void with_host_state(F f) { f(params.data(), m.data(), v.data()); }
    std::string summary_note() const { return ""; }

    // weights and their gradients by (layer, kind) or by tensor index
    real* param(int layer, ParamKind kind) { return params.data() + layout.get(layer, kind).offset; }
    real* grad(int layer, ParamKind kind) { return grads.data() + layout.get(layer, kind).offset; }
    real* param(int idx) { return params.data() + layout.tensors[idx].offset; }
    real* grad(int idx) { return grads.data() + layout.tensors[idx].offset; }

    void alloc(int Bm, int Tm) {
        if (Bm <= B_max && Tm <= T_max) return;
        B_max = std::max(Bm, B_max);
        T_max = std::max(Tm, T_max);
        size_t N = (size_t)B_max * T_max, d = cfg.d_model, F = cfg.ffn_dim, E = cfg.n_experts, K = cfg.top_k;
        acts.assign(cfg.n_layer, LayerActs());
        for (auto& a : acts) {
            a.x.resize(N * d); a.ln1.resize(N * d); a.ln1_rstd.resize(N);
            a.q.resize(N * cfg.q_dim()); a.k.resize(N * cfg.kv_dim()); a.v.resize(N * cfg.kv_dim());
            a.att.resize((size_t)B_max * cfg.n_head * T_max * T_max);
            a.atty.resize(N * cfg.q_dim()); a.x_mid.resize(N * d); a.ln2.resize(N * d); a.ln2_rstd.resize(N);
            if (!cfg.is_moe()) {
                a.g.resize(N * F); a.u.resize(N * F); a.h.resize(N * F); a.s.resize(N * F);
            } else {
                a.rlogits.resize(N * E); a.rprobs.resize(N * E); a.topk.resize(N * K); a.topw.resize(N * K);
                a.counts.resize(E); a.seq_counts.resize(B_max * E); a.offsets.resize(E + 1);
                a.row_token.resize(N * K); a.row_of.resize(N * K);
                a.xe.resize(N * K * d); a.eg.resize(N * K * F); a.eu.resize(N * K * F); a.eh.resize(N * K * F); a.es.resize(N * K * F);
                a.ey.resize(N * K * d);
                if (cfg.has_shared()) {
                    const size_t Fs = cfg.shared_dim;
                    a.sg.resize(N * Fs); a.su.resize(N * Fs); a.sh.resize(N * Fs); a.ss.resize(N * Fs);
                    a.sy.resize(N * d); a.sgate.resize(N);
                }
                if (cfg.has_grove()) {
                    const size_t G = cfg.grove_groups, R = N * std::min(K, G), Fa = cfg.grove_dim;
                    a.gcounts.resize(G); a.goffsets.resize(G + 1); a.grow_token.resize(R); a.grow_of.resize(N * K);
                    a.grow_w.resize(R); a.xa.resize(R * d);
                    a.ag.resize(R * Fa); a.au.resize(R * Fa); a.ah.resize(R * Fa); a.as.resize(R * Fa);
                    a.ya.resize(R * d);
                }
                a.psum.resize(N * E); a.zsum.resize(N);
            }
        }
        x_final.resize(N * d); lnf.resize(N * d); lnf_rstd.resize(N);
        logits.resize(N * cfg.vocab_size); lse.resize(N); inputs.resize(N); targets.resize(N);
        const size_t ffn_rows = cfg.is_moe() ? N * K : N;
        Scratch& s = scratch;
        s.tmp.resize(N * d); s.dlogits.resize(N * cfg.vocab_size); s.dx.resize(N * d); s.dln.resize(N * d);
        s.dq.resize(N * cfg.q_dim()); s.dk.resize(N * cfg.kv_dim()); s.dv.resize(N * cfg.kv_dim());
        s.datty.resize(N * cfg.q_dim());
        s.dg.resize(ffn_rows * F); s.du.resize(ffn_rows * F); s.dh.resize(ffn_rows * F);
        if (cfg.is_moe()) { s.dtopw.resize(N * K); s.dey.resize(N * K * d); s.dxe.resize(N * K * d); s.drouter.resize(N * E); }
        if (cfg.has_shared()) {
            const size_t Fs = cfg.shared_dim;
            s.dsg.resize(N * Fs); s.dsu.resize(N * Fs); s.dsh.resize(N * Fs); s.dsy.resize(N * d); s.dsc.resize(N);
        }
        if (cfg.has_grove()) {
            const size_t R = N * std::min(K, (size_t)cfg.grove_groups), Fa = cfg.grove_dim;
            s.dag.resize(R * Fa); s.dau.resize(R * Fa); s.dah.resize(R * Fa);
            s.dya.resize(R * d); s.dxa.resize(R * d); s.dgw.resize(R);
        }
        cfg.rope_tables(T_max, &rope_cos, &rope_sin);  // [T_max, hd/2], computed in double once
    }

    // ---- MoE layer: route, permute tokens by expert, run each expert, combine; then the
    // Grove adjugate experts or the shared expert, if any ----
    // ln2 [N, d] -> out [N, d]
    void moe_forward(real* out, LayerActs& a, int l) {
        const int N = B * T, d = cfg.d_model, F = cfg.ffn_dim, E = cfg.n_experts, K = cfg.top_k;
        if (cfg.nexus_router)  // the router weight is derived: R [E, d] = Emb [E, d] P [d, d]
            nexus_router_forward(param(l, P_ROUTER), param(l, P_NEXUS_EMB), param(l, P_NEXUS_PROJ), E, d, d);
        matmul_forward(a.rlogits.data(), a.ln2.data(), param(l, P_ROUTER), N, d, E);
        router_forward(a.rprobs.data(), a.topk.data(), a.topw.data(), a.rlogits.data(),
                       router_loss.aux_free_rate > 0 ? expert_bias[l].data() : nullptr, N, E, K, cfg.routing);
        router_stats(a.psum.data(), a.zsum.data(), a.rprobs.data(), a.rlogits.data(), N, E, 1);
        moe_permute(a.counts.data(), a.seq_counts.data(), a.offsets.data(), a.row_token.data(), a.row_of.data(),
                    a.topk.data(), B, T, E, K);
        moe_gather_forward(a.xe.data(), a.ln2.data(), a.row_token.data(), N * K, d);
        for (int e = 0; e < E; e++) {  // expert e: a SwiGLU FFN over its block of rows r0 .. r0+ne
            size_t r0 = a.offsets[e];
            const auto& w = layout.experts[l][e];  // w1 (gate), w3 (up), w2 (down)
            ffn_forward(a.ey.data() + r0 * d, a.eg.data() + r0 * F, a.eu.data() + r0 * F, a.eh.data() + r0 * F,
                        a.es.data() + r0 * F, a.xe.data() + r0 * d, param(w[0]), param(w[1]), param(w[2]), a.counts[e], d, F);
        }
        moe_combine_forward(out, a.ey.data(), a.topw.data(), a.row_of.data(), N, K, d);
        for (int e = 0; e < E; e++) step_load[l][e] += a.counts[e];
        if (cfg.has_grove()) grove_forward(out, a, l);
        if (cfg.has_shared()) shared_forward(out, a, l);
    }
    // out [N, d] += lambda * sum over the token's active groups j of gw[n,j] * A_j(ln2[n])
    void grove_forward(real* out, LayerActs& a, int l) {
        const int N = B * T, d = cfg.d_model, K = cfg.top_k, G = cfg.grove_groups, Fa = cfg.grove_dim;
        grove_permute(a.gcounts.data(), a.goffsets.data(), a.grow_token.data(), a.grow_w.data(), a.grow_of.data(),
                      a.topk.data(), a.topw.data(), N, K, G, cfg.grove_group_size());
        grove_gather_forward(a.xa.data(), a.ln2.data(), a.grow_token.data(), a.goffsets[G], d);
        for (int j = 0; j < G; j++) {  // adjugate j: a SwiGLU FFN over its group's rows
            size_t r0 = a.goffsets[j];
            const auto& w = layout.adjugates[l][j];
            ffn_forward(a.ya.data() + r0 * d, a.ag.data() + r0 * Fa, a.au.data() + r0 * Fa, a.ah.data() + r0 * Fa,
                        a.as.data() + r0 * Fa, a.xa.data() + r0 * d, param(w[0]), param(w[1]), param(w[2]),
                        a.gcounts[j], d, Fa);
        }
        grove_combine_forward(out, a.ya.data(), a.grow_w.data(), a.grow_of.data(), cfg.grove_scale, N, K, d);
    }
    // dout [N, d] -> dln2 [N, d] (+=), dtopw [N, K] (+=), the adjugates' weight gradients (+=)
    void grove_backward(real* dln2, real* dtopw, const real* dout, LayerActs& a, int l) {
        const int N = B * T, d = cfg.d_model, K = cfg.top_k, G = cfg.grove_groups, Fa = cfg.grove_dim;
        const int R = a.goffsets[G];
        real *dya = scratch.dya.data(), *dxa = scratch.dxa.data(), *dgw = scratch.dgw.data();
        grove_combine_backward(dya, dgw, dout, a.ya.data(), a.grow_w.data(), a.grow_token.data(), cfg.grove_scale, R, d);
        grove_weights_backward(dtopw, dgw, a.grow_of.data(), N * K);
        std::fill(dxa, dxa + (size_t)R * d, 0);
        for (int j = 0; j < G; j++) {
            size_t r0 = a.goffsets[j];
            const auto& w = layout.adjugates[l][j];
            ffn_backward(dxa + r0 * d, grad(w[0]), grad(w[1]), grad(w[2]), dya + r0 * d, a.xa.data() + r0 * d,
                         a.ag.data() + r0 * Fa, a.au.data() + r0 * Fa, a.ah.data() + r0 * Fa, a.as.data() + r0 * Fa,
                         param(w[0]), param(w[1]), param(w[2]), scratch.dah.data() + r0 * Fa,
                         scratch.dag.data() + r0 * Fa, scratch.dau.data() + r0 * Fa, a.gcounts[j], d, Fa);
        }
        grove_gather_backward(dln2, dxa, a.grow_of.data(), N, K, d);
    }
    // out [N, d] += [sigmoid(ln2 . w_g) * | (1 - p_{e_1}) *] SwiGLU_shared(ln2)
    void shared_forward(real* out, LayerActs& a, int l) {
        const int N = B * T, d = cfg.d_model, Fs = cfg.shared_dim;
        ffn_forward(a.sy.data(), a.sg.data(), a.su.data(), a.sh.data(), a.ss.data(), a.ln2.data(), param(l, P_SGATE),
                    param(l, P_SUP), param(l, P_SDOWN), N, d, Fs);
        if (cfg.routing == ROUTING_XFT)
            xft_shared_forward(out, a.sgate.data(), a.sy.data(), a.rprobs.data(), a.topk.data(), N, cfg.n_experts,
                               cfg.top_k, d);
        else if (cfg.shared_gate)
            shared_gate_forward(out, a.sgate.data(), a.ln2.data(), param(l, P_SGATE_W), a.sy.data(), N, d);
        else
            residual_forward(out, out, a.sy.data(), (size_t)N * d);
    }
    // dout [N, d] -> dln2 [N, d] (+=), the shared expert's and its gate's weight gradients (+=)
    void shared_backward(real* dln2, const real* dout, LayerActs& a, int l) {
        const int N = B * T, d = cfg.d_model, Fs = cfg.shared_dim;
        const real* dy = dout;  // ungated: the FFN's output gradient is dout itself
        if (cfg.routing == ROUTING_XFT) {  // the weight's gradient goes to the router (moe_backward)
            xft_shared_backward(scratch.dsy.data(), scratch.dsc.data(), dout, a.sy.data(), a.sgate.data(), N, d);
            dy = scratch.dsy.data();
        } else if (cfg.shared_gate) {
            shared_gate_backward(dln2, grad(l, P_SGATE_W), scratch.dsy.data(), dout, a.ln2.data(), param(l, P_SGATE_W),
                                 a.sy.data(), a.sgate.data(), N, d);
            dy = scratch.dsy.data();
        }
        ffn_backward(dln2, grad(l, P_SGATE), grad(l, P_SUP), grad(l, P_SDOWN), dy, a.ln2.data(), a.sg.data(),
                     a.su.data(), a.sh.data(), a.ss.data(), param(l, P_SGATE), param(l, P_SUP), param(l, P_SDOWN),
                     scratch.dsh.data(), scratch.dsg.data(), scratch.dsu.data(), N, d, Fs);
    }
    // dout [N, d] -> dln2 [N, d] (+=), expert and router weight gradients (+=), the router
    // losses' gradient included (scaled by `scale`, as the whole backward)
    void moe_backward(real* dln2, const real* dout, LayerActs& a, int l, real scale) {
        const int N = B * T, d = cfg.d_model, F = cfg.ffn_dim, E = cfg.n_experts, K = cfg.top_k;
        real *dtopw = scratch.dtopw.data(), *dey = scratch.dey.data(), *dxe = scratch.dxe.data();
        real *deh = scratch.dh.data(), *deg = scratch.dg.data(), *deu = scratch.du.data();
        if (cfg.has_shared()) shared_backward(dln2, dout, a, l);  // the last part of the forward first
        std::fill(dxe, dxe + (size_t)N * K * d, 0);  // dtopw and dey are written whole
        moe_combine_backward(dey, dtopw, dout, a.ey.data(), a.topw.data(), a.row_of.data(), N, K, d);
        if (cfg.has_grove()) grove_backward(dln2, dtopw, dout, a, l);  // after dtopw is written
        for (int e = 0; e < E; e++) {
            size_t r0 = a.offsets[e];
            const auto& w = layout.experts[l][e];
            ffn_backward(dxe + r0 * d, grad(w[0]), grad(w[1]), grad(w[2]), dey + r0 * d,
                         a.xe.data() + r0 * d, a.eg.data() + r0 * F, a.eu.data() + r0 * F, a.eh.data() + r0 * F,
                         a.es.data() + r0 * F, param(w[0]), param(w[1]), param(w[2]), deh + r0 * F, deg + r0 * F,
                         deu + r0 * F, a.counts[e], d, F);
        }
        moe_gather_backward(dln2, dxe, a.row_of.data(), N, K, d);
        // router: the losses' gradient, then the gate weights' path, then W_r
        real* dlogits = scratch.drouter.data();
        std::fill(dlogits, dlogits + (size_t)N * E, 0);
        std::vector<real> G, Grow;
        if (router_loss.aux_loss != AUX_NONE && router_loss.aux_coef != 0)
            aux_dp_per_seq(G, router_loss.aux_loss, routing_stats(), l);
        if (router_loss.dpsl.on && router_loss.dpsl.coef != 0) dpsl_dp_rows(Grow, routing_stats(), router_loss.dpsl, l);
        router_losses_backward(dlogits, a.rprobs.data(), a.rlogits.data(), G.empty() ? nullptr : G.data(),
                               router_loss.aux_coef, router_loss.z_coef, scale, B, T, E,
                               Grow.empty() ? nullptr : Grow.data(), router_loss.dpsl.coef);
        router_backward(dlogits, dtopw, a.rprobs.data(), a.topk.data(), a.topw.data(), N, E, K, cfg.routing,
                        cfg.routing == ROUTING_XFT ? scratch.dsc.data() : nullptr);
        matmul_backward(dln2, grad(l, P_ROUTER), dlogits, a.ln2.data(), param(l, P_ROUTER), N, d, E);
        if (cfg.nexus_router) {  // dR (this backward's, the slot was 0) -> dP += Emb^T dR; R is not trained
            real* dR = grad(l, P_ROUTER);
            nexus_router_backward(grad(l, P_NEXUS_PROJ), dR, param(l, P_NEXUS_EMB), E, d, d);
            std::fill(dR, dR + (size_t)E * d, (real)0);
        }
    }
    // the last forward pass's routing statistics, as the router losses read them (with
    // seg = 1, psum holds each row's probabilities: they are the rows dpsl reads too)
    RoutingStats routing_stats() const {
        RoutingStats s;
        s.B = B; s.T = T; s.E = cfg.n_experts; s.K = cfg.top_k; s.seg = 1;
        for (int l = 0; l < cfg.n_layer && cfg.is_moe(); l++)
            s.layers.push_back({acts[l].seq_counts.data(), acts[l].psum.data(), acts[l].zsum.data(), acts[l].psum.data()});
        return s;
    }

    // ---- the whole model ----
    // Forward pass on inputs [B, T]; with targets, computes the losses too.
    Losses forward(const int* in, const int* tgts, int B_, int T_) {
        alloc(B_, T_);
        B = B_;
        T = T_;
        const int N = B * T, d = cfg.d_model, F = cfg.ffn_dim, V = cfg.vocab_size;
        const int H = cfg.n_head, Hkv = cfg.n_kv_head, hd = cfg.head_dim, qd = cfg.q_dim(), kvd = cfg.kv_dim();
        if (cfg.sliding_window > 0 && T > cfg.sliding_window)
            FAIL("sequence length %d exceeds the model's sliding_window %d, which this trainer does not implement", T,
                 cfg.sliding_window);
        for (int n = 0; n < N; n++) {
            if (in[n] < 0 || in[n] >= V) FAIL("input token %d at position %d outside [0, %d)", in[n], n, V);
            inputs[n] = in[n];
        }
        real* tmp = scratch.tmp.data();
        encoder_forward(acts[0].x.data(), inputs.data(), param(layout.embed), N, d);
        for (int l = 0; l < cfg.n_layer; l++) {
            LayerActs& a = acts[l];
            real* x_next = l + 1 < cfg.n_layer ? acts[l + 1].x.data() : x_final.data();
            // attention block
            rmsnorm_forward(a.ln1.data(), a.ln1_rstd.data(), a.x.data(), param(l, P_ATTN_NORM), N, d, cfg.rms_eps);
            matmul_forward(a.q.data(), a.ln1.data(), param(l, P_WQ), N, d, qd);
            matmul_forward(a.k.data(), a.ln1.data(), param(l, P_WK), N, d, kvd);
            matmul_forward(a.v.data(), a.ln1.data(), param(l, P_WV), N, d, kvd);
            if (!kv) {
                rope_forward(a.q.data(), rope_cos.data(), rope_sin.data(), N, T, H, hd);
                rope_forward(a.k.data(), rope_cos.data(), rope_sin.data(), N, T, Hkv, hd);
                attention_forward(a.atty.data(), a.att.data(), a.q.data(), a.k.data(), a.v.data(), B, T, H, Hkv, hd);
            } else {  // decoding (forward_cached): the rows at their positions, attending to the cache
                rope_forward_at(a.q.data(), kv->rope_cos.data(), kv->rope_sin.data(), kv_pos.data(), N, H, hd);
                rope_forward_at(a.k.data(), kv->rope_cos.data(), kv->rope_sin.data(), kv_pos.data(), N, Hkv, hd);
                for (int i = 0; i < N; i++) {  // the new keys and values into the cache
                    size_t at = ((size_t)(kv_row0 + i / T) * kv->T_max + kv_pos[i]) * kvd;
                    std::copy(a.k.begin() + (size_t)i * kvd, a.k.begin() + (size_t)(i + 1) * kvd, kv->k[l].begin() + at);
                    std::copy(a.v.begin() + (size_t)i * kvd, a.v.begin() + (size_t)(i + 1) * kvd, kv->v[l].begin() + at);
                }
                attention_forward_cached(a.atty.data(), a.q.data(), kv->k[l].data(), kv->v[l].data(), kv_pos.data(),
                                         kv_row0, B, T, kv->T_max, H, Hkv, hd);
            }
            matmul_forward(tmp, a.atty.data(), param(l, P_WO), N, qd, d);
            residual_forward(a.x_mid.data(), a.x.data(), tmp, (size_t)N * d);
            // FFN block: dense SwiGLU or mixture of experts
            rmsnorm_forward(a.ln2.data(), a.ln2_rstd.data(), a.x_mid.data(), param(l, P_FFN_NORM), N, d, cfg.rms_eps);
            if (!cfg.is_moe())
                ffn_forward(tmp, a.g.data(), a.u.data(), a.h.data(), a.s.data(), a.ln2.data(), param(l, P_GATE),
                            param(l, P_UP), param(l, P_DOWN), N, d, F);
            else
                moe_forward(tmp, a, l);
            residual_forward(x_next, a.x_mid.data(), tmp, (size_t)N * d);
        }
        rmsnorm_forward(lnf.data(), lnf_rstd.data(), x_final.data(), param(layout.final_norm), N, d, cfg.rms_eps);
        matmul_forward(logits.data(), lnf.data(), param(layout.lm_head), N, d, V);
        Losses out;
        have_targets = tgts != nullptr;
        if (tgts) {
            for (int n = 0; n < N; n++) {
                if (tgts[n] < 0 || tgts[n] >= V) FAIL("target token %d at position %d outside [0, %d)", tgts[n], n, V);
                targets[n] = tgts[n];
            }
            out.ce = crossentropy_forward(lse.data(), logits.data(), targets.data(), N, V);
            add_router_losses(out, router_loss, routing_stats());
        }
        last = out;
        return out;
    }

    // Backward pass of the last forward; adds scale * d(loss)/d(params) into grads.
    void backward(real scale = 1) {
        if (!have_targets) FAIL("backward() needs a forward pass with targets");
        const int N = B * T, d = cfg.d_model, F = cfg.ffn_dim, V = cfg.vocab_size;
        const int H = cfg.n_head, Hkv = cfg.n_kv_head, hd = cfg.head_dim, qd = cfg.q_dim(), kvd = cfg.kv_dim();
        real *dlogits = scratch.dlogits.data(), *dx = scratch.dx.data(), *dln = scratch.dln.data();
        real *dq = scratch.dq.data(), *dk = scratch.dk.data(), *dv = scratch.dv.data(), *datty = scratch.datty.data();
        real *dg = scratch.dg.data(), *du = scratch.du.data(), *dh = scratch.dh.data();  // dense FFN
        auto zero = [](real* p, size_t n) { std::fill(p, p + n, (real)0); };
        crossentropy_backward(dlogits, logits.data(), lse.data(), targets.data(), N, V, scale / N);
        zero(dx, (size_t)N * d);
        zero(dln, (size_t)N * d);
        matmul_backward(dln, grad(layout.lm_head), dlogits, lnf.data(), param(layout.lm_head), N, d, V);
        rmsnorm_backward(dx, grad(layout.final_norm), dln, x_final.data(), param(layout.final_norm),
                         lnf_rstd.data(), N, d);
        // dx now holds d(loss)/d(residual stream) after the last layer; walk the layers back
        for (int l = cfg.n_layer - 1; l >= 0; l--) {
            LayerActs& a = acts[l];
            // FFN block: x_next = x_mid + ffn(ln2(x_mid))
            zero(dln, (size_t)N * d);
            if (!cfg.is_moe())
                ffn_backward(dln, grad(l, P_GATE), grad(l, P_UP), grad(l, P_DOWN), dx, a.ln2.data(), a.g.data(),
                             a.u.data(), a.h.data(), a.s.data(), param(l, P_GATE), param(l, P_UP), param(l, P_DOWN),
                             dh, dg, du, N, d, F);
            else
                moe_backward(dln, dx, a, l, scale);
            rmsnorm_backward(dx, grad(l, P_FFN_NORM), dln, a.x_mid.data(), param(l, P_FFN_NORM), a.ln2_rstd.data(),
                             N, d);  // dx += (residual path already in dx)
            // attention block: x_mid = x + o_proj(attn(...))
            zero(datty, (size_t)N * qd);
            matmul_backward(datty, grad(l, P_WO), dx, a.atty.data(), param(l, P_WO), N, qd, d);
            zero(dq, (size_t)N * qd);
            zero(dk, (size_t)N * kvd);
            zero(dv, (size_t)N * kvd);
            attention_backward(dq, dk, dv, datty, a.att.data(), a.q.data(), a.k.data(), a.v.data(), B, T, H, Hkv, hd);
            rope_backward(dq, rope_cos.data(), rope_sin.data(), N, T, H, hd);
            rope_backward(dk, rope_cos.data(), rope_sin.data(), N, T, Hkv, hd);
            zero(dln, (size_t)N * d);
            matmul_backward(dln, grad(l, P_WQ), dq, a.ln1.data(), param(l, P_WQ), N, d, qd);
            matmul_backward(dln, grad(l, P_WK), dk, a.ln1.data(), param(l, P_WK), N, d, kvd);
            matmul_backward(dln, grad(l, P_WV), dv, a.ln1.data(), param(l, P_WV), N, d, kvd);
            rmsnorm_backward(dx, grad(l, P_ATTN_NORM), dln, a.x.data(), param(l, P_ATTN_NORM), a.ln1_rstd.data(),
                             N, d);
        }
        encoder_backward(grad(layout.embed), dx, inputs.data(), N, d);
    }

    // one micro-batch of a step of n_micro: the forward, and 1/n_micro of its gradient
    Losses forward_backward(const int* in, const int* tgts, int B_, int T_, int n_micro) {
        Losses l = forward(in, tgts, B_, T_);
        backward((real)1 / n_micro);
        return l;
    }

    // Decoding with a KV cache: tokens [B, n], sequence b at positions pos[b] .. pos[b] + n - 1
    // and at cache row row0 + b; writes their keys and values into the cache and attends to
    // the cached ones before them. Returns the logits [B*n, V] (valid until the next forward).
    // It is forward() with its attention reading the cache, row by row the same arithmetic:
    // the logits equal a full forward pass over the whole context (test_cpu checks this bit
    // for bit). Routing counts of generated tokens do not go into the aux-free balancing
    // statistics.
    const real* forward_cached(KVCache& c, const int* tokens, const int* pos, int row0, int B_, int n) {
        if (row0 < 0 || row0 + B_ > c.rows) FAIL("internal: cache rows %d..%d of %d", row0, row0 + B_, c.rows);
        kv_pos.resize((size_t)B_ * n);
        for (int b = 0; b < B_; b++) {
            if (pos[b] < 0 || pos[b] + n > c.T_max)
                FAIL("sequence %d reaches position %d, beyond the KV cache's %d", row0 + b, pos[b] + n, c.T_max);
            for (int t = 0; t < n; t++) kv_pos[(size_t)b * n + t] = pos[b] + t;
        }
        auto saved_load = step_load;
        kv = &c;
        kv_row0 = row0;
        try {
            forward(tokens, nullptr, B_, n);
        } catch (...) {
            kv = nullptr;
            throw;
        }
        kv = nullptr;
        step_load = saved_load;
        return logits.data();
    }

    void zero_grad() { std::fill(grads.begin(), grads.end(), 0); }

    // AdamW with global-norm clipping; weight decay on matrices only; then the aux-free
    // bias update. Returns the norm before clipping.
    double step(const AdamWSettings& hp, double lr) {
        double norm = global_norm(grads.data(), grads.size());
        if (!std::isfinite(norm)) return norm;  // no update: the run stops at the last good weights
        AdamWStep st = adamw_step(hp, norm, ++adam_t);
        for (auto& t : layout.tensors)
            if (t.trainable)  // the Nexus router's Emb and R: no update, no weight decay (their moments stay 0)
                adamw_update(params.data() + t.offset, grads.data() + t.offset, m.data() + t.offset,
                             v.data() + t.offset, (long)t.numel, hp, st, lr, t.decay() ? hp.weight_decay : 0);
        nexus_refresh_routers(cfg, layout, params.data());  // R = Emb P of the new P (what a checkpoint saves)
        aux_free_bias_update(expert_bias, step_load, cfg.is_moe() ? router_loss.aux_free_rate : 0);
        return norm;
    }

    // what evaluate and sample_text (common/run.h) read after a forward
    const int* expert_counts(int l) const { return acts[l].counts.data(); }
    const real* logits_row(int n) const { return logits.data() + (size_t)n * cfg.vocab_size; }
};

// ----------------------------------------------------------------------------
// The program: the shared command line and training run (common/run.h) around Model

#ifndef TRAIN_MOE_NO_MAIN
int main(int argc, char** argv) {
    TrainArgs args;
    Cli cli("train_moe", "CPU reference trainer for dense and Mixture-of-Experts language models (fp32).\n"
                         "Example: ./train_moe --data data/tiny --model tiny --experts 4 --topk 2 --steps 200");
    args.add_to(cli);
    std::string ensemble;
    cli.section("Evaluation only");
    cli.add("--ensemble", &ensemble, "A,B,...: no training; evaluate the uniform mixture of these models' next-token "
                                     "distributions on --data's validation split (Branch-Train-Merge's ensemble) into "
                                     "--out/metrics.jsonl");
    cli.epilog("Checkpoints are Hugging Face model directories (config.json + model.safetensors) plus\n"
               "optimizer.safetensors and trainer_state.json; --resume continues bit-identically.");
    try {
        cli.parse(argc, argv);
        args.validate();
#ifdef _OPENMP
        if (args.threads > 0) omp_set_num_threads(args.threads);
#endif
        if (!ensemble.empty()) return run_ensemble_eval<Model>(args, cli, ensemble);
        Model M;
        return run_training(M, args, cli);
    } catch (const Error& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    } catch (const std::bad_alloc&) {  // the memory check before the run missed it: still one clear line
        fprintf(stderr, "error: out of memory (a host allocation failed); use a smaller --batch / --seq or model\n");
        return 1;
    }
}
#endif
