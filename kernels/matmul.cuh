// kernels/matmul.cuh: GEMMs through cuBLAS (cublasGemmEx), in the Hugging Face [out, in]
// weight layout with row-major activations, and the per-expert GEMMs of MoE layers.
//
// Row-major X [N, C] is column-major X^T (C x N) with leading dimension C, so
//   out[N, OC] = inp[N, C] @ w[OC, C]^T   is  out^T = w^T(op T on w's C x OC) * inp^T
// and the two backward products follow the same way (see each function).
// All products accumulate in fp32 (CUBLAS_COMPUTE_32F; fp32 inputs stay true fp32, no
// TF32, because the handle keeps CUBLAS_DEFAULT_MATH). Weight gradients are fp32 and
// always accumulated (beta = 1): they are zeroed once per optimizer step, which is what
// gradient accumulation over micro-batches needs.
//
// cuBLAS gives the same bits run to run for the same sizes on the same GPU, as long as one
// stream and a fixed workspace are used (we set both); so the GEMMs keep resume
// bit-identical.
#pragma once
#include <vector>
#include "common.cuh"

namespace gpu {

inline void gemm_ex(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void* A,
                    cudaDataType_t at, int lda, const void* B, cudaDataType_t bt, int ldb, float beta, void* C,
                    cudaDataType_t ct, int ldc) {
    const float alpha = 1.0f;
    cublasCheck(cublasGemmEx(h, ta, tb, m, n, k, &alpha, A, at, lda, B, bt, ldb, &beta, C, ct, ldc,
                             CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// out [N, OC] (type TO; beta 0 = overwrite, 1 = add) = inp [N, C] @ w [OC, C]^T
template <typename TO, typename TI>
void matmul_forward(cublasHandle_t h, TO* out, const TI* inp, const TI* w, int N, int C, int OC, float beta = 0.0f) {
    if (N == 0) return;  // never hand cuBLAS an empty matrix
    gemm_ex(h, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, C, w, CudaType<TI>::value, C, inp, CudaType<TI>::value, C, beta, out,
            CudaType<TO>::value, OC);
}

// dinp [N, C] (beta 0 = overwrite, 1 = add) = dout [N, OC] @ w [OC, C]
//   column-major: dinp^T (C x N) = w^T (C x OC, op N) * dout^T (OC x N, op N)
template <typename T>
void matmul_backward_input(cublasHandle_t h, T* dinp, const T* dout, const T* w, int N, int C, int OC,
                           float beta = 0.0f) {
    if (N == 0) return;
    gemm_ex(h, CUBLAS_OP_N, CUBLAS_OP_N, C, N, OC, w, CudaType<T>::value, C, dout, CudaType<T>::value, OC, beta, dinp,
            CudaType<T>::value, C);
}

// dw [OC, C] (fp32) += dout [N, OC]^T @ inp [N, C]
//   column-major: dw^T (C x OC) = inp^T (C x N, op N) * dout (N x OC: op T on dout^T)
template <typename T>
void matmul_backward_weight(cublasHandle_t h, float* dw, const T* dout, const T* inp, int N, int C, int OC) {
    if (N == 0) return;  // a weight that saw no rows gets exactly zero contribution
    gemm_ex(h, CUBLAS_OP_N, CUBLAS_OP_T, C, OC, N, inp, CudaType<T>::value, C, dout, CudaType<T>::value, OC, 1.0f, dw,
            CUDA_R_32F, C);
}

// ----------------------------------------------------------------------------
// Expert GEMMs: the permuted rows of a MoE layer are grouped by expert (expert e owns rows
// offsets[e] .. offsets[e] + counts[e]); each expert is one ordinary GEMM over its block.
// An expert with no rows is skipped: no GEMM with m = 0 (one vendor's grouped GEMM got
// the weight gradient wrong there), and its weight gradient is left exactly as it was.
// counts/offsets are HOST arrays: the caller copies the counts from the device once per
// MoE layer per step (a small synchronizing copy; a device-side grouped GEMM would avoid
// it, later).

struct ExpertBlocks {
    std::vector<int> counts, offsets;  // [E], [E+1], host copies
};

// out rows of expert e = inp rows of expert e @ w_e^T;  w[e]: device pointer [OC, C]
template <typename T>
void expert_matmul_forward(cublasHandle_t h, T* out, const T* inp, const std::vector<const T*>& w,
                           const ExpertBlocks& eb, int C, int OC) {
    for (size_t e = 0; e < w.size(); e++) {
        if (eb.counts[e] == 0) continue;
        size_t r0 = (size_t)eb.offsets[e];
        matmul_forward(h, out + r0 * OC, inp + r0 * C, w[e], eb.counts[e], C, OC);
    }
}
// dinp rows (overwritten) and dw[e] (fp32, accumulated) of every expert with rows
template <typename T>
void expert_matmul_backward(cublasHandle_t h, T* dinp, const std::vector<float*>& dw, const T* dout, const T* inp,
                            const std::vector<const T*>& w, const ExpertBlocks& eb, int C, int OC) {
    for (size_t e = 0; e < w.size(); e++) {
        if (eb.counts[e] == 0) continue;
        size_t r0 = (size_t)eb.offsets[e];
        int n = eb.counts[e];
        matmul_backward_input(h, dinp + r0 * C, dout + r0 * OC, w[e], n, C, OC);
        matmul_backward_weight(h, dw[e], dout + r0 * OC, inp + r0 * C, n, C, OC);
    }
}

}  // namespace gpu
