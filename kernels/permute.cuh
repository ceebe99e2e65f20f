// kernels/permute.cuh: dropless token permutation for MoE layers, and the combine that
// undoes it. Deterministic, no atomics, and in exactly the CPU trainer's row order:
// the N*K (token, slot) pairs, i = n*K + k, are sorted by expert with a stable counting
// sort, so expert e owns rows offsets[e] .. offsets[e+1]-1, filled in increasing i.
//   seq_counts [B, E]  assignments per sequence and expert (the seq aux loss needs them)
//   counts [E], offsets [E+1]
//   row_token [N*K]    token of each permuted row;  row_of [N*K]  row of pair i
#pragma once
#include "common.cuh"

namespace gpu {

// seq_counts[b, e] = #{(t, k): topk[(b*T + t)*K + k] == e}. grid B, one thread per expert.
__global__ void moe_seq_counts_kernel(int* seq_counts, const int* topk, int T_, int E, int K) {
    int b = blockIdx.x, e = threadIdx.x;
    if (e >= E) return;
    const int* sel = topk + (size_t)b * T_ * K;
    int c = 0;
    for (int i = 0; i < T_ * K; i++) c += sel[i] == e;
    seq_counts[(size_t)b * E + e] = c;
}
// counts[e] = sum_b seq_counts[b, e]; offsets = exclusive prefix sum. One thread: E is small.
__global__ void moe_offsets_kernel(int* counts, int* offsets, const int* seq_counts, int B, int E) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    offsets[0] = 0;
    for (int e = 0; e < E; e++) {
        int c = 0;
        for (int b = 0; b < B; b++) c += seq_counts[(size_t)b * E + e];
        counts[e] = c;
        offsets[e + 1] = offsets[e] + c;
    }
}
// Stable scatter: block e walks the pairs in order, 1024 at a time; a pair's row is
// offsets[e] + (pairs of expert e before it), from a warp ballot and the warps' totals.
__global__ void __launch_bounds__(1024) moe_scatter_kernel(int* row_token, int* row_of, const int* topk,
                                                           const int* offsets, int NK, int K) {
    __shared__ int warp_total[32];
    __shared__ int base;
    const int e = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    if (threadIdx.x == 0) base = offsets[e];
    __syncthreads();
    for (int i0 = 0; i0 < NK; i0 += blockDim.x) {
        int i = i0 + threadIdx.x;
        bool mine = i < NK && topk[i] == e;
        unsigned ballot = __ballot_sync(0xffffffffu, mine);
        if (lane == 0) warp_total[warp] = __popc(ballot);
        __syncthreads();
        if (mine) {
            int before = __popc(ballot & ((1u << lane) - 1u));
            for (int w = 0; w < warp; w++) before += warp_total[w];
            int r = base + before;
            row_token[r] = i / K;
            row_of[i] = r;
        }
        __syncthreads();  // everyone has read base and warp_total
        if (threadIdx.x == 0) {
            int tot = 0;
            for (int w = 0; w < nwarps; w++) tot += warp_total[w];
            base += tot;
        }
        __syncthreads();
    }
}

// The whole permutation from topk [N, K]: seq_counts, counts, offsets, row_token, row_of.
inline void moe_permute(int* seq_counts, int* counts, int* offsets, int* row_token, int* row_of, const int* topk, int B,
                        int T_, int E, int K, cudaStream_t s) {
    moe_seq_counts_kernel<<<B, cdiv(E, 32) * 32, 0, s>>>(seq_counts, topk, T_, E, K);
    KERNEL_CHECK();
    moe_offsets_kernel<<<1, 1, 0, s>>>(counts, offsets, seq_counts, B, E);
    KERNEL_CHECK();
    moe_scatter_kernel<<<E, 1024, 0, s>>>(row_token, row_of, topk, offsets, B * T_ * K, K);
    KERNEL_CHECK();
}

// xe [N*K, d]: xe[r] = x[row_token[r]]
template <typename T>
__global__ void moe_gather_kernel(T* xe, const T* x, const int* row_token, int NK, int d) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)NK * d) return;
    size_t r = i / d;
    int c = (int)(i % d);
    xe[i] = x[(size_t)row_token[r] * d + c];
}
template <typename T>
void moe_gather(T* xe, const T* x, const int* row_token, int NK, int d, cudaStream_t s) {
    moe_gather_kernel<<<cdiv((long)NK * d, 256), 256, 0, s>>>(xe, x, row_token, NK, d);
    KERNEL_CHECK();
}

// combine: out[n] = sum_k topw[n, k] ey[row_of[n*K + k]], slots in order (fp32 sum)
template <typename T>
__global__ void moe_combine_forward_kernel(T* out, const T* ey, const float* topw, const int* row_of, int N, int K,
                                           int d) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * d) return;
    size_t n = i / d;
    int c = (int)(i % d);
    float s = 0.0f;
    for (int k = 0; k < K; k++) s += topw[n * K + k] * to_f(ey[(size_t)row_of[n * K + k] * d + c]);
    out[i] = from_f<T>(s);
}
template <typename T>
void moe_combine_forward(T* out, const T* ey, const float* topw, const int* row_of, int N, int K, int d,
                         cudaStream_t s) {
    moe_combine_forward_kernel<<<cdiv((long)N * d, 256), 256, 0, s>>>(out, ey, topw, row_of, N, K, d);
    KERNEL_CHECK();
}

// combine backward, one block per token n: dey[r] = w_{n,k} dout[n] (written) and
// dtopw[n, k] = dout[n] . ey[r] (fp32, fixed-order block reduction)
template <typename T>
__global__ void moe_combine_backward_kernel(T* dey, float* dtopw, const T* dout, const T* ey, const float* topw,
                                            const int* row_of, int K, int d) {
    __shared__ float red[32];
    int n = blockIdx.x;
    const T* dr = dout + (size_t)n * d;
    for (int k = 0; k < K; k++) {
        int r = row_of[n * K + k];
        float w = topw[(size_t)n * K + k];
        const T* yr = ey + (size_t)r * d;
        T* dyr = dey + (size_t)r * d;
        float s = 0.0f;
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float g = to_f(dr[c]);
            s += g * to_f(yr[c]);
            dyr[c] = from_f<T>(w * g);
        }
        s = block_sum(s, red);
        if (threadIdx.x == 0) dtopw[(size_t)n * K + k] = s;
    }
}
template <typename T>
void moe_combine_backward(T* dey, float* dtopw, const T* dout, const T* ey, const float* topw, const int* row_of, int N,
                          int K, int d, cudaStream_t s) {
    moe_combine_backward_kernel<<<N, 256, 0, s>>>(dey, dtopw, dout, ey, topw, row_of, K, d);
    KERNEL_CHECK();
}

// un-permute backward: dx[n] = sum_k dxe[row_of[n*K + k]] (written; slots in order)
template <typename T>
__global__ void moe_unpermute_backward_kernel(T* dx, const T* dxe, const int* row_of, int N, int K, int d) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * d) return;
    size_t n = i / d;
    int c = (int)(i % d);
    float s = 0.0f;
    for (int k = 0; k < K; k++) s += to_f(dxe[(size_t)row_of[n * K + k] * d + c]);
    dx[i] = from_f<T>(s);
}
template <typename T>
void moe_unpermute_backward(T* dx, const T* dxe, const int* row_of, int N, int K, int d, cudaStream_t s) {
    moe_unpermute_backward_kernel<<<cdiv((long)N * d, 256), 256, 0, s>>>(dx, dxe, row_of, N, K, d);
    KERNEL_CHECK();
}

}  // namespace gpu
