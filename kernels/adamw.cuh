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
//
// The trainer's step is one launch for all parameters (adamw_update_multi: a list of chunks
// built once per model, 16-byte loads where a chunk is aligned), and reads the clip factor
// and a skip flag from the device (adamw_scalars), so the host never waits for the gradient
// norm before the update. adamw_update (one range, clip from the host) is the same
// arithmetic for one tensor: dev/cuda/adamw.cu's reference point.
#pragma once
#include <vector>
#include "../common/rng.h"
#include "../common/run.h"  // grad_clip_factor
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

struct AdamWArgs {
    float lr, b1, one_minus_b1, b2, one_minus_b2, bc1, bc2, eps, clip;
    uint64_t seed, stream;
    bool stochastic;
    // the moments of element i are m[i - mv_shift], v[i - mv_shift]: 0 when m and v span the
    // whole parameter buffer; under data parallelism they hold only this rank's slices
    long long mv_shift = 0;
};

// One element: gradient g (unclipped), moments mi, vi and weight pi updated in place; the
// CPU trainer's float expressions in its order (every kernel below goes through here)
__device__ __forceinline__ void adamw_math(float& pi, float& mi, float& vi, float g, float clip, float wd,
                                           const AdamWArgs& a) {
    float gi = g * clip;
    mi = a.b1 * mi + a.one_minus_b1 * gi;
    vi = a.b2 * vi + a.one_minus_b2 * gi * gi;
    float mhat = mi / a.bc1, vhat = vi / a.bc2;
    pi -= a.lr * (mhat / (sqrtf(vhat) + a.eps) + wd * pi);
}
// element i of the flat buffers (its moments at i - mv_shift)
template <typename T>
__device__ __forceinline__ void adamw_element(float* p, T* copy, const float* g, float* m, float* v, size_t i,
                                              long long mv_shift, float clip, float wd, const AdamWArgs& a) {
    const size_t j = (size_t)((long long)i - mv_shift);  // the moments' index (a shard: see AdamWArgs)
    float pi = p[i], mi = m[j], vi = v[j];
    adamw_math(pi, mi, vi, g[i], clip, wd, a);
    m[j] = mi;
    v[j] = vi;
    p[i] = pi;
    if (copy) store_weight(copy + i, pi, a.seed, a.stream, i, a.stochastic);
}

// n elements starting at flat index `base` of the parameter buffer (base feeds the RNG)
template <typename T>
__global__ void adamw_kernel(float* p, T* copy, const float* g, float* m, float* v, size_t n, size_t base, float wd,
                             AdamWArgs a) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) adamw_element(p, copy, g, m, v, base + i, a.mv_shift, a.clip, wd, a);
}

// Updates elements [base, base + n) of the flat buffers with weight decay wd.
// copy: the working copy (bf16 mode) or null (fp32 mode: the master IS the working copy).
template <typename T>
void adamw_update(float* p, T* copy, const float* g, float* m, float* v, size_t base, size_t n, float wd,
                  const AdamWArgs& a, cudaStream_t s) {
    if (n == 0) return;
    adamw_kernel<<<cdiv((long)n, 256), 256, 0, s>>>(p, copy, g, m, v, n, base, wd, a);
    KERNEL_CHECK();
}

// ---- The whole step in one launch ----
// The trainer's update is a list of segments (runs of tensors with one weight decay; under
// data parallelism cut to this rank's slices, with their moments' shift). They are cut into
// chunks of at most ADAMW_CHUNK elements, one block each, so that one launch covers all.
// A chunk whose start and moments' start are multiples of 4 and whose length is too is
// "aligned": its threads move p, g, m and v 16 bytes (4 floats) at a time. The planner cuts
// each segment into an unaligned head (< 4 elements), aligned chunks and a tail (< 4).
// On one GPU (mv_shift 0) everything but those heads and tails is aligned; under data
// parallelism a slice's shift is a multiple of 4 only when the slices happen to be.
constexpr int ADAMW_CHUNK = 8192;
struct AdamWSegment {
    size_t base, n;  // elements [base, base + n) of the flat buffers
    bool decay;      // weight decay applies (matrices; not 1-D tensors)
    long long mv_shift;
};
struct AdamWChunk {
    size_t begin;
    long long mv_shift;
    int n;
    int decay;
};
struct AdamWPlan {
    AdamWChunk* chunks = nullptr;  // device
    int n_chunks = 0, n_aligned = 0;
    void release() {
        if (chunks) cudaFree(chunks);
        chunks = nullptr;
        n_chunks = n_aligned = 0;
    }
};
inline bool adamw_chunk_aligned(const AdamWChunk& c) { return c.begin % 4 == 0 && c.mv_shift % 4 == 0 && c.n % 4 == 0; }
// host: the chunks of the segments, in order (also what dev/cuda/adamw.cu checks)
inline std::vector<AdamWChunk> adamw_chunks(const std::vector<AdamWSegment>& segs) {
    std::vector<AdamWChunk> out;
    for (const AdamWSegment& sg : segs) {
        size_t i = sg.base, end = sg.base + sg.n;
        auto add = [&](size_t a, size_t b) { if (b > a) out.push_back({a, sg.mv_shift, (int)(b - a), sg.decay ? 1 : 0}); };
        const size_t head_end = std::min(end, (i + 3) / 4 * 4), body_end = std::max(head_end, end / 4 * 4);
        add(i, head_end);
        for (i = head_end; i < body_end; i += ADAMW_CHUNK) add(i, std::min(body_end, i + ADAMW_CHUNK));
        add(body_end, end);
    }
    return out;
}
// uploads the plan (once per model: a synchronous copy)
inline void adamw_make_plan(AdamWPlan* plan, const std::vector<AdamWSegment>& segs) {
    plan->release();
    std::vector<AdamWChunk> c = adamw_chunks(segs);
    plan->n_chunks = (int)c.size();
    for (const AdamWChunk& x : c) plan->n_aligned += adamw_chunk_aligned(x);
    if (c.empty()) return;
    cudaCheck(cudaMalloc(&plan->chunks, c.size() * sizeof(AdamWChunk)));
    cudaCheck(cudaMemcpy(plan->chunks, c.data(), c.size() * sizeof(AdamWChunk), cudaMemcpyHostToDevice));
}

template <typename T>
__global__ void adamw_multi_kernel(float* p, T* copy, const float* g, float* m, float* v, const AdamWChunk* chunks,
                                   float weight_decay, const float* clip_dev, const int* skip, const AdamWArgs* a_dev) {
    if (*skip) return;  // a non-finite norm or loss: no update (the run stops at the last good weights)
    const AdamWArgs a = *a_dev;
    const AdamWChunk c = chunks[blockIdx.x];
    const float clip = *clip_dev, wd = c.decay ? weight_decay : 0.0f;
    if (!(c.begin % 4 == 0 && c.mv_shift % 4 == 0 && c.n % 4 == 0)) {
        for (int q = threadIdx.x; q < c.n; q += blockDim.x) adamw_element(p, copy, g, m, v, c.begin + q, c.mv_shift, clip, wd, a);
        return;
    }
    for (int q = threadIdx.x; q < c.n / 4; q += blockDim.x) {
        const size_t i = c.begin + 4 * (size_t)q, j = (size_t)((long long)i - c.mv_shift);
        const float4 gv = *(const float4*)(g + i);
        float4 pv = *(const float4*)(p + i), mv = *(const float4*)(m + j), vv = *(const float4*)(v + j);
        adamw_math(pv.x, mv.x, vv.x, gv.x, clip, wd, a);
        adamw_math(pv.y, mv.y, vv.y, gv.y, clip, wd, a);
        adamw_math(pv.z, mv.z, vv.z, gv.z, clip, wd, a);
        adamw_math(pv.w, mv.w, vv.w, gv.w, clip, wd, a);
        *(float4*)(m + j) = mv;
        *(float4*)(v + j) = vv;
        *(float4*)(p + i) = pv;
        if (copy) {
            store_weight(copy + i, pv.x, a.seed, a.stream, i, a.stochastic);
            store_weight(copy + i + 1, pv.y, a.seed, a.stream, i + 1, a.stochastic);
            store_weight(copy + i + 2, pv.z, a.seed, a.stream, i + 2, a.stochastic);
            store_weight(copy + i + 3, pv.w, a.seed, a.stream, i + 3, a.stochastic);
        }
    }
}
// The whole update: every chunk of `plan` (weight decay wd where the chunk's segment
// decays), clip factor and skip flag read on the device (adamw_scalars). The step's
// arguments too are read on the device (a_dev: the learning rate, the bias corrections and
// the rounding stream change every step; a CUDA graph holding this launch replays its
// pointer, not values); a.clip and a.mv_shift are not used (the chunks carry the shifts)
template <typename T>
void adamw_update_multi(float* p, T* copy, const float* g, float* m, float* v, const AdamWPlan& plan, float wd,
                        const float* clip_dev, const int* skip_dev, const AdamWArgs* a_dev, cudaStream_t s) {
    if (plan.n_chunks == 0) return;
    adamw_multi_kernel<<<plan.n_chunks, 256, 0, s>>>(p, copy, g, m, v, plan.chunks, wd, clip_dev, skip_dev, a_dev);
    KERNEL_CHECK();
}

// The step's scalars, on the device: norm = sqrt(sum of the n_seg squared norms, in order;
// the trainer's segments: the whole buffer, or this rank's slices per bucket summed over
// ranks), clip = grad_clip_factor (common/run.h: the CPU trainer's formula) as the float
// the update reads, and skip = the norm or a loss statistic (bad: set by note_non_finite)
// is not finite. One thread: a handful of additions.
__global__ void adamw_scalars_kernel(double* norm, float* clip, int* skip, const double* sq, int n_seg, double grad_clip,
                                     const int* bad) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    double s = 0;
    for (int i = 0; i < n_seg; i++) s += sq[i];
    const double nm = sqrt(s);
    *norm = nm;
    *clip = (float)grad_clip_factor(grad_clip, nm);
    *skip = !isfinite(nm) || *bad;
}
inline void adamw_scalars(double* norm, float* clip, int* skip, const double* sq, int n_seg, double grad_clip,
                          const int* bad, cudaStream_t s) {
    adamw_scalars_kernel<<<1, 32, 0, s>>>(norm, clip, skip, sq, n_seg, grad_clip, bad);
    KERNEL_CHECK();
}

// *bad = 1 if any of x[0..n) is not finite (else left as it is): the forward's loss
// statistics, so that a step with a non-finite loss skips its update on the device
__global__ void note_non_finite_kernel(int* bad, const double* x, size_t n) {
    for (size_t i = threadIdx.x; i < n; i += blockDim.x)
        if (!isfinite(x[i])) *bad = 1;  // every writer writes 1: no race on the value
}
inline void note_non_finite(int* bad, const double* x, size_t n, cudaStream_t s) {
    note_non_finite_kernel<<<1, 256, 0, s>>>(bad, x, n);
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
