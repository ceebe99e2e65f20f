// kernels/rope.cuh: rotary position embedding, Hugging Face "rotate half" convention.
// Within each head, the pair (i, i + hd/2) is rotated by the angle pos * inv_freq[i],
// pos = n % T. The cos/sin tables [T_max, hd/2] are computed on the host in double, as
// the CPU trainer does, and rounded to float.
#pragma once
#include "common.cuh"

namespace gpu {

// x [N, nh * hd] in place; one thread per rotated pair. sign = +1 forward, -1 backward
// (the rotation is orthogonal: its transpose is the rotation by the opposite angle).
template <typename T>
__global__ void rope_kernel(T* x, const float* cosb, const float* sinb, int N, int T_, int nh, int hd, float sign) {
    int h2 = hd / 2;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * nh * h2) return;
    int j = (int)(i % h2);
    size_t nh_idx = i / h2;  // n * nh + h
    int n = (int)(nh_idx / nh);
    T* v = x + nh_idx * hd;
    float c = cosb[(size_t)(n % T_) * h2 + j], s = sign * sinb[(size_t)(n % T_) * h2 + j];
    float a = to_f(v[j]), b = to_f(v[j + h2]);
    v[j] = from_f<T>(a * c - b * s);
    v[j + h2] = from_f<T>(b * c + a * s);
}
template <typename T>
void rope_forward(T* x, const float* cosb, const float* sinb, int N, int T_, int nh, int hd, cudaStream_t s) {
    rope_kernel<<<cdiv((long)N * nh * (hd / 2), 256), 256, 0, s>>>(x, cosb, sinb, N, T_, nh, hd, 1.0f);
    KERNEL_CHECK();
}
template <typename T>
void rope_backward(T* dx, const float* cosb, const float* sinb, int N, int T_, int nh, int hd, cudaStream_t s) {
    rope_kernel<<<cdiv((long)N * nh * (hd / 2), 256), 256, 0, s>>>(dx, cosb, sinb, N, T_, nh, hd, -1.0f);
    KERNEL_CHECK();
}

// rows at explicit positions pos [N] (decoding with a KV cache; train_moe.cpp rope_forward_at)
template <typename T>
__global__ void rope_at_kernel(T* x, const float* cosb, const float* sinb, const int* pos, int N, int nh, int hd) {
    int h2 = hd / 2;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * nh * h2) return;
    int j = (int)(i % h2);
    size_t nh_idx = i / h2;
    int n = (int)(nh_idx / nh);
    T* v = x + nh_idx * hd;
    float c = cosb[(size_t)pos[n] * h2 + j], s = sinb[(size_t)pos[n] * h2 + j];
    float a = to_f(v[j]), b = to_f(v[j + h2]);
    v[j] = from_f<T>(a * c - b * s);
    v[j + h2] = from_f<T>(b * c + a * s);
}
template <typename T>
void rope_forward_at(T* x, const float* cosb, const float* sinb, const int* pos, int N, int nh, int hd, cudaStream_t s) {
    rope_at_kernel<T><<<cdiv((long)N * nh * (hd / 2), 256), 256, 0, s>>>(x, cosb, sinb, pos, N, nh, hd);
    KERNEL_CHECK();
}

}  // namespace gpu
