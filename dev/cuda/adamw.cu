/*
AdamW update, fp32 parameters, gradients and moments (one tensor at a time, as Model::step).
  g' = g * clip                       (clip = grad_clip / norm when the global norm exceeds it)
  m  = b1 m + (1 - b1) g'
  v  = b2 v + (1 - b2) g'^2
  p -= lr (m / bc1 / (sqrt(v / bc2) + eps) + wd p),   bc1 = 1 - b1^t, bc2 = 1 - b2^t
CPU reference: adamw_update of train_moe.cpp (one tensor's update, as Model::step calls it),
with the step's clip factor and bias corrections as adamw_step (common/run.h) makes them.

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/adamw.cu -o build/adamw -lcublas -lcublasLt -lgomp && ./build/adamw [version]

Version 3 is the production kernel, kernels/adamw.cuh (gpu::adamw_update), called as
train_moe.cu's GPUModel::step does (gpu::AdamWArgs filled from the same double->float
roundings, a flat buffer and an element range [base, base + n)): fp32 mode (copy = null).
It runs on a range inside a larger buffer (base 3, 5 elements after the end), and the
elements outside the range must stay bit-identical.
Version 4 is the same with the bf16 working copy (T = bf16), stochastic rounding on:
p, m, v as in version 3, and the copy checked bit for bit against a host emulation of
store_weight (the Philox RNG of common/rng.h is host-callable) from the GPU's own fp32 p;
each copy element must be p rounded down or up (never further); the rounding must be
unbiased (mean of (copy - p) / ulp near 0); outside the range the poisoned copy stays
untouched; and with stochastic = false the copy is round-to-nearest exactly.
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/adamw.cuh"

struct HP {
    double lr, b1, b2, eps, wd, clip;
    long t;
};

// CPU reference: train_moe.cpp's adamw_update, with a given clip factor
void adamw_cpu(float* p, const float* g, float* mm, float* vv, long n, const HP& hp) {
    AdamWSettings s;
    s.beta1 = hp.b1; s.beta2 = hp.b2; s.eps = hp.eps;
    AdamWStep st = adamw_step(s, 0, hp.t);  // the bias corrections of step t
    st.clip = hp.clip;
    adamw_update(p, g, mm, vv, n, s, st, hp.lr, hp.wd);
}

// the float constants, rounded on the host exactly as the CPU loop rounds them
struct HPf {
    float lr, b1, omb1, b2, omb2, bc1, bc2, eps, wd, clip;
};
HPf to_f(const HP& h) {
    return HPf{(float)h.lr, (float)h.b1, (float)(1 - h.b1), (float)h.b2, (float)(1 - h.b2),
               (float)(1 - std::pow(h.b1, (double)h.t)), (float)(1 - std::pow(h.b2, (double)h.t)), (float)h.eps,
               (float)h.wd, (float)h.clip};
}

// ----------------------------------------------------------------------------
// version 1: one thread per parameter.
__device__ inline void adamw1(float& p, float g, float& m, float& v, const HPf& h) {
    float gi = g * h.clip;
    m = h.b1 * m + h.omb1 * gi;
    v = h.b2 * v + h.omb2 * gi * gi;
    float mhat = m / h.bc1, vhat = v / h.bc2;
    p -= h.lr * (mhat / (sqrtf(vhat) + h.eps) + h.wd * p);
}
__global__ void adamw_v1(float* p, const float* g, float* m, float* v, long n, HPf h) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) adamw1(p[i], g[i], m[i], v[i], h);
}

// ----------------------------------------------------------------------------
// version 2: float4 loads/stores in a grid-stride loop (16 bytes per access, a grid sized to
// the machine); scalar tail. 28 bytes per parameter either way: this only moves it closer to
// the copy ceiling.
__global__ void adamw_v2(float* p, const float* g, float* m, float* v, long n, HPf h) {
    long n4 = n / 4;
    for (long j = (long)blockIdx.x * blockDim.x + threadIdx.x; j < n4; j += (long)gridDim.x * blockDim.x) {
        float4 pp = ((float4*)p)[j], gg = ((const float4*)g)[j], mm = ((float4*)m)[j], vv = ((float4*)v)[j];
        adamw1(pp.x, gg.x, mm.x, vv.x, h);
        adamw1(pp.y, gg.y, mm.y, vv.y, h);
        adamw1(pp.z, gg.z, mm.z, vv.z, h);
        adamw1(pp.w, gg.w, mm.w, vv.w, h);
        ((float4*)p)[j] = pp;
        ((float4*)m)[j] = mm;
        ((float4*)v)[j] = vv;
    }
    if (blockIdx.x == 0 && threadIdx.x < n % 4) {
        long i = n4 * 4 + threadIdx.x;
        adamw1(p[i], g[i], m[i], v[i], h);
    }
}

const char* NAMES[] = {"", "thread per parameter", "float4 grid-stride", "kernels/adamw.cuh (fp32, no copy)",
                       "kernels/adamw.cuh (bf16 copy, stochastic)"};
const int NV = 4;

// versions 3 and 4: the production kernel, AdamWArgs built as GPUModel::step builds them
gpu::AdamWArgs make_args(const HP& hp, uint64_t seed, bool stochastic) {
    double bc1 = 1 - std::pow(hp.b1, (double)hp.t), bc2 = 1 - std::pow(hp.b2, (double)hp.t);
    gpu::AdamWArgs a;
    a.lr = (float)hp.lr; a.b1 = (float)hp.b1; a.one_minus_b1 = (float)(1 - hp.b1);
    a.b2 = (float)hp.b2; a.one_minus_b2 = (float)(1 - hp.b2);
    a.bc1 = (float)bc1; a.bc2 = (float)bc2; a.eps = (float)hp.eps; a.clip = (float)hp.clip;
    a.seed = seed; a.stream = gpu::sr_stream((uint64_t)hp.t); a.stochastic = stochastic;
    return a;
}
// host emulation of gpu::store_weight (bf16): the expected copy, bit for bit
uint16_t sr_expected(float x, uint64_t seed, uint64_t stream, uint64_t index, bool stochastic) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    if (stochastic && (bits & 0x7f800000u) != 0x7f800000u) {
        uint32_t r = philox4x32(seed, index, stream).v[0] & 0xffffu;
        bits = (bits + r) & 0xffff0000u;
        return (uint16_t)(bits >> 16);
    }
    __nv_bfloat16 b = __float2bfloat16_rn(x);
    uint16_t u;
    memcpy(&u, &b, 2);
    return u;
}
std::vector<uint16_t> bits_of(const std::vector<__nv_bfloat16>& v) {
    std::vector<uint16_t> o(v.size());
    memcpy(o.data(), v.data(), v.size() * 2);
    return o;
}
template <typename T>
void check_production(Suite& S, long n, const HP& hp, uint64_t& seed) {
    const bool with_copy = sizeof(T) == 2;
    const long base = 3, total = n + base + 5;  // the range [base, base + n) of a larger flat buffer
    auto p = rand_floats(total, seed++), g = rand_floats(total, seed++, -0.1f, 0.1f);
    auto m = rand_floats(total, seed++, -0.01f, 0.01f), vv = rand_floats(total, seed++, 0.0f, 1e-4f);
    Dev<float> dP(p), dG(g), dM(m), dV(vv);
    Dev<T> dCopy(with_copy ? total : 0);
    auto p_ref = p, m_ref = m, v_ref = vv;
    adamw_cpu(p_ref.data() + base, g.data() + base, m_ref.data() + base, v_ref.data() + base, n, hp);
    const uint64_t sr_seed = 0x1234abcdull + (uint64_t)n;
    gpu::AdamWArgs a = make_args(hp, sr_seed, true);
    const float wd = (float)hp.wd;
    T* copy = with_copy ? dCopy.p : nullptr;
    auto run = [&] { gpu::adamw_update(dP.p, copy, dG.p, dM.p, dV.p, (size_t)base, (size_t)n, wd, a, (cudaStream_t)0); };
    if (with_copy) dCopy.poison();
    run();
    auto gp = dP.host();
    S.check_close("param", gp, p_ref, TOL_FP32);
    S.check_close("m", dM.host(), m_ref, TOL_FP32);
    S.check_close("v", dV.host(), v_ref, TOL_FP32);
    // outside [base, base + n): untouched (p_ref, m_ref, v_ref kept the start values there)
    auto outside = [&](const std::vector<float>& x) {
        std::vector<float> o;
        for (long i = 0; i < total; i++)
            if (i < base || i >= base + n) o.push_back(x[i]);
        return o;
    };
    S.check_equal("p outside the range untouched", outside(gp), outside(p));
    S.check_equal("m outside the range untouched", outside(dM.host()), outside(m));
    if constexpr (sizeof(T) == 2) {
        auto cb = bits_of(dCopy.host());
        std::vector<uint16_t> want(total, 0xFFFF);  // poison outside the range
        long bad_bracket = 0;
        double bias = 0;
        for (long i = base; i < base + n; i++) {
            want[i] = sr_expected(gp[i], a.seed, a.stream, (uint64_t)i, true);
            uint32_t pb;
            memcpy(&pb, &gp[i], 4);
            uint32_t lo = pb & 0xffff0000u, cbits = (uint32_t)cb[i] << 16;
            if (!(cbits == lo || ((pb & 0xffffu) != 0 && cbits == lo + 0x10000u))) bad_bracket++;
            float c;
            memcpy(&c, &cbits, 4);
            float ulp_lo, ulp_hi;
            uint32_t hi = lo + 0x10000u;
            memcpy(&ulp_lo, &lo, 4);
            memcpy(&ulp_hi, &hi, 4);
            double ulp = std::fabs((double)ulp_hi - (double)ulp_lo);
            if (ulp > 0 && std::isfinite(ulp)) bias += ((double)c - (double)gp[i]) / ulp;
        }
        S.check_equal("bf16 copy (bits, host emulation)", cb, want);
        char detail[96];
        snprintf(detail, sizeof detail, "%ld of %ld outside [round down, round up]", bad_bracket, n);
        S.check_true("copy is p rounded down or up", bad_bracket == 0, detail);
        if (n >= 4099) {  // unbiased: E[(copy - p) / ulp] = 0, std <= 0.5 / sqrt(n)
            double mean = bias / n, bound = 5 * 0.5 / std::sqrt((double)n);
            snprintf(detail, sizeof detail, "mean (copy - p)/ulp %.2e (bound %.1e)", mean, bound);
            S.check_true("stochastic rounding unbiased", std::fabs(mean) <= bound, detail);
        }
        // round to nearest (stochastic off): rerun the update on fresh state, compare exactly
        dP.upload(p); dM.upload(m); dV.upload(vv);
        dCopy.poison();
        gpu::AdamWArgs a_rn = make_args(hp, sr_seed, false);
        gpu::adamw_update(dP.p, copy, dG.p, dM.p, dV.p, (size_t)base, (size_t)n, wd, a_rn, (cudaStream_t)0);
        auto gp2 = dP.host();
        auto cb2 = bits_of(dCopy.host());
        for (long i = base; i < base + n; i++) want[i] = sr_expected(gp2[i], 0, 0, 0, false);
        S.check_equal("bf16 copy, round to nearest", cb2, want);
    }
    if (n == 100L * 1000 * 1000) S.bench("100M params", run, 28.0 * n + (with_copy ? 2.0 * n : 0.0));
}

int main(int argc, char** argv) {
    Suite S("adamw", argc, argv);
    int sms = 0;
    cudaCheck(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const long sizes[] = {1, 5, 4099, 1L << 20, 100L * 1000 * 1000};
    // step 1 (bias corrections largest), a later step with clipping, no weight decay
    const HP hps[] = {{3e-4, 0.9, 0.95, 1e-8, 0.1, 1.0, 1}, {1e-3, 0.9, 0.95, 1e-8, 0.1, 0.37, 1000},
                      {6e-4, 0.8, 0.999, 1e-6, 0.0, 1.0, 7}};
    for (int v = 1; v <= NV; v++) {
        if (!S.want(v)) continue;
        S.begin(v, NAMES[v]);
        uint64_t seed = 5 * v;
        for (long n : sizes)
            for (const HP& hp : hps) {
                if (n == 100L * 1000 * 1000 && &hp != &hps[1]) continue;  // the big size once
                if (EMULATED && n == 100L * 1000 * 1000) continue;          // there to be timed
                printf("  n %ld, step %ld, clip %g, wd %g\n", n, hp.t, hp.clip, hp.wd);
                if (v >= 3) {
                    if (v == 3) check_production<float>(S, n, hp, seed);
                    else check_production<__nv_bfloat16>(S, n, hp, seed);
                    continue;
                }
                auto p = rand_floats(n, seed++), g = rand_floats(n, seed++, -0.1f, 0.1f);
                auto m = rand_floats(n, seed++, -0.01f, 0.01f), vv = rand_floats(n, seed++, 0.0f, 1e-4f);
                Dev<float> dP(p), dG(g), dM(m), dV(vv);
                adamw_cpu(p.data(), g.data(), m.data(), vv.data(), n, hp);
                HPf h = to_f(hp);
                auto run = [&] {
                    if (v == 1) adamw_v1<<<ceil_div(n, 256), 256>>>(dP.p, dG.p, dM.p, dV.p, n, h);
                    else adamw_v2<<<std::min((long)sms * 8, (long)ceil_div(n, 1024) + 1), 256>>>(dP.p, dG.p, dM.p, dV.p, n, h);
                    launchCheck();
                };
                run();
                S.check_close("param", dP.host(), p, TOL_FP32);
                S.check_close("m", dM.host(), m, TOL_FP32);
                S.check_close("v", dV.host(), vv, TOL_FP32);
                if (n == 100L * 1000 * 1000) S.bench("100M params", run, 28.0 * n);
            }
    }
    return S.finish();
}
