// kernels/grouped_matmul.cuh: the expert GEMMs of an MoE layer as ONE launch each, on tensor
// cores (bf16 in, fp32 accumulate), driven by the row offsets on the DEVICE, so the host
// needs no expert counts to launch them (kernels/matmul.cuh's per-expert cuBLAS loop does).
//
// After the permutation, expert e owns rows offsets[e] .. offsets[e+1] of X [R, C] and has
// its weight W_e [OC, C] at w + e * w_stride (the flat parameter buffer: each expert's
// matrices sit at a fixed distance from the previous expert's). Three products:
//   forward:         Y[rows of e]  = X[rows of e] @ W_e^T             (Y bf16, written)
//   backward input:  dX[rows of e] = dY[rows of e] @ W_e              (dX bf16, written)
//   backward weight: dW_e         += dY[rows of e]^T @ X[rows of e]   (dW fp32, accumulated)
// Each block computes a 64 x 64 tile of the output with 4 warps (16 rows each), k in steps
// of 32 staged in shared memory, mma.sync m16n8k16 (kernels/mma.cuh). Forward and backward
// input: the grid covers every possible row tile (cdiv(R, 64) + E: each expert adds at most
// one partial tile); a block finds its expert and tile from the offsets and returns if it
// has none. Backward weight: one block row per (expert, 64 rows of OC); the k loop runs over
// the expert's rows, so an expert without rows adds nothing and its dW stays bit-exact.
// Each output element has one writer and a fixed summation order: deterministic.
// Requires C and OC multiples of 8 (16-byte rows); R, the counts and E are free.
#pragma once
#include "common.cuh"
#include "mma.cuh"  // mma_m16n8k16_bf16, ldmatrix_x2(_trans), ldmatrix_x4(_trans), pack_bf16x2

namespace gpu {

enum GroupedMode { GROUPED_FWD = 0, GROUPED_BWD_INPUT = 1, GROUPED_BWD_WEIGHT = 2 };

constexpr int GMM_BM = 64, GMM_BN = 64, GMM_BK = 32;
constexpr int GMM_LDK = GMM_BK + 8;  // tiles stored [64 rows][32 k] (+8: 16-byte rows, fewer bank conflicts)
constexpr int GMM_LDN = GMM_BN + 8;  // tiles stored [32 k][64 columns]

// Copies a rows x cols tile (cols a multiple of 8) from src (row stride ld_src) into dst (row
// stride ld_dst), 16 bytes per thread and step; element (r, c) is zero unless r < row_lim and
// c < col_lim (col_lim a multiple of 8).
__device__ __forceinline__ void gmm_stage(bf16* dst, int ld_dst, const bf16* src, size_t ld_src, int rows, int cols,
                                          int row_lim, int col_lim) {
    const int c8n = cols / 8;
    for (int i = threadIdx.x; i < rows * c8n; i += blockDim.x) {
        const int r = i / c8n, c = (i % c8n) * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < row_lim && c < col_lim) val = *reinterpret_cast<const uint4*>(src + (size_t)r * ld_src + c);
        *reinterpret_cast<uint4*>(dst + r * ld_dst + c) = val;
    }
}

// out tile = A (64 x K) * B (K x 64), by mode:
//   FWD:        A = X rows [r][k=c],  B[k][n] = W_e[n][k]   (W rows are the output columns)
//   BWD_INPUT:  A = dY rows [r][k=o], B[k][n] = W_e[k][n]
//   BWD_WEIGHT: A[m][k] = dY[k][m] (rows of the expert are k), B[k][n] = X[k][n]
// Shared: As and Bs, each 64 x 40 or 32 x 72 bf16 (the larger: 64 x 40 = 2560 elements).
template <int MODE>
__global__ void __launch_bounds__(128) grouped_matmul_kernel(void* out, const bf16* a_mat, const bf16* b_mat,
                                                            const int* offsets, int E, size_t w_stride, int C, int OC) {
    __shared__ __align__(16) bf16 As[GMM_BM * GMM_LDK > GMM_BK * GMM_LDN ? GMM_BM * GMM_LDK : GMM_BK * GMM_LDN];
    __shared__ __align__(16) bf16 Bs[GMM_BM * GMM_LDK > GMM_BK * GMM_LDN ? GMM_BM * GMM_LDK : GMM_BK * GMM_LDN];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, tq = lane & 3;

    // which expert, which rows (m) and columns (n) of the output, and the k extent
    int e = 0, m0, m_end, K, N;
    if (MODE == GROUPED_BWD_WEIGHT) {
        const int mt_per_e = (OC + GMM_BM - 1) / GMM_BM;
        e = blockIdx.x / mt_per_e;
        m0 = (blockIdx.x % mt_per_e) * GMM_BM;  // a row of dW_e (an output channel o)
        m_end = OC;
        K = offsets[e + 1] - offsets[e];        // the expert's rows
        N = C;
        if (K == 0) return;                     // no rows: dW_e stays exactly as it was
    } else {
        int tile = blockIdx.x;  // the expert whose row tiles contain this block's
        while (e < E) {
            const int tiles = (offsets[e + 1] - offsets[e] + GMM_BM - 1) / GMM_BM;
            if (tile < tiles) break;
            tile -= tiles;
            e++;
        }
        if (e == E) return;  // more blocks than row tiles
        m0 = offsets[e] + tile * GMM_BM;
        m_end = offsets[e + 1];
        K = MODE == GROUPED_FWD ? C : OC;
        N = MODE == GROUPED_FWD ? OC : C;
    }
    const int n0 = blockIdx.y * GMM_BN;
    if (n0 >= N) return;
    const bf16* W = b_mat + (size_t)e * w_stride;  // W_e (FWD, BWD_INPUT); unused in BWD_WEIGHT
    const int r_e = offsets[e];                      // the expert's first row (BWD_WEIGHT)

    float acc[GMM_BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < GMM_BN / 8; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += GMM_BK) {
        __syncthreads();  // the previous k step's tiles are no longer read
        if (MODE == GROUPED_FWD) {
            gmm_stage(As, GMM_LDK, a_mat + (size_t)m0 * C + k0, C, GMM_BM, GMM_BK, m_end - m0, K - k0);
            gmm_stage(Bs, GMM_LDK, W + (size_t)n0 * C + k0, C, GMM_BN, GMM_BK, N - n0, K - k0);
        } else if (MODE == GROUPED_BWD_INPUT) {
            gmm_stage(As, GMM_LDK, a_mat + (size_t)m0 * OC + k0, OC, GMM_BM, GMM_BK, m_end - m0, K - k0);
            gmm_stage(Bs, GMM_LDN, W + (size_t)k0 * C + n0, C, GMM_BK, GMM_BN, K - k0, N - n0);
        } else {
            gmm_stage(As, GMM_LDN, a_mat + (size_t)(r_e + k0) * OC + m0, OC, GMM_BK, GMM_BM, K - k0, m_end - m0);
            gmm_stage(Bs, GMM_LDN, b_mat + (size_t)(r_e + k0) * C + n0, C, GMM_BK, GMM_BN, K - k0, N - n0);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GMM_BK; kk += 16) {
            uint32_t a[4];
            if (MODE == GROUPED_BWD_WEIGHT)  // A[m][k] = As[k][m]: the transposed load (kernels/mma.cuh)
                ldmatrix_x4_trans(a, &As[(kk + (lane & 7) + (lane >> 4) * 8) * GMM_LDN + warp * 16 + ((lane >> 3) & 1) * 8]);
            else
                ldmatrix_x4(a, &As[(warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * GMM_LDK + kk + (lane >> 4) * 8]);
#pragma unroll
            for (int nt = 0; nt < GMM_BN / 8; nt++) {
                uint32_t b[2];
                if (MODE == GROUPED_FWD)  // B[k][n] = Bs[n][k]: W's rows, not transposed
                    ldmatrix_x2(b, &Bs[(nt * 8 + (lane & 7)) * GMM_LDK + kk + ((lane >> 3) & 1) * 8]);
                else  // B[k][n] = Bs[k][n]: rows are k, the transposed load
                    ldmatrix_x2_trans(b, &Bs[(kk + (lane & 7) + ((lane >> 3) & 1) * 8) * GMM_LDN + nt * 8]);
                mma_m16n8k16_bf16(acc[nt], a, b, acc[nt]);
            }
        }
    }
    // epilogue: rows g and g+8 of the warp's 16, columns 2 tq, 2 tq + 1 of each 8-wide tile
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int m = m0 + warp * 16 + g + 8 * r;
        if (m >= m_end) continue;
#pragma unroll
        for (int nt = 0; nt < GMM_BN / 8; nt++) {
            const int n = n0 + nt * 8 + 2 * tq;
            if (n >= N) continue;  // N is a multiple of 8, so n + 1 < N too
            if (MODE == GROUPED_BWD_WEIGHT) {
                float* dw = (float*)out + (size_t)e * w_stride + (size_t)m * C + n;
                dw[0] += acc[nt][2 * r];
                dw[1] += acc[nt][2 * r + 1];
            } else {
                __nv_bfloat162 pair;
                pair.x = __float2bfloat16(acc[nt][2 * r]);
                pair.y = __float2bfloat16(acc[nt][2 * r + 1]);
                *reinterpret_cast<__nv_bfloat162*>((bf16*)out + (size_t)m * N + n) = pair;
            }
        }
    }
}

// Y [R, OC] = X [R, C] @ W_e^T per expert block; offsets: DEVICE [E+1]; w: expert 0's
// [OC, C] matrix, expert e's at w + e * w_stride
inline void grouped_matmul_forward(bf16* Y, const bf16* X, const bf16* w, size_t w_stride, const int* offsets, int E,
                                   int R, int C, int OC, cudaStream_t s) {
    dim3 grid(cdiv(R, GMM_BM) + E, cdiv(OC, GMM_BN));
    grouped_matmul_kernel<GROUPED_FWD><<<grid, 128, 0, s>>>(Y, X, w, offsets, E, w_stride, C, OC);
    KERNEL_CHECK();
}
// dX [R, C] (written) = dY [R, OC] @ W_e per expert block, and dW_e (fp32, dw + e * w_stride,
// accumulated) += dY^T X per expert block
inline void grouped_matmul_backward(bf16* dX, float* dw, const bf16* dY, const bf16* X, const bf16* w, size_t w_stride,
                                    const int* offsets, int E, int R, int C, int OC, cudaStream_t s) {
    dim3 grid_in(cdiv(R, GMM_BM) + E, cdiv(C, GMM_BN));
    grouped_matmul_kernel<GROUPED_BWD_INPUT><<<grid_in, 128, 0, s>>>(dX, dY, w, offsets, E, w_stride, C, OC);
    KERNEL_CHECK();
    dim3 grid_w(E * cdiv(OC, GMM_BM), cdiv(C, GMM_BN));
    grouped_matmul_kernel<GROUPED_BWD_WEIGHT><<<grid_w, 128, 0, s>>>(dw, dY, X, offsets, E, w_stride, C, OC);
    KERNEL_CHECK();
}
inline bool grouped_matmul_supports(int C, int OC) { return C % 8 == 0 && OC % 8 == 0; }

}  // namespace gpu
