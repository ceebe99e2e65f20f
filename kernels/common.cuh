// kernels/common.cuh: what every kernel file needs: error checks with file:line, the bf16
// helpers (the element type `T` of activations is float or __nv_bfloat16), deterministic
// warp/block reductions, and launch helpers.
//
// Everything in kernels/ lives in namespace gpu, so that files which also include the CPU
// trainer (dev/cuda/*.cu include train_moe.cpp) never see two functions with one name.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>

namespace gpu {

// ----------------------------------------------------------------------------
// Error checks: print the failed call with its file and line, then exit (a CUDA error
// leaves the context unusable, so there is nothing sensible to continue with).

inline void cuda_check(cudaError_t e, const char* what, const char* file, int line) {
    if (e == cudaErrorMemoryAllocation) {  // the memory plan before the run (common/resources.h) missed it
        fprintf(stderr, "error: out of GPU memory at %s:%d (%s); use a smaller --batch / --seq or model\n", file,
                line, what);
        exit(1);
    }
    if (e != cudaSuccess) {
        fprintf(stderr, "error: CUDA error at %s:%d: %s\n  in %s\n", file, line, cudaGetErrorString(e), what);
        exit(1);
    }
}
inline void cublas_check(cublasStatus_t s, const char* what, const char* file, int line) {
    if (s != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "error: cuBLAS error %d at %s:%d\n  in %s\n", (int)s, file, line, what);
        exit(1);
    }
}

}  // namespace gpu

// dev/cuda/common.h defines macros of the same names and meaning; keep theirs if present.
#ifndef cudaCheck
#define cudaCheck(call) gpu::cuda_check((call), #call, __FILE__, __LINE__)
#endif
#ifndef cublasCheck
#define cublasCheck(call) gpu::cublas_check((call), #call, __FILE__, __LINE__)
#endif
// after every kernel launch: catches bad launch configurations at the launch site
#define KERNEL_CHECK() gpu::cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

namespace gpu {

typedef __nv_bfloat16 bf16;

inline int cdiv(long a, long b) { return (int)((a + b - 1) / b); }

// ----------------------------------------------------------------------------
// Element types. Activations are T = float (--dtype fp32) or bf16 (--dtype bf16); all
// arithmetic inside kernels is fp32: load with to_f, store with from_f<T>.

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }

// cuBLAS data type of an element type
template <typename T> struct CudaType;
template <> struct CudaType<float> { static constexpr cudaDataType_t value = CUDA_R_32F; };
template <> struct CudaType<bf16> { static constexpr cudaDataType_t value = CUDA_R_16BF; };

// ----------------------------------------------------------------------------
// Reductions. A warp's butterfly reduction adds in a fixed pattern, so results are
// bit-identical run to run (unlike atomics, whose order depends on timing).

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets
// the result. `shared` must hold 32 values. Two __syncthreads: safe to call repeatedly.
template <typename F>
__device__ F block_sum(F v, F* shared) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();  // protects `shared` from a previous call still being read
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    F r = lane < nwarps ? shared[lane] : (F)0;
    return warp_sum(r);
}
__device__ inline float block_max(float v, float* shared) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float r = lane < nwarps ? shared[lane] : -INFINITY;
    return warp_max(r);
}

// ----------------------------------------------------------------------------
// Small utility kernels

template <typename T>
__global__ void fill_kernel(T* p, float value, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = from_f<T>(value);
}
template <typename T>
void fill(T* p, float value, size_t n, cudaStream_t s) {
    if (n == 0) return;
    fill_kernel<<<cdiv((long)n, 256), 256, 0, s>>>(p, value, n);
    KERNEL_CHECK();
}

// dst (type D) = src (type S), element by element (round to nearest for bf16)
template <typename D, typename S>
__global__ void convert_kernel(D* dst, const S* src, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = from_f<D>(to_f(src[i]));
}
template <typename D, typename S>
void convert(D* dst, const S* src, size_t n, cudaStream_t s) {
    if (n == 0) return;
    convert_kernel<<<cdiv((long)n, 256), 256, 0, s>>>(dst, src, n);
    KERNEL_CHECK();
}

// Second pass of a deterministic column sum: dst[c] += sum over chunks k (in order) of
// scratch[k, c]. The first pass (per op) writes one partial sum per chunk of rows.
__global__ void column_chunks_sum_kernel(float* dst, const float* scratch, int nchunks, int ncols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= ncols) return;
    float s = 0.0f;
    for (int k = 0; k < nchunks; k++) s += scratch[(size_t)k * ncols + c];
    dst[c] += s;
}

}  // namespace gpu
