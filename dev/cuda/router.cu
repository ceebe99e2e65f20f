/*
MoE router, fp32: softmax over the E router logits, top-K selection (by logit + optional
aux-free bias; ties go to the lower expert index), gate weights for both routing variants,
their backward, and the gradients of the router losses (aux switch / seq / pooled, z-loss).
  forward:  probs[N,E], topk[N,K] (best first), topw[N,K]
            topk_softmax: w_k = p_{e_k} / sum_k' p_{e_k'};   softmax_topk: w_k = p_{e_k}
  backward: dlogits[N,E] += d(topw)/dz . dtopw
  losses:   dlogits += scale * (aux_coef d(aux)/dz + z_coef d(z)/dz), with the per-sequence or
            pooled expert counts as inputs (they carry no gradient)
CPU reference: router_forward / router_backward / router_losses_backward of train_moe.cpp,
with dAux/dp from aux_dp_per_seq (common/router_losses.h, the RoutingStats form). The loss
gradients alone are checked against that loop transcribed in double (loss_reference), with
a tolerance designed for them: see "The router-loss gradients' check" below.
Inputs include logits quantized to multiples of 0.25 (ties in the top-K selection), and an
expert whose logit is always -30 (it receives no token). Every case runs at full size under
emulation too (the largest, B 4 T 1024, takes about a second there).

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/router.cu -o build/router -lcublas -lcublasLt -lgomp && ./build/router [version]

Version 2 is the production router, kernels/router.cuh, called as train_moe.cu's
moe_forward / moe_backward do, on the same cases:
  gpu::router_logits_forward   logits = x @ Wr^T (fp32 weights; x fp32 here), vs matmul_forward
  gpu::router_forward          probs, lse (new output), topk, topw, vs router_forward
  gpu::router_stats            psum [B,E], zsum [B] in double, vs host double sums
  gpu::router_backward         dlogits WRITTEN (not +=) = gate-weight part + scale*(aux + z)
                               parts, aux through the per-sequence coefficients [B, E] that
                               aux_dp_per_seq (common/router_losses.h) builds on the host,
                               as train_moe.cu does. Checked term by term, as version 1: the gate part alone
                               (aux_g null, z_coef 0) against router_backward from 0, then each
                               loss alone (dtopw = 0) by the loss gradients' check, then all
                               together against router_losses_backward + router_backward.
  gpu::router_aux_coef         the balancing loss's coefficients [B, E] on the device (as
                               train_moe.cu's backward computes them), vs aux_dp_per_seq on
                               the host: bit-identical, switch / seq / pooled, one GPU and
                               three data-parallel ranks (the gathered counts' layout).
  gpu::router_backward_matmul  dx += dlogits @ Wr, dWr += dlogits^T x (2-pass, deterministic),
                               vs matmul_backward; dWr checked bit-identical on rerun.
Version 3: router_logits_forward and router_backward_matmul with T = bf16 (x and dx bf16;
logits, dWr fp32 sums): the reference on the bf16-rounded x.
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/router.cuh"

// ----------------------------------------------------------------------------
// The router-loss gradients' check (versions 1 and 2)
//
// Each element is dz_j = start_j + c p_j (G_j - sum_i p_i G_i) (aux, c = scale aux_coef), or
// start_j + c_z 2 lse p_j / N (z-loss, c_z = scale z_coef). The aux terms CANCEL: G_j and
// the mean sum_i p_i G_i are ~1/N (2.4e-4 at N 4096) and nearly equal where the load is
// nearly balanced, so an element can be 1e-11 while its terms are 1e-7. A correct fp32
// kernel is off by a few ulps of the TERMS (1e-14), 1e-3 of such an element: the former
// check (fp32 reference, elementwise rtol 1e-4, atol 1e-6 x max|dz|) failed on those
// elements whenever the two sides round differently (nvcc fuses a*b+c, the CPU loop does
// not): d(switch)/dz and d(seq)/dz at B 4 T 1024. Now:
//   - the reference is train_moe.cpp's router_losses_backward loop in DOUBLE
//     (loss_reference; G from aux_dp_per_seq<double>), so that it measures the kernel only;
//   - each element's error is measured against mag_j, the size of the terms it is made of:
//     |start_j| + |c| p_j (|G_j| + sum_i p_i |G_i|), z-loss |start_j| + |c_z| 2 (|max z| +
//     log sum exp + 1) p_j / N (lse = max + log sum, the log's error is absolute, ~E eps);
//     and the whole tensor's against ||mag||, by Suite::check_scaled with TOL_LOSS:
//         max_j |out_j - ref_j| / mag_j <= 1e-5   and   ||out - ref|| / ||mag|| <= 1e-5.
//     fp32 rounding of these few-term sums stays below ~5 eps = 3e-7 of mag (30x margin);
//     the line also prints kappa = ||mag|| / ||ref||: errors above 1e-5 kappa of ||ref||
//     are caught (kappa <= ~130 in these cases);
//   - the check is tested every time it runs (check_loss_grad): it must ACCEPT the same
//     gradient computed with fused multiply-adds (loss_grad_fma: another correct fp32
//     rounding, the one a GPU makes; under emulation the kernel's bits equal the CPU
//     loop's, so nothing else here meets a rounding difference), and it must REJECT two
//     planted bugs made from the kernel's own output: the gradient doubled (the backward's
//     scale 0.5 not applied) and the last row's gradient missing (a row loop that stops at
//     N-1); each printed with its error as a multiple of the bound, next to the real one's.
constexpr Tol TOL_LOSS = {1e-5, 1e-5, 0.0};

struct LossRef {
    std::vector<double> ref, mag;
};
// start + scale (aux_coef dAux/dz + z_coef dZ/dz) in double, as router_losses_backward of
// train_moe.cpp computes it; G [B, E] (empty: no aux term); and each element's term size
LossRef loss_reference(const std::vector<float>& start, const std::vector<float>& probs,
                       const std::vector<float>& logits, const std::vector<double>& G, double aux_coef, double z_coef,
                       double scale, int B, int T, int E) {
    const int N = B * T;
    LossRef r;
    r.ref.assign(start.begin(), start.end());
    r.mag.resize(start.size());
    for (size_t i = 0; i < start.size(); i++) r.mag[i] = std::fabs((double)start[i]);
    for (int n = 0; n < N; n++) {
        const float* p = &probs[(size_t)n * E];
        double* dz = &r.ref[(size_t)n * E];
        double* mg = &r.mag[(size_t)n * E];
        if (!G.empty()) {
            const double* g = &G[(size_t)(n / T) * E];
            double s = 0, sa = 0, c = scale * aux_coef;
            for (int i = 0; i < E; i++) { s += p[i] * g[i]; sa += p[i] * std::fabs(g[i]); }
            for (int j = 0; j < E; j++) {
                dz[j] += c * p[j] * (g[j] - s);
                mg[j] += std::fabs(c) * p[j] * (std::fabs(g[j]) + sa);
            }
        }
        if (z_coef != 0) {
            const float* zz = &logits[(size_t)n * E];
            double mx = zz[0], s = 0;
            for (int i = 1; i < E; i++) mx = std::max(mx, (double)zz[i]);
            for (int i = 0; i < E; i++) s += std::exp(zz[i] - mx);
            double lse = mx + std::log(s), lse_mag = std::fabs(mx) + std::log(s) + 1;
            for (int j = 0; j < E; j++) {
                dz[j] += z_loss_dlogit<double>(scale * z_coef, lse, p[j], N);
                mg[j] += std::fabs(z_loss_dlogit<double>(scale * z_coef, lse_mag, p[j], N));
            }
        }
    }
    return r;
}
// the same gradient in fp32 with every a*b+c fused, as nvcc contracts the kernel's loops
// (std::fma rounds once): a correct result with other rounding than the CPU loop's
std::vector<float> loss_grad_fma(const std::vector<float>& start, const std::vector<float>& probs,
                                 const std::vector<float>& logits, const std::vector<float>& G, float aux_coef,
                                 float z_coef, float scale, int B, int T, int E) {
    const int N = B * T;
    std::vector<float> out = start;
    for (int n = 0; n < N; n++) {
        const float* p = &probs[(size_t)n * E];
        float* dz = &out[(size_t)n * E];
        if (!G.empty()) {
            const float* g = &G[(size_t)(n / T) * E];
            float s = 0, c = scale * aux_coef;
            for (int i = 0; i < E; i++) s = std::fma(p[i], g[i], s);
            for (int j = 0; j < E; j++) dz[j] = std::fma(c * p[j], g[j] - s, dz[j]);
        }
        if (z_coef != 0) {
            const float* zz = &logits[(size_t)n * E];
            float mx = zz[0], s = 0;
            for (int i = 1; i < E; i++) mx = std::max(mx, zz[i]);
            for (int i = 0; i < E; i++) s += std::exp(zz[i] - mx);
            float lse = mx + std::log(s), c = scale * z_coef * 2;
            for (int j = 0; j < E; j++) dz[j] = std::fma(c * lse, p[j] / N, dz[j]);
        }
    }
    return out;
}
// the check (Suite::check_scaled) and its tests, see above
void check_loss_grad(Suite& S, const std::string& what, const std::vector<float>& out, const std::vector<float>& start,
                     const LossRef& r, const std::vector<float>& fma_version, int N, int E) {
    S.check_scaled(what.c_str(), out, r.ref, r.mag, TOL_LOSS);
    Suite::Cmp real = Suite::compare_scaled(out, r.ref, r.mag, TOL_LOSS);
    Suite::Cmp alt = Suite::compare_scaled(fma_version, r.ref, r.mag, TOL_LOSS);
    char detail[96];
    snprintf(detail, sizeof detail, "error %.3g x bound (the real output: %.3g x bound)", alt.ratio(), real.ratio());
    S.check_true("accepts fused multiply-add rounding", alt.ok, detail);
    std::vector<float> bad = out;
    for (size_t i = 0; i < bad.size(); i++) bad[i] = start[i] + 2 * (out[i] - start[i]);
    S.check_catches("gradient x2 (scale not applied)", real, Suite::compare_scaled(bad, r.ref, r.mag, TOL_LOSS));
    bad = out;
    for (int j = 0; j < E; j++) bad[(size_t)(N - 1) * E + j] = start[(size_t)(N - 1) * E + j];
    S.check_catches("last row's gradient missing", real, Suite::compare_scaled(bad, r.ref, r.mag, TOL_LOSS));
}

// The routing statistics the losses read (common/router_losses.h), as the trainers build
// them: layer 0 is this layer (the counts from topk), layers 1 and 2 two other layers with
// random counts (they enter the pooled loss only). psum/zsum are not read by the gradients.
struct Stats {
    std::vector<int> counts[3];
    RoutingStats rs;
    Stats(const std::vector<int>& topk, int B, int T, int E, int K, uint64_t seed) {
        const int N = B * T;
        counts[0].assign((size_t)B * E, 0);
        for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++) counts[0][(size_t)(n / T) * E + topk[(size_t)n * K + k]]++;
        for (int l = 1; l < 3; l++) counts[l] = rand_ints((size_t)B * E, 2 * T * K / E + 1, seed + l);
        rs.B = B; rs.T = T; rs.E = E; rs.K = K; rs.seg = T;
        for (int l = 0; l < 3; l++) rs.layers.push_back({counts[l].data(), nullptr, nullptr});
    }
    // G [B, E] of layer 0 in R (empty for AUX_NONE)
    template <typename R>
    std::vector<R> G(AuxLoss aux) const {
        std::vector<R> g;
        if (aux != AUX_NONE) aux_dp_per_seq(g, aux, rs, 0);
        return g;
    }
    bool balanced() const {  // equal pooled counts: the aux gradient is then exactly 0
        for (int e = 1; e < rs.E; e++) if (rs.pooled_count(e) != rs.pooled_count(0)) return false;
        return true;
    }
};

// ----------------------------------------------------------------------------
// version 1: one thread per token for everything, the CPU loops transcribed. E is small (8
// to 64) and a row is E*4 bytes, so a thread per row is a reasonable shape anyway.
__global__ void router_forward_v1(float* probs, int* topk, float* topw, const float* logits, const float* bias, int N,
                                  int E, int K, Routing routing) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* z = logits + (size_t)n * E;
    float* p = probs + (size_t)n * E;
    float mx = z[0];
    for (int i = 1; i < E; i++) mx = fmaxf(mx, z[i]);
    float sum = 0;
    for (int i = 0; i < E; i++) { p[i] = expf(z[i] - mx); sum += p[i]; }
    for (int i = 0; i < E; i++) p[i] /= sum;
    int* sel = topk + (size_t)n * K;
    for (int k = 0; k < K; k++) {  // K rounds of "largest not yet taken"; strict > keeps the lower index
        int best = -1;
        float best_s = 0;
        for (int i = 0; i < E; i++) {
            bool taken = false;
            for (int j = 0; j < k; j++) taken |= sel[j] == i;
            if (taken) continue;
            float s = z[i] + (bias ? bias[i] : 0.0f);
            if (best < 0 || s > best_s) { best = i; best_s = s; }
        }
        sel[k] = best;
    }
    float wsum = 0;
    for (int k = 0; k < K; k++) wsum += p[sel[k]];
    for (int k = 0; k < K; k++)
        topw[(size_t)n * K + k] = routing == ROUTING_TOPK_SOFTMAX ? p[sel[k]] / wsum : p[sel[k]];
}
__global__ void router_backward_v1(float* dlogits, const float* dtopw, const float* probs, const int* topk,
                                   const float* topw, int N, int E, int K, Routing routing) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    float* dz = dlogits + (size_t)n * E;
    const float* p = probs + (size_t)n * E;
    const float* w = topw + (size_t)n * K;
    const float* dw = dtopw + (size_t)n * K;
    const int* sel = topk + (size_t)n * K;
    float s = 0;
    if (routing == ROUTING_TOPK_SOFTMAX) {
        for (int k = 0; k < K; k++) s += w[k] * dw[k];
        for (int k = 0; k < K; k++) dz[sel[k]] += w[k] * (dw[k] - s);
    } else {
        for (int k = 0; k < K; k++) s += dw[k] * p[sel[k]];
        for (int k = 0; k < K; k++) dz[sel[k]] += dw[k] * p[sel[k]];
        for (int j = 0; j < E; j++) dz[j] -= s * p[j];
    }
}
// dL/dp_{t,i} = G(b, i), the formulas of common/router_losses.h (aux_dp_per_seq) evaluated
// on the device, then through the softmax; plus the z-loss term (z_loss_dlogit)
__device__ float aux_coeff(AuxLoss aux, const int* seq_counts, const long long* pooled_C, int b, int i, int B, int T,
                           int E, int K, int L) {
    int N = B * T;
    if (aux == AUX_SWITCH) {
        long long tot = 0;
        for (int bb = 0; bb < B; bb++) tot += seq_counts[bb * E + i];
        return switch_loss_dp<float>(tot, N, E, K);
    }
    if (aux == AUX_SEQ) return seq_loss_dp<float>(seq_counts[b * E + i], B, T, E, K);
    if (aux == AUX_POOLED) return pooled_loss_dp<float>(pooled_C[i], L, N, E);
    return 0.0f;
}
__global__ void router_losses_backward_v1(float* dlogits, const float* probs, const float* logits,
                                          const int* seq_counts, const long long* pooled_C, int B, int T, int E, int K,
                                          int L, AuxLoss aux, float aux_coef, float z_coef, float scale) {
    int N = B * T;
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* p = probs + (size_t)n * E;
    const float* z = logits + (size_t)n * E;
    float* dz = dlogits + (size_t)n * E;
    if (aux != AUX_NONE && aux_coef != 0) {
        float s = 0;
        for (int i = 0; i < E; i++) s += p[i] * aux_coeff(aux, seq_counts, pooled_C, n / T, i, B, T, E, K, L);
        for (int j = 0; j < E; j++)
            dz[j] += scale * aux_coef * p[j] * (aux_coeff(aux, seq_counts, pooled_C, n / T, j, B, T, E, K, L) - s);
    }
    if (z_coef != 0) {
        float mx = z[0], s = 0;
        for (int i = 1; i < E; i++) mx = fmaxf(mx, z[i]);
        for (int i = 0; i < E; i++) s += expf(z[i] - mx);
        float lse = mx + logf(s);
        for (int j = 0; j < E; j++) dz[j] += z_loss_dlogit(scale * z_coef, lse, p[j], N);
    }
}

const char* NAMES[] = {"", "thread per token", "kernels/router.cuh (fp32)", "kernels/router.cuh matmuls (x bf16)"};
const int NV = 3;

// the router's two matmuls (versions 2 and 3); d: model width
template <typename T>
void check_router_matmuls(Suite& S, int N, int d, int E, uint64_t& seed) {
    const bool is_bf16 = sizeof(T) == 2;
    auto x = rand_floats((size_t)N * d, seed++), w = rand_floats((size_t)E * d, seed++, -0.1f, 0.1f);
    auto dl = rand_floats((size_t)N * E, seed++), dx0 = rand_floats((size_t)N * d, seed++);
    auto dw0 = rand_floats((size_t)E * d, seed++);
    if (is_bf16) { x = round_bf16(x); dx0 = round_bf16(dx0); }
    std::vector<float> logits((size_t)N * E), dx = dx0, dw = dw0;
    matmul_forward(logits.data(), x.data(), w.data(), N, d, E);
    matmul_backward(dx.data(), dw.data(), dl.data(), x.data(), w.data(), N, d, E);
    Dev<T> dX(to_t<T>(x)), dDx(to_t<T>(dx0));
    Dev<float> dW(w), dL((size_t)N * E), dDl(dl), dDw(dw0), scratch(gpu::router_scratch_floats(N, E, d));
    Tol tl = TOL_FP32;  // fp32 sums of d products (x exact in both)
    tl.atol = 1e-4;
    dL.poison();
    gpu::router_logits_forward(dL.p, (const T*)dX.p, dW.p, N, d, E, (cudaStream_t)0);
    S.check_close("router logits", dL.host(), logits, tl);
    auto bwd = [&] { gpu::router_backward_matmul(dDx.p, dDw.p, scratch.p, dDl.p, (const T*)dX.p, dW.p, N, d, E, (cudaStream_t)0); };
    bwd();
    S.check_close("router dx (+=)", host_f(dDx), dx, is_bf16 ? TOL_BF16 : tl);
    auto gw = dDw.host();
    S.check_close("router dW (+=)", gw, dw, tl);
    dDw.upload(dw0);
    bwd();
    S.check_equal("router dW bit-identical on rerun", dDw.host(), gw);
    if (N == 4096) {
        S.bench("router logits", [&] { gpu::router_logits_forward(dL.p, (const T*)dX.p, dW.p, N, d, E, (cudaStream_t)0); },
                sizeof(T) * (double)N * d + 4.0 * (E * d + N * E), 2.0 * N * d * E);
        S.bench("router backward matmuls", bwd, sizeof(T) * 3.0 * N * d + 4.0 * (N * E + 2.0 * E * d), 4.0 * N * d * E);
    }
}

// G on the device (gpu::router_aux_coef) vs aux_dp_per_seq on the host, exactly (the same
// function of the same integers, common/router_losses.h aux_dp_coef), for every balancing
// loss, 3 MoE layers, one GPU (W 1) and data parallel (W 3: every rank's counts in the
// gathered layout, each rank computing its own rows of the global batch's G). The device
// layout has B + 1 rows per layer (train_moe.cu's B_max > B case), the extra row poisoned.
void check_aux_coef(Suite& S, int B, int T, int E, int K, uint64_t& seed) {
    const int L = 3, Bm = B + 1;
    for (int W : {1, 3}) {
        const size_t layer_stride = (size_t)Bm * E, rank_stride = L * layer_stride;
        std::vector<int> gathered(W * rank_stride, -1);
        std::vector<std::vector<int>> host(L);  // [L][W B, E]: rank r's rows at r B
        for (int l = 0; l < L; l++) {
            host[l] = rand_ints((size_t)W * B * E, 2 * T * K / E + 1, seed++);
            for (int r = 0; r < W; r++)
                for (size_t x = 0; x < (size_t)B * E; x++)
                    gathered[r * rank_stride + l * layer_stride + x] = host[l][(size_t)r * B * E + x];
        }
        RoutingStats rs;
        rs.B = W * B; rs.T = T; rs.E = E; rs.K = K; rs.seg = T;
        for (int l = 0; l < L; l++) rs.layers.push_back({host[l].data(), nullptr, nullptr});
        Dev<int> dC(gathered);
        Dev<float> dG((size_t)B * E);
        for (AuxLoss aux : {AUX_SWITCH, AUX_SEQ, AUX_POOLED}) {
            std::vector<float> out, ref, g;
            for (int l = 0; l < L; l++) {
                aux_dp_per_seq(g, aux, rs, l);  // [W B, E]
                ref.insert(ref.end(), g.begin(), g.end());
                for (int r = 0; r < W; r++) {
                    dG.poison();
                    gpu::router_aux_coef(dG.p, dC.p, rank_stride, layer_stride, W, r, l, L, B, T, E, K, aux, 0);
                    std::vector<float> h = dG.host();
                    out.insert(out.end(), h.begin(), h.end());
                }
            }
            S.check_equal(strfmt("G %s on the device, W %d", aux_name(aux), W).c_str(), out, ref);
        }
    }
}

// version 2: forward, stats and backward of kernels/router.cuh (fp32), as train_moe.cu calls them
void check_production(Suite& S, int B, int T, int E, int K, Routing routing, bool use_bias, const std::vector<float>& logits,
                      const std::vector<float>& bias, const std::vector<float>& probs, const std::vector<int>& topk,
                      const std::vector<float>& topw, const std::vector<float>& dtopw, uint64_t& seed) {
    const int N = B * T;
    const bool softmax_topk = routing == ROUTING_SOFTMAX_TOPK;
    std::vector<float> lse(N);
    for (int n = 0; n < N; n++) {
        const float* z = &logits[(size_t)n * E];
        float mx = z[0], s = 0;
        for (int i = 1; i < E; i++) mx = std::max(mx, z[i]);
        for (int i = 0; i < E; i++) s += std::exp(z[i] - mx);
        lse[n] = mx + std::log(s);
    }
    Dev<float> dZ(logits), dBias(bias), dP((size_t)N * E), dLse(N), dW((size_t)N * K), dDw(dtopw), dDl((size_t)N * E);
    Dev<int> dK((size_t)N * K);
    Dev<double> dPsum((size_t)B * E), dZsum(B);
    cudaStream_t st = 0;
    auto fwd = [&] {
        gpu::router_forward(dP.p, dLse.p, dK.p, dW.p, dZ.p, use_bias ? dBias.p : nullptr, N, E, K, softmax_topk, st);
    };
    dP.poison(); dLse.poison(); dW.poison(); dK.poison();
    fwd();
    S.check_close("probs", dP.host(), probs, TOL_FP32);
    S.check_close("lse", dLse.host(), lse, TOL_FP32);
    S.check_equal("topk (incl. ties)", dK.host(), topk);
    S.check_close("topw", dW.host(), topw, TOL_FP32);
    // stats from the CPU's probs and lse (independent of the forward check); the reference
    // is train_moe.cpp's router_stats with one segment per sequence (seg = T), as the kernel
    dP.upload(probs); dLse.upload(lse); dK.upload(topk); dW.upload(topw);
    std::vector<double> psum((size_t)B * E), zsum(B);
    router_stats(psum.data(), zsum.data(), probs.data(), logits.data(), N, E, T);
    dPsum.poison(); dZsum.poison();
    gpu::router_stats(dPsum.p, dZsum.p, dP.p, dLse.p, B, T, E, st);
    auto to_f32 = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
    S.check_close("psum [B,E] (double)", to_f32(dPsum.host()), to_f32(psum), TOL_FP32);
    S.check_close("zsum [B] (double)", to_f32(dZsum.host()), to_f32(zsum), TOL_FP32);
    // backward, gate part alone: dlogits written, so the reference starts from 0
    std::vector<float> dl((size_t)N * E, 0.0f);
    router_backward(dl.data(), dtopw.data(), probs.data(), topk.data(), topw.data(), N, E, K, routing);
    const float scale = 0.5f;
    dDl.poison();
    gpu::router_backward(dDl.p, dDw.p, dP.p, dLse.p, dK.p, dW.p, nullptr, 0.01f, 0.0f, scale, N, N, T, E, K, softmax_topk, st);
    S.check_close("dlogits from gates (written)", dDl.host(), dl, TOL_FP32);
    if (N == 4096) {
        S.bench(softmax_topk ? "forward softmax_topk" : "forward topk_softmax", fwd, (2.0 * N * E + 2.0 * N * K) * 4 + 4.0 * N);
        S.bench("backward (gates)", [&] {
            gpu::router_backward(dDl.p, dDw.p, dP.p, dLse.p, dK.p, dW.p, nullptr, 0.01f, 0.0f, scale, N, N, T, E, K,
                                 softmax_topk, st);
        }, 4.0 * (3.0 * N * E + 3.0 * N * K));
    }
    // the loss terms one at a time (dtopw = 0 so that the gate part is exactly 0), G from
    // the routing statistics on the host, as moe_backward does
    Stats stats(topk, B, T, E, K, seed++);
    Dev<float> dZero(std::vector<float>((size_t)N * K, 0.0f)), dAuxG((size_t)B * E);
    const double aux_coef = 0.01, z_coef = 0.001;
    const std::vector<float> zero((size_t)N * E, 0.0f);
    for (AuxLoss aux : {AUX_SWITCH, AUX_SEQ, AUX_POOLED, AUX_NONE}) {
        double zc = aux == AUX_NONE ? z_coef : 0.0;
        auto Gf = stats.G<float>(aux);
        LossRef r = loss_reference(zero, probs, logits, stats.G<double>(aux), aux_coef, zc, scale, B, T, E);
        double mx = 0;
        for (double x : r.ref) mx = std::max(mx, std::fabs(x));
        const float* g_dev = nullptr;
        if (!Gf.empty()) {
            dAuxG.upload(Gf);
            g_dev = dAuxG.p;
        }
        dDl.poison();
        gpu::router_backward(dDl.p, dZero.p, dP.p, dLse.p, dK.p, dW.p, g_dev, (float)aux_coef, (float)zc, scale, N, N, T, E,
                             K, softmax_topk, st);
        std::string what = std::string("d(") + (aux == AUX_NONE ? "z-loss" : aux_name(aux)) + ")/dz (written)";
        check_loss_grad(S, what, dDl.host(), zero, r,
                        loss_grad_fma(zero, probs, logits, Gf, (float)aux_coef, (float)zc, scale, B, T, E), N, E);
        if (!stats.balanced() || aux == AUX_NONE) S.check_true((what + " non-zero").c_str(), mx > 0);
    }
    // all three together (seq aux + z + gates), as one training step runs it; the gate part
    // dominates: train_moe.cpp's fp32 loops are the reference, at the fp32 tolerance
    {
        std::vector<float> all_ref((size_t)N * E, 0.0f), g = stats.G<float>(AUX_SEQ);
        router_losses_backward(all_ref.data(), probs.data(), logits.data(), g.data(), aux_coef, z_coef, scale, B, T, E);
        router_backward(all_ref.data(), dtopw.data(), probs.data(), topk.data(), topw.data(), N, E, K, routing);
        dAuxG.upload(g);
        dDl.poison();
        gpu::router_backward(dDl.p, dDw.p, dP.p, dLse.p, dK.p, dW.p, dAuxG.p, (float)aux_coef, (float)z_coef, scale, N, N,
                             T, E, K, softmax_topk, st);
        S.check_close("dlogits, gates + seq + z", dDl.host(), all_ref, TOL_FP32);
    }
}

int main(int argc, char** argv) {
    Suite S("router", argc, argv);
    struct Case { int B, T, E, K; Routing routing; bool bias, ties, starve; };
    const Case cases[] = {
        {1, 5, 4, 1, ROUTING_TOPK_SOFTMAX, false, false, false},
        {2, 33, 8, 2, ROUTING_TOPK_SOFTMAX, false, true, true},
        {2, 33, 8, 2, ROUTING_SOFTMAX_TOPK, true, true, true},
        {3, 100, 64, 6, ROUTING_SOFTMAX_TOPK, false, false, false},
        {4, 1024, 8, 2, ROUTING_TOPK_SOFTMAX, false, false, true},
        {4, 1024, 8, 2, ROUTING_SOFTMAX_TOPK, true, true, false},
    };
    for (int v = 1; v <= NV; v++) {
        if (!S.want(v)) continue;
        S.begin(v, NAMES[v]);
        uint64_t seed = 31 * v;
        for (auto c : cases) {
            int B = c.B, T = c.T, N = B * T, E = c.E, K = c.K;
            printf("  B %d T %d E %d K %d %s%s%s%s\n", B, T, E, K, routing_name(c.routing), c.bias ? " bias" : "",
                   c.ties ? " ties" : "", c.starve ? " (expert 3 gets no token)" : "");
            const int d = N >= 4096 ? 768 : 37;  // model width, for the router's matmuls (versions 2-3)
            if (v == 3) {
                check_router_matmuls<gpu::bf16>(S, N, d, E, seed);
                continue;
            }
            if (v == 2) check_router_matmuls<float>(S, N, d, E, seed);
            auto logits = rand_floats((size_t)N * E, seed++, -3, 3);
            if (c.ties) for (auto& x : logits) x = std::round(x * 4) / 4;
            if (c.starve) for (int n = 0; n < N; n++) logits[(size_t)n * E + 3] = -30;
            std::vector<float> bias = rand_floats(E, seed++, -0.5f, 0.5f);
            if (c.ties) for (auto& x : bias) x = std::round(x * 4) / 4;
            std::vector<float> probs((size_t)N * E), topw((size_t)N * K);
            std::vector<int> topk((size_t)N * K);
            router_forward(probs.data(), topk.data(), topw.data(), logits.data(), c.bias ? bias.data() : nullptr, N, E, K,
                           c.routing);
            auto dtopw = rand_floats((size_t)N * K, seed++), dl0 = rand_floats((size_t)N * E, seed++);
            std::vector<float> dl = dl0;
            router_backward(dl.data(), dtopw.data(), probs.data(), topk.data(), topw.data(), N, E, K, c.routing);

            if (v == 2) {
                check_aux_coef(S, c.B, c.T, E, K, seed);
                check_production(S, c.B, c.T, E, K, c.routing, c.bias, logits, bias, probs, topk, topw, dtopw, seed);
                continue;
            }
            Dev<float> dZ(logits), dBias(bias), dP((size_t)N * E), dW((size_t)N * K), dDw(dtopw), dDl(dl0);
            Dev<int> dK((size_t)N * K);
            dP.poison(); dW.poison(); dK.poison();
            router_forward_v1<<<ceil_div(N, 128), 128>>>(dP.p, dK.p, dW.p, dZ.p, c.bias ? dBias.p : nullptr, N, E, K,
                                                         c.routing);
            launchCheck();
            S.check_close("probs", dP.host(), probs, TOL_FP32);
            S.check_equal("topk (incl. ties)", dK.host(), topk);
            S.check_close("topw", dW.host(), topw, TOL_FP32);
            // backward from the CPU's forward, so that a forward bug is not counted twice
            dP.upload(probs); dK.upload(topk); dW.upload(topw);
            router_backward_v1<<<ceil_div(N, 128), 128>>>(dDl.p, dDw.p, dP.p, dK.p, dW.p, N, E, K, c.routing);
            launchCheck();
            S.check_close("dlogits from gates (+=)", dDl.host(), dl, TOL_FP32);
            if (N == 4096)
                S.bench(c.routing == ROUTING_SOFTMAX_TOPK ? "forward softmax_topk" : "forward topk_softmax", [&] {
                    router_forward_v1<<<ceil_div(N, 128), 128>>>(dP.p, dK.p, dW.p, dZ.p, c.bias ? dBias.p : nullptr, N,
                                                                 E, K, c.routing);
                }, (2.0 * N * E + 2.0 * N * K) * 4);

            // router-loss gradients: counts as Model::moe_forward computes them, two other
            // (random) layers for the pooled loss
            Stats stats(topk, B, T, E, K, seed++);
            const int L = stats.rs.n_layers();
            std::vector<long long> pooled_ll(E);
            for (int e = 0; e < E; e++) pooled_ll[e] = stats.rs.pooled_count(e);
            Dev<int> dSc(stats.counts[0]);
            Dev<long long> dPool(pooled_ll);
            const double aux_coef = 0.01, z_coef = 0.001;
            const float scale = 0.5f;
            const std::vector<float> zero((size_t)N * E, 0.0f);
            for (AuxLoss aux : {AUX_SWITCH, AUX_SEQ, AUX_POOLED, AUX_NONE}) {
                double zc = aux == AUX_NONE ? z_coef : 0.0;  // each term on its own
                // these gradients are ~1e-6 and less: accumulate onto a random start of the
                // same size, so that they are not lost in the start's rounding
                auto Gd = stats.G<double>(aux);
                double mx = 0;
                for (double x : loss_reference(zero, probs, logits, Gd, aux_coef, zc, scale, B, T, E).ref)
                    mx = std::max(mx, std::fabs(x));
                std::vector<float> start = rand_floats((size_t)N * E, seed++, -(float)mx, (float)mx);
                if (mx == 0) start = rand_floats((size_t)N * E, seed++);
                LossRef r = loss_reference(start, probs, logits, Gd, aux_coef, zc, scale, B, T, E);
                dDl.upload(start);
                router_losses_backward_v1<<<ceil_div(N, 128), 128>>>(dDl.p, dP.p, dZ.p, dSc.p, dPool.p, B, T, E, K, L, aux,
                                                                     (float)aux_coef, (float)zc, scale);
                launchCheck();
                std::string what = std::string("d(") + (aux == AUX_NONE ? "z-loss" : aux_name(aux)) + ")/dz (+=)";
                check_loss_grad(S, what, dDl.host(), start, r,
                                loss_grad_fma(start, probs, logits, stats.G<float>(aux), (float)aux_coef, (float)zc,
                                              scale, B, T, E),
                                N, E);
                // the gradient must reach the router (a known silent bug elsewhere); the aux
                // gradient vanishes when all counts are equal, so only where they differ
                if (!stats.balanced() || aux == AUX_NONE) S.check_true((what + " non-zero").c_str(), mx > 0);
            }
        }
    }
    return S.finish();
}
