// kernels/swiglu.cuh: the SwiGLU activation, out = silu(g) * u, silu(g) = g sigmoid(g).
//
// The gate and up projections come from ONE GEMM: W_gate [F, d] and W_up [F, d] sit next
// to each other in the flat parameter buffer (ParamLayout puts gate, up, down in a row, and
// Mixtral's w1, w3, w2 likewise), so together they are one [2F, d] matrix and the GEMM
// writes gu [rows, 2F]: gate in columns 0..F-1, up in columns F..2F-1.
#pragma once
#include "common.cuh"

namespace gpu {

// a [rows, F] = silu(gu[:, :F]) * gu[:, F:]
template <typename T>
__global__ void swiglu_forward_kernel(T* a, const T* gu, size_t rows, int F) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * F) return;
    size_t r = i / F;
    int c = (int)(i % F);
    float g = to_f(gu[r * 2 * F + c]), u = to_f(gu[r * 2 * F + F + c]);
    float sg = 1.0f / (1.0f + expf(-g));
    a[i] = from_f<T>(g * sg * u);
}
template <typename T>
void swiglu_forward(T* a, const T* gu, size_t rows, int F, cudaStream_t s) {
    if (rows == 0) return;
    swiglu_forward_kernel<<<cdiv((long)(rows * F), 256), 256, 0, s>>>(a, gu, rows, F);
    KERNEL_CHECK();
}

// dgu [rows, 2F] (written): d silu(g)/dg = s (1 + g (1 - s))
template <typename T>
__global__ void swiglu_backward_kernel(T* dgu, const T* da, const T* gu, size_t rows, int F) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * F) return;
    size_t r = i / F;
    int c = (int)(i % F);
    float g = to_f(gu[r * 2 * F + c]), u = to_f(gu[r * 2 * F + F + c]), d = to_f(da[i]);
    float sg = 1.0f / (1.0f + expf(-g));
    dgu[r * 2 * F + c] = from_f<T>(d * u * sg * (1.0f + g * (1.0f - sg)));
    dgu[r * 2 * F + F + c] = from_f<T>(d * g * sg);
}
template <typename T>
void swiglu_backward(T* dgu, const T* da, const T* gu, size_t rows, int F, cudaStream_t s) {
    if (rows == 0) return;
    swiglu_backward_kernel<<<cdiv((long)(rows * F), 256), 256, 0, s>>>(dgu, da, gu, rows, F);
    KERNEL_CHECK();
}

}  // namespace gpu
