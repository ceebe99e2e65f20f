/*
AdamW update, fp32 parameters, gradients and moments (one tensor at a time, as Model::step).
  g' = g * clip                       (clip = grad_clip / norm when the global norm exceeds it)
  m  = b1 m + (1 - b1) g'
  v  = b2 v + (1 - b2) g'^2
  p -= lr (m / bc1 / (sqrt(v / bc2) + eps) + wd p),   bc1 = 1 - b1^t, bc2 = 1 - b2^t
CPU reference: the loop body of Model::step in train_moe.cpp, copied below as adamw_cpu
(Model::step is a method over the whole model; the per-element arithmetic is the same,
including which constants are rounded from double to float).

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/adamw.cu -o build/adamw -lcublas -lcublasLt -lgomp && ./build/adamw [version]

TODO: kernels/adamw.cuh exists (written concurrently) but is not included yet: add its
kernels as the last version, checked the same way (this file has only its own versions).
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"

struct HP {
    double lr, b1, b2, eps, wd, clip;
    long t;
};

// CPU reference: Model::step's inner loop, unchanged
void adamw_cpu(float* p, const float* g, float* mm, float* vv, long n, const HP& hp) {
    double bc1 = 1 - std::pow(hp.b1, (double)hp.t), bc2 = 1 - std::pow(hp.b2, (double)hp.t);
    real wd = (real)hp.wd;
#pragma omp parallel for
    for (long i = 0; i < n; i++) {
        real gi = g[i] * (real)hp.clip;
        mm[i] = (real)hp.b1 * mm[i] + (real)(1 - hp.b1) * gi;
        vv[i] = (real)hp.b2 * vv[i] + (real)(1 - hp.b2) * gi * gi;
        real mhat = mm[i] / (real)bc1, vhat = vv[i] / (real)bc2;
        p[i] -= (real)hp.lr * (mhat / (std::sqrt(vhat) + (real)hp.eps) + wd * p[i]);
    }
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

const char* NAMES[] = {"", "thread per parameter", "float4 grid-stride"};
const int NV = 2;

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
                printf("  n %ld, step %ld, clip %g, wd %g\n", n, hp.t, hp.clip, hp.wd);
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
