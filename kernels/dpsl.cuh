// kernels/dpsl.cuh: the Dirichlet-prior shaping loss (docs/METHODS.md 1.6) on the device, so
// that a training step needs no host wait for it (the micro-batch stays one CUDA graph).
// Per MoE layer, for each expert i, over the N = B T rows of the micro-batch:
//   sort p_{., i} ascending (ties: the lower row first, as common/router_losses.h dpsl_order)
//   row t, the r-th smallest: term D(F_i(p_t,i) - u_r), dL/dp_t,i = (1/(N E)) D' f_i(p_t,i)
//   sum [E] = sum_r term_r   (the host's dpsl_loss divides by N E and adds the layers)
//   G [N, E] = dL/dp         (router_backward sends it through the softmax, scaled by dpsl_coef)
// The per-sample formula is common/router_losses.h dpsl_row (Beta CDF by continued fraction
// and density, in double): the CPU trainer's own lines.
//
// One block per expert. The sort is a bitonic sort of 64-bit keys (float bits of p << 32 |
// row) in shared memory: p >= 0 (a softmax output), so the bits order like the values and
// equal p's order by row. M = N rounded up to a power of two (padding keys sort last);
// (log2 M)(log2 M + 1)/2 passes of M/2 compare-exchanges. Then each thread evaluates the
// formula for its ranks r = tid, tid + blockDim, ... and the block sums the terms in a
// fixed order (deterministic; the CPU adds in rank order, so the two differ by rounding).
// Cost per layer: E blocks (only E SMs busy), each the sort plus N Beta CDF evaluations in
// double (tens of continued-fraction steps each). Shared memory 8 M + 8 x threads
// bytes: N up to 16384 on an H100/H200 (227 KB per block, opted in); above that
// dpsl_prepare stops the run with an error (no global-memory fallback).
#pragma once
#include "../common/router_losses.h"
#include "common.cuh"

namespace gpu {

inline int dpsl_padded_rows(int N) {
    int M = 1;
    while (M < N) M *= 2;
    return M;
}
// threads per block: M/2 (one compare-exchange each per pass), between 32 and 1024; a power
// of two (the tree sum)
inline int dpsl_threads(int N) { return std::min(1024, std::max(32, dpsl_padded_rows(N) / 2)); }
inline size_t dpsl_smem_bytes(int N) { return 8 * (size_t)dpsl_padded_rows(N) + sizeof(double) * dpsl_threads(N); }

// sum [E] (written), G [N, E] (written) from probs [N, E]; ab [E, 2] = (alpha_i, A - alpha_i)
__global__ void dpsl_kernel(double* sum, float* G, const float* probs, const double* ab, int N, int M, int E,
                            DpslDistance distance, DpslEcdf ecdf) {
    extern __shared__ unsigned long long dpsl_smem[];
    unsigned long long* key = dpsl_smem;             // [M]
    double* part = (double*)(dpsl_smem + M);         // [blockDim.x]
    const int i = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    for (int m = tid; m < M; m += nt)
        key[m] = m < N ? ((unsigned long long)__float_as_uint(probs[(size_t)m * E + i]) << 32) | (unsigned)m
                       : ~0ull;  // padding: after every row
    __syncthreads();
    // bitonic sort, ascending: merge sorted runs of k/2 into runs of k
    for (int k = 2; k <= M; k *= 2)
        for (int j = k / 2; j > 0; j /= 2) {
            for (int m = tid; m < M; m += nt) {
                const int o = m ^ j;
                if (o > m) {
                    const unsigned long long x = key[m], y = key[o];
                    const bool up = (m & k) == 0;  // this pair's run ascends
                    if ((x > y) == up) { key[m] = y; key[o] = x; }
                }
            }
            __syncthreads();
        }
    const double a = ab[2 * i], b = ab[2 * i + 1];
    double s = 0;
    for (int r = tid; r < N; r += nt) {
        const int n = (int)(key[r] & 0xffffffffu);
        double term, dp;
        dpsl_row(&term, &dp, (double)probs[(size_t)n * E + i], r + 1, N, E, a, b, distance, ecdf);
        G[(size_t)n * E + i] = (float)dp;
        s += term;
    }
    part[tid] = s;
    __syncthreads();
    for (int w = nt / 2; w > 0; w /= 2) {  // fixed-order tree sum
        if (tid < w) part[tid] += part[tid + w];
        __syncthreads();
    }
    if (tid == 0) sum[i] = part[0];
}

// The most rows the kernel can sort on this device (a power of two)
inline int dpsl_max_rows() {
    int dev = 0, optin = 0;
    cudaCheck(cudaGetDevice(&dev));
    cudaCheck(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    int M = 1;
    while (dpsl_smem_bytes(2 * M) <= (size_t)optin) M *= 2;
    return M;
}
// Once, before any launch (not inside a capture): checks that N rows fit and opts the
// kernel in to the shared memory they need
inline void dpsl_prepare(int N) {
    const int max_rows = dpsl_max_rows();
    if (N > max_rows)
        FAIL("--aux-loss dpsl: the GPU trainer sorts each expert's probabilities over the micro-batch (batch x seq = "
             "%d rows) in one block's shared memory, which holds at most %d rows on this device; use a smaller "
             "--batch or --seq (with --grad-accum), or the CPU trainer", N, max_rows);
    cudaCheck(cudaFuncSetAttribute(dpsl_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)dpsl_smem_bytes(N)));
}
// dpsl of one MoE layer: sum [E] and G [N, E] from probs [N, E] (dpsl_prepare(N or more) first)
inline void dpsl_forward(double* sum, float* G, const float* probs, const double* ab, int N, int E,
                         DpslDistance distance, DpslEcdf ecdf, cudaStream_t s) {
    const int M = dpsl_padded_rows(N);
    dpsl_kernel<<<E, dpsl_threads(N), dpsl_smem_bytes(N), s>>>(sum, G, probs, ab, N, M, E, distance, ecdf);
    KERNEL_CHECK();
}

}  // namespace gpu
