/*
SwiGLU activation, fp32 (and bf16 storage in version 3).
  forward:  out = silu(g) * u,  silu(g) = g * sigmoid(g)
  backward: dg += dout * u * s * (1 + g (1 - s)),  du += dout * g * s,  s = sigmoid(g)   (accumulate)
CPU reference: swiglu_forward / swiglu_backward of train_moe.cpp. Purely elementwise and
memory-bound: the floor is the bytes (forward reads g, u and writes out: 12 bytes per
element in fp32; backward reads dout, g, u, dg, du and writes dg, du: 28 bytes).

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/swiglu.cu -o build/swiglu -lcublas -lcublasLt -lgomp && ./build/swiglu [version]

Versions 4 (T = float) and 5 (T = bf16) are the production kernels, kernels/swiglu.cuh
(gpu::swiglu_forward / gpu::swiglu_backward), called as train_moe.cu does: 16-byte loads and
stores (8 bf16 or 4 floats per thread) when F is a multiple of that (the F 3072 cases), one
element per thread otherwise (F 1 and 59). Their layout
differs from versions 1-3: one fused gate|up buffer gu [rows, 2F] (gate in columns 0..F-1,
up in F..2F-1 of each row) instead of two [n] arrays, and the backward WRITES dgu [rows, 2F]
(train_moe.cu gives it a scratch buffer) instead of accumulating. So the CPU reference is
the same swiglu_forward / swiglu_backward on the de-interleaved g, u (n = rows * F) with dg,
du starting from 0, and dgu is poisoned before the backward. Sizes: (rows, F) with
rows * F equal to the n of versions 1-3 (1, 7, 1003 = 17 * 59, then F = 3072).
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/swiglu.cuh"

// ----------------------------------------------------------------------------
// version 1: one thread per element, plain expf.
__global__ void swiglu_forward_v1(float* out, const float* g, const float* u, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 1.0f / (1.0f + expf(-g[i]));
    out[i] = g[i] * s * u[i];
}
__global__ void swiglu_backward_v1(float* dg, float* du, const float* dout, const float* g, const float* u, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 1.0f / (1.0f + expf(-g[i]));
    dg[i] += dout[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    du[i] += dout[i] * g[i] * s;
}

// ----------------------------------------------------------------------------
// version 2: 4 elements per thread with 16-byte loads/stores, in a grid-stride loop sized to
// the SM count (fewer blocks to schedule). Scalar tail for n % 4.
__device__ inline float silu_s(float g) { return 1.0f / (1.0f + expf(-g)); }
__global__ void swiglu_forward_v2(float* out, const float* g, const float* u, long n) {
    long n4 = n / 4;
    for (long j = (long)blockIdx.x * blockDim.x + threadIdx.x; j < n4; j += (long)gridDim.x * blockDim.x) {
        float4 gv = ((const float4*)g)[j], uv = ((const float4*)u)[j], o;
        o.x = gv.x * silu_s(gv.x) * uv.x;
        o.y = gv.y * silu_s(gv.y) * uv.y;
        o.z = gv.z * silu_s(gv.z) * uv.z;
        o.w = gv.w * silu_s(gv.w) * uv.w;
        ((float4*)out)[j] = o;
    }
    if (blockIdx.x == 0 && threadIdx.x < n % 4) {
        long i = n4 * 4 + threadIdx.x;
        out[i] = g[i] * silu_s(g[i]) * u[i];
    }
}
__device__ inline void swiglu_bwd1(float& dg, float& du, float dy, float g, float u) {
    float s = silu_s(g);
    dg += dy * u * s * (1.0f + g * (1.0f - s));
    du += dy * g * s;
}
__global__ void swiglu_backward_v2(float* dg, float* du, const float* dout, const float* g, const float* u, long n) {
    long n4 = n / 4;
    for (long j = (long)blockIdx.x * blockDim.x + threadIdx.x; j < n4; j += (long)gridDim.x * blockDim.x) {
        float4 y = ((const float4*)dout)[j], gv = ((const float4*)g)[j], uv = ((const float4*)u)[j];
        float4 a = ((float4*)dg)[j], b = ((float4*)du)[j];
        swiglu_bwd1(a.x, b.x, y.x, gv.x, uv.x);
        swiglu_bwd1(a.y, b.y, y.y, gv.y, uv.y);
        swiglu_bwd1(a.z, b.z, y.z, gv.z, uv.z);
        swiglu_bwd1(a.w, b.w, y.w, gv.w, uv.w);
        ((float4*)dg)[j] = a;
        ((float4*)du)[j] = b;
    }
    if (blockIdx.x == 0 && threadIdx.x < n % 4) {
        long i = n4 * 4 + threadIdx.x;
        swiglu_bwd1(dg[i], du[i], dout[i], g[i], u[i]);
    }
}

// ----------------------------------------------------------------------------
// version 3: bf16 storage, fp32 arithmetic, 8 elements (16 bytes) per thread: half the bytes
// of v2, so about half the time if v2 runs at the copy ceiling. Checked at bf16 tolerance
// against the CPU reference on the bf16-rounded inputs.
typedef __nv_bfloat16 bf16;
struct alignas(16) bf16x8 { __nv_bfloat162 h[4]; };
__global__ void swiglu_forward_v3(bf16* out, const bf16* g, const bf16* u, long n) {
    long n8 = n / 8;
    for (long j = (long)blockIdx.x * blockDim.x + threadIdx.x; j < n8; j += (long)gridDim.x * blockDim.x) {
        bf16x8 gv = ((const bf16x8*)g)[j], uv = ((const bf16x8*)u)[j], o;
        for (int k = 0; k < 4; k++) {
            float2 a = __bfloat1622float2(gv.h[k]), b = __bfloat1622float2(uv.h[k]);
            o.h[k] = __floats2bfloat162_rn(a.x * silu_s(a.x) * b.x, a.y * silu_s(a.y) * b.y);
        }
        ((bf16x8*)out)[j] = o;
    }
    if (blockIdx.x == 0 && threadIdx.x < n % 8) {
        long i = n8 * 8 + threadIdx.x;
        float a = __bfloat162float(g[i]);
        out[i] = __float2bfloat16(a * silu_s(a) * __bfloat162float(u[i]));
    }
}
__global__ void swiglu_backward_v3(bf16* dg, bf16* du, const bf16* dout, const bf16* g, const bf16* u, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float a = __bfloat162float(dg[i]), b = __bfloat162float(du[i]);
        swiglu_bwd1(a, b, __bfloat162float(dout[i]), __bfloat162float(g[i]), __bfloat162float(u[i]));
        dg[i] = __float2bfloat16(a);
        du[i] = __float2bfloat16(b);
    }
}

const char* NAMES[] = {"", "thread per element", "float4 grid-stride", "bf16 storage, 16-byte loads",
                       "kernels/swiglu.cuh (fp32, gu [rows, 2F])", "kernels/swiglu.cuh (bf16, gu [rows, 2F])"};
const int NV = 5;

// versions 4 and 5: the production kernels on the fused layout gu [rows, 2F]
template <typename T>
void check_production(Suite& S, long rows, int F, uint64_t& seed) {
    const bool is_bf16 = sizeof(T) == 2;
    const Tol tol = is_bf16 ? TOL_BF16 : TOL_FP32;
    const long n = rows * F;
    printf("  rows %ld F %d (n %ld)\n", rows, F, n);
    auto g = rand_floats(n, seed++, -6, 6), u = rand_floats(n, seed++, -2, 2), dy = rand_floats(n, seed++);
    if (is_bf16) { g = round_bf16(g); u = round_bf16(u); dy = round_bf16(dy); }
    std::vector<float> out(n), sig(n), dg(n, 0.0f), du(n, 0.0f);  // the kernel writes dgu: start the reference at 0
    swiglu_forward(out.data(), sig.data(), g.data(), u.data(), n);
    swiglu_backward(dg.data(), du.data(), dy.data(), g.data(), u.data(), sig.data(), n);
    std::vector<float> gu((size_t)n * 2), dgu_ref((size_t)n * 2);  // interleave by row: [g | u]
    for (long r = 0; r < rows; r++)
        for (int c = 0; c < F; c++) {
            gu[(size_t)r * 2 * F + c] = g[(size_t)r * F + c];
            gu[(size_t)r * 2 * F + F + c] = u[(size_t)r * F + c];
            dgu_ref[(size_t)r * 2 * F + c] = dg[(size_t)r * F + c];
            dgu_ref[(size_t)r * 2 * F + F + c] = du[(size_t)r * F + c];
        }
    Dev<T> dGu(to_t<T>(gu)), dA(n), dDa(to_t<T>(dy)), dDgu((size_t)n * 2);
    auto fwd = [&] { gpu::swiglu_forward(dA.p, (const T*)dGu.p, (size_t)rows, F, (cudaStream_t)0); };
    auto bwd = [&] { gpu::swiglu_backward(dDgu.p, (const T*)dDa.p, (const T*)dGu.p, (size_t)rows, F, (cudaStream_t)0); };
    dA.poison();
    fwd();
    S.check_close("forward a", host_f(dA), out, tol);
    dDgu.poison();
    bwd();
    S.check_close("backward dgu (written)", host_f(dDgu), dgu_ref, tol);
    // rows == 0 (an MoE layer can route no row to a buffer): must return without touching dgu
    auto before = host_f(dDgu);
    gpu::swiglu_forward(dA.p, (const T*)dGu.p, (size_t)0, F, (cudaStream_t)0);
    gpu::swiglu_backward(dDgu.p, (const T*)dDa.p, (const T*)dGu.p, (size_t)0, F, (cudaStream_t)0);
    S.check_equal("rows 0: no-op", host_f(dDgu), before);
    if (n == 8192L * 3072) {
        double es = sizeof(T);
        S.bench("forward", fwd, 3.0 * n * es);   // read g, u; write a
        S.bench("backward", bwd, 5.0 * n * es);  // read da, g, u; write dg, du
    }
}

int main(int argc, char** argv) {
    Suite S("swiglu", argc, argv);
    int sms = 0;
    cudaCheck(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const int grid = sms * 8;
    // N*F dense, N*K*F experts; emulated: 512 rows of F 3072, and not the largest (it is
    // there to be timed)
    const long big = EMULATED ? 512L * 3072 : 4096L * 3072;
    const long sizes[] = {1, 7, 1003, big, 8192L * 3072};
    for (int v = 1; v <= NV; v++) {
        if (!S.want(v)) continue;
        S.begin(v, NAMES[v]);
        uint64_t seed = 77 * v;
        if (v >= 4) {
            const long rows_F[][2] = {{1, 1}, {7, 1}, {17, 59}, {big / 3072, 3072}, {8192, 3072}};  // same n as above
            for (auto& rf : rows_F) {
                if (EMULATED && rf[0] == 8192) continue;
                if (v == 4) check_production<float>(S, rf[0], (int)rf[1], seed);
                else check_production<bf16>(S, rf[0], (int)rf[1], seed);
            }
            continue;
        }
        for (long n : sizes) {
            if (EMULATED && n == 8192L * 3072) continue;
            printf("  n %ld\n", n);
            auto g = rand_floats(n, seed++, -6, 6), u = rand_floats(n, seed++, -2, 2), dy = rand_floats(n, seed++);
            auto dg0 = rand_floats(n, seed++), du0 = rand_floats(n, seed++);
            if (v == 3) { g = round_bf16(g); u = round_bf16(u); dy = round_bf16(dy); dg0 = round_bf16(dg0); du0 = round_bf16(du0); }
            std::vector<float> out(n), sig(n), dg = dg0, du = du0;
            swiglu_forward(out.data(), sig.data(), g.data(), u.data(), n);
            swiglu_backward(dg.data(), du.data(), dy.data(), g.data(), u.data(), sig.data(), n);
            if (v < 3) {
                Dev<float> dG(g), dU(u), dY(dy), dOut(n), dDg(dg0), dDu(du0);
                auto fwd = [&] {
                    if (v == 1) swiglu_forward_v1<<<ceil_div(n, 256), 256>>>(dOut.p, dG.p, dU.p, n);
                    else swiglu_forward_v2<<<std::min(grid, ceil_div(n, 1024) + 1), 256>>>(dOut.p, dG.p, dU.p, n);
                    launchCheck();
                };
                auto bwd = [&] {
                    if (v == 1) swiglu_backward_v1<<<ceil_div(n, 256), 256>>>(dDg.p, dDu.p, dY.p, dG.p, dU.p, n);
                    else swiglu_backward_v2<<<std::min(grid, ceil_div(n, 1024) + 1), 256>>>(dDg.p, dDu.p, dY.p, dG.p, dU.p, n);
                    launchCheck();
                };
                dOut.poison();
                fwd();
                S.check_close("forward", dOut.host(), out, TOL_FP32);
                bwd();
                S.check_close("backward dg (+=)", dDg.host(), dg, TOL_FP32);
                S.check_close("backward du (+=)", dDu.host(), du, TOL_FP32);
                if (n == 8192L * 3072) {
                    S.bench("forward", fwd, 12.0 * n);
                    S.bench("backward", bwd, 28.0 * n);
                }
            } else {
                Dev<bf16> dG(to_bf16(g)), dU(to_bf16(u)), dY(to_bf16(dy)), dOut(n), dDg(to_bf16(dg0)), dDu(to_bf16(du0));
                int gr = std::min(grid, ceil_div(n, 2048) + 1);
                auto fwd = [&] { swiglu_forward_v3<<<gr, 256>>>(dOut.p, dG.p, dU.p, n); launchCheck(); };
                auto bwd = [&] { swiglu_backward_v3<<<gr, 256>>>(dDg.p, dDu.p, dY.p, dG.p, dU.p, n); launchCheck(); };
                dOut.poison();
                fwd();
                S.check_close("forward (bf16)", from_bf16(dOut.host()), out, TOL_BF16);
                bwd();
                S.check_close("backward dg (+=, bf16)", from_bf16(dDg.host()), dg, TOL_BF16);
                S.check_close("backward du (+=, bf16)", from_bf16(dDu.host()), du, TOL_BF16);
                if (n == 8192L * 3072) {
                    S.bench("forward (bf16)", fwd, 6.0 * n);
                    S.bench("backward (bf16)", bwd, 14.0 * n);
                }
            }
        }
    }
    return S.finish();
}
