// kernels/xft_routing.cuh: XFT's routing-weight normalization (docs/METHODS.md 1.8; the CPU
// reference is train_moe.cpp router_forward / router_backward with ROUTING_XFT and
// xft_shared_forward / xft_shared_backward). The router (kernels/router.cuh) selects the K
// experts and computes p = softmax(z); these kernels then
//   forward:  w_k = q_1 softmax_k(q_1 .. q_K)   (q_k = p_{e_k}: a softmax over PROBABILITIES)
//             c   = 1 - q_1                      the shared expert's weight: out += c y
//   backward: dy = c dout (written), dc = dout . y; then the gate weights' gradient becomes a
//             gradient over the chosen probabilities,
//               dq_k = w_k (dw_k - gbar) + delta_{k,1} (gbar - dc),   gbar = sum_k s_k dw_k,
//             which kernels/router.cuh's softmax_topk path (w_k = p_{e_k}) takes through the
//             softmax: router_backward(..., dtopw = dq, softmax_topk = true).
// One thread per token for the [N, K] parts; one warp per row for the [N, d] parts (the dot
// product a butterfly sum: bit-identical run to run).
#pragma once
#include "common.cuh"

namespace gpu {

// topw [N, K] (overwritten: xft weights), c [N] (written) from probs [N, E], topk [N, K]
__global__ void xft_weights_kernel(float* topw, float* c, const float* probs, const int* topk, int N, int E, int K) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* p = probs + (size_t)n * E;
    const int* sel = topk + (size_t)n * K;
    float* w = topw + (size_t)n * K;
    float esum = 0.0f;  // the probabilities lie in [0, 1]: no max shift needed
    for (int k = 0; k < K; k++) { w[k] = expf(p[sel[k]]); esum += w[k]; }
    const float q1 = p[sel[0]];
    for (int k = 0; k < K; k++) w[k] = q1 * (w[k] / esum);
    c[n] = 1.0f - q1;
}
inline void xft_weights(float* topw, float* c, const float* probs, const int* topk, int N, int E, int K,
                        cudaStream_t s) {
    xft_weights_kernel<<<cdiv(N, 128), 128, 0, s>>>(topw, c, probs, topk, N, E, K);
    KERNEL_CHECK();
}

// out[n] += c[n] y[n]
template <typename T>
__global__ void xft_shared_forward_kernel(T* out, const float* c, const T* y, int N, int d) {
    const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const size_t row = (size_t)n * d;
    const float g = c[n];
    for (int i = lane; i < d; i += 32) out[row + i] = from_f<T>(to_f(out[row + i]) + g * to_f(y[row + i]));
}
template <typename T>
void xft_shared_forward(T* out, const float* c, const T* y, int N, int d, cudaStream_t s) {
    const int rows_per_block = 8;
    xft_shared_forward_kernel<<<cdiv(N, rows_per_block), rows_per_block * 32, 0, s>>>(out, c, y, N, d);
    KERNEL_CHECK();
}

// dy[n] = c[n] dout[n] (written); dc[n] = dout[n] . y[n] (written)
template <typename T>
__global__ void xft_shared_backward_kernel(T* dy, float* dc, const T* dout, const T* y, const float* c, int N, int d) {
    const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const size_t row = (size_t)n * d;
    const float g = c[n];
    float s = 0.0f;
    for (int i = lane; i < d; i += 32) {
        s += to_f(dout[row + i]) * to_f(y[row + i]);
        dy[row + i] = from_f<T>(g * to_f(dout[row + i]));
    }
    s = warp_sum(s);
    if (lane == 0) dc[n] = s;
}
template <typename T>
void xft_shared_backward(T* dy, float* dc, const T* dout, const T* y, const float* c, int N, int d, cudaStream_t s) {
    const int rows_per_block = 8;
    xft_shared_backward_kernel<<<cdiv(N, rows_per_block), rows_per_block * 32, 0, s>>>(dy, dc, dout, y, c, N, d);
    KERNEL_CHECK();
}

// dtopw [N, K]: dL/dw_k in, dL/dq_k out (in place), from topw [N, K], probs, topk and dc [N]
__global__ void xft_gate_backward_kernel(float* dtopw, const float* topw, const float* probs, const int* topk,
                                         const float* dc, int N, int E, int K) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    float* dw = dtopw + (size_t)n * K;
    const float* w = topw + (size_t)n * K;
    const float q1 = probs[(size_t)n * E + topk[(size_t)n * K]];
    float gbar = 0.0f;  // sum_k s_k dw_k, s_k = w_k / q_1
    for (int k = 0; k < K; k++) gbar += w[k] * dw[k];
    gbar /= q1;
    for (int k = 0; k < K; k++) dw[k] = w[k] * (dw[k] - gbar) + (k == 0 ? gbar - dc[n] : 0.0f);
}
inline void xft_gate_backward(float* dtopw, const float* topw, const float* probs, const int* topk, const float* dc,
                              int N, int E, int K, cudaStream_t s) {
    xft_gate_backward_kernel<<<cdiv(N, 128), 128, 0, s>>>(dtopw, topw, probs, topk, dc, N, E, K);
    KERNEL_CHECK();
}

}  // namespace gpu
