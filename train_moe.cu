/*
train_moe.cu: the GPU trainer. Same model, command line, file formats, losses, routing,
schedules, evaluation, sampling, metrics and resume as the CPU reference trainer
(train_moe.cpp); read that file first: this one follows it layer by layer.

Precision: --dtype bf16 (default) keeps fp32 master weights, fp32 gradients and fp32 AdamW
moments, and a bf16 working copy of the weights (stochastically rounded after each step)
that every GEMM and kernel reads; activations are bf16, every sum is fp32 (the router and
the loss sums even more: see kernels/router.cuh). --dtype fp32 runs the same code with
float everywhere: it is what the tests hold to the reference tightly.

Memory, as in llm.c: parameters, gradients and the two moments are each one flat device
buffer with the ParamLayout offsets; all activations live in one block sized up front from
(B, T, config), MoE buffers for the dropless worst case of N*K rows; nothing is allocated
inside the step loop.

Determinism: no float atomics anywhere; every reduction has a fixed order; cuBLAS runs on
one stream with a fixed workspace. So a resumed run reproduces the uninterrupted one bit
for bit on the same GPU.

One GPU. Data-parallel training would all-reduce the gradient buffer right before the
global norm in GPUModel::step (marked there).

Status: compiled, never run on a GPU (see docs/gpu-log.md).
*/
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include "common/cli.h"
#include "common/dataloader.h"
#include "common/json.h"
#include "common/metrics.h"
#include "common/model.h"
#include "common/router_losses.h"
#include "common/rng.h"
#include "common/run.h"
#include "common/safetensors.h"
#include "common/schedule.h"
#include "common/tokenizer.h"
#include "common/train_args.h"
#include "common/util.h"

#include "kernels/common.cuh"
#include "kernels/adamw.cuh"
#include "kernels/attention.cuh"
#include "kernels/classifier.cuh"
#include "kernels/encoder.cuh"
#include "kernels/global_norm.cuh"
#include "kernels/matmul.cuh"
#include "kernels/permute.cuh"
#include "kernels/rmsnorm.cuh"
#include "kernels/rope.cuh"
#include "kernels/router.cuh"
#include "kernels/swiglu.cuh"

using gpu::bf16;

// ----------------------------------------------------------------------------
// Device memory helpers

// Carves typed arrays out of one allocation. Used twice: once with base = null to
// measure, then on the real block (the same sequence of take() calls).
struct Arena {
    char* base = nullptr;
    size_t used = 0;
    template <typename X>
    X* take(size_t n) {
        used = (used + 255) & ~(size_t)255;  // 256-byte alignment for every array
        X* p = base ? (X*)(base + used) : nullptr;
        used += n * sizeof(X);
        return p;
    }
};

template <typename X>
static void upload(X* dst, const X* src, size_t n, cudaStream_t s) {
    if (n == 0) return;
    cudaCheck(cudaMemcpyAsync(dst, src, n * sizeof(X), cudaMemcpyHostToDevice, s));
    cudaCheck(cudaStreamSynchronize(s));  // src may be a temporary
}
template <typename X>
static void download(X* dst, const X* src, size_t n, cudaStream_t s) {
    if (n == 0) return;
    cudaCheck(cudaMemcpyAsync(dst, src, n * sizeof(X), cudaMemcpyDeviceToHost, s));
    cudaCheck(cudaStreamSynchronize(s));
}
// device array of T (float or bf16) -> host floats
static std::vector<float> download_floats(const float* src, size_t n, cudaStream_t s) {
    std::vector<float> out(n);
    download(out.data(), src, n, s);
    return out;
}
static std::vector<float> download_floats(const bf16* src, size_t n, cudaStream_t s) {
    std::vector<uint16_t> raw(n);
    download(raw.data(), (const uint16_t*)src, n, s);
    std::vector<float> out(n);
    for (size_t i = 0; i < n; i++) out[i] = bf16_to_f32(raw[i]);
    return out;
}

// ----------------------------------------------------------------------------
// The model on the GPU. T is the element type of activations and of the weights' working
// copy: float (--dtype fp32) or bf16 (--dtype bf16).

template <typename T>
struct LayerActs {
    T *x, *ln1, *q, *k, *v, *atty, *x_mid, *ln2;  // [N, d] / [N, H*hd] / [N, Hkv*hd]
    float *rstd1, *rstd2, *att_lse;              // [N], [N], [B, H, T]
    T *gu, *a;                                   // dense FFN: [N, 2F] gate|up, [N, F] silu(gate)*up
    // MoE
    float *rlogits, *probs, *rlse, *topw;        // [N, E], [N, E], [N], [N, K]
    int *topk, *seq_counts, *counts, *offsets;   // [N, K], [B, E], [E], [E+1]
    int *row_token, *row_of;                     // [N*K], [N*K]
    T *xe, *egu, *ea, *ey;                       // [N*K, d], [N*K, 2F], [N*K, F], [N*K, d]
    double *psum, *zsum;                         // [B, E], [B]: sums for the router losses
    // host copies, read after each forward
    gpu::ExpertBlocks eb;
    std::vector<int> h_seq_counts;
    std::vector<double> h_psum, h_zsum;
};

template <typename T>
struct GPUModel {
    ModelConfig cfg;
    ParamLayout lay;
    TrainSettings ts;
    std::vector<std::vector<float>> expert_bias;  // [L][E] aux-loss-free balancing (host master)
    std::vector<std::vector<long>> step_load;     // [L][E] assignments since the last optimizer step
    long adam_t = 0;
    uint64_t seed = 0;           // stochastic rounding key
    bool stochastic_round = true;

    cudaStream_t stream = nullptr;
    cublasHandle_t blas = nullptr;
    void* blas_workspace = nullptr;

    // flat parameter buffers (fp32) and the working copy (== params when T is float)
    float *params = nullptr, *grads = nullptr, *m = nullptr, *v = nullptr;
    T* wcopy = nullptr;
    float* d_bias = nullptr;  // [L*E]

    // activations, sized by alloc()
    int B_max = 0, T_max = 0, B = 0, T_ = 0;
    char* act_block = nullptr;
    size_t act_bytes = 0;
    std::vector<LayerActs<T>> la;
    T *x_final, *lnf, *logits, *tmp;
    float *rstdf, *losses, *rope_cos, *rope_sin;
    int *inputs, *targets, *bk_token, *bk_start, *bk_pos;
    // backward scratch, shared by all layers
    T *dres, *dln, *dq, *dk, *dv, *datty, *dgu, *da, *dey, *dxe;
    float *dtopw, *drl, *att_D, *aux_g, *red_scratch;
    double *norm_partial, *norm_out;
    size_t max_rows_ffn = 0;  // N (dense) or N*K (MoE)

    // the last forward pass
    bool have_targets = false;
    float grad_scale = 0;
    std::vector<int> h_inputs, h_targets;
    gpu::EncoderBuckets buckets;
    Losses last;

    ~GPUModel() {
        if (act_block) cudaFree(act_block);
        if (params) cudaFree(params);
        if (grads) cudaFree(grads);
        if (m) cudaFree(m);
        if (v) cudaFree(v);
        if (wcopy && (void*)wcopy != (void*)params) cudaFree(wcopy);
        if (d_bias) cudaFree(d_bias);
        if (blas_workspace) cudaFree(blas_workspace);
        if (blas) cublasDestroy(blas);
        if (stream) cudaStreamDestroy(stream);
    }

    static constexpr bool is_fp32() { return sizeof(T) == sizeof(float); }

    // ---- setup ----
    // Uploads host fp32 weights (from scratch, a checkpoint or a fixture) and makes the
    // device buffers. Called once per model.
    void setup(const ModelConfig& c, const std::vector<float>& host_params, const std::vector<std::vector<float>>& bias) {
        cfg = c;
        lay = build_layout(cfg);
        check_fused_layouts();
        cudaCheck(cudaStreamCreate(&stream));
        cublasCheck(cublasCreate(&blas));
        cublasCheck(cublasSetStream(blas, stream));
        cublasCheck(cublasSetMathMode(blas, CUBLAS_DEFAULT_MATH));  // no TF32 for fp32 inputs
        const size_t ws_bytes = 32u << 20;
        cudaCheck(cudaMalloc(&blas_workspace, ws_bytes));
        cublasCheck(cublasSetWorkspace(blas, blas_workspace, ws_bytes));
        size_t P = lay.total;
        cudaCheck(cudaMalloc(&params, P * sizeof(float)));
        cudaCheck(cudaMalloc(&grads, P * sizeof(float)));
        cudaCheck(cudaMalloc(&m, P * sizeof(float)));
        cudaCheck(cudaMalloc(&v, P * sizeof(float)));
        cudaCheck(cudaMemset(grads, 0, P * sizeof(float)));
        cudaCheck(cudaMemset(m, 0, P * sizeof(float)));
        cudaCheck(cudaMemset(v, 0, P * sizeof(float)));
        if (is_fp32()) wcopy = (T*)params;
        else cudaCheck(cudaMalloc(&wcopy, P * sizeof(T)));
        int LE = std::max(1, cfg.n_layer * std::max(cfg.n_experts, 1));
        cudaCheck(cudaMalloc(&d_bias, LE * sizeof(float)));
        expert_bias = bias;
        if (expert_bias.empty()) expert_bias.assign(cfg.n_layer, std::vector<float>(cfg.n_experts, 0.0f));
        step_load.assign(cfg.n_layer, std::vector<long>(cfg.n_experts, 0));
        upload_params(host_params);
        upload_bias();
    }
    // gate|up of each FFN must be one [2F, d] block (see kernels/swiglu.cuh)
    void check_fused_layouts() const {
        auto adjacent = [&](int a, int b) {
            const ParamTensor &ta = lay.tensors[a], &tb = lay.tensors[b];
            if (tb.offset != ta.offset + ta.numel) FAIL("internal: %s and %s are not adjacent", ta.name.c_str(), tb.name.c_str());
        };
        for (int l = 0; l < cfg.n_layer; l++) {
            if (!cfg.is_moe()) adjacent(lay.by_layer[l][P_GATE], lay.by_layer[l][P_UP]);
            else for (auto& id : lay.experts[l]) adjacent(id[0], id[1]);
        }
    }
    void upload_params(const std::vector<float>& host_params) {
        upload(params, host_params.data(), lay.total, stream);
        refresh_copy();
    }
    // the working copy from the master weights, keyed by the optimizer step (kernels/adamw.cuh)
    void refresh_copy() {
        if (!is_fp32()) gpu::weights_to_copy(wcopy, params, lay.total, seed, gpu::sr_stream((uint64_t)adam_t),
                                             stochastic_round, stream);
    }
    void upload_bias() {
        if (!cfg.is_moe()) return;
        std::vector<float> flat;
        for (auto& row : expert_bias) flat.insert(flat.end(), row.begin(), row.end());
        upload(d_bias, flat.data(), flat.size(), stream);
    }
    std::vector<float> download_params() const {
        std::vector<float> h(lay.total);
        download(h.data(), params, lay.total, stream);
        return h;
    }

    // weights: working copy (T), master (fp32), gradient (fp32)
    T* W(int layer, int kind) { return wcopy + lay.get(layer, kind).offset; }
    T* W(int idx) { return wcopy + lay.tensors[idx].offset; }
    float* Pm(int layer, int kind) { return params + lay.get(layer, kind).offset; }
    float* G(int layer, int kind) { return grads + lay.get(layer, kind).offset; }
    float* G(int idx) { return grads + lay.tensors[idx].offset; }

    // ---- activations: one block, carved twice (measure, then assign) ----
    void carve(Arena& A) {
        const size_t N = (size_t)B_max * T_max, d = cfg.d_model, F = cfg.ffn_dim, E = cfg.n_experts,
                     K = cfg.top_k, qd = cfg.q_dim(), kvd = cfg.kv_dim(), V = cfg.vocab_size;
        const size_t NK = cfg.is_moe() ? N * K : N;
        max_rows_ffn = NK;
        for (auto& a : la) {
            a.x = A.take<T>(N * d); a.ln1 = A.take<T>(N * d);
            a.q = A.take<T>(N * qd); a.k = A.take<T>(N * kvd); a.v = A.take<T>(N * kvd);
            a.atty = A.take<T>(N * qd); a.x_mid = A.take<T>(N * d); a.ln2 = A.take<T>(N * d);
            a.rstd1 = A.take<float>(N); a.rstd2 = A.take<float>(N);
            a.att_lse = A.take<float>((size_t)B_max * cfg.n_head * T_max);
            if (!cfg.is_moe()) {
                a.gu = A.take<T>(N * 2 * F); a.a = A.take<T>(N * F);
            } else {
                a.rlogits = A.take<float>(N * E); a.probs = A.take<float>(N * E); a.rlse = A.take<float>(N);
                a.topw = A.take<float>(N * K); a.topk = A.take<int>(N * K);
                a.seq_counts = A.take<int>((size_t)B_max * E); a.counts = A.take<int>(E); a.offsets = A.take<int>(E + 1);
                a.row_token = A.take<int>(NK); a.row_of = A.take<int>(NK);
                a.xe = A.take<T>(NK * d); a.egu = A.take<T>(NK * 2 * F); a.ea = A.take<T>(NK * F); a.ey = A.take<T>(NK * d);
                a.psum = A.take<double>((size_t)B_max * E); a.zsum = A.take<double>(B_max);
            }
        }
        x_final = A.take<T>(N * d); lnf = A.take<T>(N * d); logits = A.take<T>(N * V); tmp = A.take<T>(N * d);
        rstdf = A.take<float>(N); losses = A.take<float>(N);
        rope_cos = A.take<float>((size_t)T_max * cfg.head_dim / 2); rope_sin = A.take<float>((size_t)T_max * cfg.head_dim / 2);
        inputs = A.take<int>(N); targets = A.take<int>(N);
        bk_token = A.take<int>(N); bk_start = A.take<int>(N + 1); bk_pos = A.take<int>(N);
        dres = A.take<T>(N * d); dln = A.take<T>(N * d);
        dq = A.take<T>(N * qd); dk = A.take<T>(N * kvd); dv = A.take<T>(N * kvd); datty = A.take<T>(N * qd);
        dgu = A.take<T>(NK * 2 * F); da = A.take<T>(NK * F); dey = A.take<T>(NK * d); dxe = A.take<T>(NK * d);
        dtopw = A.take<float>(N * std::max<size_t>(K, 1)); drl = A.take<float>(N * std::max<size_t>(E, 1));
        att_D = A.take<float>((size_t)B_max * cfg.n_head * T_max);
        aux_g = A.take<float>((size_t)B_max * std::max<size_t>(E, 1));
        size_t red = gpu::rmsnorm_scratch_floats((int)N, (int)d);
        if (cfg.is_moe()) red = std::max(red, gpu::router_scratch_floats((int)N, (int)E, (int)d));
        red_scratch = A.take<float>(red);
        norm_partial = A.take<double>(gpu::NORM_BLOCKS); norm_out = A.take<double>(1);
    }
    void alloc(int Bm, int Tm) {
        if (act_block) FAIL("internal: activations are allocated once");
        if (!gpu::attention_supports_head_dim(cfg.head_dim))
            FAIL("head_dim %d: the GPU attention kernels support 8, 16, 32, 64, 96 and 128", cfg.head_dim);
        B_max = Bm;
        T_max = Tm;
        la.assign(cfg.n_layer, LayerActs<T>());
        Arena measure;
        carve(measure);
        act_bytes = measure.used;
        cudaCheck(cudaMalloc(&act_block, act_bytes));
        Arena real;
        real.base = act_block;
        carve(real);
        for (auto& a : la) {
            a.h_seq_counts.assign((size_t)B_max * std::max(cfg.n_experts, 1), 0);
            a.h_psum.assign((size_t)B_max * std::max(cfg.n_experts, 1), 0);
            a.h_zsum.assign(B_max, 0);
            a.eb.counts.assign(cfg.n_experts, 0);
            a.eb.offsets.assign(cfg.n_experts + 1, 0);
        }
        // RoPE tables [T_max, hd/2], in double on the host like the CPU trainer, then float
        std::vector<double> inv = cfg.rope_inv_freq();
        int h2 = cfg.head_dim / 2;
        std::vector<float> c((size_t)T_max * h2), s((size_t)T_max * h2);
        for (int t = 0; t < T_max; t++)
            for (int i = 0; i < h2; i++) {
                c[(size_t)t * h2 + i] = (float)std::cos(t * inv[i]);
                s[(size_t)t * h2 + i] = (float)std::sin(t * inv[i]);
            }
        upload(rope_cos, c.data(), c.size(), stream);
        upload(rope_sin, s.data(), s.size(), stream);
    }

    // ---- MoE layer: route, permute by expert, run each expert, combine ----
    void moe_forward(T* out, LayerActs<T>& a, int l) {
        const int N = B * T_, d = cfg.d_model, F = cfg.ffn_dim, E = cfg.n_experts, K = cfg.top_k, NK = N * K;
        gpu::router_logits_forward(a.rlogits, a.ln2, Pm(l, P_ROUTER), N, d, E, stream);
        gpu::router_forward(a.probs, a.rlse, a.topk, a.topw, a.rlogits, ts.aux_free_rate > 0 ? d_bias + (size_t)l * E : nullptr,
                            N, E, K, cfg.routing == ROUTING_SOFTMAX_TOPK, stream);
        gpu::moe_permute(a.seq_counts, a.counts, a.offsets, a.row_token, a.row_of, a.topk, B, T_, E, K, stream);
        gpu::router_stats(a.psum, a.zsum, a.probs, a.rlse, B, T_, E, stream);
        // The per-expert GEMMs need the row counts on the host: one small synchronizing
        // copy per MoE layer per forward (first version; a device-side grouped GEMM would
        // remove it). The router-loss sums come along in the same wait.
        cudaCheck(cudaMemcpyAsync(a.h_seq_counts.data(), a.seq_counts, (size_t)B * E * sizeof(int), cudaMemcpyDeviceToHost, stream));
        cudaCheck(cudaMemcpyAsync(a.h_psum.data(), a.psum, (size_t)B * E * sizeof(double), cudaMemcpyDeviceToHost, stream));
        cudaCheck(cudaMemcpyAsync(a.h_zsum.data(), a.zsum, (size_t)B * sizeof(double), cudaMemcpyDeviceToHost, stream));
        cudaCheck(cudaStreamSynchronize(stream));
        a.eb.offsets[0] = 0;
        for (int e = 0; e < E; e++) {
            int c = 0;
            for (int b = 0; b < B; b++) c += a.h_seq_counts[(size_t)b * E + e];
            a.eb.counts[e] = c;
            a.eb.offsets[e + 1] = a.eb.offsets[e] + c;
        }
        gpu::moe_gather(a.xe, a.ln2, a.row_token, NK, d, stream);
        std::vector<const T*> w13(E), w2(E);
        for (int e = 0; e < E; e++) {
            w13[e] = W(lay.experts[l][e][0]);  // w1 (gate) then w3 (up): one [2F, d] block
            w2[e] = W(lay.experts[l][e][2]);
        }
        gpu::expert_matmul_forward(blas, a.egu, a.xe, w13, a.eb, d, 2 * F);
        gpu::swiglu_forward(a.ea, a.egu, (size_t)NK, F, stream);
        gpu::expert_matmul_forward(blas, a.ey, a.ea, w2, a.eb, F, d);
        gpu::moe_combine_forward(out, a.ey, a.topw, a.row_of, N, K, d, stream);
        for (int e = 0; e < E; e++) step_load[l][e] += a.eb.counts[e];
    }
    // dout [N, d] -> dln2 [N, d] (written), expert and router weight gradients (+=)
    void moe_backward(T* dln2, const T* dout, LayerActs<T>& a, int l) {
        const int N = B * T_, d = cfg.d_model, F = cfg.ffn_dim, E = cfg.n_experts, K = cfg.top_k, L = cfg.n_layer;
        const int NK = N * K;
        gpu::moe_combine_backward(dey, dtopw, dout, a.ey, a.topw, a.row_of, N, K, d, stream);
        std::vector<const T*> w13(E), w2(E);
        std::vector<float*> g13(E), g2(E);
        for (int e = 0; e < E; e++) {
            w13[e] = W(lay.experts[l][e][0]);
            w2[e] = W(lay.experts[l][e][2]);
            g13[e] = G(lay.experts[l][e][0]);
            g2[e] = G(lay.experts[l][e][2]);
        }
        gpu::expert_matmul_backward(blas, da, g2, dey, a.ea, w2, a.eb, F, d);
        gpu::swiglu_backward(dgu, da, a.egu, (size_t)NK, F, stream);
        gpu::expert_matmul_backward(blas, dxe, g13, dgu, a.xe, w13, a.eb, d, 2 * F);
        gpu::moe_unpermute_backward(dln2, dxe, a.row_of, N, K, d, stream);
        // router: balancing-loss coefficients from the host (counts are already there)
        const float* g_dev = nullptr;
        if (ts.aux_type != AUX_NONE && ts.aux_coef != 0) {
            std::vector<long> pooled_C(E, 0);
            if (ts.aux_type == AUX_POOLED)
                for (int ll = 0; ll < L; ll++)
                    for (int e = 0; e < E; e++) pooled_C[e] += la[ll].eb.counts[e];
            std::vector<float> g;
            aux_dp_per_seq(g, ts.aux_type, a.h_seq_counts.data(), pooled_C.data(), B, T_, E, K, L);
            upload(aux_g, g.data(), g.size(), stream);
            g_dev = aux_g;
        }
        gpu::router_backward(drl, dtopw, a.probs, a.rlse, a.topk, a.topw, g_dev, (float)ts.aux_coef, (float)ts.z_coef,
                             grad_scale, N, T_, E, K, cfg.routing == ROUTING_SOFTMAX_TOPK, stream);
        gpu::router_backward_matmul(dln2, G(l, P_ROUTER), red_scratch, drl, a.ln2, Pm(l, P_ROUTER), N, d, E, stream);
    }

    // Router losses over all layers from the host copies of the sums (train_moe.cpp
    // router_losses, same formulas and the same double arithmetic on the host).
    void router_losses(double* aux, double* z) {
        *aux = 0;
        *z = 0;
        if (!cfg.is_moe()) return;
        const int N = B * T_, E = cfg.n_experts, K = cfg.top_k, L = cfg.n_layer;
        std::vector<double> pooled_P(E, 0);
        std::vector<long> pooled_C(E, 0);
        for (int l = 0; l < L; l++) {
            LayerActs<T>& a = la[l];
            for (int b = 0; b < B; b++) *z += a.h_zsum[b] / N;
            if (ts.aux_type == AUX_SWITCH || ts.aux_type == AUX_SEQ) {
                int nseq = ts.aux_type == AUX_SEQ ? B : 1, rows = N / nseq;
                for (int s = 0; s < nseq; s++) {
                    double val = 0;
                    for (int i = 0; i < E; i++) {
                        long c = 0;
                        double Pi = 0;
                        for (int bb = s * (B / nseq); bb < (s + 1) * (B / nseq); bb++) {
                            c += a.h_seq_counts[(size_t)bb * E + i];
                            Pi += a.h_psum[(size_t)bb * E + i];
                        }
                        val += (double)c / ((double)rows * K) * (Pi / rows);
                    }
                    *aux += E * val / nseq;
                }
            } else if (ts.aux_type == AUX_POOLED) {
                for (int i = 0; i < E; i++) {
                    pooled_C[i] += a.eb.counts[i];
                    for (int b = 0; b < B; b++) pooled_P[i] += a.h_psum[(size_t)b * E + i];
                }
            }
        }
        if (ts.aux_type == AUX_POOLED) {
            double LN = (double)L * N;
            for (int i = 0; i < E; i++) *aux += E * (pooled_C[i] / LN) * (pooled_P[i] / LN);
        }
    }

    // ---- the whole model ----
    // Forward on inputs [B, T] (host). With targets, computes the losses; with
    // grad_scale_ != 0 too, leaves dlogits = grad_scale_ * dCE/dlogits in the logits buffer
    // for backward() (grad_scale_ = 1 / grad_accum, as in the CPU trainer).
    Losses forward(const int* in, const int* tgts, int B_, int T_in, float grad_scale_ = 0.0f) {
        if (B_ > B_max || T_in > T_max) FAIL("internal: batch %dx%d exceeds the allocated %dx%d", B_, T_in, B_max, T_max);
        B = B_;
        T_ = T_in;
        const int N = B * T_, d = cfg.d_model, F = cfg.ffn_dim, V = cfg.vocab_size, L = cfg.n_layer;
        const int H = cfg.n_head, Hkv = cfg.n_kv_head, hd = cfg.head_dim, qd = cfg.q_dim(), kvd = cfg.kv_dim();
        const float eps = cfg.rms_eps;
        if (cfg.sliding_window > 0 && T_ > cfg.sliding_window)  // train_moe.cpp refuses this too
            FAIL("sequence length %d exceeds the model's sliding_window %d, which this trainer does not implement", T_,
                 cfg.sliding_window);
        h_inputs.assign(in, in + N);
        for (int n = 0; n < N; n++)
            if (in[n] < 0 || in[n] >= V) FAIL("input token %d at position %d outside [0, %d)", in[n], n, V);
        upload(inputs, h_inputs.data(), N, stream);
        have_targets = tgts != nullptr;
        grad_scale = tgts ? grad_scale_ : 0.0f;
        if (tgts) {
            h_targets.assign(tgts, tgts + N);
            for (int n = 0; n < N; n++)
                if (tgts[n] < 0 || tgts[n] >= V) FAIL("target token %d at position %d outside [0, %d)", tgts[n], n, V);
            upload(targets, h_targets.data(), N, stream);
        }
        if (grad_scale != 0) {  // the embedding backward's buckets: positions grouped by token
            gpu::build_encoder_buckets(&buckets, h_inputs.data(), N, V);
            upload(bk_token, buckets.token.data(), buckets.token.size(), stream);
            upload(bk_start, buckets.start.data(), buckets.start.size(), stream);
            upload(bk_pos, buckets.positions.data(), buckets.positions.size(), stream);
        }

        gpu::encoder_forward(la[0].x, inputs, W(lay.embed), N, d, stream);
        gpu::rmsnorm_forward(la[0].ln1, la[0].rstd1, la[0].x, W(0, P_ATTN_NORM), N, d, eps, stream);
        for (int l = 0; l < L; l++) {
            LayerActs<T>& a = la[l];
            // attention block (a.ln1 = rmsnorm(a.x) was computed by the previous step)
            gpu::matmul_forward(blas, a.q, a.ln1, W(l, P_WQ), N, d, qd);
            gpu::matmul_forward(blas, a.k, a.ln1, W(l, P_WK), N, d, kvd);
            gpu::matmul_forward(blas, a.v, a.ln1, W(l, P_WV), N, d, kvd);
            gpu::rope_forward(a.q, rope_cos, rope_sin, N, T_, H, hd, stream);
            gpu::rope_forward(a.k, rope_cos, rope_sin, N, T_, Hkv, hd, stream);
            gpu::attention_forward(a.atty, a.att_lse, a.q, a.k, a.v, B, T_, H, Hkv, hd, stream);
            gpu::matmul_forward(blas, tmp, a.atty, W(l, P_WO), N, qd, d);
            // x_mid = x + attention; ln2 = rmsnorm(x_mid)
            gpu::residual_rmsnorm_forward(a.x_mid, a.ln2, a.rstd2, a.x, tmp, W(l, P_FFN_NORM), N, d, eps, stream);
            // FFN block: dense SwiGLU or mixture of experts, into tmp
            if (!cfg.is_moe()) {
                gpu::matmul_forward(blas, a.gu, a.ln2, W(l, P_GATE), N, d, 2 * F);  // gate|up in one GEMM
                gpu::swiglu_forward(a.a, a.gu, (size_t)N, F, stream);
                gpu::matmul_forward(blas, tmp, a.a, W(l, P_DOWN), N, F, d);
            } else {
                moe_forward(tmp, a, l);
            }
            // x_next = x_mid + ffn; and the next norm (next layer's input norm, or the final norm)
            bool last_layer = l + 1 == L;
            T* x_next = last_layer ? x_final : la[l + 1].x;
            T* ln_next = last_layer ? lnf : la[l + 1].ln1;
            float* rstd_next = last_layer ? rstdf : la[l + 1].rstd1;
            const T* w_next = last_layer ? W(lay.final_norm) : W(l + 1, P_ATTN_NORM);
            gpu::residual_rmsnorm_forward(x_next, ln_next, rstd_next, a.x_mid, tmp, w_next, N, d, eps, stream);
        }
        gpu::matmul_forward(blas, logits, lnf, W(lay.lm_head), N, d, V);
        Losses out;
        if (tgts) {
            gpu::crossentropy_forward_backward(logits, losses, targets, N, V, grad_scale / N, stream);
            std::vector<float> row_loss = download_floats(losses, N, stream);
            double ce = 0;
            for (int n = 0; n < N; n++) ce += row_loss[n];
            out.ce = ce / N;
            router_losses(&out.aux, &out.z);
            out.loss = out.ce + (ts.aux_type == AUX_NONE ? 0 : ts.aux_coef * out.aux) + ts.z_coef * out.z;
        }
        last = out;
        return out;
    }

    // Backward pass of the last forward (which must have had targets and grad_scale != 0);
    // adds grad_scale * d(loss)/d(params) into grads.
    void backward() {
        if (!have_targets || grad_scale == 0) FAIL("internal: backward() needs a forward pass with targets and a gradient scale");
        const int N = B * T_, d = cfg.d_model, F = cfg.ffn_dim, V = cfg.vocab_size;
        const int H = cfg.n_head, Hkv = cfg.n_kv_head, hd = cfg.head_dim, qd = cfg.q_dim(), kvd = cfg.kv_dim();
        // logits now hold dlogits (crossentropy_forward_backward wrote them in place)
        gpu::matmul_backward_input(blas, dln, logits, W(lay.lm_head), N, d, V);
        gpu::matmul_backward_weight(blas, G(lay.lm_head), logits, lnf, N, d, V);
        cudaCheck(cudaMemsetAsync(dres, 0, (size_t)N * d * sizeof(T), stream));
        gpu::rmsnorm_backward(dres, G(lay.final_norm), red_scratch, dln, x_final, W(lay.final_norm), rstdf, N, d, stream);
        // dres = d(loss)/d(residual stream) after the last layer; walk the layers back
        for (int l = cfg.n_layer - 1; l >= 0; l--) {
            LayerActs<T>& a = la[l];
            // FFN block: x_next = x_mid + ffn(ln2(x_mid))
            if (!cfg.is_moe()) {
                gpu::matmul_backward_input(blas, da, dres, W(l, P_DOWN), N, F, d);
                gpu::matmul_backward_weight(blas, G(l, P_DOWN), dres, a.a, N, F, d);
                gpu::swiglu_backward(dgu, da, a.gu, (size_t)N, F, stream);
                gpu::matmul_backward_input(blas, dln, dgu, W(l, P_GATE), N, d, 2 * F);
                gpu::matmul_backward_weight(blas, G(l, P_GATE), dgu, a.ln2, N, d, 2 * F);  // gate and up grads
            } else {
                moe_backward(dln, dres, a, l);
            }
            gpu::rmsnorm_backward(dres, G(l, P_FFN_NORM), red_scratch, dln, a.x_mid, W(l, P_FFN_NORM), a.rstd2, N, d,
                                  stream);  // dres += (the residual path is already in dres)
            // attention block: x_mid = x + o_proj(attn(...))
            gpu::matmul_backward_input(blas, datty, dres, W(l, P_WO), N, qd, d);
            gpu::matmul_backward_weight(blas, G(l, P_WO), dres, a.atty, N, qd, d);
            gpu::attention_backward(dq, dk, dv, att_D, datty, a.atty, a.att_lse, a.q, a.k, a.v, B, T_, H, Hkv, hd, stream);
            gpu::rope_backward(dq, rope_cos, rope_sin, N, T_, H, hd, stream);
            gpu::rope_backward(dk, rope_cos, rope_sin, N, T_, Hkv, hd, stream);
            gpu::matmul_backward_input(blas, dln, dq, W(l, P_WQ), N, d, qd, 0.0f);
            gpu::matmul_backward_input(blas, dln, dk, W(l, P_WK), N, d, kvd, 1.0f);
            gpu::matmul_backward_input(blas, dln, dv, W(l, P_WV), N, d, kvd, 1.0f);
            gpu::matmul_backward_weight(blas, G(l, P_WQ), dq, a.ln1, N, d, qd);
            gpu::matmul_backward_weight(blas, G(l, P_WK), dk, a.ln1, N, d, kvd);
            gpu::matmul_backward_weight(blas, G(l, P_WV), dv, a.ln1, N, d, kvd);
            gpu::rmsnorm_backward(dres, G(l, P_ATTN_NORM), red_scratch, dln, a.x, W(l, P_ATTN_NORM), a.rstd1, N, d,
                                  stream);
        }
        gpu::encoder_backward(G(lay.embed), dres, bk_token, bk_start, bk_pos, (int)buckets.token.size(), d, stream);
    }

    void zero_grad() { cudaCheck(cudaMemsetAsync(grads, 0, lay.total * sizeof(float), stream)); }

    // AdamW with global-norm clipping; weight decay on matrices only. Returns the norm
    // before clipping (train_moe.cpp Model::step).
    double step(const AdamW& hp, double lr) {
        // (data parallel: all-reduce `grads` across GPUs here, before the norm)
        gpu::global_norm_squared(norm_out, norm_partial, grads, lay.total, stream);
        double sq = 0;
        download(&sq, norm_out, 1, stream);
        double norm = std::sqrt(sq);
        double clip = (hp.grad_clip > 0 && norm > hp.grad_clip) ? hp.grad_clip / norm : 1.0;
        adam_t++;
        double bc1 = 1 - std::pow(hp.beta1, (double)adam_t), bc2 = 1 - std::pow(hp.beta2, (double)adam_t);
        gpu::AdamWArgs a;
        a.lr = (float)lr; a.b1 = (float)hp.beta1; a.one_minus_b1 = (float)(1 - hp.beta1);
        a.b2 = (float)hp.beta2; a.one_minus_b2 = (float)(1 - hp.beta2);
        a.bc1 = (float)bc1; a.bc2 = (float)bc2; a.eps = (float)hp.eps; a.clip = (float)clip;
        a.seed = seed; a.stream = gpu::sr_stream((uint64_t)adam_t); a.stochastic = stochastic_round;
        T* copy = is_fp32() ? nullptr : wcopy;
        // one launch per run of neighbouring tensors with the same decay setting
        size_t i = 0;
        while (i < lay.tensors.size()) {
            bool dec = lay.tensors[i].decay();
            size_t base = lay.tensors[i].offset, end = base + lay.tensors[i].numel;
            size_t j = i + 1;
            while (j < lay.tensors.size() && lay.tensors[j].decay() == dec && lay.tensors[j].offset == end) {
                end += lay.tensors[j].numel;
                j++;
            }
            gpu::adamw_update(params, copy, grads, m, v, base, end - base, dec ? (float)hp.weight_decay : 0.0f, a,
                              stream);
            i = j;
        }
        // aux-loss-free balancing (DeepSeek-V3): b_i += u * sign(mean load - load_i), on the host
        if (ts.aux_free_rate > 0 && cfg.is_moe()) {
            for (int l = 0; l < cfg.n_layer; l++) {
                double mean = 0;
                for (int e = 0; e < cfg.n_experts; e++) mean += step_load[l][e];
                mean /= cfg.n_experts;
                for (int e = 0; e < cfg.n_experts; e++) {
                    double diff = mean - step_load[l][e];
                    expert_bias[l][e] += (float)(ts.aux_free_rate * ((diff > 0) - (diff < 0)));
                }
            }
            upload_bias();
        }
        for (auto& s : step_load) std::fill(s.begin(), s.end(), 0);
        cudaCheck(cudaStreamSynchronize(stream));
        return norm;
    }

    // host copies of the optimizer state, for checkpoints
    void download_state(std::vector<float>* p, std::vector<float>* mm, std::vector<float>* vv) const {
        p->resize(lay.total); mm->resize(lay.total); vv->resize(lay.total);
        download(p->data(), params, lay.total, stream);
        download(mm->data(), m, lay.total, stream);
        download(vv->data(), v, lay.total, stream);
    }
    void upload_moments(const std::vector<float>& mm, const std::vector<float>& vv) {
        upload(m, mm.data(), lay.total, stream);
        upload(v, vv.data(), lay.total, stream);
    }
};

// ----------------------------------------------------------------------------
// Evaluation and sampling (train_moe.cpp evaluate / sample_text)

template <typename T>
EvalResult evaluate(GPUModel<T>& M, const DataLoader& data, int max_batches) {
    EvalResult r;
    std::vector<int> inp((size_t)data.B * data.T), tgt((size_t)data.B * data.T);
    for (size_t d = 0; d < data.domains.size(); d++) {
        int nb = std::min(max_batches, data.val_batches((int)d));
        std::vector<std::vector<double>> load(M.cfg.n_layer, std::vector<double>(M.cfg.n_experts, 0));
        double sum = 0;
        for (int i = 0; i < nb; i++) {
            data.val_batch((int)d, i, inp.data(), tgt.data());
            sum += M.forward(inp.data(), tgt.data(), data.B, data.T).ce;
            for (int l = 0; l < M.cfg.n_layer && M.cfg.is_moe(); l++)
                for (int e = 0; e < M.cfg.n_experts; e++) load[l][e] += M.la[l].eb.counts[e];
        }
        for (auto& row : load) {
            double tot = 0;
            for (double c : row) tot += c;
            for (double& c : row) c = tot > 0 ? c / tot : 0;
        }
        r.loss.push_back(nb > 0 ? sum / nb : NAN);
        r.load.push_back(load);
    }
    for (auto& s : M.step_load) std::fill(s.begin(), s.end(), 0);  // eval is not training load
    return r;
}

// n tokens after an end-of-text token, temperature 1, whole context recomputed per token
template <typename T>
std::string sample_text(GPUModel<T>& M, const Tokenizer& tok, int n, int T_max, RngStream& rng) {
    std::vector<int> ctx = {tok.eot >= 0 ? tok.eot : 0};
    std::string out;
    const int V = M.cfg.vocab_size;
    std::vector<double> p(V);
    auto saved = M.step_load;
    for (int i = 0; i < n; i++) {
        int start = std::max(0, (int)ctx.size() - T_max);
        int len = (int)ctx.size() - start;
        M.forward(ctx.data() + start, nullptr, 1, len);
        std::vector<float> z = download_floats(M.logits + (size_t)(len - 1) * V, V, M.stream);
        double mx = z[0], s = 0;
        for (int j = 1; j < V; j++) mx = std::max(mx, (double)z[j]);
        for (int j = 0; j < V; j++) s += (p[j] = std::exp(z[j] - mx));
        double u = rng.uniform() * s, acc = 0;
        int next = V - 1;
        for (int j = 0; j < V; j++) {
            acc += p[j];
            if (u < acc) { next = j; break; }
        }
        if (next == tok.eot) break;
        ctx.push_back(next);
        out += tok.ok() ? tok.decode(next) : strfmt("<%d>", next);
    }
    M.step_load = saved;
    return out;
}

// ----------------------------------------------------------------------------
// Throughput accounting (docs/perf.md): model FLOPs per token = 6 N_active (forward +
// backward of every active weight) + causal attention 6 L T (H hd) (QK^T and PV, forward
// and backward, half of the T x T scores), over the GPU's dense bf16 peak.

static double flops_per_token(const ModelConfig& c, int T) {
    return 6.0 * (double)count_active_params(c) + 6.0 * c.n_layer * (double)T * c.q_dim();
}
// dense bf16 tensor-core peak by device name; 0 = unknown (MFU is then not reported)
static double device_peak_flops(const cudaDeviceProp& p) {
    std::string n = p.name;
    auto has = [&](const char* s) { return n.find(s) != std::string::npos; };
    if (has("H100") && has("PCIe")) return 756e12;
    if (has("H100") && has("NVL")) return 835e12;
    if (has("H100") || has("H200") || has("GH200")) return 989e12;  // SXM
    if (has("A100")) return 312e12;
    return 0;
}

// ----------------------------------------------------------------------------
// Fixture check (--check-fixture DIR): the GPU trainer against the PyTorch reference
// fixtures (test/fixtures/*), as test/test_cpu.cpp checks the CPU trainer. Prints one
// PASS/FAIL line per check and "N passed, M failed"; returns the number of failures.
//
// Tolerances: |got - ref| <= atol + rtol |ref| per element, atol relative to the tensor's
// largest |ref|. fp32 mode: tight (1e-5, as the CPU trainer). bf16 mode: loose, and for
// gradients a relative L2 error per tensor, because bf16 activations (8 bits of mantissa)
// and a routing decision flipped by rounding move single elements a lot while the tensor
// as a whole stays close; the table is in docs/perf.md.

struct FixtureTol {
    double logits, router_logits, topw, loss_rel, grad, adam_loss_rel, grad_norm_rel;
    bool exact_routing;   // require identical top-K indices and counts
    bool grad_l2;         // gradients: relative L2 error instead of max-normalized error
};
static FixtureTol fixture_tol(bool fp32) {
    if (fp32) return {1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 2e-5, 1e-4, true, false};
    return {3e-2, 3e-2, 3e-2, 1e-2, 5e-2, 2e-2, 5e-2, false, true};
}

struct CheckCounter {
    int pass = 0, fail = 0;
    void check(bool ok, const std::string& what) {
        if (ok) pass++;
        else fail++;
        printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
        fflush(stdout);
    }
};

// max_i |a - b| / (atol_rel * max|b| + rtol |b|)
static double worst_ratio(const float* a, const double* b, size_t n, double tol) {
    double mx = 0;
    for (size_t i = 0; i < n; i++) mx = std::max(mx, std::fabs(b[i]));
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double r = std::fabs((double)a[i] - b[i]) / (tol * mx + tol * std::fabs(b[i]) + 1e-12);
        if (!(r <= worst)) worst = r;  // NaN counts as worst
    }
    return worst;
}
static double rel_l2(const float* a, const double* b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double e = (double)a[i] - b[i];
        num += e * e;
        den += b[i] * b[i];
    }
    if (den == 0) return num == 0 ? 0 : INFINITY;
    return std::sqrt(num / den);
}

template <typename T>
int check_fixture(const std::string& dir, bool sr, CheckCounter& cc) {
    const bool fp32 = sizeof(T) == sizeof(float);
    const FixtureTol tol = fixture_tol(fp32);
    std::string base = dir.substr(dir.find_last_of('/') == std::string::npos ? 0 : dir.find_last_of('/') + 1);
    std::string tag = base + (fp32 ? " [fp32]" : " [bf16]");
    ModelConfig cfg;
    ParamLayout lay0;
    std::vector<float> host;
    load_model_dir(dir, &cfg, &lay0, &host);
    SafeTensorsReader fx(path_join(dir, "fixture.safetensors"));
    auto meta = fx.metadata;
    TrainSettings ts;
    ts.aux_type = parse_aux(meta.count("aux_type") ? meta["aux_type"] : "none");
    ts.aux_coef = atof(meta["aux_coef"].c_str());
    ts.z_coef = atof(meta["z_coef"].c_str());
    const TensorInfo& ii = fx.info("inputs");
    int B = (int)ii.shape[0], Tq = (int)ii.shape[1], N = B * Tq, V = cfg.vocab_size;
    std::vector<int> inputs = fx.read_vec<int>("inputs"), targets = fx.read_vec<int>("targets");

    GPUModel<T> M;
    M.ts = ts;
    M.stochastic_round = sr;
    M.setup(cfg, host, {});
    M.alloc(B, Tq);
    // 1. forward: logits, loss terms, routing
    Losses l = M.forward(inputs.data(), targets.data(), B, Tq, 0.0f);
    std::vector<float> logits = download_floats(M.logits, (size_t)N * V, M.stream);
    std::vector<double> ref_logits = fx.read_vec<double>("logits", {B, Tq, V});
    double w = worst_ratio(logits.data(), ref_logits.data(), logits.size(), tol.logits);
    cc.check(w <= 1, strfmt("%s logits: worst error ratio %.3g (tol %g)", tag.c_str(), w, tol.logits));
    auto scalar = [&](const char* k) { return fx.read_vec<double>(k)[0]; };
    for (auto kv : std::vector<std::pair<const char*, double>>{{"loss", l.loss}, {"ce", l.ce}, {"aux", l.aux}, {"z", l.z}}) {
        double ref = scalar(kv.first);
        cc.check(std::fabs(kv.second - ref) <= tol.loss_rel * std::fabs(ref) + 1e-7,
                 strfmt("%s %s: got %.9g, reference %.9g", tag.c_str(), kv.first, kv.second, ref));
    }
    if (cfg.is_moe()) {
        int E = cfg.n_experts, K = cfg.top_k;
        for (int layer = 0; layer < cfg.n_layer; layer++) {
            auto& a = M.la[layer];
            auto rl = fx.read_vec<double>(strfmt("router_logits.%d", layer), {N, E});
            auto got_rl = download_floats(a.rlogits, (size_t)N * E, M.stream);
            double wr = worst_ratio(got_rl.data(), rl.data(), rl.size(), tol.router_logits);
            cc.check(wr <= 1, strfmt("%s router_logits.%d: worst error ratio %.3g", tag.c_str(), layer, wr));
            auto idx = fx.read_vec<int>(strfmt("topk_idx.%d", layer), {N, K});
            std::vector<int> got_idx((size_t)N * K);
            download(got_idx.data(), a.topk, got_idx.size(), M.stream);
            int diff = 0;
            for (int i = 0; i < N * K; i++) diff += idx[i] != got_idx[i];
            auto cnt = fx.read_vec<int>(strfmt("expert_counts.%d", layer), {E});
            int cdiff = 0;
            for (int e = 0; e < E; e++) cdiff += cnt[e] != a.eb.counts[e];
            if (tol.exact_routing) {
                cc.check(diff == 0, strfmt("%s topk_idx.%d: %d of %d differ", tag.c_str(), layer, diff, N * K));
                cc.check(cdiff == 0, strfmt("%s expert_counts.%d: %d experts differ", tag.c_str(), layer, cdiff));
                auto tw = fx.read_vec<double>(strfmt("topk_weight.%d", layer), {N, K});
                auto got_tw = download_floats(a.topw, (size_t)N * K, M.stream);
                double wt = worst_ratio(got_tw.data(), tw.data(), tw.size(), tol.topw);
                cc.check(wt <= 1, strfmt("%s topk_weight.%d: worst error ratio %.3g", tag.c_str(), layer, wt));
            } else {  // bf16: a near-tie may flip; allow 1 in 8 selections to differ
                cc.check(diff * 8 <= N * K, strfmt("%s topk_idx.%d: %d of %d differ (bf16 allows 1/8)", tag.c_str(), layer, diff, N * K));
            }
        }
    }
    // 2. every parameter's gradient
    M.forward(inputs.data(), targets.data(), B, Tq, 1.0f);
    M.zero_grad();
    M.backward();
    std::vector<float> grads(M.lay.total);
    download(grads.data(), M.grads, M.lay.total, M.stream);
    int bad = 0;
    double worst_all = 0;
    std::string worst_name;
    for (auto& t : M.lay.tensors) {
        auto g = fx.read_vec<double>("grad." + t.name, t.shape);
        double e = tol.grad_l2 ? rel_l2(grads.data() + t.offset, g.data(), t.numel) / tol.grad
                               : worst_ratio(grads.data() + t.offset, g.data(), t.numel, tol.grad);
        if (!(e <= 1)) {
            bad++;
            printf("    %s grad.%s: error ratio %.3g\n", tag.c_str(), t.name.c_str(), e);
        }
        if (!(e <= worst_all)) { worst_all = e; worst_name = t.name; }
    }
    cc.check(bad == 0, strfmt("%s gradients: %d of %zu tensors out of tolerance (worst %.3g: %s)", tag.c_str(), bad,
                              M.lay.tensors.size(), worst_all, worst_name.c_str()));
    // 3. ten AdamW steps on the same batch, from a fresh copy of the model
    AdamW hp;
    hp.beta1 = atof(meta["beta1"].c_str());
    hp.beta2 = atof(meta["beta2"].c_str());
    hp.eps = atof(meta["eps"].c_str());
    hp.weight_decay = atof(meta["weight_decay"].c_str());
    hp.grad_clip = atof(meta["grad_clip"].c_str());
    double lr = atof(meta["lr"].c_str());
    auto ref_losses = fx.read_vec<double>("adamw_losses");
    std::vector<double> ref_norms;
    if (fx.has("adamw_grad_norms")) ref_norms = fx.read_vec<double>("adamw_grad_norms");
    GPUModel<T> M2;
    M2.ts = ts;
    M2.stochastic_round = sr;
    M2.setup(cfg, host, {});
    M2.alloc(B, Tq);
    int bad_steps = 0, bad_norms = 0;
    for (size_t s = 0; s < ref_losses.size(); s++) {
        Losses ls = M2.forward(inputs.data(), targets.data(), B, Tq, 1.0f);
        if (!(std::fabs(ls.loss - ref_losses[s]) <= tol.adam_loss_rel * std::fabs(ref_losses[s]))) {
            bad_steps++;
            printf("    %s AdamW step %zu loss %.9g vs reference %.9g\n", tag.c_str(), s, ls.loss, ref_losses[s]);
        }
        M2.zero_grad();
        M2.backward();
        double norm = M2.step(hp, lr);
        if (s < ref_norms.size() && !(std::fabs(norm - ref_norms[s]) <= tol.grad_norm_rel * std::fabs(ref_norms[s]))) {
            bad_norms++;
            printf("    %s AdamW step %zu grad norm %.9g vs reference %.9g\n", tag.c_str(), s, norm, ref_norms[s]);
        }
    }
    cc.check(bad_steps == 0, strfmt("%s AdamW: %d of %zu step losses out of tolerance", tag.c_str(), bad_steps, ref_losses.size()));
    if (!ref_norms.empty())
        cc.check(bad_norms == 0, strfmt("%s AdamW: %d of %zu grad norms out of tolerance", tag.c_str(), bad_norms, ref_norms.size()));
    return cc.fail;
}

// ----------------------------------------------------------------------------
// Training (train_moe.cpp main, the same loop; + mfu in every step record)

struct GpuOptions {
    std::string dtype = "bf16", check_fixture;
    int device = 0, bench_warmup = 3;
    bool bench = false, no_sr = false;
};

template <typename T>
int run_training(TrainArgs& args, Cli& cli, const GpuOptions& go) {
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, go.device));
    const double peak = device_peak_flops(prop);

    default_out_to_resume_run(args, cli);
    Tokenizer tok;
    std::string tok_path = load_run_tokenizer(args, &tok);

    // model (host fp32 weights first, exactly as the CPU trainer makes them)
    TrainSettings ts = train_settings_from_args(args);
    ModelConfig cfg;
    ParamLayout lay;
    std::vector<float> host;
    std::vector<std::vector<float>> bias;
    std::vector<float> h_m, h_v;
    long adam_t = 0;
    std::string resume_dir;
    if (!args.resume.empty()) {
        resume_dir = resolve_resume_dir(args.resume);
        load_model_dir(resume_dir, &cfg, &lay, &host);
        read_bias_tensors(resume_dir, cfg, &bias);
    } else if (!args.init.empty()) {
        if (cli.was_set("--experts"))
            FAIL("--init with --experts: a checkpoint's shape is fixed; make an MoE from a dense model with ./upcycle");
        load_model_dir(args.init, &cfg, &lay, &host);
        read_bias_tensors(args.init, cfg, &bias);
        if (args.init_optimizer) {
            std::string op = path_join(args.init, "optimizer.safetensors");
            if (!path_exists(op)) FAIL("%s: --init-optimizer needs this file", op.c_str());
            h_m.assign(lay.total, 0);
            h_v.assign(lay.total, 0);
            adam_t = read_optimizer_file(op, lay, h_m.data(), h_v.data());
        }
    } else {
        cfg = config_from_args(args, tok.ok() ? (int)tok.tokens.size() : 0);
        lay = build_layout(cfg);
        host.assign(lay.total, 0.0f);
        init_from_scratch(cfg, lay, host.data(), (uint64_t)args.seed, (float)args.init_std);
    }
    if (tok.ok() && (int)tok.tokens.size() > cfg.vocab_size)
        FAIL("%s: tokenizer has %zu tokens but the model's vocab_size is %d", tok_path.c_str(), tok.tokens.size(),
             cfg.vocab_size);
    if (args.seq > cfg.max_seq_len)
        fprintf(stderr, "warning: --seq %d exceeds max_position_embeddings %d of the checkpoint\n", args.seq, cfg.max_seq_len);

    // data: real shards; --bench falls back to synthetic tokens when the folder has none
    DataLoader* data = nullptr;
    std::unique_ptr<DataLoader> data_owner;
    try {
        data_owner.reset(new DataLoader(args.data_dir, args.mix, args.batch, args.seq, cfg.vocab_size, (uint64_t)args.seed));
        data = data_owner.get();
    } catch (const Error& e) {
        if (!go.bench) throw;
        printf("bench: no usable data in %s (%s): synthetic tokens\n", args.data_dir.c_str(), e.what());
    }
    if (!go.bench) check_writable_dir(args.out);

    LRSchedule sched = schedule_from_args(args);
    AdamW hp = adamw_from_args(args);

    GPUModel<T> M;
    M.ts = ts;
    M.seed = (uint64_t)args.seed;
    M.stochastic_round = !go.no_sr;
    RunState rs;
    if (!resume_dir.empty()) {
        Json saved;
        h_m.assign(build_layout(cfg).total, 0);
        h_v.assign(h_m.size(), 0);
        load_training_state(resume_dir, build_layout(cfg), h_m.data(), h_v.data(), &adam_t, rs,
                            data ? data->domains.size() : 0, &saved);
        args.check_resume_settings(saved, resume_dir);
        if (data) data->state = rs.data;
    }
    M.adam_t = adam_t;  // before setup: the working copy is keyed by it
    M.setup(cfg, host, bias);
    if (!h_m.empty()) M.upload_moments(h_m, h_v);
    M.alloc(args.batch, args.seq);
    const ModelConfig& c = M.cfg;

    printf("device: %s (%s, %s)\n", prop.name, sizeof(T) == 4 ? "fp32" : "bf16 mixed precision",
           peak > 0 ? strfmt("bf16 peak %.0f TFLOP/s", peak / 1e12).c_str() : "unknown device: no MFU");
    print_model_summary(c, ts.aux_type, ts.aux_coef, ts.z_coef);
    printf("; activations %.2f GiB\n", M.act_bytes / 1073741824.0);

    const double tokens_per_step = (double)args.batch * args.seq * args.grad_accum;
    const double flops_step = flops_per_token(c, args.seq) * tokens_per_step;
    std::vector<int> inp((size_t)args.batch * args.seq), tgt((size_t)args.batch * args.seq);
    uint64_t synth_counter = 0;
    auto next_batch = [&]() {
        if (data) { data->next_batch(inp.data(), tgt.data()); return; }
        for (size_t i = 0; i < inp.size(); i++) {  // synthetic: uniform random tokens
            inp[i] = (int)(rng_u64((uint64_t)args.seed, stream_id(PURPOSE_MISC, 0xbe), synth_counter++) % c.vocab_size);
            tgt[i] = (int)(rng_u64((uint64_t)args.seed, stream_id(PURPOSE_MISC, 0xbe), synth_counter++) % c.vocab_size);
        }
    };
    auto train_step = [&](double lr, Losses* acc) {
        M.zero_grad();
        for (int micro = 0; micro < args.grad_accum; micro++) {
            next_batch();
            Losses l = M.forward(inp.data(), tgt.data(), args.batch, args.seq, 1.0f / args.grad_accum);
            M.backward();
            acc->add_mean(l, args.grad_accum);
        }
        return M.step(hp, lr);
    };

    if (go.bench) {  // throughput only: no eval, no checkpoints, no metrics file
        for (int i = 0; i < go.bench_warmup; i++) {
            Losses acc;
            train_step(sched.at(0), &acc);
        }
        cudaCheck(cudaDeviceSynchronize());
        double t0 = now_seconds();
        Losses acc;
        for (int s = 0; s < args.steps; s++) { acc = Losses(); train_step(sched.at(s), &acc); }
        cudaCheck(cudaDeviceSynchronize());
        double dt = (now_seconds() - t0) / std::max(1, args.steps);
        size_t free_b = 0, total_b = 0;
        cudaCheck(cudaMemGetInfo(&free_b, &total_b));
        double tps = tokens_per_step / dt;
        printf("bench: %s | %d steps of %.0f tokens | %.1f ms/step | %.0f tok/s | MFU %s | GPU memory in use %.2f GiB | "
               "last loss %.4f\n",
               c.is_moe() ? "MoE" : "dense", args.steps, tokens_per_step, dt * 1e3, tps,
               peak > 0 ? strfmt("%.1f%%", 100 * flops_step / dt / peak).c_str() : "n/a (unknown device)",
               (total_b - free_b) / 1073741824.0, acc.loss);
        return 0;
    }

    MetricsLog metrics;
    metrics.open(path_join(args.out, "metrics.jsonl"), resume_dir.empty() ? -1 : rs.step);
    RngStream sample_rng((uint64_t)args.seed, stream_id(PURPOSE_SAMPLE));
    sample_rng.counter = rs.sample_counter;
    print_data_and_run(args, *data, sched, resume_dir, rs.step);

    const long start_step = rs.step;
    double t_start = now_seconds();
    long last_saved = -1;
    Json settings = args.settings();
    auto save_now = [&]() {
        rs.data = data->state;
        rs.sample_counter = sample_rng.counter;
        std::string name = strfmt("step_%06ld", rs.step);
        std::vector<float> p, mm, vv;
        M.download_state(&p, &mm, &vv);
        save_checkpoint(path_join(args.out, name), M.cfg, M.lay, p.data(), mm.data(), vv.data(), M.adam_t,
                        M.expert_bias, M.ts.aux_free_rate > 0, rs, settings,
                        path_join(args.data_dir, "tokenizer.json"));  // as train_moe.cpp: HF tools need it
        write_text_atomic(path_join(args.out, "latest"), name + "\n");
        last_saved = rs.step;
        printf("saved %s\n", path_join(args.out, name).c_str());
    };
    auto print_sample = [&]() {
        if (args.sample_tokens <= 0) return;
        std::string s = sample_text(M, tok, args.sample_tokens, args.seq, sample_rng);
        printf("sample at step %ld: %s\n", rs.step, printable(s).c_str());
    };
    while (rs.step < args.steps) {
        if (args.eval_every > 0 && rs.step % args.eval_every == 0)
            log_eval(metrics, M.cfg, *data, evaluate(M, *data, args.eval_batches), rs.step, rs.tokens);
        if (args.sample_every > 0 && rs.step > 0 && rs.step % args.sample_every == 0) print_sample();
        double t0 = now_seconds();
        Losses acc;
        double lr = sched.at((int)rs.step);
        double norm = train_step(lr, &acc);  // step() ends with a stream synchronize: dt is real
        rs.step++;
        rs.tokens += tokens_per_step;
        double dt = now_seconds() - t0;
        if (!std::isfinite(acc.loss)) FAIL("loss is %g at step %ld: training diverged", acc.loss, rs.step);
        log_step(metrics, args, c.is_moe(), rs, start_step, acc, lr, norm, dt, now_seconds() - t_start,
                 /*has_mfu=*/true, peak > 0 ? flops_step / dt / peak : NAN);  // null on an unknown device
        if (args.save_every > 0 && rs.step % args.save_every == 0 && rs.step < args.steps) {
            rs.elapsed += now_seconds() - t_start;
            t_start = now_seconds();
            save_now();
        }
    }
    log_eval(metrics, M.cfg, *data, evaluate(M, *data, args.eval_batches), rs.step, rs.tokens);
    print_sample();
    if (!args.no_save && last_saved != rs.step) save_now();
    return 0;
}

int main(int argc, char** argv) {
    TrainArgs args;
    GpuOptions go;
    Cli cli("train_moe_gpu", "GPU trainer for dense and Mixture-of-Experts language models (bf16 mixed precision or fp32).\n"
                             "Same options, files and results as ./train_moe (the CPU reference trainer).\n"
                             "Example: ./train_moe_gpu --data data/tiny --model small --experts 8 --topk 2 --steps 1000");
    args.add_to(cli);
    cli.section("GPU");
    cli.add("--dtype", &go.dtype, "bf16 (fp32 master weights, bf16 compute) or fp32 (everything fp32; for tests)");
    cli.add("--device", &go.device, "CUDA device index");
    cli.flag("--no-stochastic-rounding", &go.no_sr, "bf16: round the weight copy to nearest instead of stochastically");
    cli.section("Testing and benchmarking");
    cli.add("--check-fixture", &go.check_fixture, "compare with a reference fixture dir (test/fixtures/*) and exit");
    cli.flag("--bench", &go.bench, "time --steps steps after --bench-warmup, print tok/s, MFU, memory (no files)");
    cli.add("--bench-warmup", &go.bench_warmup, "untimed steps before a --bench measurement");
    cli.epilog("Checkpoints are Hugging Face model directories (config.json + model.safetensors) plus\n"
               "optimizer.safetensors and trainer_state.json; --resume continues bit-identically on the same GPU.");
    try {
        cli.parse(argc, argv);
        args.validate();
        if (go.dtype != "bf16" && go.dtype != "fp32") FAIL("--dtype must be bf16 or fp32, found \"%s\"", go.dtype.c_str());
        int ndev = 0;
        cudaCheck(cudaGetDeviceCount(&ndev));
        if (go.device < 0 || go.device >= ndev) FAIL("--device %d: this machine has %d CUDA device(s)", go.device, ndev);
        cudaCheck(cudaSetDevice(go.device));
        const bool fp32 = go.dtype == "fp32";
        if (!go.check_fixture.empty()) {
            CheckCounter cc;
            if (fp32) check_fixture<float>(go.check_fixture, !go.no_sr, cc);
            else check_fixture<bf16>(go.check_fixture, !go.no_sr, cc);
            printf("%d passed, %d failed\n", cc.pass, cc.fail);
            return cc.fail ? 1 : 0;
        }
        return fp32 ? run_training<float>(args, cli, go) : run_training<bf16>(args, cli, go);
    } catch (const Error& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
