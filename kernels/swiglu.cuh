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
// 16 bytes of T (8 bf16 or 4 floats) moved by one load or store: SwiGLU is memory-bound, and
// wide accesses are what lets it approach the copy bandwidth. Needs F a multiple of N and
// 16-byte aligned buffers (the activation arena aligns every array to 256 bytes).
template <typename T>
struct alignas(16) Vec16 {
    static constexpr int N = 16 / sizeof(T);
    T x[N];
    __device__ __forceinline__ static Vec16 load(const T* p) {
        Vec16 v;
        *reinterpret_cast<uint4*>(&v) = *reinterpret_cast<const uint4*>(p);
        return v;
    }
    __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(this); }
};
template <typename T>
inline bool vec16_ok(int F, const void* p0, const void* p1, const void* p2 = nullptr) {
    auto al = [](const void* p) { return ((uintptr_t)p & 15) == 0; };
    return F % Vec16<T>::N == 0 && al(p0) && al(p1) && (!p2 || al(p2));
}

// the same function, N = 16 / sizeof(T) elements per thread (same float math per element,
// so the same bits as swiglu_forward_kernel)
template <typename T>
__global__ void swiglu_forward_vec_kernel(T* a, const T* gu, size_t rows, int F) {
    constexpr int N = Vec16<T>::N;
    size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * N;  // first element of the pack
    if (i >= rows * F) return;
    size_t r = i / F;
    int c = (int)(i % F);  // a pack never straddles rows: F is a multiple of N
    Vec16<T> g = Vec16<T>::load(gu + r * 2 * F + c), u = Vec16<T>::load(gu + r * 2 * F + F + c), out;
#pragma unroll
    for (int k = 0; k < N; k++) {
        float gf = to_f(g.x[k]);
        float sg = 1.0f / (1.0f + expf(-gf));
        out.x[k] = from_f<T>(gf * sg * to_f(u.x[k]));
    }
    out.store(a + i);
}
template <typename T>
void swiglu_forward(T* a, const T* gu, size_t rows, int F, cudaStream_t s) {
    if (rows == 0) return;
    if (vec16_ok<T>(F, a, gu)) {
        swiglu_forward_vec_kernel<<<cdiv((long)(rows * F / Vec16<T>::N), 256), 256, 0, s>>>(a, gu, rows, F);
    } else {
        swiglu_forward_kernel<<<cdiv((long)(rows * F), 256), 256, 0, s>>>(a, gu, rows, F);
    }
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
__global__ void swiglu_backward_vec_kernel(T* dgu, const T* da, const T* gu, size_t rows, int F) {
    constexpr int N = Vec16<T>::N;
    size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (i >= rows * F) return;
    size_t r = i / F;
    int c = (int)(i % F);
    Vec16<T> g = Vec16<T>::load(gu + r * 2 * F + c), u = Vec16<T>::load(gu + r * 2 * F + F + c);
    Vec16<T> d = Vec16<T>::load(da + i), dg, du;
#pragma unroll
    for (int k = 0; k < N; k++) {
        float gf = to_f(g.x[k]), uf = to_f(u.x[k]), df = to_f(d.x[k]);
        float sg = 1.0f / (1.0f + expf(-gf));
        dg.x[k] = from_f<T>(df * uf * sg * (1.0f + gf * (1.0f - sg)));
        du.x[k] = from_f<T>(df * gf * sg);
    }
    dg.store(dgu + r * 2 * F + c);
    du.store(dgu + r * 2 * F + F + c);
}
template <typename T>
void swiglu_backward(T* dgu, const T* da, const T* gu, size_t rows, int F, cudaStream_t s) {
    if (rows == 0) return;
    if (vec16_ok<T>(F, dgu, da, gu)) {
        swiglu_backward_vec_kernel<<<cdiv((long)(rows * F / Vec16<T>::N), 256), 256, 0, s>>>(dgu, da, gu, rows, F);
    } else {
        swiglu_backward_kernel<<<cdiv((long)(rows * F), 256), 256, 0, s>>>(dgu, da, gu, rows, F);
    }
    KERNEL_CHECK();
}

}  // namespace gpu
