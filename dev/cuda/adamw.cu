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
Version 5 is the trainer's whole step, kernels/adamw.cuh adamw_update_multi (one launch for
every segment, chunks with 16-byte loads where aligned) after adamw_scalars (the norm, the
clip factor and the skip flag on the device): segments with gaps between them, decay and no
decay, unaligned starts and lengths, one GPU (mv_shift 0) and a data-parallel shard (moments
packed; one shift a multiple of 4, the others not). p, m, v and the bf16 copy must equal version 4's
kernel run range by range, bit for bit (the same arithmetic, in chunks), which version 4
checks against the CPU; p also against the CPU reference; elements in the gaps untouched;
the scalars against grad_clip_factor (common/run.h) on the host, bit for bit; and a set skip
flag (a non-finite norm, or a non-finite loss noted) must leave everything untouched.
Planted bugs (each made once, not committed): the vector path's second lane rounded with the
first lane's RNG index (the copy check fails in every case); its moments at i instead of
i - mv_shift (the sharded case writes past the packed moments: the run aborts); the skip
flag ignored (both skip checks fail).
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
                       "kernels/adamw.cuh (bf16 copy, stochastic)", "kernels/adamw.cuh multi-tensor step (bf16 copy)"};
const int NV = 5;

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

// version 5: the whole step in one launch, against version 4's kernel range by range
void check_multi(Suite& S, const HP& hp, bool sharded, uint64_t& seed) {
    using bf = __nv_bfloat16;
    // segments of a flat buffer of `total`, with gaps (never updated); sharded: the moments
    // hold only the segments, packed, at index i - mv_shift
    struct Seg { size_t base, n; bool decay; };
    const Seg segs[] = {{3, 5, true}, {8, 4099, false}, {4111, 20001, true}, {24120, 8, false}, {24201, 9000, true}};
    const size_t total = 33300;
    std::vector<gpu::AdamWSegment> plan_segs;
    size_t packed = 0;
    for (const Seg& sg : segs) {
        long long shift = 0;
        if (sharded) shift = (long long)sg.base - (long long)packed;  // 3, 3, 7, 15, 88: aligned once
        plan_segs.push_back({sg.base, sg.n, sg.decay, shift});
        packed += sg.n;
    }
    const size_t nm = sharded ? packed : total;
    auto p = rand_floats(total, seed++), g = rand_floats(total, seed++, -0.1f, 0.1f);
    auto m = rand_floats(nm, seed++, -0.01f, 0.01f), vv = rand_floats(nm, seed++, 0.0f, 1e-4f);
    gpu::AdamWArgs a = make_args(hp, 0x77ull, true);
    const float wd = (float)hp.wd;
    // reference: version 4's kernel, one range at a time
    Dev<float> rP(p), rG(g), rM(m), rV(vv);
    Dev<bf> rC(total);
    rC.poison();
    for (const gpu::AdamWSegment& sg : plan_segs) {
        a.mv_shift = sg.mv_shift;
        gpu::adamw_update(rP.p, rC.p, rG.p, rM.p, rV.p, sg.base, sg.n, sg.decay ? wd : 0.0f, a, (cudaStream_t)0);
    }
    a.mv_shift = 0;
    // the step: scalars (a norm whose clip factor is hp.clip), then one launch
    gpu::AdamWPlan plan;
    gpu::adamw_make_plan(&plan, plan_segs);
    const double norm = hp.clip < 1 ? 1.0 / hp.clip : 0.5;  // grad_clip 1: clip = 1 / norm = hp.clip
    Dev<double> dSq(std::vector<double>{norm * norm * 0.25, norm * norm * 0.75}), dNorm(1);
    Dev<float> dClip(1);
    Dev<int> dSkip(1), dBad(std::vector<int>{0});
    gpu::adamw_scalars(dNorm.p, dClip.p, dSkip.p, dSq.p, 2, 1.0, dBad.p, (cudaStream_t)0);
    const double want_norm = std::sqrt(norm * norm * 0.25 + norm * norm * 0.75);
    const float want_clip = (float)grad_clip_factor(1.0, want_norm);
    S.check_equal("scalars: norm, clip, skip",
                  std::vector<double>{dNorm.host()[0], (double)dClip.host()[0], (double)dSkip.host()[0]},
                  std::vector<double>{want_norm, (double)want_clip, 0.0});
    a.clip = want_clip;  // the reference's clip: the same float
    rP.upload(p); rM.upload(m); rV.upload(vv); rC.poison();
    for (const gpu::AdamWSegment& sg : plan_segs) {
        a.mv_shift = sg.mv_shift;
        gpu::adamw_update(rP.p, rC.p, rG.p, rM.p, rV.p, sg.base, sg.n, sg.decay ? wd : 0.0f, a, (cudaStream_t)0);
    }
    a.clip = NAN;  // the multi-tensor kernel must read the device's
    Dev<gpu::AdamWArgs> dA(std::vector<gpu::AdamWArgs>{a});  // its arguments live on the device
    Dev<float> dP(p), dG(g), dM(m), dV(vv);
    Dev<bf> dC(total);
    dC.poison();
    gpu::adamw_update_multi(dP.p, dC.p, dG.p, dM.p, dV.p, plan, wd, dClip.p, dSkip.p, dA.p, (cudaStream_t)0);
    char what[96];
    snprintf(what, sizeof what, "%d chunks (%d aligned): p", plan.n_chunks, plan.n_aligned);
    S.check_equal(what, dP.host(), rP.host());
    S.check_equal("m", dM.host(), rM.host());
    S.check_equal("v", dV.host(), rV.host());
    S.check_equal("bf16 copy (bits; gaps stay poisoned)", bits_of(dC.host()), bits_of(rC.host()));
    S.check_true("some chunks aligned (16-byte path ran)", plan.n_aligned > 0);
    // p against the CPU reference too (whole buffer; the gaps keep their start values)
    std::vector<float> p_ref = p, m_ref = m, v_ref = vv;
    for (const gpu::AdamWSegment& sg : plan_segs) {
        HP h = hp;
        h.wd = sg.decay ? hp.wd : 0.0;
        h.clip = want_clip;
        const size_t j = sg.base - sg.mv_shift;
        adamw_cpu(p_ref.data() + sg.base, g.data() + sg.base, m_ref.data() + j, v_ref.data() + j, (long)sg.n, h);
    }
    S.check_close("p vs CPU", dP.host(), p_ref, TOL_FP32);
    // a skipped step: a non-finite norm, then a noted non-finite loss; nothing may change
    for (int which = 0; which < 2; which++) {
        Dev<double> bad_stat(std::vector<double>{1.0, NAN});
        dBad.upload(std::vector<int>{0});
        if (which == 0) dSq.upload(std::vector<double>{INFINITY, 1.0});
        else {
            dSq.upload(std::vector<double>{1.0, 1.0});
            gpu::note_non_finite(dBad.p, bad_stat.p, 2, (cudaStream_t)0);
        }
        gpu::adamw_scalars(dNorm.p, dClip.p, dSkip.p, dSq.p, 2, 1.0, dBad.p, (cudaStream_t)0);
        dP.upload(p); dM.upload(m); dV.upload(vv); dC.poison();
        gpu::adamw_update_multi(dP.p, dC.p, dG.p, dM.p, dV.p, plan, wd, dClip.p, dSkip.p, dA.p, (cudaStream_t)0);
        std::vector<uint16_t> poisoned(total, 0xFFFF);
        const bool same = dP.host() == p && dM.host() == m && dV.host() == vv && bits_of(dC.host()) == poisoned;
        S.check_true(which == 0 ? "skip on a non-finite norm" : "skip on a non-finite loss", dSkip.host()[0] == 1 && same);
    }
    plan.release();
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
        if (v == 5) {
            for (const HP& hp : hps)
                for (bool sharded : {false, true}) {
                    printf("  step %ld, clip %g, wd %g, %s\n", hp.t, hp.clip, hp.wd, sharded ? "a data-parallel shard" : "one GPU");
                    check_multi(S, hp, sharded, seed);
                }
            continue;
        }
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
