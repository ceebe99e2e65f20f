/*
test_emu.cu: tests of the CUDA emulation itself (dev/emu/, docs/emulation.md), built with the
emulation (g++ -include dev/emu/cuda_emu.h) and run by `make test`.

  test_emu              every check; "N passed, M failed"
  test_emu --case NAME  one deliberately broken kernel (a planted bug); the parent process
                        runs these and checks that each is reported, with what message

Part 1, semantics: warp collectives, barriers with predicates, block reductions, atomics, the
shared-memory rules, fresh-memory poisoning, and every cuBLAS GEMM entry point the project may
call, each against a plain loop written from cuBLAS's documented semantics.
Part 2, planted bugs: each must end the child with a report naming the problem (or, for bugs
that only corrupt values, give a value that differs from the correct one).
*/
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <string>
#include <vector>
#include <sys/wait.h>
#include <unistd.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include "../kernels/common.cuh"

static int g_pass = 0, g_fail = 0;
static void check(bool ok, const std::string& what) {
    (ok ? g_pass : g_fail)++;
    printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
    fflush(stdout);
}
template <class T>
static T* dev_alloc(size_t n) {
    T* p = nullptr;
    cudaCheck(cudaMalloc(&p, n * sizeof(T)));
    return p;
}
template <class T>
static std::vector<T> to_host(const T* d, size_t n) {
    std::vector<T> h(n);
    cudaCheck(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}
template <class T>
static T* to_dev(const std::vector<T>& h) {
    T* d = dev_alloc<T>(h.size());
    cudaCheck(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

// ---------------------------------------------------------------------------
// Part 1: semantics

// out[lane * 8 + i]: the results of eight collectives, one warp of `n` live lanes
__global__ void warp_ops_kernel(int* out, int n) {
    int lane = threadIdx.x;
    if (lane >= n) return;
    unsigned live = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
    int* o = out + lane * 8;
    o[0] = __shfl_sync(live, lane * 10, 3);             // broadcast from lane 3
    o[1] = __shfl_xor_sync(live, lane, 1);             // neighbour
    o[2] = __shfl_down_sync(live, lane, 4, 16);        // within 16-lane groups
    o[3] = __shfl_up_sync(live, lane, 2, 8);           // within 8-lane groups
    o[4] = (int)__ballot_sync(live, lane % 3 == 0);
    o[5] = __any_sync(live, lane == 5);
    o[6] = __all_sync(live, lane < 100);
}
static void test_warp_ops() {
    const int n = 20;  // 12 lanes have exited before the collectives
    int* d = dev_alloc<int>(32 * 8);
    cudaCheck(cudaMemset(d, 0, 32 * 8 * sizeof(int)));
    warp_ops_kernel<<<1, 32>>>(d, n);
    KERNEL_CHECK();
    std::vector<int> h = to_host(d, 32 * 8);
    int bad = 0;
    unsigned ballot = 0;
    for (int l = 0; l < n; l++) ballot |= (l % 3 == 0) << l;
    for (int l = 0; l < n; l++) {
        const int* o = &h[l * 8];
        int down = (l % 16) + 4 < 16 ? l + 4 : l;  // beyond the group: own value
        int up = (l % 8) >= 2 ? l - 2 : l;
        bad += o[0] != 30;
        bad += o[1] != (l ^ 1);
        if ((down < n)) bad += o[2] != down;  // a source lane that exited is undefined (NaN bits here)
        bad += o[3] != up;
        bad += (unsigned)o[4] != ballot;
        bad += o[5] != 1;
        bad += o[6] != 1;
    }
    check(bad == 0, "warp collectives (shfl, xor, down/up with width, ballot, any, all), 20 live lanes");
    cudaFree(d);
}

__global__ void barrier_pred_kernel(int* out) {
    int c = __syncthreads_count(threadIdx.x % 3 == 0);
    int a = __syncthreads_and(threadIdx.x < 1000);
    int o = __syncthreads_or(threadIdx.x == 77);
    int a2 = __syncthreads_and(threadIdx.x != 5);
    if (threadIdx.x == 0) { out[0] = c; out[1] = a; out[2] = o; out[3] = a2; }
}
// a 3-D grid of 3-D blocks: every (block, thread) index visited once; per block, the sum of
// its linear indices (atomicAdd on doubles)
__global__ void index_sum_kernel(double* out, int* visits) {
    int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    int nthreads = blockDim.x * blockDim.y * blockDim.z;
    atomicAdd(&visits[b * nthreads + t], 1);
    atomicAdd(&out[b], (double)(b * nthreads + t));
}
// block_sum (kernels/common.cuh: 1-D blocks, a multiple of 32 threads)
__global__ void block_sum_kernel(float* out) {
    __shared__ float red[32];
    float s = gpu::block_sum((float)threadIdx.x, red);
    s = gpu::block_sum(s, red);  // twice in a row: the second call must not see the first's red[]
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}
static void test_barriers_and_indices() {
    int* d = dev_alloc<int>(4);
    barrier_pred_kernel<<<1, 256>>>(d);
    KERNEL_CHECK();
    auto h = to_host(d, 4);
    check(h[0] == 86 && h[1] == 1 && h[2] == 1 && h[3] == 0, "__syncthreads_count / _and / _or");
    cudaFree(d);
    dim3 grid(3, 2, 2), block(8, 4, 2);  // 12 blocks of 64 threads
    const int nb = 12, nt = 64;
    double* sums = dev_alloc<double>(nb);
    int* visits = dev_alloc<int>(nb * nt);
    cudaCheck(cudaMemset(visits, 0, nb * nt * sizeof(int)));
    cudaCheck(cudaMemset(sums, 0, nb * sizeof(double)));
    index_sum_kernel<<<grid, block>>>(sums, visits);
    KERNEL_CHECK();
    auto s = to_host(sums, nb);
    auto v = to_host(visits, nb * nt);
    int bad = 0;
    for (int b = 0; b < nb; b++) bad += s[b] != (double)nt * b * nt + nt * (nt - 1) / 2.0;
    for (int x : v) bad += x != 1;
    check(bad == 0, "3-D grid and block indices: every thread once, per-block index sums");
    cudaFree(sums);
    cudaFree(visits);
    float* bs = dev_alloc<float>(3);
    block_sum_kernel<<<3, 1024>>>(bs);
    KERNEL_CHECK();
    auto hb = to_host(bs, 3);
    check(hb[0] == 1023.0f * 1024 / 2 * 1024 && hb[2] == hb[0], "gpu::block_sum over 1024 threads, twice in a row");
    cudaFree(bs);
}

__global__ void atomics_kernel(int* counter, float* fsum, unsigned* mx, unsigned long long* cas) {
    atomicAdd(counter, 1);
    atomicAdd(fsum, 0.5f);
    atomicMax(mx, (unsigned)(blockIdx.x * blockDim.x + threadIdx.x));
    unsigned long long old = *cas, assumed;
    do { assumed = old; old = atomicCAS(cas, assumed, assumed + 2); } while (old != assumed);
}
static void test_atomics() {
    int* c = dev_alloc<int>(1);
    float* f = dev_alloc<float>(1);
    unsigned* m = dev_alloc<unsigned>(1);
    unsigned long long* k = dev_alloc<unsigned long long>(1);
    cudaCheck(cudaMemset(c, 0, 4));
    cudaCheck(cudaMemset(f, 0, 4));
    cudaCheck(cudaMemset(m, 0, 4));
    cudaCheck(cudaMemset(k, 0, 8));
    atomics_kernel<<<64, 128>>>(c, f, m, k);  // blocks run on several OS threads at once
    KERNEL_CHECK();
    check(to_host(c, 1)[0] == 8192 && to_host(f, 1)[0] == 4096.0f && to_host(m, 1)[0] == 8191 &&
              to_host(k, 1)[0] == 16384,
          "atomicAdd (int, float), atomicMax, atomicCAS loop from 64 blocks x 128 threads");
    cudaFree(c); cudaFree(f); cudaFree(m); cudaFree(k);
}

// a __shared__ variable read before any write holds garbage: the emulation poisons it for
// every block, so a kernel that forgets to initialize it sees NaN in each block
__global__ void shared_garbage_kernel(float* out) {
    __shared__ float s[64];
    if (threadIdx.x == 0) out[blockIdx.x] = s[5];
    __syncthreads();
    s[threadIdx.x] = 1.0f;
}
__global__ void dyn_smem_kernel(float* out, int n) {
    extern __shared__ float buf[];
    for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = (float)i;
    __syncthreads();
    float s = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += buf[n - 1 - i];
    __shared__ float red[32];
    s = gpu::block_sum(s, red);
    if (threadIdx.x == 0) out[0] = s;
}
static void test_memory_rules() {
    float* out = dev_alloc<float>(8);
    shared_garbage_kernel<<<8, 64>>>(out);
    KERNEL_CHECK();
    auto h = to_host(out, 8);
#ifdef CUDA_EMU
    int nans = 0;
    for (float x : h) nans += std::isnan(x);
    check(nans == 8, "__shared__ memory is garbage (NaN) in every block until written");
    float* fresh = dev_alloc<float>(16);
    auto fh = to_host(fresh, 16);
    nans = 0;
    for (float x : fh) nans += std::isnan(x);
    check(nans == 16, "fresh cudaMalloc memory is NaN until written");
    cudaFree(fresh);
#endif
    // 64 KB of dynamic shared memory: allowed after the opt-in
    const int n = 16384;
    cudaCheck(cudaFuncSetAttribute(dyn_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, n * 4));
    dyn_smem_kernel<<<2, 256, n * 4>>>(out, n);
    KERNEL_CHECK();
    check(to_host(out, 1)[0] == (float)n * (n - 1) / 2, "64 KB dynamic shared memory after cudaFuncSetAttribute");
    cudaFree(out);
}

// ---- cuBLAS: a plain loop from the documented semantics, independent of the emulation's code
struct Mat {  // a stored matrix in column-major order with a leading dimension
    int rows, cols, ld;
    std::vector<double> v;  // the exact values (bf16-representable where the type is bf16)
};
static Mat rand_mat(int rows, int cols, int ld, unsigned seed, bool bf16_values) {
    Mat m{rows, cols, ld, std::vector<double>((size_t)ld * std::max(cols, 1), 0)};
    unsigned s = seed;
    for (auto& x : m.v) {
        s = s * 1664525u + 1013904223u;
        float f = ((s >> 8) % 2001 - 1000) / 1000.0f;
        x = bf16_values ? (double)__bfloat162float(__float2bfloat16_rn(f)) : (double)f;
    }
    return m;
}
// op(X)(i, p) of a stored matrix under cuBLAS's rule: N = X(i, p), T = X(p, i)
static double op_at(const Mat& X, cublasOperation_t t, int i, int p) {
    return t == CUBLAS_OP_N ? X.v[(size_t)p * X.ld + i] : X.v[(size_t)i * X.ld + p];
}
static std::vector<double> gemm_loop(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, double alpha,
                                     const Mat& A, const Mat& B, double beta, const Mat& C) {
    std::vector<double> out = C.v;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            double s = 0;
            for (int p = 0; p < k; p++) s += op_at(A, ta, i, p) * op_at(B, tb, p, j);
            out[(size_t)j * C.ld + i] = alpha * s + (beta == 0 ? 0 : beta * C.v[(size_t)j * C.ld + i]);
        }
    return out;
}
template <class T>
static void* dev_mat(const Mat& M) {
    std::vector<T> h(M.v.size());
    for (size_t i = 0; i < h.size(); i++) {
        if constexpr (std::is_same<T, __nv_bfloat16>::value) h[i] = __float2bfloat16_rn((float)M.v[i]);
        else h[i] = (T)M.v[i];
    }
    return to_dev(h);
}
template <class T>
static std::vector<double> host_mat(const void* d, size_t n) {
    std::vector<T> h = to_host((const T*)d, n);
    std::vector<double> o(n);
    for (size_t i = 0; i < n; i++) {
        if constexpr (std::is_same<T, __nv_bfloat16>::value) o[i] = __bfloat162float(h[i]);
        else o[i] = (double)h[i];
    }
    return o;
}
// the worst |got - want| / (tol * (|want| + 1)) over the stored C (ld padding must be untouched)
static double worst(const std::vector<double>& got, const std::vector<double>& want, double tol) {
    double w = 0;
    for (size_t i = 0; i < got.size(); i++) {
        double r = std::fabs(got[i] - want[i]) / (tol * (std::fabs(want[i]) + 1));
        if (!(r <= w)) w = r;
    }
    return w;
}

template <class TAB, class TC>
static void gemm_case(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, int pad,
                      float alpha, float beta, cudaDataType_t tab, cudaDataType_t tc, double tol, const char* what) {
    const bool bf = tab == CUDA_R_16BF;
    Mat A = rand_mat(ta == CUBLAS_OP_N ? m : k, ta == CUBLAS_OP_N ? k : m, (ta == CUBLAS_OP_N ? m : k) + pad, 1 + m, bf);
    Mat B = rand_mat(tb == CUBLAS_OP_N ? k : n, tb == CUBLAS_OP_N ? n : k, (tb == CUBLAS_OP_N ? k : n) + pad, 2 + n, bf);
    Mat C = rand_mat(m, n, m + pad, 3 + k, tc == CUDA_R_16BF);
    void *dA = dev_mat<TAB>(A), *dB = dev_mat<TAB>(B), *dC = dev_mat<TC>(C);
    cublasStatus_t st = cublasGemmEx(h, ta, tb, m, n, k, &alpha, dA, tab, A.ld, dB, tab, B.ld, &beta, dC, tc, C.ld,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    std::vector<double> want = gemm_loop(ta, tb, m, n, k, alpha, A, B, beta, C);
    double w = st == CUBLAS_STATUS_SUCCESS ? worst(host_mat<TC>(dC, C.v.size()), want, tol) : INFINITY;
    check(w <= 1, std::string("cublasGemmEx ") + what + (ta == CUBLAS_OP_N ? " N" : " T") +
                      (tb == CUBLAS_OP_N ? "N" : "T") + " m" + std::to_string(m) + " n" + std::to_string(n) + " k" +
                      std::to_string(k) + " ld+" + std::to_string(pad) + ": worst ratio " + std::to_string(w));
    cudaFree(dA); cudaFree(dB); cudaFree(dC);
}

static void test_cublas() {
    cublasHandle_t h;
    cublasCheck(cublasCreate(&h));
    for (auto ta : {CUBLAS_OP_N, CUBLAS_OP_T})
        for (auto tb : {CUBLAS_OP_N, CUBLAS_OP_T}) {
            gemm_case<float, float>(h, ta, tb, 37, 29, 51, 3, 0.75f, 0.5f, CUDA_R_32F, CUDA_R_32F, 1e-5, "fp32");
            gemm_case<__nv_bfloat16, float>(h, ta, tb, 16, 40, 33, 0, 1.0f, 1.0f, CUDA_R_16BF, CUDA_R_32F, 1e-5, "bf16->fp32");
            gemm_case<__nv_bfloat16, __nv_bfloat16>(h, ta, tb, 24, 9, 70, 5, 1.0f, 0.0f, CUDA_R_16BF, CUDA_R_16BF, 8e-3, "bf16->bf16");
        }
    gemm_case<float, float>(h, CUBLAS_OP_N, CUBLAS_OP_N, 8, 8, 0, 1, 1.0f, 0.5f, CUDA_R_32F, CUDA_R_32F, 1e-6, "fp32 k=0 (C = beta C)");
    // beta = 0: C is not read, so NaN in C must not leak into the result
    {
        const int m = 4, n = 3, k = 5;
        std::vector<float> A(m * k, 1.0f), B(k * n, 2.0f), C(m * n, NAN);
        float *dA = to_dev(A), *dB = to_dev(B), *dC = to_dev(C), one = 1, zero = 0;
        cublasCheck(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, dA, m, dB, k, &zero, dC, m));
        auto out = to_host(dC, m * n);
        int bad = 0;
        for (float x : out) bad += x != 10.0f;
        check(bad == 0, "cublasSgemm with beta = 0 does not read C (NaN in C stays out)");
        // documented argument checks
        check(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, dA, m - 1, dB, k, &zero, dC, m) ==
                  CUBLAS_STATUS_INVALID_VALUE, "lda < m is CUBLAS_STATUS_INVALID_VALUE");
        check(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, dA, CUDA_R_32F, m, dB, CUDA_R_32F, k, &zero, dC,
                           CUDA_R_16BF, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED,
              "fp32 inputs with a bf16 output is CUBLAS_STATUS_NOT_SUPPORTED");
        cudaFree(dA); cudaFree(dB); cudaFree(dC);
    }
    // strided batched: 3 problems, op T on A
    {
        const int m = 6, n = 5, k = 7, batch = 3;
        Mat A = rand_mat(k, m * batch, k, 11, false), B = rand_mat(k, n * batch, k, 12, false), C = rand_mat(m, n * batch, m, 13, false);
        float *dA = (float*)dev_mat<float>(A), *dB = (float*)dev_mat<float>(B), *dC = (float*)dev_mat<float>(C);
        float alpha = 1.5f, beta = -1.0f;
        cublasStatus_t st = cublasGemmStridedBatchedEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, dA, CUDA_R_32F, k,
                                                       (long long)k * m, dB, CUDA_R_32F, k, (long long)k * n, &beta, dC,
                                                       CUDA_R_32F, m, (long long)m * n, batch, CUBLAS_COMPUTE_32F,
                                                       CUBLAS_GEMM_DEFAULT);
        auto got = host_mat<float>(dC, C.v.size());
        double w = 0;
        for (int b = 0; b < batch; b++) {
            Mat Ab{k, m, k, std::vector<double>(A.v.begin() + (size_t)b * k * m, A.v.begin() + (size_t)(b + 1) * k * m)};
            Mat Bb{k, n, k, std::vector<double>(B.v.begin() + (size_t)b * k * n, B.v.begin() + (size_t)(b + 1) * k * n)};
            Mat Cb{m, n, m, std::vector<double>(C.v.begin() + (size_t)b * m * n, C.v.begin() + (size_t)(b + 1) * m * n)};
            auto want = gemm_loop(CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, alpha, Ab, Bb, beta, Cb);
            w = std::max(w, worst(std::vector<double>(got.begin() + (size_t)b * m * n, got.begin() + (size_t)(b + 1) * m * n), want, 1e-5));
        }
        check(st == CUBLAS_STATUS_SUCCESS && w <= 1, "cublasGemmStridedBatchedEx, 3 problems: worst ratio " + std::to_string(w));
        cudaFree(dA); cudaFree(dB); cudaFree(dC);
    }
    // grouped: two groups of different shapes and transposes (the expert GEMM of MoE layers)
    {
        cublasOperation_t ta[2] = {CUBLAS_OP_T, CUBLAS_OP_N}, tb[2] = {CUBLAS_OP_N, CUBLAS_OP_T};
        int m[2] = {8, 5}, n[2] = {3, 6}, k[2] = {4, 9}, gs[2] = {2, 1};
        int lda[2] = {4, 5}, ldb[2] = {4, 6}, ldc[2] = {8, 5};
        float alpha[2] = {1.0f, 0.5f}, beta[2] = {0.0f, 2.0f};
        std::vector<Mat> As, Bs, Cs;
        std::vector<const void*> hA, hB;
        std::vector<void*> hC;
        for (int g = 0, idx = 0; g < 2; g++)
            for (int i = 0; i < gs[g]; i++, idx++) {
                As.push_back(rand_mat(ta[g] == CUBLAS_OP_N ? m[g] : k[g], ta[g] == CUBLAS_OP_N ? k[g] : m[g], lda[g], 20 + idx, false));
                Bs.push_back(rand_mat(tb[g] == CUBLAS_OP_N ? k[g] : n[g], tb[g] == CUBLAS_OP_N ? n[g] : k[g], ldb[g], 30 + idx, false));
                Cs.push_back(rand_mat(m[g], n[g], ldc[g], 40 + idx, false));
                hA.push_back(dev_mat<float>(As.back()));
                hB.push_back(dev_mat<float>(Bs.back()));
                hC.push_back(dev_mat<float>(Cs.back()));
            }
        const void** dA = to_dev(hA);
        const void** dB = to_dev(hB);
        void** dC = to_dev(hC);
        cublasStatus_t st = cublasGemmGroupedBatchedEx(h, ta, tb, m, n, k, alpha, dA, CUDA_R_32F, lda, dB, CUDA_R_32F,
                                                       ldb, beta, dC, CUDA_R_32F, ldc, 2, gs, CUBLAS_COMPUTE_32F);
        double w = 0;
        for (int g = 0, idx = 0; g < 2; g++)
            for (int i = 0; i < gs[g]; i++, idx++) {
                auto want = gemm_loop(ta[g], tb[g], m[g], n[g], k[g], alpha[g], As[idx], Bs[idx], beta[g], Cs[idx]);
                w = std::max(w, worst(host_mat<float>(hC[idx], Cs[idx].v.size()), want, 1e-5));
            }
        check(st == CUBLAS_STATUS_SUCCESS && w <= 1, "cublasGemmGroupedBatchedEx, 2 groups (2 + 1 problems): worst ratio " + std::to_string(w));
        for (size_t i = 0; i < hA.size(); i++) { cudaFree((void*)hA[i]); cudaFree((void*)hB[i]); cudaFree(hC[i]); }
        cudaFree(dA); cudaFree(dB); cudaFree(dC);
    }
    cublasCheck(cublasDestroy(h));
}

// CUDA graphs: a captured stream runs nothing until the graph is launched; a launch replays
// the captured kernel arguments and cuBLAS scalars (a host variable changed after the capture
// is not seen) but reads device and pinned memory as they are when it runs. The trainer's
// graphs rely on exactly this (train_moe.cu "CUDA graphs").
__global__ void axpb_kernel(float* y, const float* x, float a, const float* b, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + *b;
}
static void test_graphs() {
    const int n = 1000;
    std::vector<float> hx(n);
    double sx = 0;
    for (int i = 0; i < n; i++) sx += hx[i] = (float)(i % 7);
    float *x = to_dev(hx), *y = dev_alloc<float>(n), *b = dev_alloc<float>(1), *dot = dev_alloc<float>(1);
    float* ones = to_dev(std::vector<float>(n, 1.0f));
    float* pinned = nullptr;
    cudaCheck(cudaMallocHost(&pinned, sizeof(float)));
    cudaStream_t s;
    cudaCheck(cudaStreamCreate(&s));
    cublasHandle_t h;
    cublasCheck(cublasCreate(&h));
    cublasCheck(cublasSetStream(h, s));
    cudaCheck(cudaMemsetAsync(y, 0, n * sizeof(float), s));
    cudaCheck(cudaMemsetAsync(dot, 0, sizeof(float), s));
    cudaCheck(cudaStreamSynchronize(s));
    float a = 2, alpha = 1, beta = 0;
    *pinned = 1;
    cudaGraph_t g;
    cudaGraphExec_t e;
    cudaStreamCaptureStatus st;
    cudaCheck(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    cudaCheck(cudaStreamIsCapturing(s, &st));
    const bool capturing = st == cudaStreamCaptureStatusActive;
    cudaCheck(cudaMemcpyAsync(b, pinned, sizeof(float), cudaMemcpyHostToDevice, s));  // read when the graph runs
    axpb_kernel<<<gpu::cdiv(n, 256), 256, 0, s>>>(y, x, a, b, n);                          // a = 2, captured
    // dot = alpha * y^T ones: a 1 x 1 product, alpha captured
    cublasCheck(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, 1, 1, n, &alpha, y, n, ones, n, &beta, dot, 1));
    cudaCheck(cudaStreamEndCapture(s, &g));
    cudaCheck(cudaStreamIsCapturing(s, &st));
    const bool ended = st == cudaStreamCaptureStatusNone;
    const bool untouched = to_host(y, n)[0] == 0 && to_host(y, n)[n - 1] == 0 && to_host(dot, 1)[0] == 0;
    check(capturing && ended && untouched, "a stream being captured runs nothing (y and the GEMM's output still 0)");
    cudaCheck(cudaGraphInstantiate(&e, g, 0));
    a = 5, alpha = 100;  // after the capture: not seen by the graph
    for (float bv : {3.0f, 7.0f}) {
        *pinned = bv;    // seen: the copy reads pinned memory when it runs
        cudaCheck(cudaGraphLaunch(e, s));
        cudaCheck(cudaStreamSynchronize(s));
        std::vector<float> hy = to_host(y, n);
        int bad = 0;
        for (int i = 0; i < n; i++) bad += hy[i] != 2 * hx[i] + bv;
        const double want = 2 * sx + (double)bv * n, got = to_host(dot, 1)[0];
        check(bad == 0 && std::fabs(got - want) <= 1e-6 * want,
              "graph launch with b = " + std::to_string((int)bv) + ": y = 2 x + b (the captured a, not 5) and y.1 = " +
                  std::to_string(got) + " (the captured alpha 1, not 100; want " + std::to_string(want) + ")");
    }
    cudaCheck(cudaGraphExecDestroy(e));
    cudaCheck(cudaGraphDestroy(g));
    cublasCheck(cublasDestroy(h));
    cudaCheck(cudaStreamDestroy(s));
    cudaCheck(cudaFreeHost(pinned));
    for (float* p : {x, y, b, dot, ones}) cudaCheck(cudaFree(p));
}

// ---------------------------------------------------------------------------
// Part 2: planted bugs

__device__ float warp_sum_f(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// block sum with the second __syncthreads missing: warps read red[] before all are written
__global__ void bug_missing_sync(float* out, const float* x, int n) {
    __shared__ float red[32];
    float v = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) v += x[i];
    v = warp_sum_f(v);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    // __syncthreads();   <-- the bug
    float r = threadIdx.x % 32 < blockDim.x / 32 ? red[threadIdx.x % 32] : 0.f;
    r = warp_sum_f(r);
    if (threadIdx.x == 0) out[blockIdx.x] = r;
}
// legacy warp-synchronous reduction: assumes the 32 lanes run in lockstep (wrong since Volta)
__global__ void bug_lockstep(float* out, const float* x) {
    __shared__ float s[64];
    int t = threadIdx.x;
    s[t] = x[t] + x[t + 32];
    volatile float* vs = s;
    if (t < 16) vs[t] += vs[t + 16];
    if (t < 8) vs[t] += vs[t + 8];
    if (t < 4) vs[t] += vs[t + 4];
    if (t < 2) vs[t] += vs[t + 2];
    if (t < 1) vs[t] += vs[t + 1];
    if (t == 0) out[0] = vs[0];
}
// lanes 20..31 exit, then a full-mask warp sum reads them
__global__ void bug_exit_then_shuffle(float* out, const float* x, int d) {
    if (threadIdx.x >= d) return;
    float v = warp_sum_f(x[threadIdx.x]);
    if (threadIdx.x == 0) out[0] = v;
}
__global__ void bug_divergent_barrier(float* out) {
    __shared__ float s[256];
    s[threadIdx.x] = threadIdx.x;
    if ((threadIdx.x / 32) % 2 == 0) {
        __syncthreads();
        out[threadIdx.x] = s[255 - threadIdx.x];
    } else {
        __syncthreads();
        out[threadIdx.x] = -s[255 - threadIdx.x];
    }
}
// lane 0 waits in __syncwarp for lane 1, which waits in __syncthreads: nobody can move
__global__ void bug_warp_vs_block(float* out) {
    if (threadIdx.x == 0) __syncwarp(0x3u);
    else __syncthreads();
    out[threadIdx.x] = 1;
}
// every thread writes the same word without synchronization: the last writer wins
__global__ void race_kernel(int* out) { out[0] = threadIdx.x; }
// lanes 0..15 shuffle among themselves, lanes 16..31 with a full mask that names 0..15 too
__global__ void bug_mismatched_masks(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_xor_sync(0x0000ffffu, v, 1);
    else v = __shfl_xor_sync(0xffffffffu, v, 16);
    out[threadIdx.x] = v;
}
__global__ void bug_syncwarp_exited(float* out) {
    if (threadIdx.x >= 8) return;
    __syncwarp();  // full mask names lanes 8..31, which have exited
    out[threadIdx.x] = 1;
}
__global__ void bug_out_of_bounds(float* out, const float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i % n] = x[i];  // <= : reads x[n]
}
__global__ void bug_big_static_smem(float* out) {
    __shared__ float a[8192], b[8192];  // 64 KB of static shared memory (nvcc refuses > 48 KB too)

    a[threadIdx.x] = 1;
    b[threadIdx.x] = 2;
    __syncthreads();
    out[threadIdx.x] = a[threadIdx.x] + b[threadIdx.x];
}
__global__ void small_kernel(float* out) { out[threadIdx.x] = 1; }

static int run_case(const std::string& c) {
    float *x = dev_alloc<float>(4096), *out = dev_alloc<float>(4096);
    std::vector<float> ones(4096, 1.0f);
    cudaCheck(cudaMemcpy(x, ones.data(), 4096 * 4, cudaMemcpyHostToDevice));
    if (c == "divergent_barrier") bug_divergent_barrier<<<1, 256>>>(out);
    else if (c == "warp_vs_block") bug_warp_vs_block<<<1, 64>>>(out);
    else if (c == "race") {
        int* w = dev_alloc<int>(1);
        race_kernel<<<1, 256>>>(w);
        cudaCheck(cudaDeviceSynchronize());
        printf("winner %d\n", to_host(w, 1)[0]);
    }
    else if (c == "mismatched_masks") {
        bug_mismatched_masks<<<1, 32>>>(out);
        auto h = to_host(out, 32);
        int nan = 0;
        for (int i = 16; i < 32; i++) nan += std::isnan(h[i]);
        printf("%s lanes 16..31\n", nan == 16 ? "nan" : "values");
    }
    else if (c == "syncwarp_exited") bug_syncwarp_exited<<<1, 32>>>(out);
    else if (c == "too_many_threads") small_kernel<<<1, 2048>>>(out);
    else if (c == "grid_y") small_kernel<<<dim3(1, 70000), 1>>>(out);
    else if (c == "dyn_smem_no_optin") dyn_smem_kernel<<<1, 64, 64 * 1024>>>(out, 16);
    else if (c == "optin_other_kernel") {  // the opt-in belongs to one kernel, not to all
        cudaCheck(cudaFuncSetAttribute(bug_out_of_bounds, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024));
        dyn_smem_kernel<<<1, 64, 64 * 1024>>>(out, 16);
    } else if (c == "static_smem") bug_big_static_smem<<<1, 32>>>(out);
    else if (c == "memcpy_past_end") cudaCheck(cudaMemcpy(out, ones.data(), 4097 * 4, cudaMemcpyHostToDevice));
    else if (c == "double_free") { cudaFree(x); cudaFree(x); }
    else if (c == "out_of_bounds") bug_out_of_bounds<<<17, 256>>>(out, x, 4096);  // caught by ASan (EMU_SAN=1)
    else if (c == "gemm_past_end") {
        cublasHandle_t h;
        cublasCheck(cublasCreate(&h));
        float one = 1, zero = 0;  // C of 64 x 128 floats does not fit in a 4096-float buffer
        cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 64, 128, 1, &one, x, 64, x, 1, &zero, out, 64);
    } else if (c == "sync_in_capture" || c == "legacy_in_capture" || c == "malloc_in_capture") {
        cudaStream_t s;
        cudaCheck(cudaStreamCreate(&s));
        cudaCheck(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
        small_kernel<<<1, 32, 0, s>>>(out);
        if (c == "sync_in_capture") cudaCheck(cudaStreamSynchronize(s));  // waits inside a capture
        else if (c == "legacy_in_capture") small_kernel<<<1, 32>>>(out);   // stream 0 while s captures
        else cudaCheck(cudaMalloc(&x, 64));
        cudaGraph_t g;
        cudaCheck(cudaStreamEndCapture(s, &g));
    } else {
        fprintf(stderr, "unknown case %s\n", c.c_str());
        return 2;
    }
    cudaCheck(cudaGetLastError());
    cudaCheck(cudaDeviceSynchronize());
    printf("case %s ran to the end\n", c.c_str());
    return 0;
}

// runs `self --case NAME` with an environment prefix; returns its output and whether it failed
static std::string run_child(const char* self, const std::string& name, const char* env, bool* failed) {
    std::string cmd = std::string(env ? env : "") + " \"" + self + "\" --case " + name + " 2>&1";
    FILE* p = popen(cmd.c_str(), "r");
    std::string out;
    char buf[512];
    while (p && fgets(buf, sizeof buf, p)) out += buf;
    int st = p ? pclose(p) : -1;
    *failed = !(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    return out;
}
// the child must fail with `needle` in its output
static void expect_reported(const char* self, const std::string& name, const std::string& needle, const char* env = nullptr) {
    bool failed = false;
    std::string out = run_child(self, name, env, &failed);
    bool named = out.find(needle) != std::string::npos;
    std::string first = out.substr(0, out.find('\n'));
    check(failed && named, "planted bug " + name + " reported (\"" + needle + "\"): " + first.substr(0, 160));
}

static void test_planted_value_bugs() {
    float *x = dev_alloc<float>(4096), *out = dev_alloc<float>(4);
    std::vector<float> ones(4096, 1.0f);
    cudaCheck(cudaMemcpy(x, ones.data(), 4096 * 4, cudaMemcpyHostToDevice));
    bug_missing_sync<<<1, 256>>>(out, x, 4096);
    KERNEL_CHECK();
    float r = to_host(out, 1)[0];
    check(r != 4096.0f, "planted bug missing __syncthreads gives a wrong block sum: " + std::to_string(r) + " (4096 if right)");
    bug_lockstep<<<1, 32>>>(out, x);
    KERNEL_CHECK();
    r = to_host(out, 1)[0];
    check(r != 64.0f, "planted bug lockstep-assuming reduction gives a wrong sum: " + std::to_string(r) + " (64 if right)");
    bug_exit_then_shuffle<<<1, 32>>>(out, x, 20);
    KERNEL_CHECK();
    r = to_host(out, 1)[0];
    check(std::isnan(r), "planted bug full-mask shuffle after 12 lanes exited reads NaN: " + std::to_string(r));
    cudaFree(x);
    cudaFree(out);
}

int main(int argc, char** argv) {
    if (argc == 3 && std::string(argv[1]) == "--case") return run_case(argv[2]);
    if (argc > 1) {
        printf("usage: test_emu [--case NAME]\n");
        return std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h" ? 0 : 2;
    }
    test_warp_ops();
    test_barriers_and_indices();
    test_atomics();
    test_memory_rules();
    test_cublas();
    test_graphs();
#ifdef CUDA_EMU
    test_planted_value_bugs();
    const char* self = argv[0];
    expect_reported(self, "divergent_barrier", "different __syncthreads");
    expect_reported(self, "warp_vs_block", "wait in __syncwarp");               // lane 0 first: reported at once
    expect_reported(self, "warp_vs_block", "DEADLOCK", "EMU_SCHED=reverse");     // lane 1 first: a deadlock
    // lanes 0..15 first: they finish and exit, and 16..31 read exited lanes (NaN);
    // lanes 31..16 first: the two shuffles meet and are reported
    bool fm = false;
    std::string mm = run_child(self, "mismatched_masks", nullptr, &fm);
    check(!fm && mm.find("nan lanes 16") != std::string::npos, "planted bug mismatched_masks gives NaN: " + mm.substr(0, mm.find('\n')));
    expect_reported(self, "mismatched_masks", "divergent warp operations", "EMU_SCHED=reverse");
    expect_reported(self, "syncwarp_exited", "exited");
    expect_reported(self, "too_many_threads", "more than 1024 threads");
    expect_reported(self, "grid_y", "grid dimensions");
    expect_reported(self, "dyn_smem_no_optin", "exceed this kernel's limit");
    expect_reported(self, "optin_other_kernel", "exceed this kernel's limit");
    expect_reported(self, "static_smem", "static shared memory");
    expect_reported(self, "memcpy_past_end", "not inside one device allocation");
    expect_reported(self, "double_free", "double free");
    expect_reported(self, "gemm_past_end", "cublas GEMM operand C");
    expect_reported(self, "sync_in_capture", "cudaStreamSynchronize while a stream is being captured");
    expect_reported(self, "legacy_in_capture", "legacy default stream");
    expect_reported(self, "malloc_in_capture", "cudaMalloc while a stream is being captured");
    // the reverse schedule really runs the lanes in the other order: the race's winner changes
    bool f1 = false, f2 = false;
    std::string fwd = run_child(self, "race", nullptr, &f1), rev = run_child(self, "race", "EMU_SCHED=reverse", &f2);
    check(!f1 && !f2 && fwd.find("winner 255") != std::string::npos && rev.find("winner 0") != std::string::npos,
          "EMU_SCHED=reverse reverses the lane order (unsynchronized writes: last writer 255 forward, 0 reversed)");
#if defined(__SANITIZE_ADDRESS__)
    expect_reported(self, "out_of_bounds", "heap-buffer-overflow");
#endif
#endif
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
