/*
Fused classifier: softmax + cross-entropy + its gradient, over logits [N, V], fp32.
  lse[n]     = log sum_i exp(z[n,i])
  loss[n]    = lse[n] - z[n, target[n]]          (the mean over n is the CE loss)
  dlogits    = scale * (softmax(z) - onehot(target)),  scale = 1/N for the mean
dlogits may alias the logits (the trainer overwrites the logits in place, as llm.c does):
each version reads an element before it writes the same element, so both are tested.
CPU reference: crossentropy_forward / crossentropy_backward of train_moe.cpp.

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/classifier.cu -o build/classifier -lcublas -lcublasLt -lgomp && ./build/classifier [version]

Versions 3 (T = float) and 4 (T = bf16) are the production kernel, kernels/classifier.cuh
(gpu::crossentropy_forward_backward), called as train_moe.cu does: IN PLACE only (logits
are replaced by dlogits when dscale != 0, left alone when dscale == 0), per-row losses out,
no lse out. Checked: losses (poisoned first), mean loss, the device sum of the losses
(gpu::loss_sum, the trainer's CE sum), dlogits in place; with dscale 0,
losses and the logits bit-unchanged. bf16: the reference runs on the bf16-rounded logits,
dlogits at TOL_BF16, the losses (fp32 sums) at TOL_FP32.

Note on the dlogits tolerance (all versions): dlogits = scale (p - onehot) with
scale = 1/N; the -scale at each target dominates ||dl||, and every other element is
~scale / V, far below TOL.atol. So the standard check barely sees the softmax part. The
production versions add one check with atol scaled to the largest non-target |dl|, where
an error in p shows.
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/classifier.cuh"

// ----------------------------------------------------------------------------
// version 1: one thread per row, three passes over the row (max, sum, write). Rows are
// V*4 = 64 KB apart, so a warp's loads are 32 separate lines: slow, obviously right.
__global__ void classifier_v1(float* dlogits, float* lse, float* loss, const float* logits, const int* targets, int N,
                              int V, float scale) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* z = logits + (size_t)n * V;
    float mx = z[0];
    for (int i = 1; i < V; i++) mx = fmaxf(mx, z[i]);
    float s = 0;
    for (int i = 0; i < V; i++) s += expf(z[i] - mx);
    float l = mx + logf(s);
    float zt = z[targets[n]];  // read before the in-place writes below
    lse[n] = l;
    loss[n] = l - zt;
    float* dz = dlogits + (size_t)n * V;
    for (int i = 0; i < V; i++) dz[i] = scale * (expf(z[i] - l) - (i == targets[n] ? 1.0f : 0.0f));
}

// ----------------------------------------------------------------------------
// version 2: one block per row. Pass 1 computes max and sum together (online softmax: when
// the running max grows, the running sum is rescaled), float4 loads, each thread over a
// strided slice, then a block reduction of (max, sum) pairs. Pass 2 writes the gradient.
// Two reads and one write of the row instead of three reads; every load is coalesced.
struct MaxSum { float m, s; };
__device__ inline MaxSum ms_merge(MaxSum a, MaxSum b) {
    float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, 0.0f};
    return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}
__global__ void classifier_v2(float* dlogits, float* lse, float* loss, const float* logits, const int* targets, int N,
                              int V, float scale) {
    int n = blockIdx.x;
    const float* z = logits + (size_t)n * V;
    float* dz = dlogits + (size_t)n * V;
    int tgt = targets[n];
    float zt = z[tgt];
    MaxSum a = {-INFINITY, 0.0f};
    bool vec = V % 4 == 0;
    if (vec)
        for (int i = threadIdx.x; i < V / 4; i += blockDim.x) {
            float4 x = ((const float4*)z)[i];
            float m = fmaxf(fmaxf(x.x, x.y), fmaxf(x.z, x.w));
            a = ms_merge(a, {m, expf(x.x - m) + expf(x.y - m) + expf(x.z - m) + expf(x.w - m)});
        }
    else
        for (int i = threadIdx.x; i < V; i += blockDim.x) a = ms_merge(a, {z[i], 1.0f});
    // warp, then block reduction of (max, sum) in a fixed order
    for (int o = 16; o > 0; o >>= 1) {
        MaxSum b = {__shfl_xor_sync(0xffffffff, a.m, o), __shfl_xor_sync(0xffffffff, a.s, o)};
        a = ms_merge(a, b);
    }
    __shared__ MaxSum sh[32];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    if (lane == 0) sh[warp] = a;
    __syncthreads();  // also: every thread has read zt before anyone overwrites the row
    MaxSum t = sh[0];
    for (int w = 1; w < nw; w++) t = ms_merge(t, sh[w]);
    float l = t.m + logf(t.s);
    if (threadIdx.x == 0) { lse[n] = l; loss[n] = l - zt; }
    if (vec)
        for (int i = threadIdx.x; i < V / 4; i += blockDim.x) {
            float4 x = ((const float4*)z)[i], d;
            d.x = scale * expf(x.x - l); d.y = scale * expf(x.y - l);
            d.z = scale * expf(x.z - l); d.w = scale * expf(x.w - l);
            int b = 4 * i;  // the target's own element gets -scale
            if (tgt >= b && tgt < b + 4) (&d.x)[tgt - b] -= scale;
            ((float4*)dz)[i] = d;
        }
    else
        for (int i = threadIdx.x; i < V; i += blockDim.x) dz[i] = scale * expf(z[i] - l) - (i == tgt ? scale : 0.0f);
}

const char* NAMES[] = {"", "thread per row, 3 passes", "block per row, online max/sum, float4",
                       "kernels/classifier.cuh (fp32, in place)", "kernels/classifier.cuh (bf16, in place)"};
const int NV = 4;

// versions 3 and 4: the production kernel (in place), as train_moe.cu calls it
template <typename T>
void check_production(Suite& S, std::vector<float> logits, const std::vector<int>& targets, int N, int V) {
    const bool is_bf16 = sizeof(T) == 2;
    if (is_bf16) logits = round_bf16(logits);
    const Tol tol = is_bf16 ? TOL_BF16 : TOL_FP32;
    float scale = 1.0f / N;
    std::vector<float> lse(N), dl((size_t)N * V), row_loss(N);
    float ref_loss = crossentropy_forward(lse.data(), logits.data(), targets.data(), N, V);
    crossentropy_backward(dl.data(), logits.data(), lse.data(), targets.data(), N, V, scale);
    for (int n = 0; n < N; n++) row_loss[n] = lse[n] - logits[(size_t)n * V + targets[n]];
    if (is_bf16) dl = round_bf16(dl);  // the kernel stores bf16: compare with the representable value
    Dev<T> dZ(to_t<T>(logits));
    Dev<float> dLoss(N);
    Dev<int> dT(targets);
    // forward only (dscale 0, evaluation): losses, logits untouched
    dLoss.poison();
    gpu::crossentropy_forward_backward(dZ.p, dLoss.p, dT.p, N, V, 0.0f, (cudaStream_t)0);
    S.check_close("per-row loss (dscale 0)", dLoss.host(), row_loss, TOL_FP32);
    S.check_equal("logits untouched (dscale 0)", host_f(dZ), logits);
    // forward + backward in place
    dLoss.poison();
    gpu::crossentropy_forward_backward(dZ.p, dLoss.p, dT.p, N, V, scale, (cudaStream_t)0);
    auto gl = dLoss.host();
    S.check_close("per-row loss", gl, row_loss, TOL_FP32);
    double mean = 0;
    for (float x : gl) mean += x;
    S.check_close("mean loss", {(float)(mean / N)}, {ref_loss}, TOL_FP32);
    // the trainer's CE sum on the device (gpu::loss_sum, one block in double) vs the host's
    // double sum of the same row losses: equal to double rounding (a planted bug, the
    // stride loop starting at 1, fails it)
    Dev<double> dSum(1);
    dSum.poison();
    gpu::loss_sum(dSum.p, dLoss.p, N, (cudaStream_t)0);
    S.check_true("loss_sum (device double) vs host sum", std::fabs(dSum.host()[0] - mean) <= 1e-12 * std::fabs(mean) + 1e-300);
    auto gdl = host_f(dZ);
    S.check_close("dlogits (in place)", gdl, dl, tol);
    double pmax = 0;  // largest non-target |dl|
    for (int n = 0; n < N; n++)
        for (int i = 0; i < V; i++)
            if (i != targets[n]) pmax = std::max(pmax, (double)std::fabs(dl[(size_t)n * V + i]));
    Tol scaled = {tol.rel, tol.atol * pmax, tol.rtol};
    S.check_close("dlogits (atol x max softmax)", gdl, dl, scaled);
    if (N == 4096) {
        // in place: from the 2nd repeat on, the kernel reads the previous gradient as logits
        // (same work per element: one read, one exp, one write, so the same time)
        dZ.upload(to_t<T>(logits));
        S.bench("fused fwd+bwd (in place)",
                [&] { gpu::crossentropy_forward_backward(dZ.p, dLoss.p, dT.p, N, V, scale, (cudaStream_t)0); },
                2.0 * N * V * sizeof(T));
    }
}

int main(int argc, char** argv) {
    Suite S("classifier", argc, argv);
    struct Size { int N, V; };
    // emulated: 512 rows of the full vocabulary instead of 4096 (those are there to be timed)
    const Size sizes[] = {{1, 5}, {3, 1001}, {64, 16384}, {EMULATED ? 512 : 4096, 16384}};
    for (int v = 1; v <= NV; v++) {
        if (!S.want(v)) continue;
        S.begin(v, NAMES[v]);
        uint64_t seed = 11 * v;
        for (auto sz : sizes) {
            int N = sz.N, V = sz.V;
            printf("  N %d V %d\n", N, V);
            auto logits = rand_floats((size_t)N * V, seed++, -8, 8);
            auto targets = rand_ints(N, V, seed++);
            if (v >= 3) {
                if (v == 3) check_production<float>(S, logits, targets, N, V);
                else check_production<gpu::bf16>(S, logits, targets, N, V);
                continue;
            }
            float scale = 1.0f / N;
            std::vector<float> lse(N), dl((size_t)N * V);
            float ref_loss = crossentropy_forward(lse.data(), logits.data(), targets.data(), N, V);
            crossentropy_backward(dl.data(), logits.data(), lse.data(), targets.data(), N, V, scale);
            std::vector<float> row_loss(N);
            for (int n = 0; n < N; n++) row_loss[n] = lse[n] - logits[(size_t)n * V + targets[n]];

            Dev<float> dZ(logits), dDl((size_t)N * V), dLse(N), dLoss(N);
            Dev<int> dT(targets);
            auto run = [&](float* out) {
                if (v == 1) classifier_v1<<<ceil_div(N, 64), 64>>>(out, dLse.p, dLoss.p, dZ.p, dT.p, N, V, scale);
                else classifier_v2<<<N, 512>>>(out, dLse.p, dLoss.p, dZ.p, dT.p, N, V, scale);
                launchCheck();
            };
            dDl.poison(); dLse.poison(); dLoss.poison();
            run(dDl.p);
            S.check_close("dlogits", dDl.host(), dl, TOL_FP32);
            S.check_close("lse", dLse.host(), lse, TOL_FP32);
            auto gl = dLoss.host();
            S.check_close("per-row loss", gl, row_loss, TOL_FP32);
            double mean = 0;
            for (float x : gl) mean += x;
            S.check_close("mean loss", {(float)(mean / N)}, {ref_loss}, TOL_FP32);
            dLse.poison();
            run(dZ.p);  // in place, as the trainer runs it
            S.check_close("dlogits (in place)", dZ.host(), dl, TOL_FP32);
            if (N == 4096) {
                dZ.upload(logits);
                // out of place for timing: in place would feed the gradient back in as logits
                S.bench("fused fwd+bwd", [&] { run(dDl.p); }, 2.0 * N * V * 4);
            }
        }
    }
    return S.finish();
}
