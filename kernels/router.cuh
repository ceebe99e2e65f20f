// kernels/router.cuh: the MoE router, all in fp32 (docs/METHODS.md 1.1-1.4).
//   logits z = W_r x            [N, E]   (W_r: the fp32 master weights, x: ln2 in T)
//   p = softmax(z)              [N, E]   lse(z) [N] kept for the z-loss
//   top-K by z + bias (bias: aux-loss-free balancing, else 0); ties go to the lower index
//   gate weights w_k: topk_softmax p_{e_k} / sum_k' p_{e_k'};  softmax_topk p_{e_k}
// Router losses: the forward sums they need (per-sequence sums of p and of lse^2, plus
// the counts from permute.cuh) are reduced here in double in a fixed order and copied to
// the host, which computes the loss values with the CPU trainer's functions
// (common/router_losses.h router_loss_values) once per step, for the log. The gradient
// needs no host: router_aux_coef computes the per-(sequence, expert) coefficient g of the
// balancing loss gradient dL/dp_{t,i} = g[b, i] on the device from the counts, with the
// host's own formula (common/router_losses.h aux_dp_coef); router_backward applies it
// through the softmax together with the z-loss and gate-weight gradients, and with the
// per-row dL/dp of the Dirichlet-prior shaping loss (1.6), which kernels/dpsl.cuh computes
// in the forward.
// The aux-loss-free bias update (common/router_losses.h aux_free_bias_update) runs on the host after
// each optimizer step, on the counts the host already has; the device reads the bias.
#pragma once
#include "../common/router_losses.h"
#include "common.cuh"

namespace gpu {

constexpr int ROUTER_DW_ROWS = 64;  // rows per partial sum of the router weight gradient
inline size_t router_scratch_floats(int N, int E, int d) { return (size_t)cdiv(N, ROUTER_DW_ROWS) * E * d; }

// logits [N, E] = x [N, d] @ w [E, d]^T, fp32. One block per token; warp w computes experts
// w, w + nwarps, ... (lanes stride over d, fixed-order warp reduction).
template <typename T>
__global__ void router_logits_kernel(float* logits, const T* x, const float* w, int N, int d, int E) {
    int n = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    const T* xr = x + (size_t)n * d;
    for (int e = warp; e < E; e += nwarps) {
        const float* wr = w + (size_t)e * d;
        float s = 0.0f;
        for (int i = lane; i < d; i += 32) s += to_f(xr[i]) * wr[i];
        s = warp_sum(s);
        if (lane == 0) logits[(size_t)n * E + e] = s;
    }
}
template <typename T>
void router_logits_forward(float* logits, const T* x, const float* w, int N, int d, int E, cudaStream_t s) {
    router_logits_kernel<<<N, 128, 0, s>>>(logits, x, w, N, d, E);
    KERNEL_CHECK();
}

// One thread per token: softmax, lse, top-K selection, gate weights.
// K rounds of "largest score not yet taken"; strict > keeps the lower index on ties.
__global__ void router_select_kernel(float* probs, float* lse, int* topk, float* topw, const float* logits,
                                            const float* bias, int N, int E, int K, int routing_softmax_topk) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* z = logits + (size_t)n * E;
    float* p = probs + (size_t)n * E;
    float mx = z[0];
    for (int i = 1; i < E; i++) mx = fmaxf(mx, z[i]);
    float sum = 0.0f;
    for (int i = 0; i < E; i++) { p[i] = expf(z[i] - mx); sum += p[i]; }
    for (int i = 0; i < E; i++) p[i] /= sum;
    lse[n] = mx + logf(sum);
    int* sel = topk + (size_t)n * K;
    for (int k = 0; k < K; k++) {
        int best = -1;
        float best_s = 0.0f;
        for (int i = 0; i < E; i++) {
            bool taken = false;
            for (int j = 0; j < k; j++) taken |= sel[j] == i;
            if (taken) continue;
            float sc = z[i] + (bias ? bias[i] : 0.0f);
            if (best < 0 || sc > best_s) { best = i; best_s = sc; }
        }
        sel[k] = best;
    }
    float wsum = 0.0f;
    for (int k = 0; k < K; k++) wsum += p[sel[k]];
    for (int k = 0; k < K; k++) topw[(size_t)n * K + k] = routing_softmax_topk ? p[sel[k]] : p[sel[k]] / wsum;
}
// probs [N, E], lse [N], topk [N, K], topw [N, K] from logits [N, E]; bias [E] or null
inline void router_forward(float* probs, float* lse, int* topk, float* topw, const float* logits, const float* bias,
                           int N, int E, int K, bool softmax_topk, cudaStream_t s) {
    router_select_kernel<<<cdiv(N, 128), 128, 0, s>>>(probs, lse, topk, topw, logits, bias, N, E, K,
                                                       softmax_topk ? 1 : 0);
    KERNEL_CHECK();
}

// Sums for the router losses, per sequence b (rows b*T .. b*T+T-1), in double:
//   psum [B, E] = sum_t p_{t,e},   zsum [B] = sum_t lse_t^2.
// grid (B, E + 1), one warp per block: block (b, e < E) sums column e, block (b, E) the
// z terms; lanes stride over t, then a fixed-order warp reduction.
__global__ void router_stats_kernel(double* psum, double* zsum, const float* probs, const float* lse, int T_, int E) {
    int b = blockIdx.x, e = blockIdx.y, lane = threadIdx.x;
    double s = 0.0;
    if (e < E) {
        for (int t = lane; t < T_; t += 32) s += probs[((size_t)b * T_ + t) * E + e];
    } else {
        for (int t = lane; t < T_; t += 32) {
            double l = lse[(size_t)b * T_ + t];
            s += l * l;
        }
    }
    s = warp_sum(s);
    if (lane == 0) {
        if (e < E) psum[(size_t)b * E + e] = s;
        else zsum[b] = s;
    }
}
inline void router_stats(double* psum, double* zsum, const float* probs, const float* lse, int B, int T_, int E,
                         cudaStream_t s) {
    router_stats_kernel<<<dim3(B, E + 1), 32, 0, s>>>(psum, zsum, probs, lse, T_, E);
    KERNEL_CHECK();
}

// The balancing loss's coefficients G [B, E] (dL/dp_{t,i} = G[b, i] for the rows t of
// sequence b) of MoE layer l, for this rank's B sequences: common/router_losses.h
// aux_dp_coef, the formula the host's aux_dp_per_seq uses. `counts` holds the per-sequence
// counts of every rank (one GPU: W = 1, rank 0), rank r's sequence b of layer l at
//   counts[r * rank_stride + l * layer_stride + b * E + i]
// and the loss's batch is the global one, W B sequences (under data parallelism the ranks
// all-gather their counts first: train_moe.cu gather_statistics). One thread per (b, i);
// it sums the counts it needs as integers (exact, so in any order).
__global__ void router_aux_coef_kernel(float* G, const int* counts, size_t rank_stride, size_t layer_stride, int W,
                                       int rank, int l, int L, int B, int T_, int E, int K, AuxLoss kind) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * E) return;
    const int b = idx / E, i = idx % E;
    long layer_count = 0, pooled_count = 0;
    for (int r = 0; r < W; r++)
        for (int ll = 0; ll < L; ll++) {
            if (kind == AUX_SWITCH && ll != l) continue;
            if (kind != AUX_SWITCH && kind != AUX_POOLED) continue;
            long c = 0;
            const int* x = counts + r * rank_stride + ll * layer_stride + i;
            for (int bb = 0; bb < B; bb++) c += x[(size_t)bb * E];
            if (ll == l) layer_count += c;
            pooled_count += c;
        }
    const long count_bi = counts[rank * rank_stride + l * layer_stride + (size_t)b * E + i];
    G[idx] = aux_dp_coef<float>(kind, count_bi, layer_count, pooled_count, W * B, T_, E, K, L);
}
inline void router_aux_coef(float* G, const int* counts, size_t rank_stride, size_t layer_stride, int W, int rank, int l,
                            int L, int B, int T_, int E, int K, AuxLoss kind, cudaStream_t s) {
    router_aux_coef_kernel<<<cdiv((long)B * E, 128), 128, 0, s>>>(G, counts, rank_stride, layer_stride, W, rank, l, L, B,
                                                                   T_, E, K, kind);
    KERNEL_CHECK();
}

// dlogits [N, E] (written) = scale * (aux_coef * dAux/dz + row_coef * dRow/dz + z_coef * dZ/dz)
//                            + d(gate weights)/dz . dtopw
//   aux: dz_j = p_j (g_j - sum_i p_i g_i), g = aux_g[b, :] (null: no aux term)
//   a loss with one dL/dp per row (dpsl, kernels/dpsl.cuh), weight row_coef: the same with
//        g = row_g[n, :] (null: none)
//   z:   dz_j = 2 lse p_j / N_loss (N_loss: the rows the z-loss averages over; N on one GPU,
//        the global batch's rows under data parallelism)
//   gate weights (dtopw [N, K] = dL/dw_k, already scaled):
//     topk_softmax: dz_{e_k} += w_k (dw_k - sum_k' w_k' dw_k')
//     softmax_topk: dz_{e_k} += dw_k p_{e_k};  dz_j -= p_j sum_k dw_k p_{e_k}
__global__ void router_backward_kernel(float* dlogits, const float* dtopw, const float* probs, const float* lse,
                                              const int* topk, const float* topw, const float* aux_g, float aux_coef,
                                              float z_coef, float scale, int N, int N_loss, int T_, int E, int K,
                                              int routing_softmax_topk, const float* row_g, float row_coef) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    float* dz = dlogits + (size_t)n * E;
    const float* p = probs + (size_t)n * E;
    for (int j = 0; j < E; j++) dz[j] = 0.0f;
    if (aux_g) {
        const float* g = aux_g + (size_t)(n / T_) * E;
        float s = 0.0f;
        for (int i = 0; i < E; i++) s += p[i] * g[i];
        for (int j = 0; j < E; j++) dz[j] += scale * aux_coef * p[j] * (g[j] - s);
    }
    if (row_g) {
        const float* g = row_g + (size_t)n * E;
        float s = 0.0f;
        for (int i = 0; i < E; i++) s += p[i] * g[i];
        for (int j = 0; j < E; j++) dz[j] += scale * row_coef * p[j] * (g[j] - s);
    }
    if (z_coef != 0.0f) {
        float l = lse[n];
        for (int j = 0; j < E; j++) dz[j] += scale * z_coef * 2.0f * l * p[j] / N_loss;
    }
    const int* sel = topk + (size_t)n * K;
    const float* w = topw + (size_t)n * K;
    const float* dw = dtopw + (size_t)n * K;
    if (!routing_softmax_topk) {
        float s = 0.0f;
        for (int k = 0; k < K; k++) s += w[k] * dw[k];
        for (int k = 0; k < K; k++) dz[sel[k]] += w[k] * (dw[k] - s);
    } else {
        float s = 0.0f;
        for (int k = 0; k < K; k++) s += dw[k] * p[sel[k]];
        for (int k = 0; k < K; k++) dz[sel[k]] += dw[k] * p[sel[k]];
        for (int j = 0; j < E; j++) dz[j] -= s * p[j];
    }
}
inline void router_backward(float* dlogits, const float* dtopw, const float* probs, const float* lse, const int* topk,
                            const float* topw, const float* aux_g, float aux_coef, float z_coef, float scale, int N,
                            int N_loss, int T_, int E, int K, bool softmax_topk, cudaStream_t s,
                            const float* row_g = nullptr, float row_coef = 0.0f) {
    router_backward_kernel<<<cdiv(N, 128), 128, 0, s>>>(dlogits, dtopw, probs, lse, topk, topw, aux_g, aux_coef, z_coef,
                                                         scale, N, N_loss, T_, E, K, softmax_topk ? 1 : 0, row_g,
                                                         row_coef);
    KERNEL_CHECK();
}

// dx [N, d] += dlogits [N, E] @ w [E, d]: one thread per (n, i), experts in order
template <typename T>
__global__ void router_backward_input_kernel(T* dx, const float* dlogits, const float* w, int N, int d, int E) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * d) return;
    size_t n = idx / d;
    int i = (int)(idx % d);
    float s = 0.0f;
    for (int e = 0; e < E; e++) s += dlogits[n * E + e] * w[(size_t)e * d + i];
    dx[idx] = from_f<T>(to_f(dx[idx]) + s);
}
// pass 1 of dw [E, d] += dlogits^T @ x: scratch[chunk, e*d + i] over the chunk's rows in order
template <typename T>
__global__ void router_backward_weight_partial_kernel(float* scratch, const float* dlogits, const T* x, int N, int d,
                                                      int E) {
    int chunk = blockIdx.x, e = blockIdx.y, i = blockIdx.z * blockDim.x + threadIdx.x;
    if (i >= d) return;
    int n0 = chunk * ROUTER_DW_ROWS, n1 = min(N, n0 + ROUTER_DW_ROWS);
    float s = 0.0f;
    for (int n = n0; n < n1; n++) s += dlogits[(size_t)n * E + e] * to_f(x[(size_t)n * d + i]);
    scratch[(size_t)chunk * E * d + (size_t)e * d + i] = s;
}
// dx += dlogits @ w;  dw (fp32 grad, [E, d]) += dlogits^T @ x.  scratch: router_scratch_floats(N, E, d)
template <typename T>
void router_backward_matmul(T* dx, float* dw, float* scratch, const float* dlogits, const T* x, const float* w, int N,
                            int d, int E, cudaStream_t s) {
    router_backward_input_kernel<<<cdiv((long)N * d, 256), 256, 0, s>>>(dx, dlogits, w, N, d, E);
    KERNEL_CHECK();
    int nchunks = cdiv(N, ROUTER_DW_ROWS);
    router_backward_weight_partial_kernel<<<dim3(nchunks, E, cdiv(d, 256)), 256, 0, s>>>(scratch, dlogits, x, N, d, E);
    KERNEL_CHECK();
    column_chunks_sum_kernel<<<cdiv((long)E * d, 256), 256, 0, s>>>(dw, scratch, nchunks, E * d);
    KERNEL_CHECK();
}

}  // namespace gpu
