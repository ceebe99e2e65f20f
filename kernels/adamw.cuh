// kernels/adamw.cuh: AdamW on the fp32 master weights with fp32 moments, and the
// low-precision working copy of the weights that the forward/backward pass reads.
//
//   g = grad * clip;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p -= lr (m / bc1 / (sqrt(v / bc2) + eps) + wd p)      (wd = 0 for 1-D tensors)
// exactly the CPU trainer's float expressions (the host passes the same float-rounded
// constants). In bf16 mode the working copy is rounded stochastically: round up with
// probability equal to the dropped fraction, from a counter-based RNG keyed by
// (seed, optimizer step, element index). So the copy is a pure function of the master
// weights and the step: a resumed run rebuilds exactly the copy the uninterrupted run had.
#pragma once
#include "../common/rng.h"
#include "common.cuh"

namespace gpu {

// the RNG stream of the stochastic rounding after optimizer step t
__host__ __device__ inline uint64_t sr_stream(uint64_t t) {
    return stream_id(PURPOSE_MISC, 0x5352u /* "SR" */, (uint32_t)(t >> 24), (uint32_t)(t & 0xffffffu));
}

__device__ __forceinline__ void store_weight(float* dst, float x, uint64_t, uint64_t, uint64_t, bool) { *dst = x; }
__device__ __forceinline__ void store_weight(bf16* dst, float x, uint64_t seed, uint64_t stream, uint64_t index,
                                             bool stochastic) {
    if (!stochastic) { *dst = __float2bfloat16_rn(x); return; }
    // add 16 random bits below the kept mantissa, then truncate: rounds up with
    // probability (dropped bits) / 2^16
    uint32_t r = philox4x32(seed, index, stream).v[0] & 0xffffu;
    uint32_t bits = __float_as_uint(x);
    if ((bits & 0x7f800000u) == 0x7f800000u) { *dst = __float2bfloat16_rn(x); return; }  // inf / nan as they are
    bits = (bits + r) & 0xffff0000u;
    *dst = __float2bfloat16_rn(__uint_as_float(bits));  // exact: the low half is zero
}

// n elements starting at flat index `base` of the parameter buffer (base feeds the RNG)
template <typename T>
__global__ void adamw_kernel(float* p, T* copy, const float* g, float* m, float* v, size_t n, size_t base, long long mv_shift, float lr,
                             float b1, float one_minus_b1, float b2, float one_minus_b2, float bc1, float bc2, float eps,
                             float wd, float clip, uint64_t seed, uint64_t stream, bool stochastic) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    i += base;
    float gi = g[i] * clip;
    const size_t j = (size_t)((long long)i - mv_shift);  // the moments' index (a shard: see AdamWArgs)
    float mi = b1 * m[j] + one_minus_b1 * gi;
    float vi = b2 * v[j] + one_minus_b2 * gi * gi;
    m[j] = mi;
    v[j] = vi;
    float mhat = mi / bc1, vhat = vi / bc2;
    float pi = p[i];
    pi -= lr * (mhat / (sqrtf(vhat) + eps) + wd * pi);
    p[i] = pi;
    if (copy) store_weight(copy + i, pi, seed, stream, i, stochastic);
}

struct AdamWArgs {
    float lr, b1, one_minus_b1, b2, one_minus_b2, bc1, bc2, eps, clip;
    uint64_t seed, stream;
    bool stochastic;
    // the moments of element i are m[i - mv_shift], v[i - mv_shift]: 0 when m and v span the
    // whole parameter buffer; under data parallelism they hold only this rank's slices
    long long mv_shift = 0;
};

// Updates elements [base, base + n) of the flat buffers with weight decay wd.
// copy: the working copy (bf16 mode) or null (fp32 mode: the master IS the working copy).
template <typename T>
void adamw_update(float* p, T* copy, const float* g, float* m, float* v, size_t base, size_t n, float wd,
                  const AdamWArgs& a, cudaStream_t s) {
    if (n == 0) return;
    adamw_kernel<<<cdiv((long)n, 256), 256, 0, s>>>(p, copy, g, m, v, n, base, a.mv_shift, a.lr, a.b1, a.one_minus_b1, a.b2,
                                                    a.one_minus_b2, a.bc1, a.bc2, a.eps, wd, a.clip, a.seed, a.stream,
                                                    a.stochastic);
    KERNEL_CHECK();
}

// copy = master rounded the same way as after an optimizer step with the same stream
// (after loading a checkpoint: the copy the run had at that step)
template <typename T>
__global__ void weights_to_copy_kernel(T* copy, const float* p, size_t n, uint64_t seed, uint64_t stream,
                                       bool stochastic) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) store_weight(copy + i, p[i], seed, stream, i, stochastic);
}
template <typename T>
void weights_to_copy(T* copy, const float* p, size_t n, uint64_t seed, uint64_t stream, bool stochastic,
                     cudaStream_t s) {
    weights_to_copy_kernel<<<cdiv((long)n, 256), 256, 0, s>>>(copy, p, n, seed, stream, stochastic);
    KERNEL_CHECK();
}

}  // namespace gpu
