/*
train_moe.cpp: the CPU reference trainer. Dense (Llama) and Mixture-of-Experts (Mixtral)
language models, trained in fp32 with plain loops and OpenMP.

This is the readable version of the project: every layer's forward and backward sit side by
side, in model order, and the training loop at the bottom reads top to bottom. The GPU
trainer (train_moe.cu) computes the same function, and the tests hold both to the PyTorch
reference in dev/reference/.

The model (N = B*T tokens, d = hidden size):
  x = embed[tokens]                                  [N, d]
  per layer:
    x = x + o_proj(attention(rope(q(rmsnorm(x))), rope(k(..)), v(..)))
    x = x + ffn(rmsnorm(x))          ffn = SwiGLU, or a top-K mixture of SwiGLU experts
  logits = lm_head(rmsnorm(x))                       [N, V]
  loss = CE + aux_coef * load_balancing + z_coef * router_z

Build with -DTRAIN_MOE_DOUBLE to compute in double precision (the finite-difference test
does), and -DTRAIN_MOE_NO_MAIN to include this file as a library (the tests do).
*/
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "common/cli.h"
#include "common/dataloader.h"
#include "common/json.h"
#include "common/metrics.h"
#include "common/model.h"
#include "common/router_losses.h"
#include "common/rng.h"
#include "common/safetensors.h"
#include "common/schedule.h"
#include "common/tokenizer.h"
#include "common/run.h"
#include "common/train_args.h"
#include "common/util.h"

#ifdef TRAIN_MOE_DOUBLE
typedef double real;
#else
typedef float real;
#endif

// ----------------------------------------------------------------------------
// Small helpers

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

// out[N, OC] = inp[N, C] @ w[OC, C]^T   (Hugging Face [out, in] weight layout)
// Rows of inp go four at a time so that each weight row, once loaded, serves four dot
// products; every output is still exactly dot(inp row, w row).
void matmul_forward(real* out, const real* inp, const real* w, int N, int C, int OC) {
#pragma omp parallel for
    for (int n0 = 0; n0 < N; n0 += 4) {
        int rows = std::min(4, N - n0);
        for (int o = 0; o < OC; o++)
            for (int j = 0; j < rows; j++)
                out[(size_t)(n0 + j) * OC + o] = dot(inp + (size_t)(n0 + j) * C, w + (size_t)o * C, C);
    }
}
// y += a0 x0 + a1 x1 + a2 x2 + a3 x3: four rows per pass, so the accumulator row is stored
// once per four multiply-adds (the plain one-row axpy is limited by stores)
static inline void axpy4(real* y, const real* a, const real* x0, const real* x1, const real* x2, const real* x3,
                         int n) {
    for (int i = 0; i < n; i++) y[i] += a[0] * x0[i] + a[1] * x1[i] + a[2] * x2[i] + a[3] * x3[i];
}

// dinp += dout @ w;  dw += dout^T @ inp   (either may be null)
void matmul_backward(real* dinp, real* dw, const real* dout, const real* inp, const real* w, int N, int C, int OC) {
    if (dinp) {  // blocks of 4 rows of dinp share each strip of 4 weight rows while it is in cache
#pragma omp parallel for
        for (int n0 = 0; n0 < N; n0 += 4) {
            int rows = std::min(4, N - n0), o = 0;
            for (; o + 4 <= OC; o += 4)
                for (int j = 0; j < rows; j++)
                    axpy4(dinp + (size_t)(n0 + j) * C, dout + (size_t)(n0 + j) * OC + o, w + (size_t)o * C,
                          w + (size_t)(o + 1) * C, w + (size_t)(o + 2) * C, w + (size_t)(o + 3) * C, C);
            for (; o < OC; o++)
                for (int j = 0; j < rows; j++)
                    axpy(dinp + (size_t)(n0 + j) * C, dout[(size_t)(n0 + j) * OC + o], w + (size_t)o * C, C);
        }
    }
    if (dw) {
#pragma omp parallel for
        for (int o = 0; o < OC; o++) {
            real* dwo = dw + (size_t)o * C;
            int n = 0;
            for (; n + 4 <= N; n += 4) {
                real a[4] = {dout[(size_t)n * OC + o], dout[(size_t)(n + 1) * OC + o], dout[(size_t)(n + 2) * OC + o],
                             dout[(size_t)(n + 3) * OC + o]};
                axpy4(dwo, a, inp + (size_t)n * C, inp + (size_t)(n + 1) * C, inp + (size_t)(n + 2) * C,
                      inp + (size_t)(n + 3) * C, C);
            }
            for (; n < N; n++) axpy(dwo, dout[(size_t)n * OC + o], inp + (size_t)n * C, C);
        }
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
                real sum = 0;
                for (int j = 0; j <= t; j++) { p[j] = std::exp(p[j] - mx); sum += p[j]; }
                for (int j = 0; j <= t; j++) p[j] /= sum;
                real* o = out + (size_t)(b * T + t) * qd + h * hd;
                for (int i = 0; i < hd; i++) o[i] = 0;
                for (int j = 0; j <= t; j++) axpy(o, p[j], v + (size_t)(b * T + j) * kvd + kh * hd, hd);
            }
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

// SwiGLU: out = silu(g) * u, silu(g) = g * sigmoid(g)
void swiglu_forward(real* out, const real* g, const real* u, size_t n) {
#pragma omp parallel for
    for (long i = 0; i < (long)n; i++) {
        real sg = 1 / (1 + std::exp(-g[i]));
        out[i] = g[i] * sg * u[i];
    }
}
// d silu(g)/dg = s (1 + g (1 - s))
void swiglu_backward(real* dg, real* du, const real* dout, const real* g, const real* u, size_t n) {
#pragma omp parallel for
    for (long i = 0; i < (long)n; i++) {
        real sg = 1 / (1 + std::exp(-g[i]));
        dg[i] += dout[i] * u[i] * sg * (1 + g[i] * (1 - sg));
        du[i] += dout[i] * g[i] * sg;
    }
}

void residual_forward(real* out, const real* a, const real* b, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

// ----------------------------------------------------------------------------
// Router: logits z = W_r x [N, E] (computed by matmul_forward), probabilities p = softmax(z),
// top-K selection by z + bias (bias: aux-loss-free balancing, 0 otherwise; ties go to the
// lower expert index), and the gate weights of the selected experts:
//   topk_softmax: w_k = p_{e_k} / sum_k' p_{e_k'}   (sum to 1; Mixtral)
//   softmax_topk: w_k = p_{e_k}                      (no renormalization; Megatron pre-softmax)

void router_forward(real* probs, int* topk, real* topw, const real* logits, const float* bias, int N, int E, int K,
                    int routing) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const real* z = logits + (size_t)n * E;
        real* p = probs + (size_t)n * E;
        real mx = z[0];
        for (int i = 1; i < E; i++) mx = std::max(mx, z[i]);
        real sum = 0;
        for (int i = 0; i < E; i++) { p[i] = std::exp(z[i] - mx); sum += p[i]; }
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
        real wsum = 0;
        for (int k = 0; k < K; k++) wsum += p[sel[k]];
        for (int k = 0; k < K; k++)
            topw[(size_t)n * K + k] = routing == ROUTING_TOPK_SOFTMAX ? p[sel[k]] / wsum : p[sel[k]];
    }
}
// dlogits += d(gate weights)/dz given dtopw [N, K].
//   softmax_topk: w_k = p_{e_k}            => dz_j = sum_k dw_k p_{e_k} (delta_{j,e_k} - p_j)
//   topk_softmax: w = softmax over the selected logits only
//                                          => dz_{e_k} = w_k (dw_k - sum_k' w_k' dw_k'), others 0
void router_backward(real* dlogits, const real* dtopw, const real* probs, const int* topk, const real* topw, int N,
                     int E, int K, int routing) {
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
        } else {
            real s = 0;  // sum_k dw_k p_{e_k}
            for (int k = 0; k < K; k++) s += dw[k] * p[sel[k]];
            for (int k = 0; k < K; k++) dz[sel[k]] += dw[k] * p[sel[k]];
            for (int j = 0; j < E; j++) dz[j] -= s * p[j];
        }
    }
}

// ----------------------------------------------------------------------------
// Router losses (docs/METHODS.md 1.2, 1.3). Let c_i = (token, slot) assignments to expert i.
//   switch: per layer  E * sum_i f_i P_i,  f_i = c_i / (N K), P_i = mean_t p_{t,i}; summed over layers
//   seq:    the switch value per sequence, averaged over sequences; summed over layers
//   pooled: Hugging Face Mixtral's: all layers' rows pooled, E * sum_i (C_i / (L N)) P_i, with
//           C_i = assignments over all layers and P the mean over all L*N rows (= K at balance)
//   z:      per layer mean_t (logsumexp_i z_{t,i})^2, summed over layers
// f (the counts) carries no gradient; the gradient reaches the router through P and z.

// dL_aux/dp for every (row, expert): g [N*E], each sequence's coefficients
// (aux_dp_per_seq in common/router_losses.h) repeated over its T rows.
static void aux_dp(std::vector<real>& g, int aux, const int* seq_counts, const long* pooled_counts, int B, int T,
                   int E, int K, int L) {
    std::vector<real> per_seq;
    aux_dp_per_seq(per_seq, aux, seq_counts, pooled_counts, B, T, E, K, L);
    g.resize((size_t)B * T * E);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int i = 0; i < E; i++) g[(size_t)(b * T + t) * E + i] = per_seq[(size_t)b * E + i];
}

// ----------------------------------------------------------------------------
// Cross-entropy over the vocabulary, fused with its backward: mean over the N tokens.
real crossentropy_forward(real* lse, const real* logits, const int* targets, int N, int V) {
    double loss = 0;
    std::vector<real> row_loss(N);
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const real* z = logits + (size_t)n * V;
        real mx = z[0];
        for (int i = 1; i < V; i++) mx = std::max(mx, z[i]);
        real s = 0;
        for (int i = 0; i < V; i++) s += std::exp(z[i] - mx);
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
        for (int i = 0; i < V; i++) dz[i] = scale * std::exp(z[i] - lse[n]);
        dz[targets[n]] -= scale;
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
    std::vector<real> g, u, a;         // dense FFN: [N, F] gate, up, silu(gate)*up
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
    std::vector<real> eg, eu, ea;      // [N*K, F] expert gate, up, activation
    std::vector<real> ey;              // [N*K, d] expert outputs
};

struct Model {
    ModelConfig cfg;
    ParamLayout lay;
    std::vector<real> params, grads, m, v;
    std::vector<std::vector<float>> expert_bias;  // [L][E], aux-loss-free balancing
    std::vector<std::vector<long>> step_load;     // [L][E] assignments since the last optimizer step
    TrainSettings ts;
    long adam_t = 0;  // optimizer steps taken

    // activations for up to B_max x T_max tokens
    int B_max = 0, T_max = 0, B = 0, T = 0;
    std::vector<LayerActs> la;
    std::vector<real> x_final, lnf, lnf_rstd, logits, lse, rope_cos, rope_sin;
    std::vector<int> inputs, targets;  // of the last forward pass
    bool have_targets = false;
    Losses last;

    void init_layout() {
        lay = build_layout(cfg);
        grads.assign(lay.total, 0);
        m.assign(lay.total, 0);
        v.assign(lay.total, 0);
        expert_bias.assign(cfg.n_layer, std::vector<float>(cfg.n_experts, 0.0f));
        step_load.assign(cfg.n_layer, std::vector<long>(cfg.n_experts, 0));
    }
    void init_scratch(const ModelConfig& c, uint64_t seed) {
        cfg = c;
        init_layout();
        params.assign(lay.total, 0);
        init_from_scratch(cfg, lay, params.data(), seed);
    }
    void load(const std::string& dir) {
        ParamLayout l2;
        load_model_dir(dir, &cfg, &l2, &params);
        init_layout();
        read_bias_tensors(dir, cfg, &expert_bias);  // aux-free routing biases, if saved
    }
    real* P(int layer, int kind) { return params.data() + lay.get(layer, kind).offset; }
    real* G(int layer, int kind) { return grads.data() + lay.get(layer, kind).offset; }
    real* P(int idx) { return params.data() + lay.tensors[idx].offset; }
    real* G(int idx) { return grads.data() + lay.tensors[idx].offset; }

    void alloc(int Bm, int Tm) {
        if (Bm <= B_max && Tm <= T_max) return;
        B_max = std::max(Bm, B_max);
        T_max = std::max(Tm, T_max);
        size_t N = (size_t)B_max * T_max, d = cfg.d_model, F = cfg.ffn_dim, E = cfg.n_experts, K = cfg.top_k;
        la.assign(cfg.n_layer, LayerActs());
        for (auto& a : la) {
            a.x.resize(N * d); a.ln1.resize(N * d); a.ln1_rstd.resize(N);
            a.q.resize(N * cfg.q_dim()); a.k.resize(N * cfg.kv_dim()); a.v.resize(N * cfg.kv_dim());
            a.att.resize((size_t)B_max * cfg.n_head * T_max * T_max);
            a.atty.resize(N * cfg.q_dim()); a.x_mid.resize(N * d); a.ln2.resize(N * d); a.ln2_rstd.resize(N);
            if (!cfg.is_moe()) {
                a.g.resize(N * F); a.u.resize(N * F); a.a.resize(N * F);
            } else {
                a.rlogits.resize(N * E); a.rprobs.resize(N * E); a.topk.resize(N * K); a.topw.resize(N * K);
                a.counts.resize(E); a.seq_counts.resize(B_max * E); a.offsets.resize(E + 1);
                a.row_token.resize(N * K); a.row_of.resize(N * K);
                a.xe.resize(N * K * d); a.eg.resize(N * K * F); a.eu.resize(N * K * F); a.ea.resize(N * K * F);
                a.ey.resize(N * K * d);
            }
        }
        x_final.resize(N * d); lnf.resize(N * d); lnf_rstd.resize(N);
        logits.resize(N * cfg.vocab_size); lse.resize(N); inputs.resize(N); targets.resize(N);
        // RoPE tables [T_max, hd/2], computed in double once
        std::vector<double> inv = cfg.rope_inv_freq();
        int h2 = cfg.head_dim / 2;
        rope_cos.resize((size_t)T_max * h2);
        rope_sin.resize((size_t)T_max * h2);
        for (int t = 0; t < T_max; t++)
            for (int i = 0; i < h2; i++) {
                rope_cos[(size_t)t * h2 + i] = (real)std::cos(t * inv[i]);
                rope_sin[(size_t)t * h2 + i] = (real)std::sin(t * inv[i]);
            }
    }

    // ---- MoE layer: route, permute tokens by expert, run each expert, combine ----
    void moe_forward(real* out, LayerActs& a, int l) {
        const int N = B * T, d = cfg.d_model, F = cfg.ffn_dim, E = cfg.n_experts, K = cfg.top_k;
        matmul_forward(a.rlogits.data(), a.ln2.data(), P(l, P_ROUTER), N, d, E);
        router_forward(a.rprobs.data(), a.topk.data(), a.topw.data(), a.rlogits.data(),
                       ts.aux_free_rate > 0 ? expert_bias[l].data() : nullptr, N, E, K, cfg.routing);
        // counting sort of the N*K (token, slot) pairs by expert: deterministic, dropless
        std::fill(a.counts.begin(), a.counts.end(), 0);
        std::fill(a.seq_counts.begin(), a.seq_counts.begin() + B * E, 0);
        for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++) {
                int e = a.topk[n * K + k];
                a.counts[e]++;
                a.seq_counts[(n / T) * E + e]++;
            }
        a.offsets[0] = 0;
        for (int e = 0; e < E; e++) a.offsets[e + 1] = a.offsets[e] + a.counts[e];
        std::vector<int> fill(a.offsets.begin(), a.offsets.end() - 1);
        for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++) {
                int r = fill[a.topk[n * K + k]]++;
                a.row_token[r] = n;
                a.row_of[n * K + k] = r;
            }
        for (int r = 0; r < N * K; r++)
            for (int i = 0; i < d; i++) a.xe[(size_t)r * d + i] = a.ln2[(size_t)a.row_token[r] * d + i];
        // each expert is a SwiGLU FFN over its own contiguous block of rows (may be empty)
        for (int e = 0; e < E; e++) {
            int r0 = a.offsets[e], ne = a.counts[e];
            const auto& id = lay.experts[l][e];
            matmul_forward(&a.eg[(size_t)r0 * F], &a.xe[(size_t)r0 * d], P(id[0]), ne, d, F);
            matmul_forward(&a.eu[(size_t)r0 * F], &a.xe[(size_t)r0 * d], P(id[1]), ne, d, F);
            swiglu_forward(&a.ea[(size_t)r0 * F], &a.eg[(size_t)r0 * F], &a.eu[(size_t)r0 * F], (size_t)ne * F);
            matmul_forward(&a.ey[(size_t)r0 * d], &a.ea[(size_t)r0 * F], P(id[2]), ne, F, d);
        }
        // combine: out[n] = sum_k w_{n,k} y_{e_k}(x_n), slots summed in order
#pragma omp parallel for
        for (int n = 0; n < N; n++) {
            real* o = out + (size_t)n * d;
            for (int i = 0; i < d; i++) o[i] = 0;
            for (int k = 0; k < K; k++) axpy(o, a.topw[n * K + k], &a.ey[(size_t)a.row_of[n * K + k] * d], d);
        }
        for (int e = 0; e < E; e++) step_load[l][e] += a.counts[e];
    }
    // dout [N, d] -> dln2 [N, d] (+=), expert and router weight gradients (+=).
    // dlogits_extra: the router-loss gradient for this layer's logits (may be null).
    void moe_backward(real* dln2, const real* dout, LayerActs& a, int l, const real* dlogits_extra) {
        const int N = B * T, d = cfg.d_model, F = cfg.ffn_dim, E = cfg.n_experts, K = cfg.top_k;
        std::vector<real> dtopw((size_t)N * K), dey((size_t)N * K * d), dxe((size_t)N * K * d, 0);
        std::vector<real> dea((size_t)N * K * F, 0), deg((size_t)N * K * F, 0), deu((size_t)N * K * F, 0);
        // un-combine: dy_r = w dout_n;  dw_{n,k} = dout_n . y_r
#pragma omp parallel for
        for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++) {
                int r = a.row_of[n * K + k];
                dtopw[n * K + k] = dot(dout + (size_t)n * d, &a.ey[(size_t)r * d], d);
                for (int i = 0; i < d; i++) dey[(size_t)r * d + i] = a.topw[n * K + k] * dout[(size_t)n * d + i];
            }
        for (int e = 0; e < E; e++) {
            int r0 = a.offsets[e], ne = a.counts[e];
            const auto& id = lay.experts[l][e];
            matmul_backward(&dea[(size_t)r0 * F], G(id[2]), &dey[(size_t)r0 * d], &a.ea[(size_t)r0 * F], P(id[2]), ne, F,
                            d);
            swiglu_backward(&deg[(size_t)r0 * F], &deu[(size_t)r0 * F], &dea[(size_t)r0 * F], &a.eg[(size_t)r0 * F],
                            &a.eu[(size_t)r0 * F], (size_t)ne * F);
            matmul_backward(&dxe[(size_t)r0 * d], G(id[0]), &deg[(size_t)r0 * F], &a.xe[(size_t)r0 * d], P(id[0]), ne,
                            d, F);
            matmul_backward(&dxe[(size_t)r0 * d], G(id[1]), &deu[(size_t)r0 * F], &a.xe[(size_t)r0 * d], P(id[1]), ne,
                            d, F);
        }
        // un-permute: each token collects its K rows' input gradients, slots in order
#pragma omp parallel for
        for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++) axpy(dln2 + (size_t)n * d, 1, &dxe[(size_t)a.row_of[n * K + k] * d], d);
        // router: gate-weight gradient plus the router losses' gradient, then W_r
        std::vector<real> dlogits((size_t)N * E, 0);
        if (dlogits_extra) for (size_t i = 0; i < dlogits.size(); i++) dlogits[i] = dlogits_extra[i];
        router_backward(dlogits.data(), dtopw.data(), a.rprobs.data(), a.topk.data(), a.topw.data(), N, E, K,
                        cfg.routing);
        matmul_backward(dln2, G(l, P_ROUTER), dlogits.data(), a.ln2.data(), P(l, P_ROUTER), N, d, E);
    }

    // Router losses over all layers (after the forward pass), unweighted.
    void router_losses(double* aux, double* z) {
        *aux = 0;
        *z = 0;
        if (!cfg.is_moe()) return;
        const int N = B * T, E = cfg.n_experts, K = cfg.top_k, L = cfg.n_layer;
        std::vector<double> pooled_P(E, 0);
        std::vector<long> pooled_C(E, 0);
        for (int l = 0; l < L; l++) {
            LayerActs& a = la[l];
            for (int n = 0; n < N; n++) {  // z-loss: mean_t lse_t^2
                const real* zz = &a.rlogits[(size_t)n * E];
                double mx = zz[0], s = 0;
                for (int i = 1; i < E; i++) mx = std::max(mx, (double)zz[i]);
                for (int i = 0; i < E; i++) s += std::exp(zz[i] - mx);
                double lse = mx + std::log(s);
                *z += lse * lse / N;
            }
            if (ts.aux_type == AUX_SWITCH || ts.aux_type == AUX_SEQ) {
                int nseq = ts.aux_type == AUX_SEQ ? B : 1, rows = N / nseq;
                for (int b = 0; b < nseq; b++) {
                    double val = 0;
                    for (int i = 0; i < E; i++) {
                        long c = 0;
                        double Pi = 0;
                        for (int bb = b * (B / nseq); bb < (b + 1) * (B / nseq); bb++) c += a.seq_counts[bb * E + i];
                        for (int n = b * rows; n < (b + 1) * rows; n++) Pi += a.rprobs[(size_t)n * E + i];
                        val += (double)c / ((double)rows * K) * (Pi / rows);
                    }
                    *aux += E * val / nseq;
                }
            } else if (ts.aux_type == AUX_POOLED) {
                for (int i = 0; i < E; i++) {
                    pooled_C[i] += a.counts[i];
                    for (int n = 0; n < N; n++) pooled_P[i] += a.rprobs[(size_t)n * E + i];
                }
            }
        }
        if (ts.aux_type == AUX_POOLED) {
            double LN = (double)L * N;
            for (int i = 0; i < E; i++) *aux += E * (pooled_C[i] / LN) * (pooled_P[i] / LN);
        }
    }
    // d(aux_coef * aux + z_coef * z)/d(router logits) of layer l, times `scale`
    void router_losses_backward(std::vector<real>& dlogits, int l, real scale) {
        const int N = B * T, E = cfg.n_experts, K = cfg.top_k, L = cfg.n_layer;
        LayerActs& a = la[l];
        dlogits.assign((size_t)N * E, 0);
        std::vector<long> pooled_C(E, 0);
        if (ts.aux_type == AUX_POOLED)
            for (int ll = 0; ll < L; ll++) for (int i = 0; i < E; i++) pooled_C[i] += la[ll].counts[i];
        std::vector<real> gp;
        if (ts.aux_type != AUX_NONE && ts.aux_coef != 0)
            aux_dp(gp, ts.aux_type, a.seq_counts.data(), pooled_C.data(), B, T, E, K, L);
#pragma omp parallel for
        for (int n = 0; n < N; n++) {
            const real* p = &a.rprobs[(size_t)n * E];
            real* dz = &dlogits[(size_t)n * E];
            if (!gp.empty()) {  // through the softmax: dz_j = p_j (g_j - sum_i p_i g_i)
                const real* g = &gp[(size_t)n * E];
                real s = 0;
                for (int i = 0; i < E; i++) s += p[i] * g[i];
                for (int j = 0; j < E; j++) dz[j] += scale * (real)ts.aux_coef * p[j] * (g[j] - s);
            }
            if (ts.z_coef != 0) {  // d lse^2 / dz_j = 2 lse p_j, mean over N
                const real* zz = &a.rlogits[(size_t)n * E];
                real mx = zz[0], s = 0;
                for (int i = 1; i < E; i++) mx = std::max(mx, zz[i]);
                for (int i = 0; i < E; i++) s += std::exp(zz[i] - mx);
                real lse = mx + std::log(s);
                for (int j = 0; j < E; j++) dz[j] += scale * (real)ts.z_coef * 2 * lse * p[j] / N;
            }
        }
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
        std::vector<real> tmp((size_t)N * d);
        encoder_forward(la[0].x.data(), inputs.data(), P(lay.embed), N, d);
        for (int l = 0; l < cfg.n_layer; l++) {
            LayerActs& a = la[l];
            real* x_next = l + 1 < cfg.n_layer ? la[l + 1].x.data() : x_final.data();
            // attention block
            rmsnorm_forward(a.ln1.data(), a.ln1_rstd.data(), a.x.data(), P(l, P_ATTN_NORM), N, d, cfg.rms_eps);
            matmul_forward(a.q.data(), a.ln1.data(), P(l, P_WQ), N, d, qd);
            matmul_forward(a.k.data(), a.ln1.data(), P(l, P_WK), N, d, kvd);
            matmul_forward(a.v.data(), a.ln1.data(), P(l, P_WV), N, d, kvd);
            rope_forward(a.q.data(), rope_cos.data(), rope_sin.data(), N, T, H, hd);
            rope_forward(a.k.data(), rope_cos.data(), rope_sin.data(), N, T, Hkv, hd);
            attention_forward(a.atty.data(), a.att.data(), a.q.data(), a.k.data(), a.v.data(), B, T, H, Hkv, hd);
            matmul_forward(tmp.data(), a.atty.data(), P(l, P_WO), N, qd, d);
            residual_forward(a.x_mid.data(), a.x.data(), tmp.data(), (size_t)N * d);
            // FFN block: dense SwiGLU or mixture of experts
            rmsnorm_forward(a.ln2.data(), a.ln2_rstd.data(), a.x_mid.data(), P(l, P_FFN_NORM), N, d, cfg.rms_eps);
            if (!cfg.is_moe()) {
                matmul_forward(a.g.data(), a.ln2.data(), P(l, P_GATE), N, d, F);
                matmul_forward(a.u.data(), a.ln2.data(), P(l, P_UP), N, d, F);
                swiglu_forward(a.a.data(), a.g.data(), a.u.data(), (size_t)N * F);
                matmul_forward(tmp.data(), a.a.data(), P(l, P_DOWN), N, F, d);
            } else {
                moe_forward(tmp.data(), a, l);
            }
            residual_forward(x_next, a.x_mid.data(), tmp.data(), (size_t)N * d);
        }
        rmsnorm_forward(lnf.data(), lnf_rstd.data(), x_final.data(), P(lay.final_norm), N, d, cfg.rms_eps);
        matmul_forward(logits.data(), lnf.data(), P(lay.lm_head), N, d, V);
        Losses out;
        have_targets = tgts != nullptr;
        if (tgts) {
            for (int n = 0; n < N; n++) {
                if (tgts[n] < 0 || tgts[n] >= V) FAIL("target token %d at position %d outside [0, %d)", tgts[n], n, V);
                targets[n] = tgts[n];
            }
            out.ce = crossentropy_forward(lse.data(), logits.data(), targets.data(), N, V);
            router_losses(&out.aux, &out.z);
            out.loss = out.ce + (ts.aux_type == AUX_NONE ? 0 : ts.aux_coef * out.aux) + ts.z_coef * out.z;
        }
        last = out;
        return out;
    }

    // Backward pass of the last forward; adds scale * d(loss)/d(params) into grads.
    void backward(real scale = 1) {
        if (!have_targets) FAIL("backward() needs a forward pass with targets");
        const int N = B * T, d = cfg.d_model, F = cfg.ffn_dim, V = cfg.vocab_size;
        const int H = cfg.n_head, Hkv = cfg.n_kv_head, hd = cfg.head_dim, qd = cfg.q_dim(), kvd = cfg.kv_dim();
        std::vector<real> dlogits((size_t)N * V), dx((size_t)N * d, 0), dln((size_t)N * d);
        std::vector<real> dq((size_t)N * qd), dk((size_t)N * kvd), dv((size_t)N * kvd), datty((size_t)N * qd);
        std::vector<real> dg, du, da, drl;
        if (!cfg.is_moe()) { dg.resize((size_t)N * F); du.resize((size_t)N * F); da.resize((size_t)N * F); }
        crossentropy_backward(dlogits.data(), logits.data(), lse.data(), targets.data(), N, V, scale / N);
        std::fill(dln.begin(), dln.end(), 0);
        matmul_backward(dln.data(), G(lay.lm_head), dlogits.data(), lnf.data(), P(lay.lm_head), N, d, V);
        rmsnorm_backward(dx.data(), G(lay.final_norm), dln.data(), x_final.data(), P(lay.final_norm), lnf_rstd.data(),
                         N, d);
        // dx now holds d(loss)/d(residual stream) after the last layer; walk the layers back
        for (int l = cfg.n_layer - 1; l >= 0; l--) {
            LayerActs& a = la[l];
            // FFN block: x_next = x_mid + ffn(ln2(x_mid))
            std::fill(dln.begin(), dln.end(), 0);
            if (!cfg.is_moe()) {
                std::fill(da.begin(), da.end(), 0);
                std::fill(dg.begin(), dg.end(), 0);
                std::fill(du.begin(), du.end(), 0);
                matmul_backward(da.data(), G(l, P_DOWN), dx.data(), a.a.data(), P(l, P_DOWN), N, F, d);
                swiglu_backward(dg.data(), du.data(), da.data(), a.g.data(), a.u.data(), (size_t)N * F);
                matmul_backward(dln.data(), G(l, P_GATE), dg.data(), a.ln2.data(), P(l, P_GATE), N, d, F);
                matmul_backward(dln.data(), G(l, P_UP), du.data(), a.ln2.data(), P(l, P_UP), N, d, F);
            } else {
                router_losses_backward(drl, l, scale);
                moe_backward(dln.data(), dx.data(), a, l, drl.data());
            }
            rmsnorm_backward(dx.data(), G(l, P_FFN_NORM), dln.data(), a.x_mid.data(), P(l, P_FFN_NORM),
                             a.ln2_rstd.data(), N, d);  // dx += (residual path already in dx)
            // attention block: x_mid = x + o_proj(attn(...))
            std::fill(datty.begin(), datty.end(), 0);
            matmul_backward(datty.data(), G(l, P_WO), dx.data(), a.atty.data(), P(l, P_WO), N, qd, d);
            std::fill(dq.begin(), dq.end(), 0);
            std::fill(dk.begin(), dk.end(), 0);
            std::fill(dv.begin(), dv.end(), 0);
            attention_backward(dq.data(), dk.data(), dv.data(), datty.data(), a.att.data(), a.q.data(), a.k.data(),
                               a.v.data(), B, T, H, Hkv, hd);
            rope_backward(dq.data(), rope_cos.data(), rope_sin.data(), N, T, H, hd);
            rope_backward(dk.data(), rope_cos.data(), rope_sin.data(), N, T, Hkv, hd);
            std::fill(dln.begin(), dln.end(), 0);
            matmul_backward(dln.data(), G(l, P_WQ), dq.data(), a.ln1.data(), P(l, P_WQ), N, d, qd);
            matmul_backward(dln.data(), G(l, P_WK), dk.data(), a.ln1.data(), P(l, P_WK), N, d, kvd);
            matmul_backward(dln.data(), G(l, P_WV), dv.data(), a.ln1.data(), P(l, P_WV), N, d, kvd);
            rmsnorm_backward(dx.data(), G(l, P_ATTN_NORM), dln.data(), a.x.data(), P(l, P_ATTN_NORM),
                             a.ln1_rstd.data(), N, d);
        }
        encoder_backward(G(lay.embed), dx.data(), inputs.data(), N, d);
    }

    void zero_grad() { std::fill(grads.begin(), grads.end(), 0); }

    // AdamW with global-norm clipping; weight decay on matrices only. Returns the norm
    // before clipping.
    double step(const AdamW& hp, double lr) {
        double sq = 0;
        for (size_t i = 0; i < grads.size(); i++) sq += (double)grads[i] * grads[i];
        double norm = std::sqrt(sq);
        double clip = (hp.grad_clip > 0 && norm > hp.grad_clip) ? hp.grad_clip / norm : 1.0;
        adam_t++;
        double bc1 = 1 - std::pow(hp.beta1, (double)adam_t), bc2 = 1 - std::pow(hp.beta2, (double)adam_t);
        for (auto& t : lay.tensors) {
            real wd = t.decay() ? (real)hp.weight_decay : 0;
            real* p = params.data() + t.offset;
            real* g = grads.data() + t.offset;
            real* mm = m.data() + t.offset;
            real* vv = v.data() + t.offset;
#pragma omp parallel for
            for (long i = 0; i < (long)t.numel; i++) {
                real gi = g[i] * (real)clip;
                mm[i] = (real)hp.beta1 * mm[i] + (real)(1 - hp.beta1) * gi;
                vv[i] = (real)hp.beta2 * vv[i] + (real)(1 - hp.beta2) * gi * gi;
                real mhat = mm[i] / (real)bc1, vhat = vv[i] / (real)bc2;
                p[i] -= (real)lr * (mhat / (std::sqrt(vhat) + (real)hp.eps) + wd * p[i]);
            }
        }
        // aux-loss-free balancing (DeepSeek-V3): b_i += u * sign(mean load - load_i)
        if (ts.aux_free_rate > 0 && cfg.is_moe()) {
            for (int l = 0; l < cfg.n_layer; l++) {
                double mean = 0;
                for (int e = 0; e < cfg.n_experts; e++) mean += step_load[l][e];
                mean /= cfg.n_experts;
                for (int e = 0; e < cfg.n_experts; e++) {
                    double diff = mean - step_load[l][e];
                    expert_bias[l][e] += (float)(ts.aux_free_rate * ((diff > 0) - (diff < 0)));
                }
            }
        }
        for (auto& s : step_load) std::fill(s.begin(), s.end(), 0);
        return norm;
    }
};

// ----------------------------------------------------------------------------
// Evaluation and sampling

EvalResult evaluate(Model& M, const DataLoader& data, int max_batches) {
    EvalResult r;
    std::vector<int> inp((size_t)data.B * data.T), tgt((size_t)data.B * data.T);
    for (size_t d = 0; d < data.domains.size(); d++) {
        int nb = std::min(max_batches, data.val_batches((int)d));
        std::vector<std::vector<double>> load(M.cfg.n_layer, std::vector<double>(M.cfg.n_experts, 0));
        double sum = 0;
        for (int i = 0; i < nb; i++) {
            data.val_batch((int)d, i, inp.data(), tgt.data());
            sum += M.forward(inp.data(), tgt.data(), data.B, data.T).ce;
            for (int l = 0; l < M.cfg.n_layer && M.cfg.is_moe(); l++)
                for (int e = 0; e < M.cfg.n_experts; e++) load[l][e] += M.la[l].counts[e];
        }
        for (auto& row : load) {  // counts -> fractions of the layer's assignments
            double tot = 0;
            for (double c : row) tot += c;
            for (double& c : row) c = tot > 0 ? c / tot : 0;
        }
        r.loss.push_back(nb > 0 ? sum / nb : NAN);
        r.load.push_back(load);
    }
    // evaluation must not count towards the aux-free balancing statistics
    for (auto& s : M.step_load) std::fill(s.begin(), s.end(), 0);
    return r;
}

// Samples n tokens after an end-of-text token, at temperature 1. Recomputes the whole
// context each token (no KV cache): simple, and fine for short CPU samples.
std::string sample_text(Model& M, const Tokenizer& tok, int n, int T_max, RngStream& rng) {
    std::vector<int> ctx = {tok.eot >= 0 ? tok.eot : 0};
    std::string out;
    std::vector<double> p(M.cfg.vocab_size);
    auto saved = M.step_load;
    for (int i = 0; i < n; i++) {
        int start = std::max(0, (int)ctx.size() - T_max);
        int len = (int)ctx.size() - start;
        M.forward(ctx.data() + start, nullptr, 1, len);
        const real* z = M.logits.data() + (size_t)(len - 1) * M.cfg.vocab_size;
        double mx = z[0], s = 0;
        for (int j = 1; j < M.cfg.vocab_size; j++) mx = std::max(mx, (double)z[j]);
        for (int j = 0; j < M.cfg.vocab_size; j++) s += (p[j] = std::exp(z[j] - mx));
        double u = rng.uniform() * s, acc = 0;
        int next = M.cfg.vocab_size - 1;
        for (int j = 0; j < M.cfg.vocab_size; j++) {
            acc += p[j];
            if (u < acc) { next = j; break; }
        }
        if (next == tok.eot) break;
        ctx.push_back(next);
        out += tok.ok() ? tok.decode(next) : strfmt("<%d>", next);
    }
    M.step_load = saved;
    return out;
}

#ifndef TRAIN_MOE_NO_MAIN
int main(int argc, char** argv) {
    TrainArgs args;
    Cli cli("train_moe", "CPU reference trainer for dense and Mixture-of-Experts language models (fp32).\n"
                         "Example: ./train_moe --data data/tiny --model tiny --experts 4 --topk 2 --steps 200");
    args.add_to(cli);
    cli.epilog("Checkpoints are Hugging Face model directories (config.json + model.safetensors) plus\n"
               "optimizer.safetensors and trainer_state.json; --resume continues bit-identically.");
    try {
        cli.parse(argc, argv);
        args.validate();
#ifdef _OPENMP
        if (args.threads > 0) omp_set_num_threads(args.threads);
#endif
        default_out_to_resume_run(args, cli);
        // tokenizer (optional: only for printing samples and for the vocabulary size)
        Tokenizer tok;
        std::string tok_path = load_run_tokenizer(args, &tok);

        // model
        Model M;
        M.ts = train_settings_from_args(args);
        std::string resume_dir;
        if (!args.resume.empty()) {
            resume_dir = resolve_resume_dir(args.resume);
            M.load(resume_dir);
        } else if (!args.init.empty()) {
            if (cli.was_set("--experts"))
                FAIL("--init with --experts: a checkpoint's shape is fixed; make an MoE from a dense model with ./upcycle");
            M.load(args.init);
            if (args.init_optimizer) {  // e.g. expert upcycling: the copies carry their AdamW moments
                std::string op = path_join(args.init, "optimizer.safetensors");
                if (!path_exists(op)) FAIL("%s: --init-optimizer needs this file", op.c_str());
                M.adam_t = read_optimizer_file(op, M.lay, M.m.data(), M.v.data());
            }
        } else {
            ModelConfig c = config_from_args(args, tok.ok() ? (int)tok.tokens.size() : 0);
            M.init_scratch(c, (uint64_t)args.seed);
            if (args.init_std != 0.02) init_from_scratch(c, M.lay, M.params.data(), (uint64_t)args.seed, (float)args.init_std);
        }
        if (tok.ok() && (int)tok.tokens.size() > M.cfg.vocab_size)
            FAIL("%s: tokenizer has %zu tokens but the model's vocab_size is %d", tok_path.c_str(), tok.tokens.size(),
                 M.cfg.vocab_size);
        const ModelConfig& c = M.cfg;
        if (args.seq > c.max_seq_len)
            fprintf(stderr, "warning: --seq %d exceeds max_position_embeddings %d of the checkpoint\n", args.seq, c.max_seq_len);

        // data
        DataLoader data(args.data_dir, args.mix, args.batch, args.seq, c.vocab_size, (uint64_t)args.seed);
        check_writable_dir(args.out);

        // schedule and optimizer
        LRSchedule sched = schedule_from_args(args);
        AdamW hp = adamw_from_args(args);

        RunState rs;
        if (!resume_dir.empty()) {
            Json saved;
            load_training_state(resume_dir, M.lay, M.m.data(), M.v.data(), &M.adam_t, rs, data.domains.size(), &saved);
            args.check_resume_settings(saved, resume_dir);
            data.state = rs.data;
        }
        MetricsLog metrics;
        metrics.open(path_join(args.out, "metrics.jsonl"), resume_dir.empty() ? -1 : rs.step);
        RngStream sample_rng((uint64_t)args.seed, stream_id(PURPOSE_SAMPLE));
        sample_rng.counter = rs.sample_counter;

        // what we are about to do
        print_model_summary(c, M.ts.aux_type, M.ts.aux_coef, M.ts.z_coef);
        printf("\n");
        print_data_and_run(args, data, sched, resume_dir, rs.step);

        // ---- the training loop ----
        std::vector<int> inp((size_t)args.batch * args.seq), tgt((size_t)args.batch * args.seq);
        const double tokens_per_step = (double)args.batch * args.seq * args.grad_accum;
        const long start_step = rs.step;
        double t_start = now_seconds();
        long last_saved = -1;
        Json settings = args.settings();
        auto save_now = [&]() {
            rs.data = data.state;
            rs.sample_counter = sample_rng.counter;
            std::string name = strfmt("step_%06ld", rs.step);
            save_checkpoint(path_join(args.out, name), M.cfg, M.lay, M.params.data(), M.m.data(), M.v.data(), M.adam_t,
                            M.expert_bias, M.ts.aux_free_rate > 0, rs, settings,
                            path_join(args.data_dir, "tokenizer.json"));
            write_text_atomic(path_join(args.out, "latest"), name + "\n");
            last_saved = rs.step;
            printf("saved %s\n", path_join(args.out, name).c_str());
        };
        auto print_sample = [&]() {
            if (args.sample_tokens <= 0) return;
            std::string s = sample_text(M, tok, args.sample_tokens, args.seq, sample_rng);
            printf("sample at step %ld: %s\n", rs.step, printable(s).c_str());
        };
        while (rs.step < args.steps) {
            if (args.eval_every > 0 && rs.step % args.eval_every == 0)
                log_eval(metrics, M.cfg, data, evaluate(M, data, args.eval_batches), rs.step, rs.tokens);
            if (args.sample_every > 0 && rs.step > 0 && rs.step % args.sample_every == 0) print_sample();
            double t0 = now_seconds();
            M.zero_grad();
            Losses acc;
            for (int micro = 0; micro < args.grad_accum; micro++) {
                data.next_batch(inp.data(), tgt.data());
                Losses l = M.forward(inp.data(), tgt.data(), args.batch, args.seq);
                M.backward((real)1 / args.grad_accum);
                acc.add_mean(l, args.grad_accum);
            }
            double lr = sched.at((int)rs.step);
            double norm = M.step(hp, lr);
            rs.step++;
            rs.tokens += tokens_per_step;
            double dt = now_seconds() - t0;
            if (!std::isfinite(acc.loss)) FAIL("loss is %g at step %ld: training diverged", acc.loss, rs.step);
            log_step(metrics, args, c.is_moe(), rs, start_step, acc, lr, norm, dt, now_seconds() - t_start);
            if (args.save_every > 0 && rs.step % args.save_every == 0 && rs.step < args.steps) {
                rs.elapsed += now_seconds() - t_start;
                t_start = now_seconds();
                save_now();
            }
        }
        log_eval(metrics, M.cfg, data, evaluate(M, data, args.eval_batches), rs.step, rs.tokens);
        print_sample();
        if (!args.no_save && last_saved != rs.step) save_now();
        return 0;
    } catch (const Error& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
#endif
