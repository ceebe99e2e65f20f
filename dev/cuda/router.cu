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

TODO: kernels/router.cuh exists (written concurrently) but is not included yet: add its
kernels as the last version, checked the same way (this file has only its own versions).
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"

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

const char* NAMES[] = {"", "thread per token"};
const int NV = 1;

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
