/*
Global gradient norm: sqrt(sum_i g_i^2) over the whole flat gradient buffer (for clipping).
CPU reference: global_norm of train_moe.cpp (a double-precision sum in index order), as
Model::step calls it.
Every version reduces in a fixed order (per-thread strided sums, fixed tree within a block,
block partials added in block order): no atomics, so the same gradients give the same bits
every run, and the clip factor (and so the whole update) is reproducible.

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/global_norm.cu -o build/global_norm -lcublas -lcublasLt -lgomp && ./build/global_norm [version]

Version 3 is the production kernel, kernels/global_norm.cuh (gpu::global_norm_squared:
the squared norm in double, into a device double, with gpu::NORM_BLOCKS doubles of
scratch); the host takes the sqrt in double.
Version 4 is what train_moe.cu's GPUModel::step runs: gpu::global_norm_squared_multi, every
segment's squared norm in one pass (grid NORM_BLOCKS x segments, 16-byte loads between an
unaligned head and tail). Segments: the whole buffer (one GPU), or several slices at
unaligned offsets and of every length mod 4, one empty (data parallel: this rank's slice
of each bucket); each segment's sum against the CPU's double sum of that slice, bit-identical
on rerun. Planted bugs (made once, not committed): the tail skipped (a slice of length
4k+1 fails), the vector loop starting at the segment instead of after its head (unaligned
slices fail).
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/global_norm.cuh"

double global_norm_cpu(const std::vector<float>& g) { return global_norm(g.data(), g.size()); }

// fixed-shape block reduction: same order every run
template <int THREADS, class Tacc>
__device__ Tacc block_sum(Tacc v) {
    __shared__ Tacc sh[THREADS];
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    return sh[0];
}

// ----------------------------------------------------------------------------
// version 1: a single block of 1024 threads, double accumulation per thread (a float sum of
// 3e5 squares per thread would already lose ~1e-5), written as the squared norm (out[0]);
// the sqrt is taken by the caller. One block uses one SM of 132, so it is slow on large
// buffers, but it has no second stage to get wrong.
__global__ void norm_squared_v1(float* out, const float* g, long n) {
    double s = 0;
    for (long i = threadIdx.x; i < n; i += 1024) s += (double)g[i] * g[i];
    double t = block_sum<1024>(s);
    if (threadIdx.x == 0) out[0] = (float)t;
}

// ----------------------------------------------------------------------------
// version 2: a grid of (SMs x 4) blocks, float4 loads, per-block partial sums to scratch,
// then one block adds the partials in block order. Accumulates in double inside each
// thread's chunk, as v1; on Hopper FP64 adds are cheap next to the memory stream.
__global__ void norm_squared_partial_v2(double* partial, const float* g, long n) {
    long n4 = n / 4;
    double s = 0;
    for (long j = (long)blockIdx.x * blockDim.x + threadIdx.x; j < n4; j += (long)gridDim.x * blockDim.x) {
        float4 x = ((const float4*)g)[j];
        s += (double)(x.x * x.x + x.y * x.y) + (double)(x.z * x.z + x.w * x.w);
    }
    if (blockIdx.x == 0 && threadIdx.x < n % 4) {
        float x = g[n4 * 4 + threadIdx.x];
        s += (double)x * x;
    }
    double t = block_sum<256>(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = t;
}
__global__ void norm_squared_final_v2(float* out, const double* partial, int nblocks) {
    double s = 0;
    for (int b = threadIdx.x; b < nblocks; b += 256) s += partial[b];
    double t = block_sum<256>(s);
    if (threadIdx.x == 0) out[0] = (float)t;
}

const char* NAMES[] = {"", "one block", "grid + ordered partials (double)", "kernels/global_norm.cuh",
                       "kernels/global_norm.cuh, segments in one pass"};
const int NV = 4;

// version 4: segments of one buffer of n elements
void check_segments(Suite& S, long n, uint64_t& seed) {
    auto g = rand_floats(n, seed++, -0.01f, 0.01f);
    std::vector<gpu::NormSegment> segs;
    if (n < 64) segs = {{0, (size_t)n}};
    else segs = {{0, (size_t)n}, {1, 5}, {7, (size_t)n / 3 + 1}, {(size_t)n / 2 + 2, 0}, {(size_t)n / 2 + 3, (size_t)n / 2 - 6},
                 {(size_t)n - 3, 3}};
    gpu::NormSegments ns;
    gpu::norm_make_segments(&ns, segs);
    Dev<float> dG(g);
    Dev<double> dSq(segs.size()), partial(gpu::NORM_BLOCKS * segs.size());
    dSq.poison();
    partial.poison();
    auto run = [&] { gpu::global_norm_squared_multi(dSq.p, partial.p, dG.p, ns, (cudaStream_t)0); };
    run();
    std::vector<float> out, ref;
    for (size_t k = 0; k < segs.size(); k++) {
        double r = 0;
        for (size_t i = 0; i < segs[k].n; i++) r += (double)g[segs[k].begin + i] * g[segs[k].begin + i];
        ref.push_back((float)std::sqrt(r));
        out.push_back((float)std::sqrt(dSq.host()[k]));
    }
    char what[64];
    snprintf(what, sizeof what, "%zu segments' norms", segs.size());
    S.check_close(what, out, ref, TOL_FP32);
    auto first = dSq.host();
    run();
    S.check_equal("bit-identical on rerun", dSq.host(), first);
    if (n == 300L * 1000 * 1000) S.bench("300M gradients", run, 4.0 * n);
    ns.release();
}

int main(int argc, char** argv) {
    Suite S("global_norm", argc, argv);
    int sms = 0;
    cudaCheck(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const int nb2 = sms * 4;
    // 1: a single element; 300M: about the MoE d768 benchmark model's parameter count
    const long sizes[] = {1, 3, 1027, 1L << 22, 300L * 1000 * 1000};
    for (int v = 1; v <= NV; v++) {
        if (!S.want(v)) continue;
        S.begin(v, NAMES[v]);
        uint64_t seed = 3 * v;
        for (long n : sizes) {
            if (EMULATED && n == 300L * 1000 * 1000) continue;  // there to be timed
            printf("  n %ld\n", n);
            if (v == 4) {
                check_segments(S, n, seed);
                continue;
            }
            auto g = rand_floats(n, seed++, -0.01f, 0.01f);
            double ref = global_norm_cpu(g);
            if (v == 3) {  // production: double result, sqrt on the host (GPUModel::step)
                Dev<float> dG(g);
                Dev<double> dSq(1), partial(gpu::NORM_BLOCKS);
                auto run = [&] { gpu::global_norm_squared(dSq.p, partial.p, dG.p, (size_t)n, (cudaStream_t)0); };
                dSq.poison();
                partial.poison();
                run();
                double sq = dSq.host()[0];
                S.check_close("norm", {(float)std::sqrt(sq)}, {(float)ref}, TOL_FP32);
                run();
                S.check_equal("bit-identical on rerun", dSq.host(), std::vector<double>{sq});
                if (n == 300L * 1000 * 1000) S.bench("300M gradients", run, 4.0 * n);
                continue;
            }
            Dev<float> dG(g), dOut(1);
            Dev<double> partial(nb2);
            auto run = [&] {
                if (v == 1) norm_squared_v1<<<1, 1024>>>(dOut.p, dG.p, n);
                else {
                    norm_squared_partial_v2<<<nb2, 256>>>(partial.p, dG.p, n);
                    launchCheck();
                    norm_squared_final_v2<<<1, 256>>>(dOut.p, partial.p, nb2);
                }
                launchCheck();
            };
            dOut.poison();
            run();
            float sq = dOut.host()[0];
            S.check_close("norm", {std::sqrt(sq)}, {(float)ref}, TOL_FP32);
            run();
            S.check_equal("bit-identical on rerun", dOut.host(), std::vector<float>{sq});
            if (n == 300L * 1000 * 1000) S.bench("300M gradients", run, 4.0 * n);
        }
    }
    return S.finish();
}
