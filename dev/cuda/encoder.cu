/*
Token embedding (encoder) forward and backward, fp32.
  forward:  out[n, :] = wte[token[n], :]
  backward: dwte[token[n], :] += dout[n, :]   for n = 0..N-1 in order   (accumulates)
CPU reference: encoder_forward / encoder_backward of train_moe.cpp.
The backward is a scatter-add with collisions (a token repeats in a batch). Atomics would
make the result depend on timing; every version here adds the rows of one token in
increasing n, the CPU's order, so it is deterministic and in fact bit-identical to the CPU.

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/encoder.cu -o build/encoder -lcublas -lcublasLt -lgomp && ./build/encoder [version]

Version 3 is the production kernel, kernels/encoder.cuh (gpu::encoder_forward /
gpu::build_encoder_buckets + gpu::encoder_backward, T = float), called as train_moe.cu
does. Its backward sums a token's rows from 0 and adds the sum to dwte once
(dwte += (d1 + d2 + ...)), while the CPU adds them one by one ((dwte + d1) + d2 ...): a
different association, so its backward is checked with the fp32 tolerance, not exactly.
Version 4 is the same header with T = bf16 (wte, out and dout bf16, dwte fp32): forward
exact against the CPU on bf16-rounded wte, backward (fp32 sums of bf16-rounded dout)
with the fp32 tolerance.
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/encoder.cuh"

// ----------------------------------------------------------------------------
// version 1: forward one thread per element; backward one thread per column i walking all
// N tokens in order. Obviously right and deterministic, but only d threads do the backward.

__global__ void encoder_forward_v1(float* out, const int* tokens, const float* wte, int N, int d) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)N * d) return;
    int n = idx / d, i = idx % d;
    out[idx] = wte[(size_t)tokens[n] * d + i];
}
__global__ void encoder_backward_v1(float* dwte, const float* dout, const int* tokens, int N, int d) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= d) return;
    for (int n = 0; n < N; n++) dwte[(size_t)tokens[n] * d + i] += dout[(size_t)n * d + i];
}

// ----------------------------------------------------------------------------
// version 2: forward with 16-byte loads and stores (d % 4 == 0, else falls back to v1).
// Backward: the host (which holds the tokens anyway) buckets positions by token, stably
// (CSR: bucket b has token bucket_tok[b] and positions pos[off[b]..off[b+1]) in increasing
// n); one block per distinct token, threads over columns. Every (token, column) is owned by
// one thread: no collisions, N*d independent adds spread over all SMs.

__global__ void encoder_forward_v2(float4* out, const int* tokens, const float4* wte, int N, int d4) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)N * d4) return;
    int n = idx / d4, i = idx % d4;
    out[idx] = wte[(size_t)tokens[n] * d4 + i];
}
__global__ void encoder_backward_v2(float* dwte, const float* dout, const int* bucket_tok, const int* off,
                                    const int* pos, int d) {
    int b = blockIdx.x;
    float* row = dwte + (size_t)bucket_tok[b] * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = row[i];  // same association as the CPU's repeated +=: bit-identical
        for (int j = off[b]; j < off[b + 1]; j++) acc += dout[(size_t)pos[j] * d + i];
        row[i] = acc;
    }
}
// host side of v2: stable bucketing of positions by token
struct Buckets {
    std::vector<int> tok, off, pos;
};
Buckets bucket_tokens(const std::vector<int>& tokens, int V) {
    std::vector<int> count(V, 0);
    for (int t : tokens) count[t]++;
    Buckets b;
    std::vector<int> start(V, 0);
    int acc = 0;
    for (int v = 0; v < V; v++)
        if (count[v]) { b.tok.push_back(v); b.off.push_back(acc); start[v] = acc; acc += count[v]; }
    b.off.push_back(acc);
    b.pos.resize(tokens.size());
    for (size_t n = 0; n < tokens.size(); n++) b.pos[start[tokens[n]]++] = (int)n;
    return b;
}

const char* NAMES[] = {"", "thread/element fwd, thread/column bwd", "float4 fwd, bucketed bwd",
                       "kernels/encoder.cuh (fp32)", "kernels/encoder.cuh (bf16)"};
const int NV = 4;

// versions 3 and 4: kernels/encoder.cuh, called as train_moe.cu calls it (buckets built on
// the host by gpu::build_encoder_buckets, uploaded, then gpu::encoder_backward with the
// number of buckets). For bf16 the CPU reference is recomputed on bf16-rounded wte and dout.
template <typename T>
void to_dev_vec(std::vector<T>& o, const std::vector<float>& v);
template <> void to_dev_vec<float>(std::vector<float>& o, const std::vector<float>& v) { o = v; }
template <> void to_dev_vec<gpu::bf16>(std::vector<gpu::bf16>& o, const std::vector<float>& v) { o = to_bf16(v); }
template <typename T>
std::vector<float> to_host_f(const Dev<T>& d);
template <> std::vector<float> to_host_f<float>(const Dev<float>& d) { return d.host(); }
template <> std::vector<float> to_host_f<gpu::bf16>(const Dev<gpu::bf16>& d) { return from_bf16(d.host()); }

template <typename T>
void check_production(Suite& S, const std::vector<int>& tokens, std::vector<float> wte, std::vector<float> dout,
                      const std::vector<float>& dwte0, std::vector<float> out, std::vector<float> dwte, int N, int d,
                      int V) {
    const bool is_bf16 = sizeof(T) == 2;
    if (is_bf16) {  // the reference on the inputs the kernel sees
        wte = round_bf16(wte);
        dout = round_bf16(dout);
        dwte = dwte0;
        encoder_forward(out.data(), tokens.data(), wte.data(), N, d);
        encoder_backward(dwte.data(), dout.data(), tokens.data(), N, d);
    }
    std::vector<T> hWte, hDout;
    to_dev_vec<T>(hWte, wte);
    to_dev_vec<T>(hDout, dout);
    Dev<int> dTok(tokens);
    Dev<T> dWte(hWte), dDout(hDout), dOut((size_t)N * d);
    Dev<float> dDwte(dwte0);
    gpu::EncoderBuckets bk;
    gpu::build_encoder_buckets(&bk, tokens.data(), N, V);
    Dev<int> dBt(bk.token), dBs(bk.start), dBp(bk.positions);
    const int nb = (int)bk.token.size();
    Dev<int> dNb(std::vector<int>{nb});  // the count is read on the device; the grid is min(N, V) blocks
    auto fwd = [&] { gpu::encoder_forward(dOut.p, dTok.p, (const T*)dWte.p, N, d, (cudaStream_t)0); };
    auto bwd = [&] { gpu::encoder_backward(dDwte.p, (const T*)dDout.p, dBt.p, dBs.p, dBp.p, dNb.p, std::min(N, V), d, (cudaStream_t)0); };
    dOut.poison();
    fwd();
    S.check_equal("forward out (a copy: exact)", to_host_f(dOut), out);
    bwd();
    S.check_close("backward dwte (+=)", dDwte.host(), dwte, TOL_FP32);
    if (N == 4096) {
        S.bench("forward", fwd, 2.0 * N * d * sizeof(T));
        S.bench("backward (excl. host bucketing)", bwd, (double)N * d * sizeof(T) + 2.0 * N * d * 4);
    }
}

int main(int argc, char** argv) {
    Suite S("encoder", argc, argv);
    struct Size { int N, d, V; };
    // {.., V = 3}: every token repeats many times; d 6: not a multiple of 4 (v2 fallback)
    const Size sizes[] = {{5, 6, 3}, {300, 64, 3}, {1024, 256, 1000}, {4096, 768, 16384}};
    for (int v = 1; v <= NV; v++) {
        if (!S.want(v)) continue;
        S.begin(v, NAMES[v]);
        uint64_t seed = 100 * v;
        for (auto sz : sizes) {
            int N = sz.N, d = sz.d, V = sz.V;
            printf("  N %d d %d V %d\n", N, d, V);
            auto tokens = rand_ints(N, V, seed++);
            auto wte = rand_floats((size_t)V * d, seed++), dout = rand_floats((size_t)N * d, seed++);
            auto dwte0 = rand_floats((size_t)V * d, seed++);
            std::vector<float> out((size_t)N * d), dwte = dwte0;
            encoder_forward(out.data(), tokens.data(), wte.data(), N, d);
            encoder_backward(dwte.data(), dout.data(), tokens.data(), N, d);

            if (v >= 3) {  // production
                if (v == 3) check_production<float>(S, tokens, wte, dout, dwte0, out, dwte, N, d, V);
                else check_production<gpu::bf16>(S, tokens, wte, dout, dwte0, out, dwte, N, d, V);
                continue;
            }
            Dev<int> dTok(tokens);
            Dev<float> dWte(wte), dDout(dout), dOut((size_t)N * d), dDwte(dwte0);
            Buckets bk = bucket_tokens(tokens, V);
            Dev<int> dBt(bk.tok), dBo(bk.off), dBp(bk.pos);
            auto fwd = [&] {
                if (v == 1 || d % 4) encoder_forward_v1<<<ceil_div((long)N * d, 256), 256>>>(dOut.p, dTok.p, dWte.p, N, d);
                else encoder_forward_v2<<<ceil_div((long)N * d / 4, 256), 256>>>((float4*)dOut.p, dTok.p,
                                                                                  (const float4*)dWte.p, N, d / 4);
                launchCheck();
            };
            auto bwd = [&] {
                if (v == 1) encoder_backward_v1<<<ceil_div(d, 128), 128>>>(dDwte.p, dDout.p, dTok.p, N, d);
                else encoder_backward_v2<<<(int)bk.tok.size(), 256>>>(dDwte.p, dDout.p, dBt.p, dBo.p, dBp.p, d);
                launchCheck();
            };
            dOut.poison();
            fwd();
            S.check_equal("forward out (a copy: exact)", dOut.host(), out);
            bwd();
            S.check_equal("backward dwte (+=, exact)", dDwte.host(), dwte);
            if (N == 4096) {
                S.bench("forward", fwd, 2.0 * N * d * 4);
                S.bench("backward (excl. host bucketing)", bwd, 3.0 * N * d * 4);
            }
        }
    }
    return S.finish();
}
