// kernels/global_norm.cuh: the global gradient norm over the whole flat fp32 gradient
// buffer, in two deterministic passes (a fixed number of blocks each sums a fixed
// grid-stride share in double; then one block sums the partials in a fixed tree order).
// global_norm_squared_multi does the same for several segments of the buffer in one pass
// (the trainer's: the whole buffer, or under data parallelism this rank's slice of every
// bucket), with 16-byte loads; the clip factor is then computed on the device too
// (kernels/adamw.cuh adamw_scalars), so nothing waits for the host.
#pragma once
#include <vector>
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

// ---- Several segments in one pass ----
struct NormSegment { size_t begin, n; };  // elements [begin, begin + n) of the buffer
struct NormSegments {
    NormSegment* segs = nullptr;  // device
    int n = 0;
    void release() {
        if (segs) cudaFree(segs);
        segs = nullptr;
        n = 0;
    }
};
// uploads the segments (once per model: a synchronous copy)
inline void norm_make_segments(NormSegments* out, const std::vector<NormSegment>& segs) {
    out->release();
    out->n = (int)segs.size();
    if (segs.empty()) return;
    cudaCheck(cudaMalloc(&out->segs, segs.size() * sizeof(NormSegment)));
    cudaCheck(cudaMemcpy(out->segs, segs.data(), segs.size() * sizeof(NormSegment), cudaMemcpyHostToDevice));
}
// grid (NORM_BLOCKS, segments): block (x, y) sums its grid-stride share of segment y. The
// segment is cut into a head up to the first 16-byte boundary, float4 vectors, and a tail;
// thread k of the grid takes head element k, vectors k, k + stride, ..., tail element k,
// in that order (a fixed order for a given segment and address)
__global__ void global_norm_partial_multi_kernel(double* partial, const float* g, const NormSegment* segs) {
    __shared__ double red[32];
    const NormSegment sg = segs[blockIdx.y];
    const float* x = g + sg.begin;
    const size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    const size_t head = std::min(sg.n, (size_t)((16 - (uintptr_t)x % 16) % 16 / 4));
    const size_t nvec = (sg.n - head) / 4, tail0 = head + 4 * nvec;
    double s = 0.0;
    if (k < head) s += (double)x[k] * x[k];
    const float4* xv = (const float4*)(x + head);
    for (size_t i = k; i < nvec; i += stride) {
        const float4 q = xv[i];
        s += (double)q.x * q.x;
        s += (double)q.y * q.y;
        s += (double)q.z * q.z;
        s += (double)q.w * q.w;
    }
    if (tail0 + k < sg.n) s += (double)x[tail0 + k] * x[tail0 + k];
    s = block_sum(s, red);
    if (threadIdx.x == 0) partial[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = s;
}
// sumsq[y] = segment y's squared norm: block y adds its NORM_BLOCKS partials (fixed tree)
__global__ void global_norm_final_multi_kernel(double* sumsq, const double* partial, int nparts) {
    __shared__ double red[32];
    const double* p = partial + (size_t)blockIdx.x * nparts;
    double s = 0.0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) s += p[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) sumsq[blockIdx.x] = s;
}
// sumsq [segments] (device); partial: NORM_BLOCKS * segments doubles of scratch
inline void global_norm_squared_multi(double* sumsq, double* partial, const float* g, const NormSegments& segs,
                                      cudaStream_t s) {
    if (segs.n == 0) return;
    global_norm_partial_multi_kernel<<<dim3(NORM_BLOCKS, segs.n), 256, 0, s>>>(partial, g, segs.segs);
    KERNEL_CHECK();
    global_norm_final_multi_kernel<<<segs.n, 1024, 0, s>>>(sumsq, partial, NORM_BLOCKS);
    KERNEL_CHECK();
}

}  // namespace gpu
