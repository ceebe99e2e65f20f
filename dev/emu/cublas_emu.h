// dev/emu/cublas_emu.h: the cuBLAS GEMM entry points, implemented from cuBLAS's documented
// semantics (not from how this project calls them), for the CUDA emulation (cuda_emu.h).
//
//   C = alpha op(A) op(B) + beta C        column-major; op(X) = X, X^T (or X^H: = X^T here,
//                                          no complex types are emulated)
//   op(A) is m x k, op(B) is k x n, C is m x n; A is stored lda-strided as (m x k) if
//   transa == N, else (k x m); likewise B; element (i, j) of C is C[i + j * ldc].
//   beta == 0: C is not read (it may hold NaN); k == 0 or alpha == 0: C = beta C.
//   Validation as cuBLAS documents it: m, n, k >= 0, lda >= max(1, rows of A as stored),
//   ldb likewise, ldc >= max(1, m), else CUBLAS_STATUS_INVALID_VALUE; an unsupported
//   (type, compute type) combination gives CUBLAS_STATUS_NOT_SUPPORTED.
//   Batched forms: strided (X_i = X + i * strideX), pointer arrays, and grouped (per group
//   its own op, sizes, ld, alpha, beta; group g has group_size[g] problems, pointers in order).
//
// Numerics: inputs converted to the compute type (fp32 or fp64), products summed in a fixed
// order, the result scaled and rounded once to C's type (round to nearest). Real cuBLAS sums
// in another order (and may split k): results agree to rounding, not bit for bit.
// In addition to cuBLAS's own checks, every operand must lie inside one device allocation.
#pragma once

namespace emu {

struct BlasHandle {
    cudaStream_t stream = nullptr;
    cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
    cublasMath_t math_mode = CUBLAS_DEFAULT_MATH;
};
inline BlasHandle* blas(cublasHandle_t h) { return reinterpret_cast<BlasHandle*>(h); }

inline size_t type_bytes(cudaDataType_t t) {
    switch (t) {
        case CUDA_R_32F: return 4;
        case CUDA_R_64F: return 8;
        case CUDA_R_16BF: case CUDA_R_16F: return 2;
        default: return 0;
    }
}
template <class Acc>
inline Acc load_elem(const void* p, cudaDataType_t t, size_t i) {
    switch (t) {
        case CUDA_R_32F: return (Acc)((const float*)p)[i];
        case CUDA_R_64F: return (Acc)((const double*)p)[i];
        case CUDA_R_16BF: return (Acc)__bfloat162float(((const __nv_bfloat16*)p)[i]);
        case CUDA_R_16F: return (Acc)__half2float(((const __half*)p)[i]);
        default: fail("cublas: data type %d is not emulated", (int)t);
    }
}
template <class Acc>
inline void store_elem(void* p, cudaDataType_t t, size_t i, Acc v) {
    switch (t) {
        case CUDA_R_32F: ((float*)p)[i] = (float)v; break;
        case CUDA_R_64F: ((double*)p)[i] = (double)v; break;
        case CUDA_R_16BF: ((__nv_bfloat16*)p)[i] = __float2bfloat16_rn((float)v); break;
        case CUDA_R_16F: ((__half*)p)[i] = __float2half_rn((float)v); break;
        default: fail("cublas: data type %d is not emulated", (int)t);
    }
}

// Which (A/B type, C type, compute type) combinations cublasGemmEx accepts (the documented
// table, restricted to the real types this emulation knows); 0 = not supported, 32 = fp32
// scale and accumulation, 64 = fp64.
inline int gemm_combo(cudaDataType_t at, cudaDataType_t bt, cudaDataType_t ct, cublasComputeType_t comp) {
    if (at != bt) return 0;
    switch (comp) {
        case CUBLAS_COMPUTE_64F: case CUBLAS_COMPUTE_64F_PEDANTIC:
            return at == CUDA_R_64F && ct == CUDA_R_64F ? 64 : 0;
        case CUBLAS_COMPUTE_32F: case CUBLAS_COMPUTE_32F_PEDANTIC:
            if (at == CUDA_R_32F) return ct == CUDA_R_32F ? 32 : 0;
            if (at == CUDA_R_16BF) return ct == CUDA_R_16BF || ct == CUDA_R_32F ? 32 : 0;
            if (at == CUDA_R_16F) return ct == CUDA_R_16F || ct == CUDA_R_32F ? 32 : 0;
            return 0;
        case CUBLAS_COMPUTE_32F_FAST_TF32: case CUBLAS_COMPUTE_32F_FAST_16BF: case CUBLAS_COMPUTE_32F_FAST_16F:
            return at == CUDA_R_32F && ct == CUDA_R_32F ? 32 : 0;  // fp32 data, faster internal math allowed
        default:
            return 0;
    }
}

struct GemmArgs {
    cublasOperation_t ta, tb;
    int m, n, k;
    const void* alpha;  // float (32) or double (64), host or "device" per pointer mode
    const void* A;
    cudaDataType_t at;
    int lda;
    const void* B;
    cudaDataType_t bt;
    int ldb;
    const void* beta;
    void* C;
    cudaDataType_t ct;
    int ldc;
    cublasComputeType_t comp;
};

inline bool valid_op(cublasOperation_t t) { return t == CUBLAS_OP_N || t == CUBLAS_OP_T || t == CUBLAS_OP_C; }

inline cublasStatus_t gemm_validate(const GemmArgs& g) {
    if (!valid_op(g.ta) || !valid_op(g.tb)) return CUBLAS_STATUS_INVALID_VALUE;
    if (g.m < 0 || g.n < 0 || g.k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (g.lda < std::max(1, g.ta == CUBLAS_OP_N ? g.m : g.k)) return CUBLAS_STATUS_INVALID_VALUE;
    if (g.ldb < std::max(1, g.tb == CUBLAS_OP_N ? g.k : g.n)) return CUBLAS_STATUS_INVALID_VALUE;
    if (g.ldc < std::max(1, g.m)) return CUBLAS_STATUS_INVALID_VALUE;
    if (!gemm_combo(g.at, g.bt, g.ct, g.comp)) return CUBLAS_STATUS_NOT_SUPPORTED;
    return CUBLAS_STATUS_SUCCESS;
}

// the elements a stored rows x cols matrix with leading dimension ld spans
inline size_t extent(int rows, int cols, int ld) {
    return rows == 0 || cols == 0 ? 0 : (size_t)(cols - 1) * ld + rows;
}

template <class Acc>
void gemm_run(const GemmArgs& g, Acc alpha, Acc beta) {
    const int m = g.m, n = g.n, k = g.k;
    if (m == 0 || n == 0) return;
    const bool use_ab = k > 0 && alpha != (Acc)0;
    // operands must be device memory, as far as they are read or written
    if (use_ab) {
        check_device_range(g.A, extent(g.ta == CUBLAS_OP_N ? m : k, g.ta == CUBLAS_OP_N ? k : m, g.lda) * type_bytes(g.at), "cublas GEMM operand A");
        check_device_range(g.B, extent(g.tb == CUBLAS_OP_N ? k : n, g.tb == CUBLAS_OP_N ? n : k, g.ldb) * type_bytes(g.bt), "cublas GEMM operand B");
    }
    check_device_range(g.C, extent(m, n, g.ldc) * type_bytes(g.ct), "cublas GEMM operand C");
    // op(A) row i and op(B) column j as contiguous k-vectors: every dot product is unit-stride
    std::vector<Acc> a(use_ab ? (size_t)m * k : 0), b(use_ab ? (size_t)n * k : 0);
    if (use_ab) {
        for (int i = 0; i < m; i++)
            for (int p = 0; p < k; p++)
                a[(size_t)i * k + p] = load_elem<Acc>(g.A, g.at, g.ta == CUBLAS_OP_N ? (size_t)p * g.lda + i : (size_t)i * g.lda + p);
        for (int j = 0; j < n; j++)
            for (int p = 0; p < k; p++)
                b[(size_t)j * k + p] = load_elem<Acc>(g.B, g.bt, g.tb == CUBLAS_OP_N ? (size_t)j * g.ldb + p : (size_t)p * g.ldb + j);
    }
    auto column = [&](int j) {
        const Acc* y = use_ab ? &b[(size_t)j * k] : nullptr;
        for (int i = 0; i < m; i++) {
            Acc s = 0;
            if (use_ab) {
                const Acc* x = &a[(size_t)i * k];
                // 8 interleaved partial sums (as a GPU splits k), added in a fixed order
                Acc part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                int p = 0;
                for (; p + 8 <= k; p += 8)
                    for (int u = 0; u < 8; u++) part[u] += x[p + u] * y[p + u];
                for (; p < k; p++) part[p & 7] += x[p] * y[p];
                s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
            }
            size_t ci = (size_t)j * g.ldc + i;
            Acc c = beta == (Acc)0 ? (Acc)0 : beta * load_elem<Acc>(g.C, g.ct, ci);  // beta 0: C not read
            store_elem<Acc>(g.C, g.ct, ci, alpha * s + c);
        }
    };
#ifdef _OPENMP
    if (!omp_in_parallel() && (double)m * n * k > 1e5) {
#pragma omp parallel for schedule(static)
        for (int j = 0; j < n; j++) column(j);
        return;
    }
#endif
    for (int j = 0; j < n; j++) column(j);
}

inline cublasStatus_t gemm(cublasHandle_t h, const GemmArgs& g, size_t scalar_index = 0) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    cublasStatus_t st = gemm_validate(g);
    if (st != CUBLAS_STATUS_SUCCESS) return st;
    // alpha/beta: scalars of the compute precision; in a grouped call, one per group. Host
    // pointer mode: read now (a captured GEMM keeps the values of its capture, as on a GPU);
    // device pointer mode: read when the GEMM runs. The matrices are read when it runs.
    const bool f64 = gemm_combo(g.at, g.bt, g.ct, g.comp) == 64;
    const bool host = blas(h)->pointer_mode == CUBLAS_POINTER_MODE_HOST;
    auto scalar = [f64, scalar_index](const void* p) {
        return f64 ? ((const double*)p)[scalar_index] : (double)((const float*)p)[scalar_index];
    };
    const double alpha = host ? scalar(g.alpha) : 0, beta = host ? scalar(g.beta) : 0;
    stream_work(blas(h)->stream, "a cuBLAS GEMM", [=] {
        const double a = host ? alpha : scalar(g.alpha), b = host ? beta : scalar(g.beta);
        if (f64) gemm_run<double>(g, a, b);
        else gemm_run<float>(g, (float)a, (float)b);
    });
    return CUBLAS_STATUS_SUCCESS;
}

}  // namespace emu

extern "C" {
inline cublasStatus_t cublasCreate_v2(cublasHandle_t* h) {
    *h = reinterpret_cast<cublasHandle_t>(new emu::BlasHandle());
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy_v2(cublasHandle_t h) {
    delete emu::blas(h);
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetStream_v2(cublasHandle_t h, cudaStream_t s) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    emu::blas(h)->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasGetStream_v2(cublasHandle_t h, cudaStream_t* s) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    *s = emu::blas(h)->stream;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    emu::blas(h)->math_mode = m;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasGetMathMode(cublasHandle_t h, cublasMath_t* m) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    *m = emu::blas(h)->math_mode;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t h, cublasPointerMode_t m) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    emu::blas(h)->pointer_mode = m;  // host and device pointers are both host memory here
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasGetPointerMode_v2(cublasHandle_t h, cublasPointerMode_t* m) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    *m = emu::blas(h)->pointer_mode;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t h, void* ws, size_t bytes) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    emu::check_device_range(ws, bytes, "cublasSetWorkspace");
    return CUBLAS_STATUS_SUCCESS;
}
inline const char* cublasGetStatusString(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS (cuda-emu)";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED (cuda-emu)";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE (cuda-emu)";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED (cuda-emu)";
        default: return "cuBLAS error (cuda-emu)";
    }
}

inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   const void* alpha, const void* A, cudaDataType_t at, int lda, const void* B,
                                   cudaDataType_t bt, int ldb, const void* beta, void* C, cudaDataType_t ct, int ldc,
                                   cublasComputeType_t comp, cublasGemmAlgo_t) {
    return emu::gemm(h, emu::GemmArgs{ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, comp});
}
inline cublasStatus_t cublasSgemm_v2(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                     const float* alpha, const float* A, int lda, const float* B, int ldb,
                                     const float* beta, float* C, int ldc) {
    return emu::gemm(h, emu::GemmArgs{ta, tb, m, n, k, alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, beta, C,
                                      CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F});
}
inline cublasStatus_t cublasDgemm_v2(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                     const double* alpha, const double* A, int lda, const double* B, int ldb,
                                     const double* beta, double* C, int ldc) {
    return emu::gemm(h, emu::GemmArgs{ta, tb, m, n, k, alpha, A, CUDA_R_64F, lda, B, CUDA_R_64F, ldb, beta, C,
                                      CUDA_R_64F, ldc, CUBLAS_COMPUTE_64F});
}
inline cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                 int n, int k, const void* alpha, const void* A, cudaDataType_t at,
                                                 int lda, long long sA, const void* B, cudaDataType_t bt, int ldb,
                                                 long long sB, const void* beta, void* C, cudaDataType_t ct, int ldc,
                                                 long long sC, int batch, cublasComputeType_t comp, cublasGemmAlgo_t) {
    if (batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    for (int i = 0; i < batch; i++) {
        cublasStatus_t s = emu::gemm(
            h, emu::GemmArgs{ta, tb, m, n, k, alpha, (const char*)A + i * sA * (long long)emu::type_bytes(at), at, lda,
                             (const char*)B + i * sB * (long long)emu::type_bytes(bt), bt, ldb, beta,
                             (char*)C + i * sC * (long long)emu::type_bytes(ct), ct, ldc, comp});
        if (s != CUBLAS_STATUS_SUCCESS) return s;
    }
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                int n, int k, const float* alpha, const float* A, int lda,
                                                long long sA, const float* B, int ldb, long long sB, const float* beta,
                                                float* C, int ldc, long long sC, int batch) {
    return cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, alpha, A, CUDA_R_32F, lda, sA, B, CUDA_R_32F, ldb, sB, beta,
                                      C, CUDA_R_32F, ldc, sC, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}
inline cublasStatus_t cublasGemmBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                          int k, const void* alpha, const void* const A[], cudaDataType_t at, int lda,
                                          const void* const B[], cudaDataType_t bt, int ldb, const void* beta,
                                          void* const C[], cudaDataType_t ct, int ldc, int batch,
                                          cublasComputeType_t comp, cublasGemmAlgo_t) {
    if (batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (batch > 0) {  // the pointer arrays live in device memory
        emu::check_device_range(A, batch * sizeof(void*), "cublasGemmBatchedEx Aarray");
        emu::check_device_range(B, batch * sizeof(void*), "cublasGemmBatchedEx Barray");
        emu::check_device_range(C, batch * sizeof(void*), "cublasGemmBatchedEx Carray");
    }
    for (int i = 0; i < batch; i++) {
        cublasStatus_t s = emu::gemm(h, emu::GemmArgs{ta, tb, m, n, k, alpha, A[i], at, lda, B[i], bt, ldb, beta, C[i],
                                                      ct, ldc, comp});
        if (s != CUBLAS_STATUS_SUCCESS) return s;
    }
    return CUBLAS_STATUS_SUCCESS;
}
// Grouped: per group g its own transposes, sizes, leading dimensions and alpha/beta (arrays
// on the host; alpha/beta per the pointer mode), group_size[g] problems each; the pointer
// arrays (device memory) list every problem, group after group.
inline cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t h, const cublasOperation_t ta[],
                                                 const cublasOperation_t tb[], const int m[], const int n[],
                                                 const int k[], const void* alpha, const void* const A[],
                                                 cudaDataType_t at, const int lda[], const void* const B[],
                                                 cudaDataType_t bt, const int ldb[], const void* beta,
                                                 void* const C[], cudaDataType_t ct, const int ldc[], int groups,
                                                 const int group_size[], cublasComputeType_t comp) {
    if (groups < 0) return CUBLAS_STATUS_INVALID_VALUE;
    long total = 0;
    for (int g = 0; g < groups; g++) {
        if (group_size[g] < 0) return CUBLAS_STATUS_INVALID_VALUE;
        total += group_size[g];
    }
    if (total > 0) {
        emu::check_device_range(A, total * sizeof(void*), "cublasGemmGroupedBatchedEx Aarray");
        emu::check_device_range(B, total * sizeof(void*), "cublasGemmGroupedBatchedEx Barray");
        emu::check_device_range(C, total * sizeof(void*), "cublasGemmGroupedBatchedEx Carray");
    }
    long idx = 0;
    for (int g = 0; g < groups; g++)
        for (int i = 0; i < group_size[g]; i++, idx++) {
            cublasStatus_t s = emu::gemm(h, emu::GemmArgs{ta[g], tb[g], m[g], n[g], k[g], alpha, A[idx], at, lda[g],
                                                          B[idx], bt, ldb[g], beta, C[idx], ct, ldc[g], comp},
                                         (size_t)g);
            if (s != CUBLAS_STATUS_SUCCESS) return s;
        }
    return CUBLAS_STATUS_SUCCESS;
}
}  // extern "C"
