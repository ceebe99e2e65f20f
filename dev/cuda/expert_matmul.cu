/*
Per-expert matrix products over contiguous row blocks (the MoE expert FFN's GEMMs).
After the permutation, expert e owns rows offsets[e]..offsets[e+1] of X [R, C] (R = N*K),
and has its own weight W_e [OC, C] (Hugging Face [out, in] layout; W is [E, OC, C]):
  forward:  Y[rows of e]  = X[rows of e] @ W_e^T
  backward: dX[rows of e] += dY[rows of e] @ W_e          (accumulates)
            dW_e          += dY[rows of e]^T @ X[rows of e] (accumulates)
An expert may receive no token (an empty block): its dW_e must be left exactly as it was
(a vendor grouped GEMM once returned wrong weight gradients for a group with zero rows), so
every case below has one empty expert and its dW is checked like any other.
CPU reference: matmul_forward / matmul_backward of train_moe.cpp, called per expert block
as Model::moe_forward / moe_backward do.

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/expert_matmul.cu -o build/expert_matmul -lcublas -lcublasLt -lgomp && ./build/expert_matmul [version]

Version 6 is kernels/grouped_matmul.cuh: one tensor-core launch per product for all experts,
driven by the offsets on the device (what lets a step run without host round trips).
Versions 4 (T = float) and 5 (T = bf16) are the production loop, kernels/matmul.cuh
(gpu::expert_matmul_forward / gpu::expert_matmul_backward with a host gpu::ExpertBlocks and
one weight pointer per expert), on a cuBLAS handle set up as train_moe.cu's GPUModel::setup
does (CUBLAS_DEFAULT_MATH, a fixed 32 MiB workspace). Semantic differences from versions
1-3, as train_moe.cu uses them: Y and dX have the activation type T (bf16 in version 5:
rounded on store), and dX is OVERWRITTEN (beta 0), not accumulated: its reference starts
from 0 and dX is poisoned. dW stays fp32 and accumulated (beta 1), and the empty expert's
dW must stay bit-exact.
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/matmul.cuh"
#include "../../kernels/grouped_matmul.cuh"

typedef __nv_bfloat16 bf16;

// ----------------------------------------------------------------------------
// version 1: one thread per output element, the expert of a row found by scanning offsets.
// No tiling, no library: the obviously right baseline (and slow: every operand from L2).
__device__ inline int expert_of(const int* offsets, int E, int r) {
    int e = 0;
    while (e + 1 < E && offsets[e + 1] <= r) e++;
    return e;
}
__global__ void fwd_v1(float* Y, const float* X, const float* W, const int* offsets, int E, int R, int C, int OC) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)R * OC) return;
    int r = idx / OC, o = idx % OC, e = expert_of(offsets, E, r);
    const float* x = X + (size_t)r * C;
    const float* w = W + ((size_t)e * OC + o) * C;
    float s = 0;
    for (int c = 0; c < C; c++) s += x[c] * w[c];
    Y[idx] = s;
}
__global__ void dx_v1(float* dX, const float* dY, const float* W, const int* offsets, int E, int R, int C, int OC) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)R * C) return;
    int r = idx / C, c = idx % C, e = expert_of(offsets, E, r);
    float s = 0;
    for (int o = 0; o < OC; o++) s += dY[(size_t)r * OC + o] * W[((size_t)e * OC + o) * C + c];
    dX[idx] += s;
}
__global__ void dw_v1(float* dW, const float* dY, const float* X, const int* offsets, int E, int C, int OC) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)E * OC * C) return;
    int e = idx / ((long)OC * C), o = (idx / C) % OC, c = idx % C;
    float s = 0;
    for (int r = offsets[e]; r < offsets[e + 1]; r++) s += dY[(size_t)r * OC + o] * X[(size_t)r * C + c];
    dW[idx] += s;
}

// ----------------------------------------------------------------------------
// version 2: a loop of cuBLAS SGEMMs, one per non-empty expert (fp32, no TF32: the default
// math mode). Row-major A[M,K] is column-major A^T, so Y = X W^T is, column-major,
// Y^T[OC,R] = W_cm^T... written out at each call. Empty experts are skipped: their GEMM
// would have M or K = 0, exactly the case the lesson above warns about.
// version 3: the same loop in bf16 (X, W, dY in bf16; fp32 accumulation and fp32 Y, dX, dW
// via cublasGemmEx): the tensor cores' bf16 rate, about 15x fp32 on H100.
struct Gemm {
    cublasHandle_t h;
    Gemm() {
        cublasCheck(cublasCreate(&h));
        cublasCheck(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
    }
    ~Gemm() { cublasDestroy(h); }
    // row-major: out[M,N] (=|+=) op(A) op(B); expressed as column-major out^T = op(B)^T op(A)^T
    template <class T>
    void rm(bool ta, bool tb, int M, int N, int K, const T* A, int lda, const T* B, int ldb, float* out, int ldo,
            float beta) {
        const float one = 1.0f;
        cudaDataType_t t = std::is_same<T, float>::value ? CUDA_R_32F : CUDA_R_16BF;
        cublasCheck(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &one, B, t,
                                 ldb, A, t, lda, &beta, out, CUDA_R_32F, ldo, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
};
template <class T>
void fwd_blas(Gemm& g, float* Y, const T* X, const T* W, const std::vector<int>& off, int C, int OC) {
    for (size_t e = 0; e + 1 < off.size(); e++) {
        int r0 = off[e], ne = off[e + 1] - off[e];
        if (ne == 0) continue;
        // Y[ne, OC] = X[ne, C] W_e[OC, C]^T
        g.rm(false, true, ne, OC, C, X + (size_t)r0 * C, C, W + e * (size_t)OC * C, C, Y + (size_t)r0 * OC, OC, 0.0f);
    }
}
template <class T>
void bwd_blas(Gemm& g, float* dX, float* dW, const T* dY, const T* X, const T* W, const std::vector<int>& off, int C,
              int OC) {
    for (size_t e = 0; e + 1 < off.size(); e++) {
        int r0 = off[e], ne = off[e + 1] - off[e];
        if (ne == 0) continue;  // dW_e += 0: nothing to do, and no zero-sized GEMM
        // dX[ne, C] += dY[ne, OC] W_e[OC, C]
        g.rm(false, false, ne, C, OC, dY + (size_t)r0 * OC, OC, W + e * (size_t)OC * C, C, dX + (size_t)r0 * C, C, 1.0f);
        // dW_e[OC, C] += dY[ne, OC]^T X[ne, C]
        g.rm(true, false, OC, C, ne, dY + (size_t)r0 * OC, OC, X + (size_t)r0 * C, C, dW + e * (size_t)OC * C, C, 1.0f);
    }
}

// The CPU reference, per expert block as Model::moe_forward / moe_backward: Y; dX and dW
// accumulate onto the given start values (*dX, *dW)
void expert_reference(const std::vector<int>& off, const std::vector<float>& X, const std::vector<float>& W,
                      const std::vector<float>& dY, int E, int C, int OC, std::vector<float>* Y,
                      std::vector<float>* dX, std::vector<float>* dW) {
    for (int e = 0; e < E; e++) {
        int r0 = off[e], ne = off[e + 1] - off[e];
        matmul_forward(&(*Y)[(size_t)r0 * OC], &X[(size_t)r0 * C], &W[(size_t)e * OC * C], ne, C, OC);
        matmul_backward(&(*dX)[(size_t)r0 * C], &(*dW)[(size_t)e * OC * C], &dY[(size_t)r0 * OC], &X[(size_t)r0 * C],
                        &W[(size_t)e * OC * C], ne, C, OC);
    }
}
// the empty expert's dW must be exactly its start value
void check_empty_expert(Suite& S, const std::vector<float>& gW, const std::vector<float>& dW0, int empty, int C,
                        int OC) {
    size_t e0 = (size_t)empty * OC * C;
    std::vector<float> ge(gW.begin() + e0, gW.begin() + e0 + (size_t)OC * C),
        re(dW0.begin() + e0, dW0.begin() + e0 + (size_t)OC * C);
    S.check_equal("dW of the empty expert untouched", ge, re);
}

const char* NAMES[] = {"", "thread per output", "cuBLAS fp32 loop over experts", "cuBLAS bf16 loop (fp32 acc)",
                       "kernels/matmul.cuh expert loop (fp32)", "kernels/matmul.cuh expert loop (bf16)",
                       "kernels/grouped_matmul.cuh (bf16, tensor cores, device offsets)"};
const int NV = 6;
bool bf16_version(int v) { return v == 3 || v == 5 || v == 6; }

// versions 4 and 5: the production expert loop, called as train_moe.cu's moe_forward /
// moe_backward call it (per-expert weight pointers into one [E, OC, C] block here)
struct ProdBlas {
    cublasHandle_t h;
    void* ws = nullptr;
    ProdBlas() {
        cublasCheck(cublasCreate(&h));
        cublasCheck(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));  // no TF32 for fp32 inputs
        const size_t ws_bytes = 32u << 20;
        cudaCheck(cudaMalloc(&ws, ws_bytes));
        cublasCheck(cublasSetWorkspace(h, ws, ws_bytes));
    }
    ~ProdBlas() {
        cublasDestroy(h);
        cudaFree(ws);
    }
};
template <typename T>
void check_production(Suite& S, ProdBlas& pb, const std::vector<int>& off, const std::vector<float>& X,
                      const std::vector<float>& W, const std::vector<float>& dY, const std::vector<float>& dW0,
                      int E, int R, int C, int OC, int empty, const char* what) {
    const bool is_bf16 = sizeof(T) == 2;
    // reference: Y; dX from 0 (overwritten); dW from dW0 (accumulated)
    std::vector<float> Y((size_t)R * OC), dX((size_t)R * C, 0.0f), dW = dW0;
    expert_reference(off, X, W, dY, E, C, OC, &Y, &dX, &dW);
    gpu::ExpertBlocks eb;
    eb.offsets = off;
    eb.counts.resize(E);
    for (int e = 0; e < E; e++) eb.counts[e] = off[e + 1] - off[e];
    Dev<T> dXin(to_t<T>(X)), dWt(to_t<T>(W)), dDy(to_t<T>(dY)), dOut((size_t)R * OC), ddX((size_t)R * C);
    Dev<float> ddW(dW0);
    std::vector<const T*> w(E);
    std::vector<float*> g(E);
    for (int e = 0; e < E; e++) {
        w[e] = dWt.p + (size_t)e * OC * C;
        g[e] = ddW.p + (size_t)e * OC * C;
    }
    auto fwd = [&] { gpu::expert_matmul_forward(pb.h, dOut.p, (const T*)dXin.p, w, eb, C, OC); };
    auto bwd = [&] { gpu::expert_matmul_backward(pb.h, ddX.p, g, (const T*)dDy.p, (const T*)dXin.p, w, eb, C, OC); };
    Tol tol = is_bf16 ? TOL_BF16 : TOL_FP32;
    if (!is_bf16) tol.atol = 1e-4;  // fp32 sums of up to 3072 products, as versions 1-2
    dOut.poison();
    fwd();
    S.check_close("forward Y", host_f(dOut), Y, tol);
    ddX.poison();
    bwd();
    S.check_close("backward dX (written)", host_f(ddX), dX, tol);
    auto gW = ddW.host();
    S.check_close("backward dW (+=), all experts", gW, dW, tol);
    check_empty_expert(S, gW, dW0, empty, C, OC);
    if (R >= 4096) {
        double fl = 2.0 * R * C * OC, eb_ = sizeof(T);
        S.bench((std::string("fwd ") + what).c_str(), fwd, eb_ * (R * C + E * OC * C + R * OC), fl);
        ddX.poison();
        S.bench((std::string("bwd ") + what).c_str(), bwd, eb_ * (R * OC + R * C + E * OC * C + R * C) + 8.0 * E * OC * C,
                2 * fl);
    }
}

// version 6: one launch per product for all experts, on tensor cores, from the DEVICE
// offsets only (no host counts): kernels/grouped_matmul.cuh, with train_moe.cu's semantics
// (Y and dX bf16 and written, dW fp32 accumulated), reruns bit-identical
void check_grouped(Suite& S, const std::vector<int>& off, const std::vector<float>& X, const std::vector<float>& W,
                   const std::vector<float>& dY, const std::vector<float>& dW0, int E, int R, int C, int OC, int empty,
                   const char* what) {
    std::vector<float> Y((size_t)R * OC), dX((size_t)R * C, 0.0f), dW = dW0;
    expert_reference(off, X, W, dY, E, C, OC, &Y, &dX, &dW);
    Dev<int> dOff(off);
    Dev<bf16> dXin(to_bf16(X)), dWt(to_bf16(W)), dDy(to_bf16(dY)), dOut((size_t)R * OC), ddX((size_t)R * C);
    Dev<float> ddW(dW0);
    const size_t stride = (size_t)OC * C;
    auto fwd = [&] { gpu::grouped_matmul_forward(dOut.p, dXin.p, dWt.p, stride, dOff.p, E, R, C, OC, 0); };
    auto bwd = [&] { gpu::grouped_matmul_backward(ddX.p, ddW.p, dDy.p, dXin.p, dWt.p, stride, dOff.p, E, R, C, OC, 0); };
    dOut.poison();
    fwd();
    auto y1 = host_f(dOut);
    S.check_close("forward Y", y1, Y, TOL_BF16);
    ddX.poison();
    bwd();
    auto dx1 = host_f(ddX);
    S.check_close("backward dX (written)", dx1, dX, TOL_BF16);
    auto gW = ddW.host();
    S.check_close("backward dW (+=), all experts", gW, dW, TOL_BF16);
    check_empty_expert(S, gW, dW0, empty, C, OC);
    dOut.poison();
    fwd();
    S.check_equal("forward Y bit-identical on rerun", host_f(dOut), y1);
    ddX.poison();
    ddW.upload(dW0);
    bwd();
    S.check_equal("dX bit-identical on rerun", host_f(ddX), dx1);
    S.check_equal("dW bit-identical on rerun", ddW.host(), gW);
    if (R >= 4096) {
        double fl = 2.0 * R * C * OC;
        S.bench((std::string("fwd ") + what).c_str(), fwd, 2.0 * (R * C + E * OC * C + R * OC), fl);
        S.bench((std::string("bwd ") + what).c_str(), bwd, 2.0 * (R * OC + R * C + E * OC * C + R * C) + 8.0 * E * OC * C,
                2 * fl);
    }
}

int main(int argc, char** argv) {
    Suite S("expert_matmul", argc, argv);
    Gemm gemm;
    ProdBlas pb;
    struct Case { int E, R, C, OC, empty; const char* what; };
    // emulated: the two model-size cases keep their shapes (C > OC, then OC > C; which
    // expert is empty) at an eighth of the width and a quarter of the rows
    const Case cases[] = {{4, 37, 16, 24, 2, "tiny"},
                          {8, 300, 64, 96, 0, "small, expert 0 empty"},
                          EMULATED ? Case{8, 1024, 384, 96, 7, "down proj shape F->d (emulated: F 384 d 96)"}
                                   : Case{8, 4096, 3072, 768, 7, "down proj F->d, last expert empty"},
                          EMULATED ? Case{8, 2048, 96, 384, 5, "gate/up proj shape d->F (emulated: d 96 F 384)"}
                                   : Case{8, 8192, 768, 3072, 5, "gate/up proj d->F (N 4096 x K 2)"}};
    uint64_t seed = 9;
    for (auto c : cases) {
        int E = c.E, R = c.R, C = c.C, OC = c.OC;
        printf("== case: %s: E %d rows %d C %d OC %d, expert %d gets no row\n", c.what, E, R, C, OC, c.empty);
        // random block sizes (uneven, as real routing), one of them zero
        auto w8 = rand_ints(E, 100, seed++);
        std::vector<int> off(E + 1, 0);
        double tot = 0;
        for (int e = 0; e < E; e++) tot += e == c.empty ? 0 : w8[e] + 20;
        for (int e = 0; e < E; e++) off[e + 1] = e + 1 == E ? R : off[e] + (e == c.empty ? 0 : (int)(R * (w8[e] + 20) / tot));
        if (c.empty == E - 1) off[E - 1] = R;  // the last block empty: everything before it
        for (int e = 0; e < E; e++) if (off[e + 1] < off[e]) off[e + 1] = off[e];
        auto X = rand_floats((size_t)R * C, seed++), W = rand_floats((size_t)E * OC * C, seed++, -0.05f, 0.05f);
        auto dY = rand_floats((size_t)R * OC, seed++), dX0 = rand_floats((size_t)R * C, seed++);
        auto dW0 = rand_floats((size_t)E * OC * C, seed++);
        for (int rnd = 0; rnd < 2; rnd++) {  // rnd 0: fp32 inputs; rnd 1: bf16-rounded inputs (version 3)
            if (rnd == 1) { X = round_bf16(X); W = round_bf16(W); dY = round_bf16(dY); }
            bool need = false;
            for (int v = 1; v <= NV; v++) need |= S.want(v) && bf16_version(v) == (rnd == 1);
            if (!need) continue;
            // CPU reference, once per input set, per expert block as Model::moe_forward/backward
            std::vector<float> Y((size_t)R * OC), dX = dX0, dW = dW0;
            expert_reference(off, X, W, dY, E, C, OC, &Y, &dX, &dW);
            for (int v = 1; v <= NV; v++) {
                if (!S.want(v) || bf16_version(v) != (rnd == 1)) continue;
                S.begin(v, NAMES[v]);
                if (v == 6) {
                    check_grouped(S, off, X, W, dY, dW0, E, R, C, OC, c.empty, c.what);
                    continue;
                }
                if (v >= 4) {
                    if (v == 4) check_production<float>(S, pb, off, X, W, dY, dW0, E, R, C, OC, c.empty, c.what);
                    else check_production<bf16>(S, pb, off, X, W, dY, dW0, E, R, C, OC, c.empty, c.what);
                    continue;
                }
                Dev<int> dOff(off);
                Dev<float> dXf(X), dWf(W), dYg(dY), dOut((size_t)R * OC), ddX(dX0), ddW(dW0);
                Dev<bf16> bX(to_bf16(X)), bW(to_bf16(W)), bdY(to_bf16(dY));
                auto fwd = [&] {
                    if (v == 1) { fwd_v1<<<ceil_div((long)R * OC, 256), 256>>>(dOut.p, dXf.p, dWf.p, dOff.p, E, R, C, OC); launchCheck(); }
                    else if (v == 2) fwd_blas(gemm, dOut.p, dXf.p, dWf.p, off, C, OC);
                    else fwd_blas(gemm, dOut.p, bX.p, bW.p, off, C, OC);
                };
                auto bwd = [&] {
                    if (v == 1) {
                        dx_v1<<<ceil_div((long)R * C, 256), 256>>>(ddX.p, dYg.p, dWf.p, dOff.p, E, R, C, OC);
                        launchCheck();
                        dw_v1<<<ceil_div((long)E * OC * C, 256), 256>>>(ddW.p, dYg.p, dXf.p, dOff.p, E, C, OC);
                        launchCheck();
                    } else if (v == 2) bwd_blas(gemm, ddX.p, ddW.p, dYg.p, dXf.p, dWf.p, off, C, OC);
                    else bwd_blas(gemm, ddX.p, ddW.p, bdY.p, bX.p, bW.p, off, C, OC);
                };
                Tol tol = v == 3 ? TOL_BF16 : TOL_FP32;
                // fp32 sums of C = 3072 products: allow a little more elementwise slack
                if (v != 3) tol.atol = 1e-4;
                dOut.poison();
                fwd();
                S.check_close("forward Y", dOut.host(), Y, tol);
                bwd();
                S.check_close("backward dX (+=)", ddX.host(), dX, tol);
                auto gW = ddW.host();
                S.check_close("backward dW (+=), all experts", gW, dW, tol);
                check_empty_expert(S, gW, dW0, c.empty, C, OC);
                if (R >= 4096) {
                    double fl = 2.0 * R * C * OC;
                    double eb = v == 3 ? 2 : 4;
                    S.bench((std::string("fwd ") + c.what).c_str(), fwd, eb * (R * C + E * OC * C) + 4.0 * R * OC, fl);
                    S.bench((std::string("bwd ") + c.what).c_str(), bwd, eb * (R * OC + R * C + E * OC * C) + 8.0 * (R * C + E * OC * C), 2 * fl);
                }
            }
        }
    }
    return S.finish();
}
