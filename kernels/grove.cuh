// kernels/grove.cuh: Grove MoE's adjugate experts (arXiv 2508.07785; docs/METHODS.md 1.10; the CPU
// reference is train_moe.cpp grove_permute / grove_combine_forward/_backward /
// grove_weights_backward). The E experts form G groups of S = E/G consecutive experts; group j's
// adjugate A_j (a SwiGLU of width F_a) adds lambda gw[n,j] A_j(x[n]) to token n, where gw[n,j] is
// the sum of the gate weights of n's slots whose expert is in group j (0: group j inactive).
//
// The GPU trainer's form is the simple one: every adjugate runs over EVERY token (one dense
// SwiGLU per group, matmul.cuh + swiglu.cuh, ya [G, N, d]) and the combine weights the rows by
// gw, skipping the inactive ones. The result is the CPU's sparse form (an inactive row adds
// nothing, and its output gradient lambda * 0 * dout = 0 contributes nothing to any weight or
// input gradient), at G / (active groups per token, at most min(K, G)) times the adjugates'
// FLOPs, with no host synchronization (no counts on the host) and nothing new to capture.
#pragma once
#include "common.cuh"

namespace gpu {

// gw [N, G] (written): gw[n, j] = sum over the slots k with topk[n,k] / S == j of topw[n,k],
// slots in order; 0 for a group none of n's experts is in. One thread per token.
__global__ void grove_weights_forward_kernel(float* gw, const int* topk, const float* topw, int N, int K, int G,
                                             int S) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    float* g = gw + (size_t)n * G;
    for (int j = 0; j < G; j++) g[j] = 0.0f;
    for (int k = 0; k < K; k++) g[topk[(size_t)n * K + k] / S] += topw[(size_t)n * K + k];
}
inline void grove_weights_forward(float* gw, const int* topk, const float* topw, int N, int K, int G, int S,
                                  cudaStream_t s) {
    grove_weights_forward_kernel<<<cdiv(N, 256), 256, 0, s>>>(gw, topk, topw, N, K, G, S);
    KERNEL_CHECK();
}

// out [N, d] += lambda gw[n, j] ya[j, n] over the active groups j (in order); ya [G, N, d].
// One thread per element.
template <typename T>
__global__ void grove_combine_forward_kernel(T* out, const T* ya, const float* gw, float lambda, int N, int d, int G) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x, Nd = (size_t)N * d;
    if (idx >= Nd) return;
    const size_t n = idx / d;
    float acc = to_f(out[idx]);
    for (int j = 0; j < G; j++) {
        const float w = gw[n * G + j];
        if (w != 0.0f) acc += (lambda * w) * to_f(ya[(size_t)j * Nd + idx]);
    }
    out[idx] = from_f<T>(acc);
}
template <typename T>
void grove_combine_forward(T* out, const T* ya, const float* gw, float lambda, int N, int d, int G, cudaStream_t s) {
    const size_t Nd = (size_t)N * d;
    grove_combine_forward_kernel<<<cdiv((long)Nd, 256), 256, 0, s>>>(out, ya, gw, lambda, N, d, G);
    KERNEL_CHECK();
}

// One warp per token n. Per group j: dgw[n,j] = lambda dout[n] . ya[j,n] (a butterfly sum);
// dya[j,n] = lambda gw[n,j] dout[n] (written: zeros for an inactive group). Then each slot k
// gets its group's dgw: dtopw[n,k] += dgw[n, topk[n,k] / S] (an inactive group's is never read).
// dgw [N, G] is scratch.
template <typename T>
__global__ void grove_combine_backward_kernel(T* dya, float* dtopw, float* dgw, const T* dout, const T* ya,
                                              const float* gw, const int* topk, float lambda, int N, int d, int G,
                                              int K, int S) {
    const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const size_t Nd = (size_t)N * d, row = (size_t)n * d;
    for (int j = 0; j < G; j++) {
        const T* y = ya + (size_t)j * Nd + row;
        T* dy = dya + (size_t)j * Nd + row;
        const float w = lambda * gw[(size_t)n * G + j];
        float s = 0.0f;
        for (int i = lane; i < d; i += 32) {
            const float g = to_f(dout[row + i]);
            s += g * to_f(y[i]);
            dy[i] = from_f<T>(w * g);
        }
        s = warp_sum(s);
        if (lane == 0) dgw[(size_t)n * G + j] = lambda * s;
    }
    __syncwarp();
    if (lane == 0)
        for (int k = 0; k < K; k++) dtopw[(size_t)n * K + k] += dgw[(size_t)n * G + topk[(size_t)n * K + k] / S];
}
template <typename T>
void grove_combine_backward(T* dya, float* dtopw, float* dgw, const T* dout, const T* ya, const float* gw,
                            const int* topk, float lambda, int N, int d, int G, int K, int S, cudaStream_t s) {
    const int rows_per_block = 8;
    grove_combine_backward_kernel<<<cdiv(N, rows_per_block), rows_per_block * 32, 0, s>>>(
        dya, dtopw, dgw, dout, ya, gw, topk, lambda, N, d, G, K, S);
    KERNEL_CHECK();
}

}  // namespace gpu
