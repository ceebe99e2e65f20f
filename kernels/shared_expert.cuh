// kernels/shared_expert.cuh: the shared expert's sigmoid gate (Qwen2-MoE; docs/METHODS.md 1.7;
// the CPU reference is train_moe.cpp shared_gate_forward/_backward). The shared expert itself is
// a dense SwiGLU FFN over every token, run with matmul.cuh and swiglu.cuh like the dense model's
// FFN; this file only scales its output per token and adds it to the routed experts' output.
//
// x [N, d] the MoE layer's input (ln2), w [d] the gate vector (fp32 master: a d-vector is too
// small to need the working copy), y [N, d] the shared FFN's output. One warp per row: its dot
// product is a butterfly sum (bit-identical run to run).
#pragma once
#include "common.cuh"

namespace gpu {

// gate[n] = sigmoid(x[n] . w); out[n] += gate[n] y[n]. w == nullptr (ungated): out[n] += y[n].
template <typename T>
__global__ void shared_gate_forward_kernel(T* out, float* gate, const T* x, const float* w, const T* y, int N, int d) {
    const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const size_t row = (size_t)n * d;
    float g = 1.0f;
    if (w) {
        float s = 0.0f;
        for (int i = lane; i < d; i += 32) s += to_f(x[row + i]) * w[i];
        s = warp_sum(s);
        g = 1.0f / (1.0f + expf(-s));
        if (lane == 0) gate[n] = g;
    }
    for (int i = lane; i < d; i += 32) out[row + i] = from_f<T>(to_f(out[row + i]) + g * to_f(y[row + i]));
}
template <typename T>
void shared_gate_forward(T* out, float* gate, const T* x, const float* w, const T* y, int N, int d, cudaStream_t s) {
    const int rows_per_block = 8;
    shared_gate_forward_kernel<<<cdiv(N, rows_per_block), rows_per_block * 32, 0, s>>>(out, gate, x, w, y, N, d);
    KERNEL_CHECK();
}

// Per row: dz[n] = (dout[n] . y[n]) gate (1 - gate); dy[n] = gate[n] dout[n] (written);
// dx[n] += dz[n] w.
template <typename T>
__global__ void shared_gate_backward_rows_kernel(T* dy, T* dx, float* dz, const T* dout, const float* w, const T* y,
                                                 const float* gate, int N, int d) {
    const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const size_t row = (size_t)n * d;
    const float g = gate[n];
    float s = 0.0f;
    for (int i = lane; i < d; i += 32) s += to_f(dout[row + i]) * to_f(y[row + i]);
    const float z = warp_sum(s) * g * (1.0f - g);
    if (lane == 0) dz[n] = z;
    for (int i = lane; i < d; i += 32) {
        dy[row + i] = from_f<T>(g * to_f(dout[row + i]));
        dx[row + i] = from_f<T>(to_f(dx[row + i]) + z * w[i]);
    }
}
// dw[i] += sum_n dz[n] x[n, i]: one thread per column, the rows in order (deterministic)
template <typename T>
__global__ void shared_gate_backward_weight_kernel(float* dw, const float* dz, const T* x, int N, int d) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= d) return;
    float s = 0.0f;
    for (int n = 0; n < N; n++) s += dz[n] * to_f(x[(size_t)n * d + i]);
    dw[i] += s;
}
// dz: scratch [N]
template <typename T>
void shared_gate_backward(T* dy, T* dx, float* dw, float* dz, const T* dout, const T* x, const float* w, const T* y,
                          const float* gate, int N, int d, cudaStream_t s) {
    const int rows_per_block = 8;
    shared_gate_backward_rows_kernel<<<cdiv(N, rows_per_block), rows_per_block * 32, 0, s>>>(dy, dx, dz, dout, w, y,
                                                                                          gate, N, d);
    KERNEL_CHECK();
    shared_gate_backward_weight_kernel<<<cdiv(d, 128), 128, 0, s>>>(dw, dz, x, N, d);
    KERNEL_CHECK();
}

}  // namespace gpu
