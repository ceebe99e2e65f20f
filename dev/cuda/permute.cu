/*
Dropless MoE permutation, fp32: group the N*K (token, slot) assignments by expert, gather
the tokens' rows in that order, and combine the experts' outputs back; and the backward.
  sort:      counts[E], seq_counts[B,E], offsets[E+1], row_token[NK], row_of[NK]: a STABLE
             counting sort of the pairs p = n*K + k by expert topk[p] (pairs of one expert keep
             increasing p), so the layout, and every sum that follows it, is deterministic
  gather:    xe[r, :] = x[row_token[r], :]
  combine:   out[n, :] = sum_k topw[n,k] ey[row_of[n,k], :]   (slots summed in order)
  backward:  dtopw[n,k] = dout[n] . ey[row_of[n,k]];  dey[row_of[n,k]] = topw[n,k] dout[n]
             dx[n, :] += sum_k dxe[row_of[n,k], :]           (slots in order)
CPU reference: moe_permute, moe_gather_forward / _backward and moe_combine_forward /
_backward of train_moe.cpp (permute_reference below calls them). Every case includes an
expert that receives no token (its block of rows is empty: offsets[e] == offsets[e+1]).

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/permute.cu -o build/permute -lcublas -lcublasLt -lgomp && ./build/permute [version]

Versions 3 (T = float) and 4 (T = bf16) are the production kernels, kernels/permute.cuh
(gpu::moe_permute, moe_gather, moe_combine_forward, moe_combine_backward,
moe_unpermute_backward), called as train_moe.cu's moe_forward / moe_backward do. One
semantic difference from versions 1-2: gpu::moe_unpermute_backward WRITES dx (train_moe.cu
then lets router_backward_matmul add the router's part into the same buffer), so its
reference starts from 0 and dx is poisoned. topw, dtopw stay fp32 in both; bf16: x, ey,
dout, dxe bf16 (the reference on their bf16 roundings), gather exact, combine / dey /
un-permute at TOL_BF16, dtopw (fp32 sums) at TOL_FP32.

dtopw is a d-long dot product (768 terms of both signs): its reference is accumulated in
double (dtopw_reference), and its elementwise atol is 1e-5 x rms(dtopw) (sum_tol in
common.h): against train_moe.cpp's fp32 dot and a flat atol 1e-5, v1's correct sequential
dot reached 0.8 of the bound at d 768 (an element near 0 after partial sums of ~10), too
close for a GPU, which rounds differently again. The check is tested on every run: the
kernel's dtopw without the last term of the dot (a loop bound off by one) must fail it.
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/permute.cuh"

// ----------------------------------------------------------------------------
// dtopw[n,k] = dout[n] . ey[row_of[n,k]] in double (the dot of train_moe.cpp, more exactly)
std::vector<float> dtopw_reference(const std::vector<float>& dout, const std::vector<float>& ey,
                                   const std::vector<int>& row_of, int N, int K, int d) {
    std::vector<float> r((size_t)N * K);
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            double s = 0;
            for (int i = 0; i < d; i++)
                s += (double)dout[(size_t)n * d + i] * ey[(size_t)row_of[n * K + k] * d + i];
            r[(size_t)n * K + k] = (float)s;
        }
    return r;
}
// dtopw's check, and its test: the kernel's dtopw without the dot's last term must fail it
void check_dtopw(Suite& S, const std::vector<float>& got, const std::vector<float>& ref, const std::vector<float>& dout,
                 const std::vector<float>& ey, const std::vector<int>& row_of, int N, int K, int d) {
    const Tol tol = sum_tol(ref);
    S.check_close("dtopw", got, ref, tol);
    std::vector<float> bad = got;
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++)
            bad[(size_t)n * K + k] -= dout[(size_t)n * d + d - 1] * ey[(size_t)row_of[n * K + k] * d + d - 1];
    S.check_catches("dtopw without the dot's last term", Suite::compare_close(got, ref, tol),
                    Suite::compare_close(bad, ref, tol));
}

// ----------------------------------------------------------------------------
// CPU reference: train_moe.cpp's MoE permutation functions
struct Perm {
    std::vector<int> counts, seq_counts, offsets, row_token, row_of;
};
Perm sort_cpu(const std::vector<int>& topk, int B, int T, int E, int K) {
    const size_t NK = (size_t)B * T * K;
    Perm a;
    a.counts.resize(E);
    a.seq_counts.resize((size_t)B * E);
    a.offsets.resize(E + 1);
    a.row_token.resize(NK);
    a.row_of.resize(NK);
    moe_permute(a.counts.data(), a.seq_counts.data(), a.offsets.data(), a.row_token.data(), a.row_of.data(), topk.data(),
                B, T, E, K);
    return a;
}
// gather, combine and their backward on the layout `ref`; dx starts from dx0 (+=), dtopw
// in double (see the top)
struct PermOut {
    std::vector<float> xe, out, dtopw, dey, dx;
};
PermOut permute_reference(const Perm& ref, const std::vector<float>& x, const std::vector<float>& ey,
                          const std::vector<float>& topw, const std::vector<float>& dout, const std::vector<float>& dxe,
                          const std::vector<float>& dx0, int N, int K, int d) {
    const int NK = N * K;
    PermOut r;
    r.xe.resize((size_t)NK * d);
    r.out.resize((size_t)N * d);
    r.dtopw.resize(NK);
    r.dey.resize((size_t)NK * d);
    r.dx = dx0;
    moe_gather_forward(r.xe.data(), x.data(), ref.row_token.data(), NK, d);
    moe_combine_forward(r.out.data(), ey.data(), topw.data(), ref.row_of.data(), N, K, d);
    moe_combine_backward(r.dey.data(), r.dtopw.data(), dout.data(), ey.data(), topw.data(), ref.row_of.data(), N, K, d);
    moe_gather_backward(r.dx.data(), dxe.data(), ref.row_of.data(), N, K, d);
    r.dtopw = dtopw_reference(dout, ey, ref.row_of, N, K, d);
    return r;
}

// The sort's five outputs against the reference; then the reference layout goes to the
// device, so that what follows the sort is checked on its own
void check_sort(Suite& S, Dev<int>& counts, Dev<int>& seq_counts, Dev<int>& offsets, Dev<int>& row_token,
                Dev<int>& row_of, const Perm& ref) {
    S.check_equal("counts", counts.host(), ref.counts);
    S.check_equal("seq_counts", seq_counts.host(), ref.seq_counts);
    S.check_equal("offsets", offsets.host(), ref.offsets);
    S.check_equal("row_token (stable order)", row_token.host(), ref.row_token);
    S.check_equal("row_of", row_of.host(), ref.row_of);
    row_token.upload(ref.row_token);
    row_of.upload(ref.row_of);
}

// ----------------------------------------------------------------------------
// version 1: the sort in ONE thread (the CPU code on the device: obviously the same
// permutation), then one thread per element for gather / combine / their backward.
__global__ void sort_v1(int* counts, int* seq_counts, int* offsets, int* row_token, int* row_of, int* fill,
                        const int* topk, int B, int T, int E, int K) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    int N = B * T;
    for (int e = 0; e < E; e++) counts[e] = 0;
    for (int i = 0; i < B * E; i++) seq_counts[i] = 0;
    for (int p = 0; p < N * K; p++) {
        counts[topk[p]]++;
        seq_counts[(p / K / T) * E + topk[p]]++;
    }
    offsets[0] = 0;
    for (int e = 0; e < E; e++) { offsets[e + 1] = offsets[e] + counts[e]; fill[e] = offsets[e]; }
    for (int p = 0; p < N * K; p++) {
        int r = fill[topk[p]]++;
        row_token[r] = p / K;
        row_of[p] = r;
    }
}
__global__ void gather_v1(float* xe, const float* x, const int* row_token, int NK, int d) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)NK * d) return;
    int r = idx / d, i = idx % d;
    xe[idx] = x[(size_t)row_token[r] * d + i];
}
__global__ void combine_v1(float* out, const float* ey, const float* topw, const int* row_of, int N, int K, int d) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)N * d) return;
    int n = idx / d, i = idx % d;
    float o = 0;
    for (int k = 0; k < K; k++) o += topw[n * K + k] * ey[(size_t)row_of[n * K + k] * d + i];
    out[idx] = o;
}
// dtopw: one thread per (n, k) pair (a d-long dot product)
__global__ void uncombine_dtopw_v1(float* dtopw, const float* dout, const float* ey, const int* row_of, int NK, int K,
                                   int d) {
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= NK) return;
    const float* a = dout + (size_t)(p / K) * d;
    const float* b = ey + (size_t)row_of[p] * d;
    float s = 0;
    for (int i = 0; i < d; i++) s += a[i] * b[i];
    dtopw[p] = s;
}
__global__ void uncombine_dey_v1(float* dey, const float* dout, const float* topw, const int* row_of, int NK, int K,
                                 int d) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)NK * d) return;
    int p = idx / d, i = idx % d;
    dey[(size_t)row_of[p] * d + i] = topw[p] * dout[(size_t)(p / K) * d + i];
}
__global__ void unpermute_v1(float* dx, const float* dxe, const int* row_of, int N, int K, int d) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)N * d) return;
    int n = idx / d, i = idx % d;
    float acc = dx[idx];
    for (int k = 0; k < K; k++) acc += dxe[(size_t)row_of[n * K + k] * d + i];
    dx[idx] = acc;
}

// ----------------------------------------------------------------------------
// version 2: the sort in one block of SORT_THREADS threads instead of one thread. Thread t
// owns a contiguous chunk of pairs; it counts its chunk per expert (shared hist[e][t]), a
// scan over t per expert gives each thread its first row inside each expert's block, and
// a second walk over the chunk writes the rows. Chunks are in pair order and each walk is
// in order, so the result equals v1's stable sort exactly. dtopw: one warp per pair
// (coalesced dot products). Gather / combine / unpermute stay as in v1.
constexpr int SORT_THREADS = 128;
__global__ void sort_v2(int* counts, int* seq_counts, int* offsets, int* row_token, int* row_of, const int* topk,
                        int B, int T, int E, int K) {
    extern __shared__ int hist[];  // [E][SORT_THREADS], then offsets [E + 1]
    int* off = hist + E * SORT_THREADS;
    int t = threadIdx.x, NK = B * T * K;
    int chunk = (NK + SORT_THREADS - 1) / SORT_THREADS, p0 = min(NK, t * chunk), p1 = min(NK, p0 + chunk);
    for (int e = 0; e < E; e++) hist[e * SORT_THREADS + t] = 0;
    for (int p = p0; p < p1; p++) hist[topk[p] * SORT_THREADS + t]++;
    __syncthreads();
    for (int e = t; e < E; e += SORT_THREADS) {  // exclusive scan over threads, per expert
        int acc = 0;
        for (int j = 0; j < SORT_THREADS; j++) { int c = hist[e * SORT_THREADS + j]; hist[e * SORT_THREADS + j] = acc; acc += c; }
        counts[e] = acc;
        off[e] = acc;  // the count, for now
    }
    __syncthreads();
    if (t == 0) {
        int acc = 0;
        for (int e = 0; e < E; e++) { int c = off[e]; off[e] = acc; offsets[e] = acc; acc += c; }
        off[E] = acc;
        offsets[E] = acc;
    }
    __syncthreads();
    for (int p = p0; p < p1; p++) {
        int e = topk[p];
        int r = off[e] + hist[e * SORT_THREADS + t]++;
        row_token[r] = p / K;
        row_of[p] = r;
    }
    for (int i = t; i < B * E; i += SORT_THREADS) {  // per-sequence counts: one thread per (b, e)
        int b = i / E, e = i % E, c = 0;
        for (int p = b * T * K; p < (b + 1) * T * K; p++) c += topk[p] == e;
        seq_counts[i] = c;
    }
}
__global__ void uncombine_dtopw_v2(float* dtopw, const float* dout, const float* ey, const int* row_of, int NK, int K,
                                   int d) {
    int p = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (p >= NK) return;
    const float* a = dout + (size_t)(p / K) * d;
    const float* b = ey + (size_t)row_of[p] * d;
    float s = 0;
    for (int i = lane; i < d; i += 32) s += a[i] * b[i];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    if (lane == 0) dtopw[p] = s;
}

const char* NAMES[] = {"", "single-thread sort, thread/element", "one-block parallel stable sort, warp dots",
                       "kernels/permute.cuh (fp32)", "kernels/permute.cuh (bf16)"};
const int NV = 4;

// versions 3 and 4: the production kernels, as train_moe.cu calls them
template <typename T>
void check_production(Suite& S, const std::vector<int>& topk, const std::vector<float>& topw, const Perm& ref,
                      std::vector<float> x, std::vector<float> ey, std::vector<float> dout, std::vector<float> dxe,
                      int B, int T_, int E, int K, int d) {
    const bool is_bf16 = sizeof(T) == 2;
    const Tol tol = is_bf16 ? TOL_BF16 : TOL_FP32;
    const int N = B * T_, NK = N * K;
    if (is_bf16) { x = round_bf16(x); ey = round_bf16(ey); dout = round_bf16(dout); dxe = round_bf16(dxe); }
    // CPU, as in versions 1-2, except dx starts at 0 (written)
    PermOut cpu = permute_reference(ref, x, ey, topw, dout, dxe, std::vector<float>((size_t)N * d, 0.0f), N, K, d);
    const std::vector<float>&xe = cpu.xe, &out = cpu.out, &dtopw = cpu.dtopw, &dey = cpu.dey, &dx = cpu.dx;

    Dev<int> dTopk(topk), dCounts(E), dSeq((size_t)B * E), dOff(E + 1), dRt(NK), dRo(NK);
    Dev<T> dX(to_t<T>(x)), dXe((size_t)NK * d), dEy(to_t<T>(ey)), dOut((size_t)N * d), dDout(to_t<T>(dout)),
        dDey((size_t)NK * d), dDxe(to_t<T>(dxe)), dDx((size_t)N * d);
    Dev<float> dW(topw), dDtw(NK);
    cudaStream_t st = 0;
    auto sort = [&] { gpu::moe_permute(dSeq.p, dCounts.p, dOff.p, dRt.p, dRo.p, dTopk.p, B, T_, E, K, st); };
    dCounts.poison(); dSeq.poison(); dOff.poison(); dRt.poison(); dRo.poison();
    sort();
    check_sort(S, dCounts, dSeq, dOff, dRt, dRo, ref);
    auto gather = [&] { gpu::moe_gather(dXe.p, (const T*)dX.p, dRt.p, NK, d, st); };
    auto combine = [&] { gpu::moe_combine_forward(dOut.p, (const T*)dEy.p, dW.p, dRo.p, N, K, d, st); };
    auto uncombine = [&] {
        gpu::moe_combine_backward(dDey.p, dDtw.p, (const T*)dDout.p, (const T*)dEy.p, dW.p, dRo.p, N, K, d, st);
    };
    auto unpermute = [&] { gpu::moe_unpermute_backward(dDx.p, (const T*)dDxe.p, dRo.p, N, K, d, st); };
    dXe.poison(); dOut.poison(); dDtw.poison(); dDey.poison(); dDx.poison();
    gather();
    S.check_equal("gather xe (exact)", host_f(dXe), xe);
    combine();
    S.check_close("combine out", host_f(dOut), out, tol);
    uncombine();
    check_dtopw(S, dDtw.host(), dtopw, dout, ey, ref.row_of, N, K, d);
    S.check_close("dey", host_f(dDey), dey, tol);
    unpermute();
    S.check_close("un-permute dx (written)", host_f(dDx), dx, tol);
    if (N == 4096) {
        const double es = sizeof(T);
        S.bench("sort (moe_permute)", sort, 4.0 * NK * 3);
        S.bench("gather", gather, 2.0 * es * NK * d);
        S.bench("combine", combine, es * (NK + N) * d);
        S.bench("un-combine (dtopw, dey)", uncombine, es * (2 * NK + N) * d);
        S.bench("un-permute", unpermute, es * (NK + N) * d);
    }
}

int main(int argc, char** argv) {
    Suite S("permute", argc, argv);
    struct Case { int B, T, E, K, d; };
    const Case cases[] = {{1, 7, 4, 2, 8}, {2, 50, 8, 1, 36}, {3, 100, 64, 6, 64}, {4, 1024, 8, 2, 768}};
    for (int v = 1; v <= NV; v++) {
        if (!S.want(v)) continue;
        S.begin(v, NAMES[v]);
        uint64_t seed = 41 * v;
        for (auto c : cases) {
            int B = c.B, T = c.T, N = B * T, E = c.E, K = c.K, d = c.d, NK = N * K;
            printf("  B %d T %d E %d K %d d %d (expert 1 gets no token)\n", B, T, E, K, d);
            // routing from the CPU router on random logits, expert 1 starved
            auto logits = rand_floats((size_t)N * E, seed++, -2, 2);
            for (int n = 0; n < N; n++) logits[(size_t)n * E + 1] = -30;
            std::vector<float> probs((size_t)N * E), topw((size_t)NK);
            std::vector<int> topk(NK);
            router_forward(probs.data(), topk.data(), topw.data(), logits.data(), nullptr, N, E, K, ROUTING_TOPK_SOFTMAX);
            Perm ref = sort_cpu(topk, B, T, E, K);
            auto x = rand_floats((size_t)N * d, seed++), ey = rand_floats((size_t)NK * d, seed++);
            auto dout = rand_floats((size_t)N * d, seed++), dxe = rand_floats((size_t)NK * d, seed++);
            auto dx0 = rand_floats((size_t)N * d, seed++);
            // CPU: gather, combine, un-combine, un-permute (train_moe.cpp)
            PermOut cpu = permute_reference(ref, x, ey, topw, dout, dxe, dx0, N, K, d);
            const std::vector<float>&xe = cpu.xe, &out = cpu.out, &dtopw = cpu.dtopw, &dey = cpu.dey, &dx = cpu.dx;

            if (v >= 3) {
                if (v == 3) check_production<float>(S, topk, topw, ref, x, ey, dout, dxe, B, T, E, K, d);
                else check_production<gpu::bf16>(S, topk, topw, ref, x, ey, dout, dxe, B, T, E, K, d);
                continue;
            }
            Dev<int> dTopk(topk), dCounts(E), dSeq((size_t)B * E), dOff(E + 1), dRt(NK), dRo(NK), dFill(E);
            Dev<float> dX(x), dXe((size_t)NK * d), dEy(ey), dW(topw), dOut((size_t)N * d), dDout(dout), dDtw(NK),
                dDey((size_t)NK * d), dDxe(dxe), dDx(dx0);
            size_t smem = ((size_t)E * SORT_THREADS + E + 1) * sizeof(int);
            auto sort = [&] {
                if (v == 1) sort_v1<<<1, 1>>>(dCounts.p, dSeq.p, dOff.p, dRt.p, dRo.p, dFill.p, dTopk.p, B, T, E, K);
                else sort_v2<<<1, SORT_THREADS, smem>>>(dCounts.p, dSeq.p, dOff.p, dRt.p, dRo.p, dTopk.p, B, T, E, K);
                launchCheck();
            };
            dCounts.poison(); dSeq.poison(); dOff.poison(); dRt.poison(); dRo.poison();
            sort();
            check_sort(S, dCounts, dSeq, dOff, dRt, dRo, ref);
            auto gather = [&] { gather_v1<<<ceil_div((long)NK * d, 256), 256>>>(dXe.p, dX.p, dRt.p, NK, d); launchCheck(); };
            auto combine = [&] { combine_v1<<<ceil_div((long)N * d, 256), 256>>>(dOut.p, dEy.p, dW.p, dRo.p, N, K, d); launchCheck(); };
            auto uncombine = [&] {
                if (v == 1) uncombine_dtopw_v1<<<ceil_div(NK, 128), 128>>>(dDtw.p, dDout.p, dEy.p, dRo.p, NK, K, d);
                else uncombine_dtopw_v2<<<ceil_div(NK, 8), 256>>>(dDtw.p, dDout.p, dEy.p, dRo.p, NK, K, d);
                launchCheck();
                uncombine_dey_v1<<<ceil_div((long)NK * d, 256), 256>>>(dDey.p, dDout.p, dW.p, dRo.p, NK, K, d);
                launchCheck();
            };
            auto unpermute = [&] { unpermute_v1<<<ceil_div((long)N * d, 256), 256>>>(dDx.p, dDxe.p, dRo.p, N, K, d); launchCheck(); };
            dXe.poison(); dOut.poison(); dDtw.poison(); dDey.poison();
            gather();
            S.check_equal("gather xe (exact)", dXe.host(), xe);
            combine();
            S.check_close("combine out", dOut.host(), out, TOL_FP32);
            uncombine();
            check_dtopw(S, dDtw.host(), dtopw, dout, ey, ref.row_of, N, K, d);
            S.check_close("dey", dDey.host(), dey, TOL_FP32);
            unpermute();
            S.check_close("un-permute dx (+=)", dDx.host(), dx, TOL_FP32);
            if (N == 4096) {
                S.bench("sort", sort, 4.0 * NK * 3);
                S.bench("gather", gather, 8.0 * NK * d);
                S.bench("combine", combine, 4.0 * (NK + N) * d);
                S.bench("un-combine (dtopw, dey)", uncombine, 4.0 * (2 * NK + N) * d);
                S.bench("un-permute", unpermute, 4.0 * (NK + 2 * N) * d);
            }
        }
    }
    return S.finish();
}
