/*
Rotary position embedding (RoPE), Hugging Face "rotate half" convention, fp32.
  x[N, nh*hd]; within each head the pair (i, i + hd/2) is rotated by angle pos * inv_freq[i],
  pos = n % T, through tables cos/sin[T, hd/2]:
    forward:  (a, b) -> (a c - b s, b c + a s)
    backward: the rotation by -angle: (a, b) -> (a c + b s, b c - a s)
CPU reference: rope_forward / rope_backward of train_moe.cpp (in place). The kernels here
take out and in separately (out == in is allowed and tested): out-of-place lets the check
poison the output and catch an unwritten element, which in place would hide at pos 0,
where the rotation is the identity.

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/rope.cu -o build/rope -lcublas -lcublasLt -lgomp && ./build/rope [version]

Version 3 is the production kernel, kernels/rope.cuh (gpu::rope_forward / gpu::rope_backward,
T = float), version 4 the same with T = bf16 (x bf16, tables fp32; the CPU reference runs on
the bf16-rounded x, TOL_BF16). The production kernels work in place only (as train_moe.cu
calls them, on q, k, dq, dk), so they cannot be poisoned: an element they forget to write
keeps its input value, which the check catches everywhere except at pos 0 (identity).
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/rope.cuh"

// ----------------------------------------------------------------------------
// version 1: one thread per rotated pair (n, head, i). dir = +1 forward, -1 backward
// (sin negated), so forward and backward are one kernel and cannot drift apart.
__global__ void rope_v1(float* out, const float* in, const float* cosb, const float* sinb, int N, int T, int nh,
                        int hd, float dir) {
    int h2 = hd / 2;
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)N * nh * h2) return;
    int i = idx % h2;
    int h = (idx / h2) % nh;
    int n = idx / ((long)h2 * nh);
    int t = n % T;
    float c = cosb[(size_t)t * h2 + i], s = dir * sinb[(size_t)t * h2 + i];
    size_t base = (size_t)n * nh * hd + (size_t)h * hd;
    float a = in[base + i], b = in[base + i + h2];
    out[base + i] = a * c - b * s;
    out[base + i + h2] = b * c + a * s;
}

// ----------------------------------------------------------------------------
// version 2: each thread rotates 4 consecutive pairs with 16-byte loads of a, b, cos and sin
// (needs hd/2 % 4 == 0, true for hd 64; otherwise v1 runs). Same bytes, a quarter of the
// instructions and index arithmetic; the loads are 128-bit.
__global__ void rope_v2(float* out, const float* in, const float* cosb, const float* sinb, int N, int T, int nh,
                        int hd, float dir) {
    int h2 = hd / 2, q = h2 / 4;
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)N * nh * q) return;
    int i = (idx % q) * 4;
    int h = (idx / q) % nh;
    int n = idx / ((long)q * nh);
    int t = n % T;
    float4 c = *(const float4*)(cosb + (size_t)t * h2 + i), s = *(const float4*)(sinb + (size_t)t * h2 + i);
    size_t base = (size_t)n * nh * hd + (size_t)h * hd;
    float4 a = *(const float4*)(in + base + i), b = *(const float4*)(in + base + i + h2);
    float4 oa, ob;
    oa.x = a.x * c.x - b.x * dir * s.x; ob.x = b.x * c.x + a.x * dir * s.x;
    oa.y = a.y * c.y - b.y * dir * s.y; ob.y = b.y * c.y + a.y * dir * s.y;
    oa.z = a.z * c.z - b.z * dir * s.z; ob.z = b.z * c.z + a.z * dir * s.z;
    oa.w = a.w * c.w - b.w * dir * s.w; ob.w = b.w * c.w + a.w * dir * s.w;
    *(float4*)(out + base + i) = oa;
    *(float4*)(out + base + i + h2) = ob;
}

void rope(int v, float* out, const float* in, const float* c, const float* s, int N, int T, int nh, int hd, float dir) {
    if (v == 1 || (hd / 2) % 4) rope_v1<<<ceil_div((long)N * nh * hd / 2, 256), 256>>>(out, in, c, s, N, T, nh, hd, dir);
    else rope_v2<<<ceil_div((long)N * nh * hd / 8, 256), 256>>>(out, in, c, s, N, T, nh, hd, dir);
    launchCheck();
}

const char* NAMES[] = {"", "thread per pair", "float4, 4 pairs per thread", "kernels/rope.cuh (fp32, in place)",
                       "kernels/rope.cuh (bf16, in place)"};
const int NV = 4;

// versions 3 and 4: the production kernels, in place, as train_moe.cu calls them
template <typename T>
void check_production(Suite& S, std::vector<float> x, const std::vector<float>& cosb, const std::vector<float>& sinb,
                      int N, int T_, int nh, int hd) {
    const bool is_bf16 = sizeof(T) == 2;
    if (is_bf16) x = round_bf16(x);
    std::vector<float> fwd = x, bwd = x;
    rope_forward(fwd.data(), cosb.data(), sinb.data(), N, T_, nh, hd);
    rope_backward(bwd.data(), cosb.data(), sinb.data(), N, T_, nh, hd);
    const Tol tol = is_bf16 ? TOL_BF16 : TOL_FP32;
    size_t n = x.size();
    Dev<T> dX(n);
    Dev<float> dC(cosb), dS(sinb);
    auto upload_x = [&] {
        if constexpr (sizeof(T) == 2) dX.upload(to_bf16(x)); else dX.upload(x);
    };
    auto download_x = [&] {
        if constexpr (sizeof(T) == 2) return from_bf16(dX.host()); else return dX.host();
    };
    upload_x();
    gpu::rope_forward(dX.p, dC.p, dS.p, N, T_, nh, hd, (cudaStream_t)0);
    S.check_close("forward (in place)", download_x(), fwd, tol);
    upload_x();
    gpu::rope_backward(dX.p, dC.p, dS.p, N, T_, nh, hd, (cudaStream_t)0);
    S.check_close("backward (in place)", download_x(), bwd, tol);
    if (N == 4096)
        S.bench("forward, q (in place)", [&] { gpu::rope_forward(dX.p, dC.p, dS.p, N, T_, nh, hd, (cudaStream_t)0); },
                2.0 * n * sizeof(T) + 2.0 * T_ * (hd / 2) * 4);
}

int main(int argc, char** argv) {
    Suite S("rope", argc, argv);
    struct Size { int N, T, nh, hd; };
    const Size sizes[] = {{6, 3, 2, 8}, {10, 5, 3, 6}, {2048, 1024, 4, 64}, {4096, 1024, 12, 64}};
    for (int v = 1; v <= NV; v++) {
        if (!S.want(v)) continue;
        S.begin(v, NAMES[v]);
        uint64_t seed = 10 * v;
        for (auto sz : sizes) {
            int N = sz.N, T = sz.T, nh = sz.nh, hd = sz.hd, h2 = hd / 2;
            printf("  N %d T %d nh %d hd %d\n", N, T, nh, hd);
            // tables as both trainers build them (ModelConfig::rope_tables, theta 10000)
            ModelConfig rc;
            rc.head_dim = hd;
            rc.rope_theta = 10000.0f;
            std::vector<float> cosb, sinb;
            rc.rope_tables(T, &cosb, &sinb);
            size_t n = (size_t)N * nh * hd;
            auto x = rand_floats(n, seed++);
            if (v >= 3) {
                if (v == 3) check_production<float>(S, x, cosb, sinb, N, T, nh, hd);
                else check_production<gpu::bf16>(S, x, cosb, sinb, N, T, nh, hd);
                continue;
            }
            std::vector<float> fwd = x, bwd = x;
            rope_forward(fwd.data(), cosb.data(), sinb.data(), N, T, nh, hd);
            rope_backward(bwd.data(), cosb.data(), sinb.data(), N, T, nh, hd);

            Dev<float> dX(x), dOut(n), dC(cosb), dS(sinb);
            dOut.poison();
            rope(v, dOut.p, dX.p, dC.p, dS.p, N, T, nh, hd, 1.0f);
            S.check_close("forward (out of place)", dOut.host(), fwd, TOL_FP32);
            dOut.poison();
            rope(v, dOut.p, dX.p, dC.p, dS.p, N, T, nh, hd, -1.0f);
            S.check_close("backward (out of place)", dOut.host(), bwd, TOL_FP32);
            rope(v, dX.p, dX.p, dC.p, dS.p, N, T, nh, hd, 1.0f);  // in place, as the trainer uses it
            S.check_close("forward (in place)", dX.host(), fwd, TOL_FP32);
            if (N == 4096) S.bench("forward, q (in place)", [&] { rope(v, dX.p, dX.p, dC.p, dS.p, N, T, nh, hd, 1.0f); },
                                   2.0 * n * 4 + 2.0 * T * h2 * 4);
        }
    }
    return S.finish();
}
