/*
RMSNorm forward and backward, fp32.
  forward:  out[n,i] = x[n,i] * rstd[n] * w[i],  rstd[n] = 1 / sqrt(mean_i x[n,i]^2 + eps)
  backward: dx[n,i] += rstd (w_i dy_i - x_i rstd^2 mean_j(w_j dy_j x_j))      (accumulates)
            dw[i]   += sum_n dy[n,i] x[n,i] rstd[n]                           (accumulates)
CPU reference: rmsnorm_forward / rmsnorm_backward of train_moe.cpp.
dw is a column sum over all N rows: every version here reduces it in a fixed order (no
atomics), so the result is bit-identical from run to run. Its reference is the same column
sum accumulated in DOUBLE (dw_reference below): train_moe.cpp's fp32 loop adds the N = 4096
rows one after another, and its rounding (partial sums ~30, ~1e-6 per add, a random walk
over 4096 adds: ~4e-5) is larger than that of the GPU's blocked sums, so against the fp32
loop the better answer failed the elementwise bound. dw's check is itself tested: the same
comparison applied to the kernel's dw with the last row's contribution dropped (an
off-by-one in a row loop) must fail (check_catches).

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/rmsnorm.cu -o build/rmsnorm -lcublas -lcublasLt -lgomp && ./build/rmsnorm [version]

Version 3 is the production kernel, kernels/rmsnorm.cuh (gpu::rmsnorm_forward /
gpu::rmsnorm_backward, instantiated with T = float), checked the same way. Version 4 is
the same header with T = bf16 (x, w, out, dout, dx bf16; rstd and dw fp32): the reference
on the bf16-rounded inputs, out and dx at TOL_BF16, rstd and dw (fp32 sums) at TOL_FP32.
Versions 5 (fp32) and 6 (bf16) are the fused gpu::residual_rmsnorm_forward, as
train_moe.cu calls it after each attention and FFN block: x_out = x + delta (poisoned,
checked; in bf16 rounded, and the norm uses the rounded x_out), out and rstd of
rmsnorm(x_out); reference residual_forward + rmsnorm_forward.
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/rmsnorm.cuh"

// ----------------------------------------------------------------------------
// version 1: one thread per row (forward, dx) and one thread per column (dw). Obviously
// right; slow because a warp's 32 threads read 32 different rows (uncoalesced).

__global__ void rmsnorm_forward_v1(float* out, float* rstd, const float* x, const float* w, int N, int d, float eps) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* xr = x + (size_t)n * d;
    float ss = 0;
    for (int i = 0; i < d; i++) ss += xr[i] * xr[i];
    float r = rsqrtf(ss / d + eps);
    rstd[n] = r;
    for (int i = 0; i < d; i++) out[(size_t)n * d + i] = xr[i] * r * w[i];
}
__global__ void rmsnorm_backward_dx_v1(float* dx, const float* dout, const float* x, const float* w,
                                       const float* rstd, int N, int d) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* xr = x + (size_t)n * d;
    const float* dy = dout + (size_t)n * d;
    float r = rstd[n], s = 0;
    for (int i = 0; i < d; i++) s += w[i] * dy[i] * xr[i];
    s = s * r * r / d;
    for (int i = 0; i < d; i++) dx[(size_t)n * d + i] += r * (w[i] * dy[i] - xr[i] * s);
}
__global__ void rmsnorm_backward_dw_v1(float* dw, const float* dout, const float* x, const float* rstd, int N, int d) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= d) return;
    float s = 0;
    for (int n = 0; n < N; n++) s += dout[(size_t)n * d + i] * x[(size_t)n * d + i] * rstd[n];
    dw[i] += s;
}

// ----------------------------------------------------------------------------
// version 2: one warp per row, lanes striding the row (coalesced 128-byte loads), shuffle
// reductions. dw in two deterministic stages: each block sums a fixed slice of rows for
// every column into scratch[block, d] (coalesced across the row), then one thread per
// column adds the slices in block order. Traffic: x and dy read once more for dw instead
// of d strided passes.

__device__ inline float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__global__ void rmsnorm_forward_v2(float* out, float* rstd, const float* x, const float* w, int N, int d, float eps) {
    int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const float* xr = x + (size_t)n * d;
    float ss = 0;
    for (int i = lane; i < d; i += 32) ss += xr[i] * xr[i];
    ss = warp_sum(ss);
    float r = rsqrtf(ss / d + eps);
    if (lane == 0) rstd[n] = r;
    for (int i = lane; i < d; i += 32) out[(size_t)n * d + i] = xr[i] * r * w[i];
}
__global__ void rmsnorm_backward_dx_v2(float* dx, const float* dout, const float* x, const float* w,
                                       const float* rstd, int N, int d) {
    int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const float* xr = x + (size_t)n * d;
    const float* dy = dout + (size_t)n * d;
    float r = rstd[n], s = 0;
    for (int i = lane; i < d; i += 32) s += w[i] * dy[i] * xr[i];
    s = warp_sum(s) * r * r / d;
    for (int i = lane; i < d; i += 32) dx[(size_t)n * d + i] += r * (w[i] * dy[i] - xr[i] * s);
}
// stage 1: block b sums rows [b*rows_per, (b+1)*rows_per) for columns strided by the block
__global__ void rmsnorm_backward_dw_partial_v2(float* scratch, const float* dout, const float* x, const float* rstd,
                                               int N, int d, int rows_per) {
    int n0 = blockIdx.x * rows_per, n1 = min(N, n0 + rows_per);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float s = 0;
        for (int n = n0; n < n1; n++) s += dout[(size_t)n * d + i] * x[(size_t)n * d + i] * rstd[n];
        scratch[(size_t)blockIdx.x * d + i] = s;
    }
}
__global__ void rmsnorm_backward_dw_final_v2(float* dw, const float* scratch, int nblocks, int d) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= d) return;
    float s = 0;
    for (int b = 0; b < nblocks; b++) s += scratch[(size_t)b * d + i];
    dw[i] += s;
}

// ----------------------------------------------------------------------------
// dw's reference: dw0 + sum_n dout[n,i] x[n,i] rstd[n] (rmsnorm_backward's column loop of
// train_moe.cpp, same products) accumulated in double, rounded once
std::vector<float> dw_reference(const std::vector<float>& dw0, const std::vector<float>& dout,
                                const std::vector<float>& x, const std::vector<float>& rstd, int N, int d) {
    std::vector<float> dw(d);
    for (int i = 0; i < d; i++) {
        double s = 0;
        for (int n = 0; n < N; n++) s += (double)dout[(size_t)n * d + i] * x[(size_t)n * d + i] * rstd[n];
        dw[i] = (float)(dw0[i] + s);
    }
    return dw;
}
// dw's check. The elementwise bound's atol is relative to the tensor's scale, rms(dw), not
// 1e-5 flat: a column sum's rounding grows with its partial sums, which are of the typical
// size |dw| (a random walk over the rows) even in a column that happens to end near 0. A
// correct fp32 sum in any order (v1 adds the rows one by one, as train_moe.cpp) stays within
// ~0.2 of that bound at N = 4096; a dropped row moves dw by O(1) (~1e3 x the bound).
// The check's test: the kernel's dw with the last row's contribution taken out (the bug
// "row loop stops at N-1") must fail the same comparison.
void check_dw(Suite& S, const char* what, const std::vector<float>& got, const std::vector<float>& ref,
              const std::vector<float>& dout, const std::vector<float>& x, const std::vector<float>& rstd, int N, int d) {
    const Tol tol = sum_tol(ref);  // atol 1e-5 x rms(dw)
    S.check_close(what, got, ref, tol);
    std::vector<float> bad = got;
    for (int i = 0; i < d; i++) bad[i] -= dout[(size_t)(N - 1) * d + i] * x[(size_t)(N - 1) * d + i] * rstd[N - 1];
    S.check_catches("dw without the last row", Suite::compare_close(got, ref, tol), Suite::compare_close(bad, ref, tol));
}

// ----------------------------------------------------------------------------
// launchers

struct Bufs {
    float *out, *rstd, *dx, *dw, *scratch;
    const float *x, *w, *dout;
    int N, d;
    float eps;
};
constexpr int DW_ROWS_PER_BLOCK = 32;

void forward(int v, const Bufs& b) {
    if (v == 3) { gpu::rmsnorm_forward<float>(b.out, b.rstd, b.x, b.w, b.N, b.d, b.eps, 0); return; }
    if (v == 1) rmsnorm_forward_v1<<<ceil_div(b.N, 128), 128>>>(b.out, b.rstd, b.x, b.w, b.N, b.d, b.eps);
    else rmsnorm_forward_v2<<<ceil_div(b.N, 8), 256>>>(b.out, b.rstd, b.x, b.w, b.N, b.d, b.eps);
    launchCheck();
}
void backward(int v, const Bufs& b) {
    if (v == 3) { gpu::rmsnorm_backward<float>(b.dx, b.dw, b.scratch, b.dout, b.x, b.w, b.rstd, b.N, b.d, 0); return; }
    if (v == 1) {
        rmsnorm_backward_dx_v1<<<ceil_div(b.N, 128), 128>>>(b.dx, b.dout, b.x, b.w, b.rstd, b.N, b.d);
        launchCheck();
        rmsnorm_backward_dw_v1<<<ceil_div(b.d, 128), 128>>>(b.dw, b.dout, b.x, b.rstd, b.N, b.d);
    } else {
        rmsnorm_backward_dx_v2<<<ceil_div(b.N, 8), 256>>>(b.dx, b.dout, b.x, b.w, b.rstd, b.N, b.d);
        launchCheck();
        int nb = ceil_div(b.N, DW_ROWS_PER_BLOCK);
        rmsnorm_backward_dw_partial_v2<<<nb, 256>>>(b.scratch, b.dout, b.x, b.rstd, b.N, b.d, DW_ROWS_PER_BLOCK);
        launchCheck();
        rmsnorm_backward_dw_final_v2<<<ceil_div(b.d, 128), 128>>>(b.dw, b.scratch, nb, b.d);
    }
    launchCheck();
}

const char* NAMES[] = {"", "thread per row", "warp per row, 2-stage dw", "kernels/rmsnorm.cuh (fp32)",
                       "kernels/rmsnorm.cuh (bf16)", "kernels/rmsnorm.cuh residual fused (fp32)",
                       "kernels/rmsnorm.cuh residual fused (bf16)"};
const int NV = 6;

// version 4: forward and backward with T = bf16
void check_bf16(Suite& S, int N, int d, float eps, uint64_t& seed) {
    typedef gpu::bf16 T;
    auto x = round_bf16(rand_floats((size_t)N * d, seed++, -2, 2)), w = round_bf16(rand_floats(d, seed++, 0.5f, 1.5f));
    auto dout = round_bf16(rand_floats((size_t)N * d, seed++));
    auto dx0 = round_bf16(rand_floats((size_t)N * d, seed++)), dw0 = rand_floats(d, seed++);
    std::vector<float> out((size_t)N * d), rstd(N), dx = dx0, dw = dw0;
    rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, d, eps);
    rmsnorm_backward(dx.data(), dw.data(), dout.data(), x.data(), w.data(), rstd.data(), N, d);
    dw = dw_reference(dw0, dout, x, rstd, N, d);  // dw in double (see the top)
    Dev<T> dX(to_t<T>(x)), dW(to_t<T>(w)), dDout(to_t<T>(dout)), dOut((size_t)N * d), dDx(to_t<T>(dx0));
    Dev<float> dRstd(N), dDw(dw0), scratch(gpu::rmsnorm_scratch_floats(N, d));
    cudaStream_t st = 0;
    auto fwd = [&] { gpu::rmsnorm_forward(dOut.p, dRstd.p, (const T*)dX.p, (const T*)dW.p, N, d, eps, st); };
    auto bwd = [&] {
        gpu::rmsnorm_backward(dDx.p, dDw.p, scratch.p, (const T*)dDout.p, (const T*)dX.p, (const T*)dW.p, dRstd.p, N, d, st);
    };
    dOut.poison();
    dRstd.poison();
    fwd();
    S.check_close("forward out (bf16)", host_f(dOut), out, TOL_BF16);
    S.check_close("forward rstd", dRstd.host(), rstd, TOL_FP32);
    dRstd.upload(rstd);
    bwd();
    S.check_close("backward dx (+=, bf16)", host_f(dDx), dx, TOL_BF16);
    auto dw1 = dDw.host();
    check_dw(S, "backward dw (+=, fp32)", dw1, dw, dout, x, rstd, N, d);
    dDw.upload(dw0);
    bwd();
    S.check_equal("dw bit-identical on rerun", dDw.host(), dw1);
    if (N == 4096) {
        S.bench("forward", fwd, 2.0 * N * d * 2 + N * 4);
        S.bench("backward", bwd, 3.0 * N * d * 2 + N * d * 2);
    }
}
// versions 5 and 6: x_out = x + delta; out, rstd = rmsnorm(x_out)
template <typename T>
void check_residual(Suite& S, int N, int d, float eps, uint64_t& seed) {
    const bool is_bf16 = sizeof(T) == 2;
    auto x = rand_floats((size_t)N * d, seed++, -2, 2), delta = rand_floats((size_t)N * d, seed++, -1, 1);
    auto w = rand_floats(d, seed++, 0.5f, 1.5f);
    if (is_bf16) { x = round_bf16(x); delta = round_bf16(delta); w = round_bf16(w); }
    std::vector<float> xo((size_t)N * d), out((size_t)N * d), rstd(N);
    residual_forward(xo.data(), x.data(), delta.data(), (size_t)N * d);
    if (is_bf16) xo = round_bf16(xo);  // stored as bf16, normalized as stored
    rmsnorm_forward(out.data(), rstd.data(), xo.data(), w.data(), N, d, eps);
    Dev<T> dX(to_t<T>(x)), dDelta(to_t<T>(delta)), dW(to_t<T>(w)), dXo((size_t)N * d), dOut((size_t)N * d);
    Dev<float> dRstd(N);
    auto run = [&] {
        gpu::residual_rmsnorm_forward(dXo.p, dOut.p, dRstd.p, (const T*)dX.p, (const T*)dDelta.p, (const T*)dW.p, N, d,
                                      eps, (cudaStream_t)0);
    };
    dXo.poison();
    dOut.poison();
    dRstd.poison();
    run();
    // x + delta: one rounding of one add on both sides (bf16: the same rounding): exact
    S.check_equal("x_out = x + delta (exact)", host_f(dXo), xo);
    S.check_close("out", host_f(dOut), out, is_bf16 ? TOL_BF16 : TOL_FP32);
    S.check_close("rstd", dRstd.host(), rstd, TOL_FP32);
    if (N == 4096) S.bench("residual + forward", run, sizeof(T) * 4.0 * N * d + 4.0 * N);
}

int main(int argc, char** argv) {
    Suite S("rmsnorm", argc, argv);
    struct Size { int N, d; };
    const Size sizes[] = {{7, 33}, {64, 256}, {1024, 768}, {4096, 768}};
    const float eps = 1e-5f;
    for (int v = 1; v <= NV; v++) {
        if (!S.want(v)) continue;
        S.begin(v, NAMES[v]);
        uint64_t seed = 1000 * v;
        for (auto sz : sizes) {
            int N = sz.N, d = sz.d;
            printf("  N %d d %d\n", N, d);
            if (v >= 4) {
                if (v == 4) check_bf16(S, N, d, eps, seed);
                else if (v == 5) check_residual<float>(S, N, d, eps, seed);
                else check_residual<gpu::bf16>(S, N, d, eps, seed);
                continue;
            }
            auto x = rand_floats((size_t)N * d, seed++, -2, 2), w = rand_floats(d, seed++, 0.5f, 1.5f);
            auto dout = rand_floats((size_t)N * d, seed++);
            auto dx0 = rand_floats((size_t)N * d, seed++), dw0 = rand_floats(d, seed++);  // accumulate into these
            std::vector<float> out((size_t)N * d), rstd(N), dx = dx0, dw = dw0;
            rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, d, eps);
            rmsnorm_backward(dx.data(), dw.data(), dout.data(), x.data(), w.data(), rstd.data(), N, d);
            dw = dw_reference(dw0, dout, x, rstd, N, d);  // dw in double (see the top)

            Dev<float> dX(x), dW(w), dDout(dout), dOut((size_t)N * d), dRstd(N), dDx(dx0), dDw(dw0);
            // scratch for the larger of v2's and the production kernel's chunking
            Dev<float> scratch(std::max((size_t)ceil_div(N, DW_ROWS_PER_BLOCK) * d, gpu::rmsnorm_scratch_floats(N, d)));
            Bufs b{dOut.p, dRstd.p, dDx.p, dDw.p, scratch.p, dX.p, dW.p, dDout.p, N, d, eps};
            dOut.poison();
            dRstd.poison();
            forward(v, b);
            S.check_close("forward out", dOut.host(), out, TOL_FP32);
            S.check_close("forward rstd", dRstd.host(), rstd, TOL_FP32);
            // backward from the CPU's rstd, so that the two checks are independent
            dRstd.upload(rstd);
            backward(v, b);
            S.check_close("backward dx (+=)", dDx.host(), dx, TOL_FP32);
            auto dw1 = dDw.host();
            check_dw(S, "backward dw (+=)", dw1, dw, dout, x, rstd, N, d);
            // determinism: a second run from the same start gives the same bits
            dDw.upload(dw0);
            backward(v, b);
            S.check_equal("dw bit-identical on rerun", dDw.host(), dw1);
            if (N == 4096) {
                double fb = 2.0 * N * d * 4 + N * 4, bb = 3.0 * N * d * 4 + N * d * 4;  // x,out | x,dy,dx r+w
                S.bench("forward", [&] { forward(v, b); }, fb);
                S.bench("backward", [&] { backward(v, b); }, bb);
            }
        }
    }
    return S.finish();
}
