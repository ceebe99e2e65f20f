/*
MoE router, fp32: softmax over the E router logits, top-K selection (by logit + optional
aux-free bias; ties go to the lower expert index), gate weights for both routing variants,
their backward, and the gradients of the router losses (aux switch / seq / pooled, z-loss).
  forward:  probs[N,E], topk[N,K] (best first), topw[N,K]
            topk_softmax: w_k = p_{e_k} / sum_k' p_{e_k'};   softmax_topk: w_k = p_{e_k}
  backward: dlogits[N,E] += d(topw)/dz . dtopw
  losses:   dlogits += scale * (aux_coef d(aux)/dz + z_coef d(z)/dz), with the per-sequence or
            pooled expert counts as inputs (they carry no gradient)
CPU reference: router_forward / router_backward of train_moe.cpp, and for the losses the
loop of Model::router_losses_backward (a method; copied below as router_losses_backward_cpu,
using the file's own aux_dp).
Inputs include logits quantized to multiples of 0.25 (ties in the top-K selection), and an
expert whose logit is always -30 (it receives no token).

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
                               loss alone (dtopw = 0) at the loss tolerance, then all together.
  gpu::router_backward_matmul  dx += dlogits @ Wr, dWr += dlogits^T x (2-pass, deterministic),
                               vs matmul_backward; dWr checked bit-identical on rerun.
Version 3: router_logits_forward and router_backward_matmul with T = bf16 (x and dx bf16;
logits, dWr fp32 sums): the reference on the bf16-rounded x.
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/router.cuh"

// Model::router_losses_backward's loop over rows, with the counts passed in
void router_losses_backward_cpu(std::vector<float>& dlogits, const std::vector<float>& probs,
                                const std::vector<float>& logits, const int* seq_counts, const long* pooled_C, int B,
                                int T, int E, int K, int L, int aux_type, double aux_coef, double z_coef, float scale) {
    int N = B * T;
    std::vector<real> gp;
    if (aux_type != AUX_NONE && aux_coef != 0) aux_dp(gp, aux_type, seq_counts, pooled_C, B, T, E, K, L);
    for (int n = 0; n < N; n++) {
        const real* p = &probs[(size_t)n * E];
        real* dz = &dlogits[(size_t)n * E];
        if (!gp.empty()) {
            const real* g = &gp[(size_t)n * E];
            real s = 0;
            for (int i = 0; i < E; i++) s += p[i] * g[i];
            for (int j = 0; j < E; j++) dz[j] += scale * (real)aux_coef * p[j] * (g[j] - s);
        }
        if (z_coef != 0) {
            const real* zz = &logits[(size_t)n * E];
            real mx = zz[0], s = 0;
            for (int i = 1; i < E; i++) mx = std::max(mx, zz[i]);
            for (int i = 0; i < E; i++) s += std::exp(zz[i] - mx);
            real lse = mx + std::log(s);
            for (int j = 0; j < E; j++) dz[j] += scale * (real)z_coef * 2 * lse * p[j] / N;
        }
    }
}

// ----------------------------------------------------------------------------
// version 1: one thread per token for everything, the CPU loops transcribed. E is small (8
// to 64) and a row is E*4 bytes, so a thread per row is a reasonable shape anyway.
__global__ void router_forward_v1(float* probs, int* topk, float* topw, const float* logits, const float* bias, int N,
                                  int E, int K, int routing) {
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
                                   const float* topw, int N, int E, int K, int routing) {
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
// dL/dp_{t,i} = c(b, i) (aux_dp), then through the softmax; plus the z-loss term
__device__ float aux_coeff(int aux, const int* seq_counts, const long long* pooled_C, int b, int i, int B, int T, int E,
                           int K, int L) {
    int N = B * T;
    if (aux == AUX_SWITCH) {
        long long tot = 0;
        for (int bb = 0; bb < B; bb++) tot += seq_counts[bb * E + i];
        return (float)E * tot / ((float)N * K) / N;
    }
    if (aux == AUX_SEQ) return (float)E * seq_counts[b * E + i] / ((float)T * K) / T / B;
    if (aux == AUX_POOLED) {
        float LN = (float)L * N;
        return (float)E * pooled_C[i] / (LN * LN);
    }
    return 0.0f;
}
__global__ void router_losses_backward_v1(float* dlogits, const float* probs, const float* logits,
                                          const int* seq_counts, const long long* pooled_C, int B, int T, int E, int K,
                                          int L, int aux, float aux_coef, float z_coef, float scale) {
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
        for (int j = 0; j < E; j++) dz[j] += scale * z_coef * 2 * lse * p[j] / N;
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

// version 2: forward, stats and backward of kernels/router.cuh (fp32), as train_moe.cu calls them
void check_production(Suite& S, int B, int T, int E, int K, int routing, bool use_bias, const std::vector<float>& logits,
                      const std::vector<float>& bias, const std::vector<float>& probs, const std::vector<int>& topk,
                      const std::vector<float>& topw, const std::vector<float>& dtopw, int L, uint64_t& seed) {
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
    // stats from the CPU's probs and lse (independent of the forward check)
    dP.upload(probs); dLse.upload(lse); dK.upload(topk); dW.upload(topw);
    std::vector<double> psum((size_t)B * E, 0.0), zsum(B, 0.0);
    for (int n = 0; n < N; n++) {
        for (int i = 0; i < E; i++) psum[(size_t)(n / T) * E + i] += probs[(size_t)n * E + i];
        zsum[n / T] += (double)lse[n] * lse[n];
    }
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
    gpu::router_backward(dDl.p, dDw.p, dP.p, dLse.p, dK.p, dW.p, nullptr, 0.01f, 0.0f, scale, N, T, E, K, softmax_topk, st);
    S.check_close("dlogits from gates (written)", dDl.host(), dl, TOL_FP32);
    if (N == 4096) {
        S.bench(softmax_topk ? "forward softmax_topk" : "forward topk_softmax", fwd, (2.0 * N * E + 2.0 * N * K) * 4 + 4.0 * N);
        S.bench("backward (gates)", [&] {
            gpu::router_backward(dDl.p, dDw.p, dP.p, dLse.p, dK.p, dW.p, nullptr, 0.01f, 0.0f, scale, N, T, E, K,
                                 softmax_topk, st);
        }, 4.0 * (3.0 * N * E + 3.0 * N * K));
    }
    // the loss terms one at a time (dtopw = 0 so that the gate part is exactly 0), with the
    // counts as moe_forward gets them and two more random layers in the pooled counts
    std::vector<int> seq_counts((size_t)B * E, 0);
    std::vector<long> pooled((size_t)E, 0);
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) { seq_counts[(n / T) * E + topk[n * K + k]]++; pooled[topk[n * K + k]]++; }
    auto other = rand_ints(E, 2 * N * K / E + 1, seed++);
    for (int e = 0; e < E; e++) pooled[e] += other[e];
    Dev<float> dZero(std::vector<float>((size_t)N * K, 0.0f)), dAuxG((size_t)B * E);
    const double aux_coef = 0.01, z_coef = 0.001;
    std::vector<float> all_ref = dl;  // everything at once, at the end
    for (int aux : {AUX_SWITCH, AUX_SEQ, AUX_POOLED, AUX_NONE}) {
        double zc = aux == AUX_NONE ? z_coef : 0.0;
        std::vector<float> inc((size_t)N * E, 0.0f);
        router_losses_backward_cpu(inc, probs, logits, seq_counts.data(), pooled.data(), B, T, E, K, L, aux, aux_coef, zc,
                                   scale);
        double mx = 0;
        for (float x : inc) mx = std::max(mx, (double)std::fabs(x));
        const float* g_dev = nullptr;
        if (aux != AUX_NONE && aux_coef != 0) {  // as moe_backward: coefficients from the host
            std::vector<float> g;
            aux_dp_per_seq(g, aux, seq_counts.data(), pooled.data(), B, T, E, K, L);
            dAuxG.upload(g);
            g_dev = dAuxG.p;
        }
        dDl.poison();
        gpu::router_backward(dDl.p, dZero.p, dP.p, dLse.p, dK.p, dW.p, g_dev, (float)aux_coef, (float)zc, scale, N, T, E,
                             K, softmax_topk, st);
        std::string what = std::string("d(") + (aux == AUX_NONE ? "z-loss" : aux_name(aux)) + ")/dz (written)";
        Tol tol = {1e-5, 1e-6 * mx + 1e-30, 1e-4};
        S.check_close(what.c_str(), dDl.host(), inc, tol);
        bool balanced = true;
        for (int e = 1; e < E; e++) balanced &= pooled[e] == pooled[0];
        if (!balanced || aux == AUX_NONE) S.check_true((what + " non-zero").c_str(), mx > 0);
    }
    // all three together (seq aux + z + gates), as one training step runs it
    {
        router_losses_backward_cpu(all_ref, probs, logits, seq_counts.data(), pooled.data(), B, T, E, K, L, AUX_SEQ,
                                   aux_coef, z_coef, scale);
        std::vector<float> g;
        aux_dp_per_seq(g, AUX_SEQ, seq_counts.data(), pooled.data(), B, T, E, K, L);
        dAuxG.upload(g);
        dDl.poison();
        gpu::router_backward(dDl.p, dDw.p, dP.p, dLse.p, dK.p, dW.p, dAuxG.p, (float)aux_coef, (float)z_coef, scale, N,
                             T, E, K, softmax_topk, st);
        S.check_close("dlogits, gates + seq + z", dDl.host(), all_ref, TOL_FP32);
    }
}

int main(int argc, char** argv) {
    Suite S("router", argc, argv);
    struct Case { int B, T, E, K, routing; bool bias, ties, starve; };
    const Case cases[] = {
        {1, 5, 4, 1, ROUTING_TOPK_SOFTMAX, false, false, false},
        {2, 33, 8, 2, ROUTING_TOPK_SOFTMAX, false, true, true},
        {2, 33, 8, 2, ROUTING_SOFTMAX_TOPK, true, true, true},
        {3, 100, 64, 6, ROUTING_SOFTMAX_TOPK, false, false, false},
        {4, 1024, 8, 2, ROUTING_TOPK_SOFTMAX, false, false, true},
        {4, 1024, 8, 2, ROUTING_SOFTMAX_TOPK, true, true, false},
    };
    const int L = 3;  // layers, for the pooled aux loss
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
                check_production(S, c.B, c.T, E, K, c.routing, c.bias, logits, bias, probs, topk, topw, dtopw, L, seed);
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

            // router-loss gradients: counts as Model::moe_forward computes them; the pooled
            // counts add two other (random) layers
            std::vector<int> seq_counts((size_t)B * E, 0);
            std::vector<long> pooled((size_t)E, 0);
            for (int n = 0; n < N; n++)
                for (int k = 0; k < K; k++) { seq_counts[(n / T) * E + topk[n * K + k]]++; pooled[topk[n * K + k]]++; }
            auto other = rand_ints(E, 2 * N * K / E + 1, seed++);
            for (int e = 0; e < E; e++) pooled[e] += other[e];
            std::vector<long long> pooled_ll(pooled.begin(), pooled.end());
            Dev<int> dSc(seq_counts);
            Dev<long long> dPool(pooled_ll);
            const double aux_coef = 0.01, z_coef = 0.001;
            const float scale = 0.5f;
            for (int aux : {AUX_SWITCH, AUX_SEQ, AUX_POOLED, AUX_NONE}) {
                double zc = aux == AUX_NONE ? z_coef : 0.0;  // each term on its own
                // these gradients are ~1e-6: accumulate onto a random start of the same size,
                // so that the comparison is not swamped by the start's rounding
                std::vector<float> inc((size_t)N * E, 0.0f);
                router_losses_backward_cpu(inc, probs, logits, seq_counts.data(), pooled.data(), B, T, E, K, L, aux,
                                           aux_coef, zc, scale);
                double mx = 0;
                for (float x : inc) mx = std::max(mx, (double)std::fabs(x));
                std::vector<float> start = rand_floats((size_t)N * E, seed++, -(float)mx, (float)mx), ref = start;
                if (mx == 0) start = rand_floats((size_t)N * E, seed++), ref = start;
                router_losses_backward_cpu(ref, probs, logits, seq_counts.data(), pooled.data(), B, T, E, K, L, aux,
                                           aux_coef, zc, scale);
                dDl.upload(start);
                router_losses_backward_v1<<<ceil_div(N, 128), 128>>>(dDl.p, dP.p, dZ.p, dSc.p, dPool.p, B, T, E, K, L, aux,
                                                                     (float)aux_coef, (float)zc, scale);
                launchCheck();
                std::string what = std::string("d(") + (aux == AUX_NONE ? "z-loss" : aux_name(aux)) + ")/dz (+=)";
                Tol tol = {1e-5, 1e-6 * mx + 1e-30, 1e-4};
                S.check_close(what.c_str(), dDl.host(), ref, tol);
                // the gradient must reach the router (a known silent bug elsewhere); the aux
                // gradient vanishes when all counts are equal, so only where they differ
                bool balanced = true;
                for (int e = 1; e < E; e++) balanced &= pooled[e] == pooled[0];
                if (!balanced || aux == AUX_NONE) S.check_true((what + " non-zero").c_str(), mx > 0);
            }
        }
    }
    return S.finish();
}
