// kernels/global_norm.cuh: the global gradient norm over the whole flat fp32 gradient
// buffer, in two deterministic passes (a fixed number of blocks each sums a fixed
// grid-stride share in double; then one block sums the partials in a fixed tree order).
// The host reads the norm back and decides the clipping factor, as the CPU trainer does.
#pragma once
#include "common.cuh"

namespace gpu {

constexpr int NORM_BLOCKS = 1024;  // fixed, so the summation order never depends on the GPU

__global__ void global_norm_partial_kernel(double* partial, const float* g, size_t n) {
    __shared__ double red[32];
    double s = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        double x = g[i];
        s += x * x;
    }
    s = block_sum(s, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
__global__ void global_norm_final_kernel(double* out, const double* partial, int nparts) {
    __shared__ double red[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) s += partial[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) *out = s;
}

// *sumsq (device) = sum of g[i]^2; partial: NORM_BLOCKS doubles of scratch
inline void global_norm_squared(double* sumsq, double* partial, const float* g, size_t n, cudaStream_t s) {
    global_norm_partial_kernel<<<NORM_BLOCKS, 256, 0, s>>>(partial, g, n);
    KERNEL_CHECK();
    global_norm_final_kernel<<<1, 1024, 0, s>>>(sumsq, partial, NORM_BLOCKS);
    KERNEL_CHECK();
}

}  // namespace gpu
