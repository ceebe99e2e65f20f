/*
train_moe.cu: the GPU trainer. Same model, command line, file formats, losses, routing,
schedules, evaluation, sampling, metrics and resume as the CPU reference trainer
(train_moe.cpp); read that file first: this one follows it layer by layer. Everything
around the model is shared with it: the training run (evaluation, sampling, checkpoints,
metrics) is common/run.h's run_training, and the router losses are common/router_losses.h's:
their gradient coefficients computed on the device with its aux_dp_coef, their values on the
host from the per-sequence sums the router kernels produce, once per step for the log.

Host waits: a bf16 training step (forward_backward per micro-batch, then step) waits for the
device once, at the end of step(), after the update is queued (docs/perf.md "Known
performance limits"; test_gpu_fixtures counts them in the emulation). On one GPU, each
micro-batch's forward + backward and the optimizer's stream work are each one CUDA graph
launch (section "CUDA graphs" in GPUModel).

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

Several GPUs: data parallel over NCCL with the AdamW moments sharded (ZeRO-1), one process
per GPU started by torchrun, srun or mpirun (section "Data parallel" below, common/world.h).
One GPU and no launcher: no NCCL call at all.

Status: never run on a GPU (docs/gpu-log.md). It runs, and is tested on every `make test`, in
the CUDA emulation on the CPU (docs/emulation.md): test/test_gpu_fixtures.cu and
test/test_gpu.sh; data parallelism with 1-4 emulated GPUs and an NCCL stand-in: test/test_dp.sh.
*/
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>
#include <nccl.h>
#include "common/cli.h"            // defines: Cli
#include "common/model.h"          // defines: ModelConfig, ParamLayout, init_from_scratch, load_model_dir
#include "common/router_losses.h"  // defines: the router losses' values and gradients, Losses, RouterLossSettings
#include "common/run.h"            // defines: run_training (and evaluate, sample_text), AdamWSettings, checkpoints, logging
#include "common/train_args.h"     // defines: TrainArgs (the shared command line)
#include "common/util.h"           // defines: Error, FAIL, strfmt, bf16_to_f32
#include "common/world.h"          // defines: World, world_from_env, NcclInit, share_unique_id

#include "kernels/common.cuh"
#include "kernels/adamw.cuh"
#include "kernels/attention.cuh"
#include "kernels/classifier.cuh"
#include "kernels/dpsl.cuh"
#include "kernels/encoder.cuh"
#include "kernels/global_norm.cuh"
#include "kernels/matmul.cuh"
#include "kernels/grouped_matmul.cuh"
#include "kernels/permute.cuh"
#include "kernels/rmsnorm.cuh"
#include "kernels/rope.cuh"
#include "kernels/router.cuh"
#include "kernels/nexus_router.cuh"
#include "kernels/shared_expert.cuh"
#include "kernels/grove.cuh"
#include "kernels/swiglu.cuh"
#include "kernels/xft_routing.cuh"

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
// from pinned host memory that stays untouched until the copy has run: no wait
template <typename X>
static void upload_async(X* dst, const X* pinned_src, size_t n, cudaStream_t s) {
    if (n == 0) return;
    cudaCheck(cudaMemcpyAsync(dst, pinned_src, n * sizeof(X), cudaMemcpyHostToDevice, s));
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
// Data parallel over several GPUs (NCCL). One process per GPU (common/world.h says which);
// every rank holds the whole model and trains on a B-row slice of each global batch of
// world * B rows (rank r: rows r B .. r B + B - 1, so the ranks together see exactly the
// batch one GPU with --batch world*B would). docs/ARCHITECTURE.md "Several GPUs".
//
// ZeRO-1: the AdamW moments are sharded. The flat gradient buffer is cut into buckets, one
// per layer (in the order the backward finishes them: the last layer first) plus the rest
// (embeddings, final norm, head) at the end; each bucket's size is a multiple of the world
// size, so rank r owns the r-th slice of every bucket. As soon as the backward is past a
// layer, the last micro-batch's gradients of that bucket are reduce-scattered (summed) on
// a second stream while the backward goes on. The optimizer step then: the global gradient
// norm from each rank's slices (one all-reduce of a few doubles), AdamW on the own slices
// (moments: this rank's slices only), and an all-gather of the updated fp32 master weights,
// from which every rank rounds the same bf16 working copy (the stochastic rounding is a
// function of the value, the step and the element index: kernels/adamw.cuh).
//
// Losses: each rank's routing statistics (per-sequence expert counts, probability and z
// sums) and cross-entropy sum are all-gathered after the forward, so every rank computes
// the router losses, their gradient coefficients and the expert load of the global batch,
// exactly as one GPU with the global batch does, and takes the rows of its own sequences.
// The cross-entropy gradient is scaled by 1 / (world B T), so the summed gradient is the
// global batch's. The aux-loss-free bias update sees the global counts: every rank takes
// the same step.
//
// Hangs: a rank that dies leaves the others inside a collective. Every host wait after a
// collective polls the stream and ncclCommGetAsyncError, and after --nccl-timeout seconds
// aborts the communicator and stops with an error naming the collective.

#define ncclCheck(dp, call, what)                                                                          \
    do {                                                                                                   \
        ncclResult_t r_ = (call);                                                                          \
        if (r_ != ncclSuccess) (dp)->fail(what, r_);                                                       \
    } while (0)

struct DataParallel {
    World world;
    ncclComm_t comm = nullptr;
    cudaStream_t comm_stream = nullptr;  // the gradient buckets' reduce-scatters
    cudaEvent_t event = nullptr;
    double timeout = 600;
    bool aborted = false;

    // a contiguous range [begin, begin + count) of the flat buffers; this rank owns
    // [begin + rank slice, begin + (rank + 1) slice), kept at shard_offset of its moments
    struct Bucket { size_t begin = 0, count = 0, slice = 0, shard_offset = 0; };
    std::vector<Bucket> buckets;        // finishing order: layer L-1, ..., layer 0, the rest
    std::vector<int> layer_bucket;      // [L]: the bucket that is complete after layer l's backward
    size_t padded_total = 0;            // parameters rounded up to a multiple of the world size
    size_t shard_total = 0;             // this rank's elements (its moments' size)

    void init(const World& w, NcclInit how, const std::string& id_file, double timeout_s) {
        world = w;
        timeout = timeout_s;
        const double started = now_seconds();
        ncclUniqueId id;
        if (w.root()) ncclCheck(this, ncclGetUniqueId(&id), "ncclGetUniqueId");
        share_unique_id(w, how, id_file, &id, sizeof(id), timeout, started);
        ncclCheck(this, ncclCommInitRank(&comm, w.size, id, w.rank), "ncclCommInitRank");
        remove_unique_id_file(w, how, id_file);
        cudaCheck(cudaStreamCreateWithFlags(&comm_stream, cudaStreamNonBlocking));
        cudaCheck(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    }
    ~DataParallel() {
        if (comm) ncclCommDestroy(comm);  // (after an error abort() has run: comm is null)
        if (event) cudaEventDestroy(event);
        if (comm_stream) cudaStreamDestroy(comm_stream);
    }
    // stops this rank's collectives (pending ones included): on any error, before the
    // model's buffers are freed (cudaFree waits for the device, which would wait forever
    // for a collective whose peer is gone)
    void abort() {
        if (comm && !aborted) ncclCommAbort(comm);
        comm = nullptr;
        aborted = true;
    }
    [[noreturn]] void fail(const char* what, ncclResult_t r) {
        std::string detail = comm ? ncclGetLastError(comm) : "";
        abort();
        FAIL("%s failed: %s%s%s. Another rank has probably stopped: see its log", what, ncclGetErrorString(r),
             detail.empty() ? "" : ": ", detail.c_str());
    }
    // waits for stream s (whose work includes collectives) without hanging on a dead rank
    void wait(cudaStream_t s, const char* what) {
        const double start = now_seconds();
        for (int spins = 0;; spins++) {
            cudaError_t q = cudaStreamQuery(s);
            if (q == cudaSuccess) return;
            if (q != cudaErrorNotReady) cudaCheck(q);
            ncclResult_t e = ncclSuccess;
            ncclCheck(this, ncclCommGetAsyncError(comm, &e), "ncclCommGetAsyncError");
            if (e != ncclSuccess && e != ncclInProgress) fail(what, e);
            if (now_seconds() - start > timeout) {
                abort();
                FAIL("%s did not finish within --nccl-timeout %.0f s: another rank has probably died or hangs (see its "
                     "log); the communicator was aborted", what, timeout);
            }
            if (spins > 100) usleep(100);
        }
    }

    // The buckets of a layout (see above). Layer l's tensors are contiguous and in layer
    // order (common/model.h build_layout); bucket l is [up(start_l), up(start_l+1)), which
    // holds only gradients that are final once the backward is past layer l: layer l's own
    // and the first few of layer l+1 (finished before it). up = round up to a multiple of
    // the world size. The rest: [0, up(start_0)) and [up(end of the layers), padded_total).
    void plan(const ParamLayout& layout, int n_layer) {
        const size_t n = (size_t)world.size;
        auto up = [&](size_t x) { return (x + n - 1) / n * n; };
        padded_total = up(layout.total);
        std::vector<size_t> start(n_layer + 1, layout.total);
        size_t layers_end = 0;
        for (const ParamTensor& t : layout.tensors)
            if (t.layer >= 0) {
                start[t.layer] = std::min(start[t.layer], t.offset);
                layers_end = std::max(layers_end, t.offset + t.numel);
            }
        start[n_layer] = layers_end;
        for (int l = 0; l < n_layer; l++)
            if (start[l + 1] < start[l]) FAIL("internal: layer %d's parameters do not follow layer %d's", l + 1, l);
        buckets.clear();
        layer_bucket.assign(n_layer, -1);
        auto add = [&](size_t a, size_t b) {
            Bucket k;
            k.begin = a; k.count = b > a ? b - a : 0; k.slice = k.count / n;
            buckets.push_back(k);
            return (int)buckets.size() - 1;
        };
        for (int l = n_layer - 1; l >= 0; l--) layer_bucket[l] = add(up(start[l]), up(start[l + 1]));
        add(0, up(n_layer > 0 ? start[0] : layout.total));
        add(up(n_layer > 0 ? layers_end : layout.total), padded_total);
        shard_total = 0;
        for (Bucket& k : buckets) { k.shard_offset = shard_total; shard_total += k.slice; }
    }
    size_t slice_begin(const Bucket& k) const { return k.begin + (size_t)world.rank * k.slice; }

    // grads of bucket b are complete on `compute`: sum them into their owners' slices, on
    // the communication stream, while the compute stream goes on
    void reduce_scatter_bucket(float* grads, int b, cudaStream_t compute) {
        const Bucket& k = buckets[b];
        if (k.count == 0) return;
        cudaCheck(cudaEventRecord(event, compute));
        cudaCheck(cudaStreamWaitEvent(comm_stream, event, 0));
        ncclCheck(this, ncclReduceScatter(grads + k.begin, grads + slice_begin(k), k.slice, ncclFloat, ncclSum, comm, comm_stream),
                  "the gradient reduce-scatter (ncclReduceScatter)");
    }
    // the compute stream waits for every reduce-scatter issued so far
    void join(cudaStream_t compute) {
        cudaCheck(cudaEventRecord(event, comm_stream));
        cudaCheck(cudaStreamWaitEvent(compute, event, 0));
    }
    // every rank's slices of x (by bucket) -> the whole of x, in place
    void all_gather_slices(float* x, cudaStream_t s, const char* what) {
        for (const Bucket& k : buckets)
            if (k.count) ncclCheck(this, ncclAllGather(x + slice_begin(k), x + k.begin, k.slice, ncclFloat, comm, s), what);
    }
    // a shard (this rank's slices, packed) -> the whole buffer `full`, in place in `full`
    void all_gather_shard(float* full, const float* shard, cudaStream_t s, const char* what) {
        for (const Bucket& k : buckets)
            if (k.count) ncclCheck(this, ncclAllGather(shard + k.shard_offset, full + k.begin, k.slice, ncclFloat, comm, s), what);
    }
    // true on every rank iff `ok` on every rank
    // (every host read after a collective first waits here: a blocking copy behind a
    // collective that never finishes would hang without the timeout)
    bool all_ok(bool ok, int* scratch, cudaStream_t s) {
        int v = ok ? 1 : 0;
        upload(scratch, &v, 1, s);
        ncclCheck(this, ncclAllReduce(scratch, scratch, 1, ncclInt32, ncclMin, comm, s), "the status all-reduce");
        wait(s, "the status all-reduce");
        download(&v, scratch, 1, s);
        return v == 1;
    }
};

// ----------------------------------------------------------------------------
// The model on the GPU. T is the element type of activations and of the weights' working
// copy: float (--dtype fp32) or bf16 (--dtype bf16).

template <typename T>
struct LayerActs {
    T *x, *ln1, *q, *k, *v, *atty, *x_mid, *ln2;  // [N, d] / [N, H*hd] / [N, Hkv*hd]
    float *rstd1, *rstd2, *att_lse;              // [N], [N], [B, H, T]
    T *gu, *h;                                   // dense FFN: [N, 2F] gate|up, [N, F] h = silu(gate)*up
    // MoE
    float *rlogits, *probs, *rlse, *topw;        // [N, E], [N, E], [N], [N, K]
    int *topk, *seq_counts, *counts, *offsets;   // [N, K], [B, E], [E], [E+1]
    int *row_token, *row_of;                     // [N*K], [N*K]
    T *xe, *egu, *eh, *ey;                       // [N*K, d], [N*K, 2F], [N*K, F], [N*K, d]
    double *psum, *zsum;                         // [B, E], [B]: sums for the router losses
    double* dpsl_sum = nullptr;                  // [E] dpsl's per-expert sums (--aux-loss ...dpsl)
    float* dpsl_g = nullptr;                     // [N, E] dpsl's dL/dp, for the backward
    // shared expert (cfg.shared_dim = Fs > 0): a dense SwiGLU FFN over every token
    T *sgu, *sh, *sy;                            // [N, 2Fs] gate|up, [N, Fs] h, [N, d] its output
    float* sgate;                                // [N] sigmoid(ln2 . w_g) (shared_gate), or 1 - p_{e_1} (xft)
    // Grove adjugate experts (cfg.grove_groups = G > 0): each over every token (kernels/grove.cuh)
    float* gw;                                   // [N, G] summed gate weights of each group (0: inactive)
    T *agu, *ah, *ya;                            // [G, N, 2Fa] gate|up, [G, N, Fa] h, [G, N, d] outputs
    // (seq_counts, psum, zsum and dpsl_sum point into GPUModel's stat_counts and stat_f)
    // fp32 only: the counts on the host (pinned), for the per-expert cuBLAS loop's launches
    gpu::ExpertBlocks eb;
    int* h_seq_counts = nullptr;     // [B, E]
};

// Keys and values of every layer for `rows` sequences of up to T_max positions on the device,
// and the RoPE tables for those positions: decoding token by token (GPUModel::forward_cached,
// train_moe.cpp KVCache).
template <typename T>
struct GPUKVCache {
    int rows = 0, T_max = 0;
    std::vector<T*> k, v;                           // [L] of [rows, T_max, Hkv*hd]
    float *rope_cos = nullptr, *rope_sin = nullptr; // [T_max, hd/2]
    int* pos_of = nullptr;                          // [rows * T_max]: the position of each row being run
    GPUKVCache() = default;
    GPUKVCache(const GPUKVCache&) = delete;
    GPUKVCache& operator=(const GPUKVCache&) = delete;
    ~GPUKVCache() { release(); }
    void release() {
        for (T* p : k) cudaFree(p);
        for (T* p : v) cudaFree(p);
        k.clear(); v.clear();
        if (rope_cos) cudaFree(rope_cos);
        if (rope_sin) cudaFree(rope_sin);
        if (pos_of) cudaFree(pos_of);
        rope_cos = rope_sin = nullptr;
        pos_of = nullptr;
    }
    void init(const ModelConfig& c, int rows_, int T_max_) {
        release();
        rows = rows_;
        T_max = T_max_;
        const size_t n = (size_t)rows * T_max * c.kv_dim();
        for (int l = 0; l < c.n_layer; l++) {
            T *a = nullptr, *b = nullptr;
            cudaCheck(cudaMalloc(&a, n * sizeof(T)));
            cudaCheck(cudaMalloc(&b, n * sizeof(T)));
            k.push_back(a);
            v.push_back(b);
        }
        std::vector<float> cs, sn;
        c.rope_tables(T_max, &cs, &sn);
        cudaCheck(cudaMalloc(&rope_cos, cs.size() * sizeof(float)));
        cudaCheck(cudaMalloc(&rope_sin, sn.size() * sizeof(float)));
        cudaCheck(cudaMemcpy(rope_cos, cs.data(), cs.size() * sizeof(float), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(rope_sin, sn.data(), sn.size() * sizeof(float), cudaMemcpyHostToDevice));
        cudaCheck(cudaMalloc(&pos_of, (size_t)rows * T_max * sizeof(int)));
    }
};

template <typename T>
struct GPUModel {
    using Cache = GPUKVCache<T>;  // decoding with a KV cache (forward_cached; common/run.h sample_text)
    ModelConfig cfg;
    ParamLayout layout;
    RouterLossSettings router_loss;
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
    double* d_dpsl_ab = nullptr;  // [E, 2] dpsl's Beta(alpha_i, A - alpha_i) per expert (kernels/dpsl.cuh)

    // activations, sized by alloc()
    int B_max = 0, T_max = 0, B = 0, T_ = 0;
    char* act_block = nullptr;
    size_t act_bytes = 0;
    std::vector<LayerActs<T>> acts;
    T *x_final, *lnf, *logits, *tmp;
    float *rstdf, *losses, *rope_cos, *rope_sin;
    int *inputs, *targets, *bk_token, *bk_start, *bk_pos, *bk_count;  // bk_count [1]: the buckets
    // backward scratch, shared by all layers
    T *dres, *dln, *dq, *dk, *dv, *datty, *dgu, *dh, *dey, *dxe;
    T *dsgu = nullptr, *dsh = nullptr, *dsy = nullptr;  // shared expert: [N, 2Fs], [N, Fs], [N, d]
    float* dsz = nullptr;                               // shared gate: [N] d(loss)/d(x . w_g); xft: d(loss)/d(1 - p_{e_1})
    T *dagu = nullptr, *dah = nullptr, *dya = nullptr;  // Grove: [N, 2Fa], [N, Fa], [G, N, d]
    float* dgw = nullptr;                               // Grove: [N, G] d(loss)/d(gw)
    float *dtopw, *drl, *att_D, *aux_g, *red_scratch;
    size_t max_rows_ffn = 0;  // N (dense) or N*K (MoE)
    // The forward's statistics stay on the device (the backward's balancing-loss
    // coefficients are computed there), in two flat arrays, so that data parallelism
    // all-gathers each with one call and the host copies each with one:
    //   stat_counts [Lm, B_max, E]                      (Lm = MoE layers: n_layer or 0)
    //   stat_f      [CE sum | psum [Lm, B_max, E] | zsum [Lm, B_max] | dpsl [Lm, E]]   (doubles;
    //               the dpsl part only with --aux-loss ...dpsl: its per-expert sums)
    // LayerActs::seq_counts, psum, zsum, dpsl_sum point into them. Zeroed once: rows past B stay finite.
    int* stat_counts = nullptr;
    double* stat_f = nullptr;
    size_t n_stat_counts = 0, n_stat_f = 0;
    // the optimizer step's device scalars (kernels/global_norm.cuh, kernels/adamw.cuh)
    double *norm_partial, *norm_sq, *d_norm;  // [NORM_BLOCKS per segment], [segments], [1]
    float* d_clip;                            // [1] the clip factor AdamW reads
    int *d_skip, *d_bad;                      // [1] skip this update; [1] a non-finite loss since zero_grad
    gpu::AdamWArgs* d_adam;                   // [1] the step's AdamW arguments (from h_adam)
    gpu::AdamWPlan adamw_plan;                // the update's chunks (one launch), on the device
    gpu::NormSegments norm_segments;          // the norm's segments (one launch), on the device

    // data parallel (null: one GPU). dp_counts/dp_f: every rank's statistics (rank r's at
    // r n_stat_counts / r n_stat_f), all-gathered after each forward with targets; dp_flag: all_ok
    DataParallel* dp = nullptr;
    int* dp_counts = nullptr;
    double* dp_f = nullptr;
    int* dp_flag = nullptr;
    size_t P_alloc = 0;  // elements of params and grads (layout.total, padded under data parallelism)
    int micro_done = 0;  // micro-batches since zero_grad(): the last one reduces the gradients

    // Pinned host memory, so that every copy of a training step is asynchronous:
    //  - one slot per micro-batch for the copies of its statistics (every rank's when
    //    gathered), read after the optimizer step's one wait (the log's losses, the load)
    //  - two staging buffers for the inputs, targets and embedding buckets, used in turn; a
    //    buffer is written again only once its last copy has run (stage_done)
    //  - the step's norm and skip flag, and the aux-loss-free bias
    struct StatSlot { int* counts; double* f; };
    std::vector<StatSlot> slots;
    int pending = 0;                  // slots of the current step filled by forward_backward
    int* stage[2] = {nullptr, nullptr};
    cudaEvent_t stage_done[2] = {nullptr, nullptr};
    int stage_next = 0;
    double* h_norm = nullptr;         // [1] the step's gradient norm
    int* h_skip = nullptr;            // [1] the step skipped its update
    gpu::AdamWArgs* h_adam = nullptr; // [1] the step's AdamW arguments (rewritten after the step's wait)
    float* h_bias = nullptr;          // [L E]
    std::vector<void*> pinned;        // every pinned allocation, freed with the model
    Losses step_losses;               // the last optimizer step's mean losses (step())
    // the host's copy of the last read statistics: this rank's, or the global batch's
    // (every rank's in rank order, stats_world of them) when the forward had targets under
    // data parallelism
    int stats_world = 1;
    std::vector<std::vector<int>> g_counts;       // [L][stats_world B, E]
    std::vector<std::vector<double>> g_psum;      // [L][stats_world B, E]
    std::vector<std::vector<double>> g_zsum;      // [L][stats_world B]
    std::vector<std::vector<double>> g_dpsl;      // [L][E] dpsl's per-expert sums (--aux-loss ...dpsl), or empty
    std::vector<std::vector<int>> g_expert;       // [L][E] assignments of that batch

    // set by forward_cached for the forward pass it runs: attention reads and writes this cache
    Cache* kv = nullptr;
    int kv_row0 = 0;

    // the last forward pass
    bool have_targets = false;
    float grad_scale = 0;
    bool gathered = false;  // its statistics were all-gathered (data parallel, with targets)
    gpu::EncoderBuckets buckets;
    Losses last;
    std::vector<float> logits_host;  // logits_row's copy

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
        for (cudaEvent_t e : stage_done) if (e) cudaEventDestroy(e);
        for (void* p : pinned) cudaFreeHost(p);
        for (auto& g : graphs) cudaGraphExecDestroy(g.second);
        adamw_plan.release();
        norm_segments.release();
    }
    template <typename X>
    X* alloc_pinned(size_t n) {
        void* p = nullptr;
        cudaCheck(cudaMallocHost(&p, std::max<size_t>(n, 1) * sizeof(X)));
        memset(p, 0, std::max<size_t>(n, 1) * sizeof(X));
        pinned.push_back(p);
        return (X*)p;
    }

    static constexpr bool is_fp32() { return sizeof(T) == sizeof(float); }
    int world() const { return dp ? dp->world.size : 1; }
    int rank() const { return dp ? dp->world.rank : 0; }
    // waits for the stream; under data parallelism with the collectives' timeout
    void sync(const char* what) {
        if (dp) dp->wait(stream, what);
        else cudaCheck(cudaStreamSynchronize(stream));
    }

    // ---- setup ----
    // Uploads host fp32 weights (from scratch, a checkpoint or a fixture) and makes the
    // device buffers. Called once per model.
    void setup(const ModelConfig& c, const std::vector<float>& host_params, const std::vector<std::vector<float>>& bias) {
        cfg = c;
        layout = build_layout(cfg);
        check_fused_layouts();
        cudaCheck(cudaStreamCreate(&stream));
        cublasCheck(cublasCreate(&blas));
        cublasCheck(cublasSetStream(blas, stream));
        cublasCheck(cublasSetMathMode(blas, CUBLAS_DEFAULT_MATH));  // no TF32 for fp32 inputs
        const size_t ws_bytes = 32u << 20;
        cudaCheck(cudaMalloc(&blas_workspace, ws_bytes));
        cublasCheck(cublasSetWorkspace(blas, blas_workspace, ws_bytes));
        // data parallel: params and grads padded to the buckets; the moments only this rank's slices
        if (dp) dp->plan(layout, cfg.n_layer);
        const size_t P = dp ? dp->padded_total : layout.total, PM = dp ? dp->shard_total : layout.total;
        P_alloc = P;
        cudaCheck(cudaMalloc(&params, P * sizeof(float)));
        cudaCheck(cudaMalloc(&grads, P * sizeof(float)));
        cudaCheck(cudaMalloc(&m, std::max<size_t>(PM, 1) * sizeof(float)));
        cudaCheck(cudaMalloc(&v, std::max<size_t>(PM, 1) * sizeof(float)));
        cudaCheck(cudaMemset(params, 0, P * sizeof(float)));
        cudaCheck(cudaMemset(grads, 0, P * sizeof(float)));
        cudaCheck(cudaMemset(m, 0, PM * sizeof(float)));
        cudaCheck(cudaMemset(v, 0, PM * sizeof(float)));
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
            const ParamTensor &ta = layout.tensors[a], &tb = layout.tensors[b];
            if (tb.offset != ta.offset + ta.numel) FAIL("internal: %s and %s are not adjacent", ta.name.c_str(), tb.name.c_str());
        };
        for (int l = 0; l < cfg.n_layer; l++) {
            if (!cfg.is_moe()) adjacent(layout.by_layer[l][P_GATE], layout.by_layer[l][P_UP]);
            else for (auto& id : layout.experts[l]) adjacent(id[0], id[1]);
            if (cfg.has_shared()) adjacent(layout.by_layer[l][P_SGATE], layout.by_layer[l][P_SUP]);
            for (auto& id : layout.adjugates[l]) adjacent(id[0], id[1]);
        }
    }
    void upload_params(const std::vector<float>& host_params) {
        upload(params, host_params.data(), layout.total, stream);
        refresh_copy();
    }
    // the working copy from the master weights, keyed by the optimizer step (kernels/adamw.cuh)
    void refresh_copy() {
        if (!is_fp32()) gpu::weights_to_copy(wcopy, params, layout.total, seed, gpu::sr_stream((uint64_t)adam_t),
                                             stochastic_round, stream);
    }
    void upload_bias() {
        if (!cfg.is_moe()) return;
        std::vector<float> flat;
        for (auto& row : expert_bias) flat.insert(flat.end(), row.begin(), row.end());
        upload(d_bias, flat.data(), flat.size(), stream);
    }
    std::vector<float> download_params() const {
        std::vector<float> h(layout.total);
        download(h.data(), params, layout.total, stream);
        return h;
    }

    // weights: working copy (T), master (fp32), gradient (fp32)
    T* weight(int layer, ParamKind kind) { return wcopy + layout.get(layer, kind).offset; }
    T* weight(int idx) { return wcopy + layout.tensors[idx].offset; }
    float* master(int layer, ParamKind kind) { return params + layout.get(layer, kind).offset; }
    float* grad(int layer, ParamKind kind) { return grads + layout.get(layer, kind).offset; }
    float* grad(int idx) { return grads + layout.tensors[idx].offset; }

    // ---- activations: one block, carved twice (measure, then assign) ----
    void carve(Arena& A) {
        const size_t N = (size_t)B_max * T_max, d = cfg.d_model, F = cfg.ffn_dim, E = cfg.n_experts,
                     K = cfg.top_k, qd = cfg.q_dim(), kvd = cfg.kv_dim(), V = cfg.vocab_size;
        const size_t NK = cfg.is_moe() ? N * K : N;
        max_rows_ffn = NK;
        const size_t Lm = cfg.is_moe() ? cfg.n_layer : 0, BE = (size_t)B_max * std::max<size_t>(E, 1);
        n_stat_counts = Lm * BE;
        const bool dpsl = cfg.is_moe() && router_loss.dpsl.on;
        n_stat_f = 1 + Lm * BE + Lm * B_max + (dpsl ? Lm * E : 0);
        stat_counts = A.take<int>(std::max<size_t>(n_stat_counts, 1));
        stat_f = A.take<double>(n_stat_f);
        for (auto& a : acts) {
            a.x = A.take<T>(N * d); a.ln1 = A.take<T>(N * d);
            a.q = A.take<T>(N * qd); a.k = A.take<T>(N * kvd); a.v = A.take<T>(N * kvd);
            a.atty = A.take<T>(N * qd); a.x_mid = A.take<T>(N * d); a.ln2 = A.take<T>(N * d);
            a.rstd1 = A.take<float>(N); a.rstd2 = A.take<float>(N);
            a.att_lse = A.take<float>((size_t)B_max * cfg.n_head * T_max);
            if (!cfg.is_moe()) {
                a.gu = A.take<T>(N * 2 * F); a.h = A.take<T>(N * F);
            } else {
                a.rlogits = A.take<float>(N * E); a.probs = A.take<float>(N * E); a.rlse = A.take<float>(N);
                a.topw = A.take<float>(N * K); a.topk = A.take<int>(N * K);
                const size_t l = &a - acts.data();
                a.seq_counts = stat_counts ? stat_counts + l * BE : nullptr;
                a.psum = stat_f ? stat_f + 1 + l * BE : nullptr;
                a.zsum = stat_f ? stat_f + 1 + Lm * BE + l * B_max : nullptr;
                if (dpsl) {
                    a.dpsl_sum = stat_f ? stat_f + 1 + Lm * BE + Lm * B_max + l * E : nullptr;
                    a.dpsl_g = A.take<float>(N * E);
                }
                a.counts = A.take<int>(E); a.offsets = A.take<int>(E + 1);
                a.row_token = A.take<int>(NK); a.row_of = A.take<int>(NK);
                a.xe = A.take<T>(NK * d); a.egu = A.take<T>(NK * 2 * F); a.eh = A.take<T>(NK * F); a.ey = A.take<T>(NK * d);
                if (cfg.has_shared()) {
                    const size_t Fs = cfg.shared_dim;
                    a.sgu = A.take<T>(N * 2 * Fs); a.sh = A.take<T>(N * Fs); a.sy = A.take<T>(N * d);
                    a.sgate = A.take<float>(N);
                }
                if (cfg.has_grove()) {
                    const size_t G = cfg.grove_groups, Fa = cfg.grove_dim;
                    a.gw = A.take<float>(N * G);
                    a.agu = A.take<T>(G * N * 2 * Fa); a.ah = A.take<T>(G * N * Fa); a.ya = A.take<T>(G * N * d);
                }
            }
        }
        x_final = A.take<T>(N * d); lnf = A.take<T>(N * d); logits = A.take<T>(N * V); tmp = A.take<T>(N * d);
        rstdf = A.take<float>(N); losses = A.take<float>(N);
        rope_cos = A.take<float>((size_t)T_max * cfg.head_dim / 2); rope_sin = A.take<float>((size_t)T_max * cfg.head_dim / 2);
        inputs = A.take<int>(N); targets = A.take<int>(N);
        bk_token = A.take<int>(N); bk_start = A.take<int>(N + 1); bk_pos = A.take<int>(N); bk_count = A.take<int>(1);
        dres = A.take<T>(N * d); dln = A.take<T>(N * d);
        dq = A.take<T>(N * qd); dk = A.take<T>(N * kvd); dv = A.take<T>(N * kvd); datty = A.take<T>(N * qd);
        dgu = A.take<T>(NK * 2 * F); dh = A.take<T>(NK * F); dey = A.take<T>(NK * d); dxe = A.take<T>(NK * d);
        if (cfg.has_shared()) {
            const size_t Fs = cfg.shared_dim;
            dsgu = A.take<T>(N * 2 * Fs); dsh = A.take<T>(N * Fs); dsy = A.take<T>(N * d); dsz = A.take<float>(N);
        }
        if (cfg.has_grove()) {
            const size_t G = cfg.grove_groups, Fa = cfg.grove_dim;
            dagu = A.take<T>(N * 2 * Fa); dah = A.take<T>(N * Fa); dya = A.take<T>(G * N * d); dgw = A.take<float>(N * G);
        }
        dtopw = A.take<float>(N * std::max<size_t>(K, 1)); drl = A.take<float>(N * std::max<size_t>(E, 1));
        att_D = A.take<float>((size_t)B_max * cfg.n_head * T_max);
        aux_g = A.take<float>((size_t)B_max * std::max<size_t>(E, 1));
        if (dpsl) d_dpsl_ab = A.take<double>(2 * E);
        size_t red = gpu::rmsnorm_scratch_floats((int)N, (int)d);
        if (cfg.is_moe()) red = std::max(red, gpu::router_scratch_floats((int)N, (int)E, (int)d));
        red_scratch = A.take<float>(red);
        const size_t n_seg = dp ? dp->buckets.size() : 1;  // the norm's segments: the buckets' slices, or all
        norm_partial = A.take<double>(gpu::NORM_BLOCKS * n_seg); norm_sq = A.take<double>(n_seg);
        d_norm = A.take<double>(1); d_clip = A.take<float>(1); d_skip = A.take<int>(1); d_bad = A.take<int>(1);
        d_adam = A.take<gpu::AdamWArgs>(1);
        if (dp) {
            dp_counts = A.take<int>(std::max<size_t>(n_stat_counts, 1) * dp->world.size);
            dp_f = A.take<double>(n_stat_f * dp->world.size);
            dp_flag = A.take<int>(1);
        }
    }
    void alloc(int Bm, int Tm) {
        if (act_block) FAIL("internal: activations are allocated once");
        if (!gpu::attention_supports_head_dim(cfg.head_dim))
            FAIL("head_dim %d: the GPU attention kernels support 8, 16, 32, 64, 96 and 128", cfg.head_dim);
        B_max = Bm;
        T_max = Tm;
        acts.assign(cfg.n_layer, LayerActs<T>());
        Arena measure;
        carve(measure);
        act_bytes = measure.used;
        cudaCheck(cudaMalloc(&act_block, act_bytes));
        Arena real;
        real.base = act_block;
        carve(real);
        cudaCheck(cudaMemset(stat_counts, 0, std::max<size_t>(n_stat_counts, 1) * sizeof(int)));
        cudaCheck(cudaMemset(stat_f, 0, n_stat_f * sizeof(double)));
        cudaCheck(cudaMemset(d_bad, 0, sizeof(int)));
        if (d_dpsl_ab) {  // dpsl: each expert's Beta marginal of the prior, and room to sort B_max T_max rows
            if (dp) FAIL("internal: --aux-loss dpsl under data parallelism");
            const DpslSettings& st = router_loss.dpsl;
            st.check(cfg.n_experts);
            std::vector<double> ab;
            for (int i = 0; i < cfg.n_experts; i++) {
                ab.push_back(st.alpha_of(i));
                ab.push_back(st.alpha_sum(cfg.n_experts) - st.alpha_of(i));
            }
            upload(d_dpsl_ab, ab.data(), ab.size(), stream);
            gpu::dpsl_prepare(B_max * T_max);
        }
        // pinned host buffers (see the members): fp32's per-layer counts, the inputs' staging,
        // the step's scalars and the bias; the statistics' slots grow with the micro-batches
        const size_t N = (size_t)B_max * T_max, BE = (size_t)B_max * std::max(cfg.n_experts, 1);
        for (auto& a : acts) {
            if (is_fp32() && cfg.is_moe()) a.h_seq_counts = alloc_pinned<int>(BE);
            a.eb.counts.assign(cfg.n_experts, 0);
            a.eb.offsets.assign(cfg.n_experts + 1, 0);
        }
        for (int i = 0; i < 2; i++) {
            stage[i] = alloc_pinned<int>(5 * N + 2);  // inputs, targets, bucket tokens, starts, positions, count
            cudaCheck(cudaEventCreateWithFlags(&stage_done[i], cudaEventDisableTiming));
        }
        h_norm = alloc_pinned<double>(1);
        h_skip = alloc_pinned<int>(1);
        h_adam = alloc_pinned<gpu::AdamWArgs>(1);
        h_bias = alloc_pinned<float>((size_t)cfg.n_layer * std::max(cfg.n_experts, 1));
        ensure_slots(1);
        plan_step_kernels();
        // RoPE tables [T_max, hd/2], in double on the host like the CPU trainer, then float
        std::vector<float> c, s;
        cfg.rope_tables(T_max, &c, &s);
        upload(rope_cos, c.data(), c.size(), stream);
        upload(rope_sin, s.data(), s.size(), stream);
    }

    // bf16 expert GEMMs run as one grouped tensor-core launch per product
    // (kernels/grouped_matmul.cuh), driven by the device offsets; fp32 keeps the cuBLAS loop
    bool grouped_experts() const {
        return !is_fp32() && gpu::grouped_matmul_supports(cfg.d_model, 2 * cfg.ffn_dim) &&
               gpu::grouped_matmul_supports(cfg.ffn_dim, cfg.d_model);
    }
    // elements between expert e's and expert e+1's matrices of one kind in the flat buffer
    size_t expert_stride(int l) const {
        if (cfg.n_experts < 2) return 0;
        return layout.tensors[layout.experts[l][1][0]].offset - layout.tensors[layout.experts[l][0][0]].offset;
    }

    // ---- MoE layer: route, permute by expert, run each expert, combine; then the Grove
    // adjugate experts or the shared expert, if any, over every token ----
    void moe_forward(T* out, LayerActs<T>& a, int l) {
        const int N = B * T_, d = cfg.d_model, F = cfg.ffn_dim, E = cfg.n_experts, K = cfg.top_k, NK = N * K;
        if (cfg.nexus_router)  // the router weight is derived: R [E, d] = Emb [E, d] P [d, d], fp32 masters
            gpu::nexus_router_forward(master(l, P_ROUTER), master(l, P_NEXUS_EMB), master(l, P_NEXUS_PROJ), E, d, stream);
        gpu::router_logits_forward(a.rlogits, a.ln2, master(l, P_ROUTER), N, d, E, stream);
        gpu::router_forward(a.probs, a.rlse, a.topk, a.topw, a.rlogits, router_loss.aux_free_rate > 0 ? d_bias + (size_t)l * E : nullptr,
                            N, E, K, cfg.routing == ROUTING_SOFTMAX_TOPK, stream);
        // XFT (METHODS 1.8): the weights q_1 softmax(q), and the shared expert's 1 - q_1
        if (cfg.routing == ROUTING_XFT) gpu::xft_weights(a.topw, a.sgate, a.probs, a.topk, N, E, K, stream);
        gpu::moe_permute(a.seq_counts, a.counts, a.offsets, a.row_token, a.row_of, a.topk, B, T_, E, K, stream);
        gpu::router_stats(a.psum, a.zsum, a.probs, a.rlse, B, T_, E, stream);
        // dpsl: each expert's rows sorted on the device, its value's sums and its gradient
        if (a.dpsl_sum && have_targets)
            gpu::dpsl_forward(a.dpsl_sum, a.dpsl_g, a.probs, d_dpsl_ab, N, E, router_loss.dpsl.distance,
                              router_loss.dpsl.ecdf, stream);
        // The routing statistics stay on the device (the backward's balancing-loss
        // coefficients are computed there); forward() copies them to the host asynchronously,
        // for the log. Only the fp32 path waits here: its per-expert cuBLAS loop needs the
        // counts on the host to launch.
        if (!grouped_experts()) {
            cudaCheck(cudaMemcpyAsync(a.h_seq_counts, a.seq_counts, (size_t)B * E * sizeof(int), cudaMemcpyDeviceToHost, stream));
            cudaCheck(cudaStreamSynchronize(stream));
            count_expert_blocks(a);
        }
        gpu::moe_gather(a.xe, a.ln2, a.row_token, NK, d, stream);
        if (grouped_experts()) {  // bf16: one tensor-core launch for all experts, device offsets
            const size_t stride = expert_stride(l);
            gpu::grouped_matmul_forward((bf16*)a.egu, (const bf16*)a.xe, (const bf16*)weight(layout.experts[l][0][0]),
                                        stride, a.offsets, E, NK, d, 2 * F, stream);
            gpu::swiglu_forward(a.eh, a.egu, (size_t)NK, F, stream);
            gpu::grouped_matmul_forward((bf16*)a.ey, (const bf16*)a.eh, (const bf16*)weight(layout.experts[l][0][2]),
                                        stride, a.offsets, E, NK, F, d, stream);
        } else {  // fp32: cuBLAS per expert, from the host counts
            std::vector<const T*> w13(E), w2(E);
            for (int e = 0; e < E; e++) {
                w13[e] = weight(layout.experts[l][e][0]);  // w1 (gate) then w3 (up): one [2F, d] block
                w2[e] = weight(layout.experts[l][e][2]);
            }
            gpu::expert_matmul_forward(blas, a.egu, a.xe, w13, a.eb, d, 2 * F);
            gpu::swiglu_forward(a.eh, a.egu, (size_t)NK, F, stream);
            gpu::expert_matmul_forward(blas, a.ey, a.eh, w2, a.eb, F, d);
        }
        gpu::moe_combine_forward(out, a.ey, a.topw, a.row_of, N, K, d, stream);
        if (cfg.has_grove()) grove_forward(out, a, l);
        if (cfg.has_shared()) shared_forward(out, a, l);
    }
    // out [N, d] += lambda sum_j gw[n, j] A_j(ln2[n]): every adjugate over every token (the
    // dense FFN's kernels, one GEMM pair per group), weighted by gw (kernels/grove.cuh)
    void grove_forward(T* out, LayerActs<T>& a, int l) {
        const int N = B * T_, d = cfg.d_model, G = cfg.grove_groups, Fa = cfg.grove_dim;
        gpu::grove_weights_forward(a.gw, a.topk, a.topw, N, cfg.top_k, G, cfg.grove_group_size(), stream);
        for (int j = 0; j < G; j++) {
            const auto& w = layout.adjugates[l][j];  // w1 then w3 (adjacent: one [2Fa, d] block), w2
            T *agu = a.agu + (size_t)j * N * 2 * Fa, *ah = a.ah + (size_t)j * N * Fa, *ya = a.ya + (size_t)j * N * d;
            gpu::matmul_forward(blas, agu, a.ln2, weight(w[0]), N, d, 2 * Fa);
            gpu::swiglu_forward(ah, agu, (size_t)N, Fa, stream);
            gpu::matmul_forward(blas, ya, ah, weight(w[2]), N, Fa, d);
        }
        gpu::grove_combine_forward(out, a.ya, a.gw, cfg.grove_scale, N, d, G, stream);
    }
    // dout [N, d] -> dln2 [N, d] (+=: after the routed path writes it), dtopw [N, K] (+=:
    // before router_backward reads it), the adjugates' weight gradients (+=)
    void grove_backward(T* dln2, const T* dout, LayerActs<T>& a, int l) {
        const int N = B * T_, d = cfg.d_model, G = cfg.grove_groups, Fa = cfg.grove_dim;
        gpu::grove_combine_backward(dya, dtopw, dgw, dout, a.ya, a.gw, a.topk, cfg.grove_scale, N, d, G, cfg.top_k,
                                    cfg.grove_group_size(), stream);
        for (int j = 0; j < G; j++) {
            const auto& w = layout.adjugates[l][j];
            const T *agu = a.agu + (size_t)j * N * 2 * Fa, *ah = a.ah + (size_t)j * N * Fa;
            const T* dy = dya + (size_t)j * N * d;
            gpu::matmul_backward_input(blas, dah, dy, weight(w[2]), N, Fa, d);
            gpu::matmul_backward_weight(blas, grad(w[2]), dy, ah, N, Fa, d);
            gpu::swiglu_backward(dagu, dah, agu, (size_t)N, Fa, stream);
            gpu::matmul_backward_input(blas, dln2, dagu, weight(w[0]), N, d, 2 * Fa, 1.0f);  // += into dln2
            gpu::matmul_backward_weight(blas, grad(w[0]), dagu, a.ln2, N, d, 2 * Fa);     // w1 and w3 grads
        }
    }
    // out [N, d] += [sigmoid(ln2 . w_g) * | (1 - p_{e_1}) *] SwiGLU_shared(ln2): the dense FFN's
    // three kernels
    void shared_forward(T* out, LayerActs<T>& a, int l) {
        const int N = B * T_, d = cfg.d_model, Fs = cfg.shared_dim;
        gpu::matmul_forward(blas, a.sgu, a.ln2, weight(l, P_SGATE), N, d, 2 * Fs);  // gate|up in one GEMM
        gpu::swiglu_forward(a.sh, a.sgu, (size_t)N, Fs, stream);
        gpu::matmul_forward(blas, a.sy, a.sh, weight(l, P_SDOWN), N, Fs, d);
        if (cfg.routing == ROUTING_XFT) return gpu::xft_shared_forward(out, a.sgate, a.sy, N, d, stream);
        gpu::shared_gate_forward(out, a.sgate, a.ln2, cfg.shared_gate ? master(l, P_SGATE_W) : nullptr, a.sy, N, d,
                                 stream);
    }
    // dout [N, d] -> dln2 [N, d] (+=: after moe_backward, which writes dln2), the shared
    // expert's and its gate's weight gradients (+=)
    void shared_backward(T* dln2, const T* dout, LayerActs<T>& a, int l) {
        const int N = B * T_, d = cfg.d_model, Fs = cfg.shared_dim;
        const T* dy = dout;  // ungated: the FFN's output gradient is dout itself
        if (cfg.routing == ROUTING_XFT) {
            dy = dsy;  // xft: written by moe_backward (xft_shared_backward), before the router's backward
        } else if (cfg.shared_gate) {
            gpu::shared_gate_backward(dsy, dln2, grad(l, P_SGATE_W), dsz, dout, a.ln2, master(l, P_SGATE_W), a.sy,
                                      a.sgate, N, d, stream);
            dy = dsy;
        }
        gpu::matmul_backward_input(blas, dsh, dy, weight(l, P_SDOWN), N, Fs, d);
        gpu::matmul_backward_weight(blas, grad(l, P_SDOWN), dy, a.sh, N, Fs, d);
        gpu::swiglu_backward(dsgu, dsh, a.sgu, (size_t)N, Fs, stream);
        gpu::matmul_backward_input(blas, dln2, dsgu, weight(l, P_SGATE), N, d, 2 * Fs, 1.0f);  // += into dln2
        gpu::matmul_backward_weight(blas, grad(l, P_SGATE), dsgu, a.ln2, N, d, 2 * Fs);  // gate and up grads
    }
    // a layer's expert blocks (host counts and offsets) from its host seq_counts (fp32)
    void count_expert_blocks(LayerActs<T>& a) {
        const int E = cfg.n_experts;
        a.eb.offsets[0] = 0;
        for (int e = 0; e < E; e++) {
            int c = 0;
            for (int b = 0; b < B; b++) c += a.h_seq_counts[(size_t)b * E + e];
            a.eb.counts[e] = c;
            a.eb.offsets[e + 1] = a.eb.offsets[e] + c;
        }
    }
    // dout [N, d] -> dln2 [N, d] (written), expert and router weight gradients (+=)
    void moe_backward(T* dln2, const T* dout, LayerActs<T>& a, int l) {
        const int N = B * T_, d = cfg.d_model, F = cfg.ffn_dim, E = cfg.n_experts, K = cfg.top_k;
        const int NK = N * K;
        gpu::moe_combine_backward(dey, dtopw, dout, a.ey, a.topw, a.row_of, N, K, d, stream);
        if (grouped_experts()) {
            const size_t stride = expert_stride(l);
            const int w2i = layout.experts[l][0][2], w13i = layout.experts[l][0][0];
            gpu::grouped_matmul_backward((bf16*)dh, grad(w2i), (const bf16*)dey, (const bf16*)a.eh,
                                         (const bf16*)weight(w2i), stride, a.offsets, E, NK, F, d, stream);
            gpu::swiglu_backward(dgu, dh, a.egu, (size_t)NK, F, stream);
            gpu::grouped_matmul_backward((bf16*)dxe, grad(w13i), (const bf16*)dgu, (const bf16*)a.xe,
                                         (const bf16*)weight(w13i), stride, a.offsets, E, NK, d, 2 * F, stream);
        } else {
            std::vector<const T*> w13(E), w2(E);
            std::vector<float*> g13(E), g2(E);
            for (int e = 0; e < E; e++) {
                w13[e] = weight(layout.experts[l][e][0]);
                w2[e] = weight(layout.experts[l][e][2]);
                g13[e] = grad(layout.experts[l][e][0]);
                g2[e] = grad(layout.experts[l][e][2]);
            }
            gpu::expert_matmul_backward(blas, dh, g2, dey, a.eh, w2, a.eb, F, d);
            gpu::swiglu_backward(dgu, dh, a.egu, (size_t)NK, F, stream);
            gpu::expert_matmul_backward(blas, dxe, g13, dgu, a.xe, w13, a.eb, d, 2 * F);
        }
        gpu::moe_unpermute_backward(dln2, dxe, a.row_of, N, K, d, stream);
        if (cfg.has_grove()) grove_backward(dln2, dout, a, l);  // adds to dln2 and dtopw
        // router: the balancing loss's dL/dp per sequence [B, E], on the device from the
        // counts (every rank's when gathered: the global batch's loss, this rank's rows), with
        // the host's formula (kernels/router.cuh router_aux_coef); then the kernel adds the
        // z-loss and the gate weights' path
        const float* g_dev = nullptr;
        if (router_loss.aux_loss != AUX_NONE && router_loss.aux_coef != 0) {
            gpu::router_aux_coef(aux_g, gathered ? dp_counts : stat_counts, n_stat_counts, (size_t)B_max * E,
                                 gathered ? world() : 1, gathered ? rank() : 0, l, cfg.n_layer, B, T_, E, K,
                                 router_loss.aux_loss, stream);
            g_dev = aux_g;
        }
        // dpsl's dL/dp per row [N, E] came with its forward (kernels/dpsl.cuh)
        const bool dpsl = a.dpsl_g && router_loss.dpsl.coef != 0;
        // xft: the shared expert's weight 1 - q_1 has its gradient dc = dout . y; with it, the
        // gate weights' gradient becomes one over the chosen probabilities (dtopw in place),
        // which the router's softmax_topk path takes through the softmax
        const bool xft = cfg.routing == ROUTING_XFT;
        if (xft) {
            gpu::xft_shared_backward(dsy, dsz, dout, a.sy, a.sgate, N, d, stream);
            gpu::xft_gate_backward(dtopw, a.topw, a.probs, a.topk, dsz, N, E, K, stream);
        }
        gpu::router_backward(drl, dtopw, a.probs, a.rlse, a.topk, a.topw, g_dev, (float)router_loss.aux_coef, (float)router_loss.z_coef,
                             grad_scale, N, gathered ? N * world() : N, T_, E, K,
                             cfg.routing == ROUTING_SOFTMAX_TOPK || xft, stream,
                             dpsl ? a.dpsl_g : nullptr, (float)router_loss.dpsl.coef);
        gpu::router_backward_matmul(dln2, grad(l, P_ROUTER), red_scratch, drl, a.ln2, master(l, P_ROUTER), N, d, E, stream);
        if (cfg.nexus_router)  // dR (this backward's; the slot was 0) -> dP += Emb^T dR, then dR = 0
            gpu::nexus_router_backward(grad(l, P_NEXUS_PROJ), grad(l, P_ROUTER), master(l, P_NEXUS_EMB), E, d, stream);
        // the shared expert last, though it ran last in the forward: it adds into dln2,
        // which the routed path above writes
        if (cfg.has_shared()) shared_backward(dln2, dout, a, l);
    }

    // the last read forward's routing statistics, from the host copies of the per-sequence
    // sums (seg = T: the kernels summed each sequence); the router losses read these
    // (gathered under data parallelism: every rank's, in rank order, the global batch)
    RoutingStats routing_stats() const {
        RoutingStats st;
        st.B = B * stats_world; st.T = T_; st.E = cfg.n_experts; st.K = cfg.top_k; st.seg = T_;
        for (int l = 0; l < cfg.n_layer && cfg.is_moe(); l++)
            st.layers.push_back({g_counts[l].data(), g_psum[l].data(), g_zsum[l].data(), nullptr,
                                 g_dpsl.empty() ? nullptr : g_dpsl[l].data()});
        return st;
    }
    // Data parallel: every rank's statistics, on the device, in rank order (rank r's at
    // r n_stat_counts and r n_stat_f): the backward's coefficients and the log's losses see the
    // global batch. No wait: the collectives run in stream order.
    void gather_statistics() {
        ncclCheck(dp, ncclAllGather(stat_counts, dp_counts, std::max<size_t>(n_stat_counts, 1), ncclInt32, dp->comm, stream),
                  "the statistics all-gather");
        ncclCheck(dp, ncclAllGather(stat_f, dp_f, n_stat_f, ncclDouble, dp->comm, stream), "the statistics all-gather");
    }
    // the statistics' host slots: at least n (one per micro-batch of a step, and one more for
    // a forward outside the step). Grows on a step's first call only.
    void ensure_slots(int n) {
        const size_t W = dp ? world() : 1;
        while ((int)slots.size() < n)
            slots.push_back({alloc_pinned<int>(std::max<size_t>(n_stat_counts, 1) * W), alloc_pinned<double>(n_stat_f * W)});
    }
    // the last forward's statistics (this rank's, or every rank's) -> host slot `slot`, asynchronously
    void copy_statistics(int slot) {
        const size_t W = gathered ? world() : 1;
        cudaCheck(cudaMemcpyAsync(slots[slot].counts, gathered ? dp_counts : stat_counts,
                                  std::max<size_t>(n_stat_counts, 1) * W * sizeof(int), cudaMemcpyDeviceToHost, stream));
        cudaCheck(cudaMemcpyAsync(slots[slot].f, gathered ? dp_f : stat_f, n_stat_f * W * sizeof(double),
                                  cudaMemcpyDeviceToHost, stream));
    }
    // After a wait: the losses of the forward whose statistics are in slot `slot` (W ranks'
    // statistics, of B x T_ rows each), its expert load added to step_load, and the host
    // copies routing_stats and expert_counts read
    Losses read_statistics(int slot, int W, bool with_targets) {
        const int E = std::max(cfg.n_experts, 1), L = cfg.is_moe() ? cfg.n_layer : 0;
        const size_t BE = (size_t)B * E, layer = (size_t)B_max * E, Lm = L;
        const StatSlot& sl = slots[slot];
        stats_world = W;
        double ce = 0;
        g_counts.assign(L, std::vector<int>(BE * W));
        g_psum.assign(L, std::vector<double>(BE * W));
        g_zsum.assign(L, std::vector<double>((size_t)B * W));
        g_expert.assign(L, std::vector<int>(cfg.n_experts, 0));
        for (int r = 0; r < W; r++) {  // rank r's rows are rows r B .. r B + B - 1 of the global batch
            const int* c = sl.counts + n_stat_counts * r;
            const double* f = sl.f + n_stat_f * r;
            ce += f[0];
            for (int l = 0; l < L; l++) {
                for (size_t i = 0; i < BE; i++) {
                    g_counts[l][BE * r + i] = c[l * layer + i];
                    g_psum[l][BE * r + i] = f[1 + l * layer + i];
                }
                for (int b = 0; b < B; b++) g_zsum[l][(size_t)B * r + b] = f[1 + Lm * layer + (size_t)l * B_max + b];
            }
        }
        g_dpsl.clear();  // (one GPU only: data parallelism refuses dpsl)
        if (L > 0 && acts[0].dpsl_sum)  // stat_f has the dpsl part (alloc() saw --aux-loss ...dpsl)
            for (int l = 0; l < L; l++) {
                const double* f = sl.f + 1 + Lm * layer + Lm * B_max + (size_t)l * E;
                g_dpsl.push_back(std::vector<double>(f, f + E));
            }
        for (int l = 0; l < L; l++) {
            for (size_t i = 0; i < BE * W; i++) g_expert[l][i % E] += g_counts[l][i];
            for (int e = 0; e < cfg.n_experts; e++) step_load[l][e] += g_expert[l][e];
        }
        Losses out;
        if (with_targets) {
            out.ce = ce / ((double)B * T_ * W);  // the losses are means over the (global) batch
            add_router_losses(out, router_loss, routing_stats());
        }
        last = out;
        return out;
    }

    // ---- the whole model ----
    // Forward on inputs [B, T] (host). With targets, computes the losses; with
    // grad_scale_ != 0 too, leaves dlogits = grad_scale_ * dCE/dlogits in the logits buffer
    // for backward() (grad_scale_ = 1 / grad_accum, as in the CPU trainer). Waits once, at the
    // end, for the losses (evaluation, sampling, the tests); a training step uses
    // forward_backward, which does not wait at all.
    Losses forward(const int* in, const int* tgts, int B_, int T_in, float grad_scale_ = 0.0f) {
        queue_forward(in, tgts, B_, T_in, grad_scale_);
        ensure_slots(pending + 1);  // the slot after the step's pending ones
        copy_statistics(pending);
        sync("the forward's statistics");
        return read_statistics(pending, gathered ? world() : 1, tgts != nullptr);
    }
    // The forward pass, queued on the stream; nothing waits (the fp32 MoE path excepted: its
    // cuBLAS loop waits for each layer's counts). The inputs go up from pinned staging.
    void queue_forward(const int* in, const int* tgts, int B_, int T_in, float grad_scale_) {
        stage_inputs(in, tgts, B_, T_in, grad_scale_);
        forward_kernels();
    }
    // The host's part of a forward: checks, the batch's shape and flags, and the inputs'
    // asynchronous copies. Never inside a CUDA graph: it reads the batch.
    void stage_inputs(const int* in, const int* tgts, int B_, int T_in, float grad_scale_) {
        if (B_ > B_max || T_in > T_max) FAIL("internal: batch %dx%d exceeds the allocated %dx%d", B_, T_in, B_max, T_max);
        B = B_;
        T_ = T_in;
        const int N = B * T_, V = cfg.vocab_size;
        if (cfg.sliding_window > 0 && T_ > cfg.sliding_window)  // train_moe.cpp refuses this too
            FAIL("sequence length %d exceeds the model's sliding_window %d, which this trainer does not implement", T_,
                 cfg.sliding_window);
        for (int n = 0; n < N; n++)
            if (in[n] < 0 || in[n] >= V) FAIL("input token %d at position %d outside [0, %d)", in[n], n, V);
        if (tgts)
            for (int n = 0; n < N; n++)
                if (tgts[n] < 0 || tgts[n] >= V) FAIL("target token %d at position %d outside [0, %d)", tgts[n], n, V);
        have_targets = tgts != nullptr;
        grad_scale = tgts ? grad_scale_ : 0.0f;
        gathered = tgts && dp;  // data parallel: the statistics of every rank (forward_kernels)
        // inputs, targets and the embedding backward's buckets (positions grouped by token)
        // through a pinned staging buffer: asynchronous copies. The buffer was last used two
        // forwards ago; its event says those copies have run (the host waits here only if the
        // device is that far behind).
        int* st = stage[stage_next];
        if (cudaEventQuery(stage_done[stage_next]) == cudaErrorNotReady) cudaCheck(cudaEventSynchronize(stage_done[stage_next]));
        memcpy(st, in, N * sizeof(int));
        upload_async(inputs, st, N, stream);
        if (tgts) {
            memcpy(st + N, tgts, N * sizeof(int));
            upload_async(targets, st + N, N, stream);
        }
        if (grad_scale != 0) {
            gpu::build_encoder_buckets(&buckets, in, N, V);
            int *tok = st + 2 * N, *start = st + 3 * N, *pos = st + 4 * N + 1;  // <= N, N + 1, N ints
            std::copy(buckets.token.begin(), buckets.token.end(), tok);
            std::copy(buckets.start.begin(), buckets.start.end(), start);
            std::copy(buckets.positions.begin(), buckets.positions.end(), pos);
            int* count = st + 5 * N + 1;
            *count = (int)buckets.token.size();
            upload_async(bk_token, tok, buckets.token.size(), stream);
            upload_async(bk_start, start, buckets.start.size(), stream);
            upload_async(bk_pos, pos, buckets.positions.size(), stream);
            upload_async(bk_count, count, 1, stream);
        }
        cudaCheck(cudaEventRecord(stage_done[stage_next], stream));
        stage_next ^= 1;
    }
    // The device's part of a forward, on the staged inputs: only stream work whose arguments
    // are fixed by (B, T_, the targets, grad_scale), so that a CUDA graph can hold it
    // (forward_backward). Writes nothing on the host (the fp32 MoE path excepted, never graphed).
    void forward_kernels() {
        const int N = B * T_, d = cfg.d_model, F = cfg.ffn_dim, V = cfg.vocab_size, L = cfg.n_layer;
        const int H = cfg.n_head, Hkv = cfg.n_kv_head, hd = cfg.head_dim, qd = cfg.q_dim(), kvd = cfg.kv_dim();
        const float eps = cfg.rms_eps;

        gpu::encoder_forward(acts[0].x, inputs, weight(layout.embed), N, d, stream);
        gpu::rmsnorm_forward(acts[0].ln1, acts[0].rstd1, acts[0].x, weight(0, P_ATTN_NORM), N, d, eps, stream);
        for (int l = 0; l < L; l++) {
            LayerActs<T>& a = acts[l];
            // attention block (a.ln1 = rmsnorm(a.x) was computed by the previous step)
            gpu::matmul_forward(blas, a.q, a.ln1, weight(l, P_WQ), N, d, qd);
            gpu::matmul_forward(blas, a.k, a.ln1, weight(l, P_WK), N, d, kvd);
            gpu::matmul_forward(blas, a.v, a.ln1, weight(l, P_WV), N, d, kvd);
            if (!kv) {
                gpu::rope_forward(a.q, rope_cos, rope_sin, N, T_, H, hd, stream);
                gpu::rope_forward(a.k, rope_cos, rope_sin, N, T_, Hkv, hd, stream);
                gpu::attention_forward(a.atty, a.att_lse, a.q, a.k, a.v, B, T_, H, Hkv, hd, stream);
            } else {  // decoding: the rows at their positions, their keys and values into the cache
                gpu::rope_forward_at(a.q, kv->rope_cos, kv->rope_sin, kv->pos_of, N, H, hd, stream);
                gpu::rope_forward_at(a.k, kv->rope_cos, kv->rope_sin, kv->pos_of, N, Hkv, hd, stream);
                gpu::kv_cache_write(kv->k[l], kv->v[l], a.k, a.v, kv->pos_of, kv_row0, N, T_, kv->T_max, kvd, stream);
                gpu::attention_decode(a.atty, a.q, kv->k[l], kv->v[l], kv->pos_of, kv_row0, N, T_, kv->T_max, H, Hkv, hd,
                                      stream);
            }
            gpu::matmul_forward(blas, tmp, a.atty, weight(l, P_WO), N, qd, d);
            // x_mid = x + attention; ln2 = rmsnorm(x_mid)
            gpu::residual_rmsnorm_forward(a.x_mid, a.ln2, a.rstd2, a.x, tmp, weight(l, P_FFN_NORM), N, d, eps, stream);
            // FFN block: dense SwiGLU or mixture of experts, into tmp
            if (!cfg.is_moe()) {
                gpu::matmul_forward(blas, a.gu, a.ln2, weight(l, P_GATE), N, d, 2 * F);  // gate|up in one GEMM
                gpu::swiglu_forward(a.h, a.gu, (size_t)N, F, stream);
                gpu::matmul_forward(blas, tmp, a.h, weight(l, P_DOWN), N, F, d);
            } else {
                moe_forward(tmp, a, l);
            }
            // x_next = x_mid + ffn; and the next norm (next layer's input norm, or the final norm)
            bool last_layer = l + 1 == L;
            T* x_next = last_layer ? x_final : acts[l + 1].x;
            T* ln_next = last_layer ? lnf : acts[l + 1].ln1;
            float* rstd_next = last_layer ? rstdf : acts[l + 1].rstd1;
            const T* w_next = last_layer ? weight(layout.final_norm) : weight(l + 1, P_ATTN_NORM);
            gpu::residual_rmsnorm_forward(x_next, ln_next, rstd_next, a.x_mid, tmp, w_next, N, d, eps, stream);
        }
        gpu::matmul_forward(blas, logits, lnf, weight(layout.lm_head), N, d, V);
        // the losses are means over the global batch: world() B T rows (one GPU: N); the CE
        // sum stays on the device (stat_f[0]) with the routing statistics
        const double rows = (double)N * (have_targets && dp ? world() : 1);
        if (have_targets) {
            gpu::crossentropy_forward_backward(logits, losses, targets, N, V, grad_scale / (float)rows, stream);
            gpu::loss_sum(stat_f, losses, N, stream);
        } else {
            cudaCheck(cudaMemsetAsync(stat_f, 0, sizeof(double), stream));
        }
        // data parallel: every rank's statistics (a forward without targets, a sample, is one rank's own)
        if (gathered) gather_statistics();
        // a training forward's non-finite loss makes the next optimizer step skip its update
        if (grad_scale != 0) gpu::note_non_finite(d_bad, gathered ? dp_f : stat_f, n_stat_f * (gathered ? world() : 1), stream);
    }

    // Backward pass of the last forward (which must have had targets and grad_scale != 0);
    // adds grad_scale * d(loss)/d(params) into grads.
    // reduce: data parallel, the step's last micro-batch: each bucket of gradients is
    // reduce-scattered as soon as the backward is past it
    void backward(bool reduce = false) {
        if (!have_targets || grad_scale == 0) FAIL("internal: backward() needs a forward pass with targets and a gradient scale");
        reduce = reduce && dp;
        const int N = B * T_, d = cfg.d_model, F = cfg.ffn_dim, V = cfg.vocab_size;
        const int H = cfg.n_head, Hkv = cfg.n_kv_head, hd = cfg.head_dim, qd = cfg.q_dim(), kvd = cfg.kv_dim();
        // logits now hold dlogits (crossentropy_forward_backward wrote them in place)
        gpu::matmul_backward_input(blas, dln, logits, weight(layout.lm_head), N, d, V);
        gpu::matmul_backward_weight(blas, grad(layout.lm_head), logits, lnf, N, d, V);
        cudaCheck(cudaMemsetAsync(dres, 0, (size_t)N * d * sizeof(T), stream));
        gpu::rmsnorm_backward(dres, grad(layout.final_norm), red_scratch, dln, x_final, weight(layout.final_norm), rstdf, N, d, stream);
        // dres = d(loss)/d(residual stream) after the last layer; walk the layers back
        for (int l = cfg.n_layer - 1; l >= 0; l--) {
            LayerActs<T>& a = acts[l];
            // FFN block: x_next = x_mid + ffn(ln2(x_mid))
            if (!cfg.is_moe()) {
                gpu::matmul_backward_input(blas, dh, dres, weight(l, P_DOWN), N, F, d);
                gpu::matmul_backward_weight(blas, grad(l, P_DOWN), dres, a.h, N, F, d);
                gpu::swiglu_backward(dgu, dh, a.gu, (size_t)N, F, stream);
                gpu::matmul_backward_input(blas, dln, dgu, weight(l, P_GATE), N, d, 2 * F);
                gpu::matmul_backward_weight(blas, grad(l, P_GATE), dgu, a.ln2, N, d, 2 * F);  // gate and up grads
            } else {
                moe_backward(dln, dres, a, l);
            }
            gpu::rmsnorm_backward(dres, grad(l, P_FFN_NORM), red_scratch, dln, a.x_mid, weight(l, P_FFN_NORM), a.rstd2, N, d,
                                  stream);  // dres += (the residual path is already in dres)
            // attention block: x_mid = x + o_proj(attn(...))
            gpu::matmul_backward_input(blas, datty, dres, weight(l, P_WO), N, qd, d);
            gpu::matmul_backward_weight(blas, grad(l, P_WO), dres, a.atty, N, qd, d);
            gpu::attention_backward(dq, dk, dv, att_D, datty, a.atty, a.att_lse, a.q, a.k, a.v, B, T_, H, Hkv, hd, stream);
            gpu::rope_backward(dq, rope_cos, rope_sin, N, T_, H, hd, stream);
            gpu::rope_backward(dk, rope_cos, rope_sin, N, T_, Hkv, hd, stream);
            gpu::matmul_backward_input(blas, dln, dq, weight(l, P_WQ), N, d, qd, 0.0f);
            gpu::matmul_backward_input(blas, dln, dk, weight(l, P_WK), N, d, kvd, 1.0f);
            gpu::matmul_backward_input(blas, dln, dv, weight(l, P_WV), N, d, kvd, 1.0f);
            gpu::matmul_backward_weight(blas, grad(l, P_WQ), dq, a.ln1, N, d, qd);
            gpu::matmul_backward_weight(blas, grad(l, P_WK), dk, a.ln1, N, d, kvd);
            gpu::matmul_backward_weight(blas, grad(l, P_WV), dv, a.ln1, N, d, kvd);
            gpu::rmsnorm_backward(dres, grad(l, P_ATTN_NORM), red_scratch, dln, a.x, weight(l, P_ATTN_NORM), a.rstd1, N, d,
                                  stream);
            if (reduce) dp->reduce_scatter_bucket(grads, dp->layer_bucket[l], stream);  // layer l's gradients are final
        }
        gpu::encoder_backward(grad(layout.embed), dres, bk_token, bk_start, bk_pos, bk_count, std::min(N, V), d, stream);
        if (reduce)  // the rest: embeddings, final norm, head
            for (int b = cfg.n_layer; b < (int)dp->buckets.size(); b++) dp->reduce_scatter_bucket(grads, b, stream);
    }

    void zero_grad() {
        cudaCheck(cudaMemsetAsync(grads, 0, P_alloc * sizeof(float), stream));
        micro_done = 0;
    }

    // AdamW with global-norm clipping; weight decay on matrices only; then the aux-free
    // bias update. Returns the norm before clipping (train_moe.cpp Model::step).
    // Everything is queued without a host wait: the norm, the clip factor and the skip flag
    // (a non-finite norm or loss: no update) are computed on the device, and one launch
    // updates every parameter. Then the step's ONE wait, after which the host reads the norm
    // and the step's losses (step_losses: the micro-batches' statistics, copied during the
    // step) and updates the aux-free bias, whose copy goes up asynchronously.
    double step(const AdamWSettings& hp, double lr) {
        // the step's arguments (the bias corrections; the clip factor is computed on the
        // device) go up from pinned memory, which the last step's wait freed
        AdamWStep st = adamw_step(hp, 0.0, ++adam_t);
        gpu::AdamWArgs& a = *h_adam;
        a.lr = (float)lr; a.b1 = (float)hp.beta1; a.one_minus_b1 = (float)(1 - hp.beta1);
        a.b2 = (float)hp.beta2; a.one_minus_b2 = (float)(1 - hp.beta2);
        a.bc1 = (float)st.bc1; a.bc2 = (float)st.bc2; a.eps = (float)hp.eps; a.clip = NAN;
        a.seed = seed; a.stream = gpu::sr_stream((uint64_t)adam_t); a.stochastic = stochastic_round; a.mv_shift = 0;
        upload_async(d_adam, h_adam, 1, stream);
        graphed(strfmt("step clip %a wd %a", hp.grad_clip, hp.weight_decay), [&] { step_kernels(hp); });
        sync("the optimizer step");
        const double norm = *h_norm;
        // the step's losses, the mean over its micro-batches (as run.h adds them up); their load
        step_losses = Losses();
        for (int i = 0; i < pending; i++) step_losses.add_mean(read_statistics(i, dp ? world() : 1, true), pending);
        pending = 0;
        if (*h_skip) {  // no update happened: the step counter and the working copy stay as they were
            adam_t--;
            if (dp) refresh_copy();
            return norm;  // non-finite, or finite with a non-finite loss (step_losses says which)
        }
        // aux-loss-free balancing (DeepSeek-V3), on the host; the device copy follows before
        // the next forward, from pinned memory (rewritten only after the next step's wait)
        const double bias_rate = cfg.is_moe() ? router_loss.aux_free_rate : 0;
        aux_free_bias_update(expert_bias, step_load, bias_rate);
        if (bias_rate > 0) {
            size_t o = 0;
            for (auto& row : expert_bias) for (float x : row) h_bias[o++] = x;
            upload_async(d_bias, h_bias, o, stream);
        }
        return norm;
    }
    // The optimizer step's stream work, the same every step (a CUDA graph can hold it): the
    // norm, the clip factor and the skip flag, the update (arguments from d_adam), and the
    // copies of the norm and the flag to the host
    void step_kernels(const AdamWSettings& hp) {
        grad_norm_squared();
        gpu::adamw_scalars(d_norm, d_clip, d_skip, norm_sq, norm_segments.n, hp.grad_clip, d_bad, stream);
        // bf16: the kernel writes the working copy too; under data parallelism every rank
        // rounds the whole copy from the gathered master weights instead
        T* copy = is_fp32() || dp ? nullptr : wcopy;
        gpu::adamw_update_multi(params, copy, grads, m, v, adamw_plan, (float)hp.weight_decay, d_clip, d_skip, d_adam, stream);
        if (dp) {
            dp->all_gather_slices(params, stream, "the weights' all-gather");
            refresh_copy();
        }
        if (cfg.nexus_router)  // R = Emb P of the new P (what a checkpoint saves), and its working copy
            for (int l = 0; l < cfg.n_layer; l++) {
                const ParamTensor& r = layout.get(l, P_ROUTER);
                gpu::nexus_router_forward(master(l, P_ROUTER), master(l, P_NEXUS_EMB), master(l, P_NEXUS_PROJ),
                                          cfg.n_experts, cfg.d_model, stream);
                if (!is_fp32()) gpu::convert(wcopy + r.offset, params + r.offset, r.numel, stream);
            }
        cudaCheck(cudaMemsetAsync(d_bad, 0, sizeof(int), stream));  // the next step's flag
        cudaCheck(cudaMemcpyAsync(h_norm, d_norm, sizeof(double), cudaMemcpyDeviceToHost, stream));
        cudaCheck(cudaMemcpyAsync(h_skip, d_skip, sizeof(int), cudaMemcpyDeviceToHost, stream));
    }
    // The squared norm of the (global) gradient, per segment, into norm_sq on the device, in
    // one pass: one GPU, one segment (the whole buffer); data parallel, this rank's slice of
    // every bucket (after the reduce-scatters), each then summed over the ranks.
    // adamw_scalars adds the segments in order and takes the sqrt.
    void grad_norm_squared() {
        if (dp) dp->join(stream);
        gpu::global_norm_squared_multi(norm_sq, norm_partial, grads, norm_segments, stream);
        if (dp)
            ncclCheck(dp, ncclAllReduce(norm_sq, norm_sq, norm_segments.n, ncclDouble, ncclSum, dp->comm, stream),
                      "the gradient norm all-reduce");
    }
    // What AdamW updates, as runs of neighbouring tensors with the same decay setting; data
    // parallel: cut to this rank's slices, whose moments are packed. Tensors that are not
    // trained (the Nexus router's Emb and R) are left out: no update, no decay.
    std::vector<gpu::AdamWSegment> update_segments() const {
        std::vector<gpu::AdamWSegment> runs;
        size_t i = 0;
        while (i < layout.tensors.size()) {
            if (!layout.tensors[i].trainable) { i++; continue; }
            bool dec = layout.tensors[i].decay();
            size_t base = layout.tensors[i].offset, end = base + layout.tensors[i].numel;
            size_t j = i + 1;
            while (j < layout.tensors.size() && layout.tensors[j].trainable && layout.tensors[j].decay() == dec &&
                   layout.tensors[j].offset == end) {
                end += layout.tensors[j].numel;
                j++;
            }
            runs.push_back({base, end - base, dec, 0});
            i = j;
        }
        if (!dp) return runs;
        std::vector<gpu::AdamWSegment> out;
        for (const DataParallel::Bucket& k : dp->buckets) {
            const size_t lo = dp->slice_begin(k), hi = lo + k.slice;
            for (const gpu::AdamWSegment& r : runs) {
                const size_t a = std::max(lo, r.base), b = std::min(hi, r.base + r.n);
                if (a < b) out.push_back({a, b - a, r.decay, (long long)lo - (long long)k.shard_offset});
            }
        }
        return out;
    }
    // the optimizer step's fixed launch plans, uploaded once: AdamW's chunks and the norm's segments
    void plan_step_kernels() {
        gpu::adamw_make_plan(&adamw_plan, update_segments());
        std::vector<gpu::NormSegment> ns;
        if (!dp) ns.push_back({0, layout.total});
        else
            for (const DataParallel::Bucket& k : dp->buckets) ns.push_back({dp->slice_begin(k), k.slice});
        gpu::norm_make_segments(&norm_segments, ns);
    }

    // host copies of the optimizer state, for checkpoints. Data parallel: every rank takes
    // part in gathering the moments (into the gradient buffer, free between steps); only
    // rank 0 copies them to the host (`host` false elsewhere)
    void download_state(std::vector<float>* p, std::vector<float>* mm, std::vector<float>* vv, bool host = true) {
        if (host) { p->resize(layout.total); mm->resize(layout.total); vv->resize(layout.total); }
        if (!dp) {
            download(p->data(), params, layout.total, stream);
            download(mm->data(), m, layout.total, stream);
            download(vv->data(), v, layout.total, stream);
            return;
        }
        if (host) download(p->data(), params, layout.total, stream);  // whole since the last step's all-gather
        dp->all_gather_shard(grads, m, stream, "the optimizer state's all-gather");
        sync("the optimizer state's all-gather");
        if (host) download(mm->data(), grads, layout.total, stream);
        dp->all_gather_shard(grads, v, stream, "the optimizer state's all-gather");
        sync("the optimizer state's all-gather");
        if (host) download(vv->data(), grads, layout.total, stream);
    }
    // whole host moments -> the device (data parallel: this rank's slices)
    void upload_moments(const std::vector<float>& mm, const std::vector<float>& vv) {
        if (!dp) {
            upload(m, mm.data(), layout.total, stream);
            upload(v, vv.data(), layout.total, stream);
            return;
        }
        std::vector<float> sm(dp->shard_total, 0.0f), sv(dp->shard_total, 0.0f);
        for (const DataParallel::Bucket& k : dp->buckets)
            for (size_t i = 0; i < k.slice; i++) {
                const size_t gi = dp->slice_begin(k) + i;  // the padding past layout.total stays 0
                if (gi < layout.total) { sm[k.shard_offset + i] = mm[gi]; sv[k.shard_offset + i] = vv[gi]; }
            }
        upload(m, sm.data(), sm.size(), stream);
        upload(v, sv.data(), sv.size(), stream);
    }

    // ---- what common/run.h's run_training asks of a model (set seed and
    // stochastic_round first: the working copy depends on them) ----
    void init_scratch(const ModelConfig& c, uint64_t init_seed, float std = 0.02f) {
        ParamLayout l = build_layout(c);
        std::vector<float> host(l.total, 0.0f);
        init_from_scratch(c, l, host.data(), init_seed, std);  // on the host, as the CPU trainer
        setup(c, host, {});
    }
    void load(const std::string& dir) {
        ModelConfig c;
        ParamLayout l;
        std::vector<float> host;
        std::vector<std::vector<float>> bias;
        load_model_dir(dir, &c, &l, &host);
        read_bias_tensors(dir, c, &bias);
        setup(c, host, bias);
    }
    void load_optimizer(const std::string& path) {
        std::vector<float> mm(layout.total, 0), vv(layout.total, 0);
        adam_t = read_optimizer_file(path, layout, mm.data(), vv.data());
        upload_moments(mm, vv);
        refresh_copy();  // the working copy is keyed by the optimizer step
    }
    void load_training_state(const std::string& dir, TrainerState& state, size_t n_domains, Json* settings) {
        std::vector<float> mm(layout.total, 0), vv(layout.total, 0);
        ::load_training_state(dir, layout, mm.data(), vv.data(), &adam_t, state, n_domains, settings);
        upload_moments(mm, vv);
        refresh_copy();
    }
    // (data parallel: every rank must call it; f runs on rank 0 only)
    template <typename F>
    void with_host_state(F f) {
        std::vector<float> p, mm, vv;
        download_state(&p, &mm, &vv, rank() == 0);
        if (rank() == 0) f(p.data(), mm.data(), vv.data());
    }
    std::string summary_note() const {
        const char* g = graphs_used() ? "on" : !cuda_graphs ? "off" : dp ? "off (data parallel)" : "off (fp32 MoE)";
        return strfmt("; activations %.2f GiB; CUDA graphs %s", act_bytes / 1073741824.0, g);
    }
    // One micro-batch of a training step, queued without a host wait: its statistics go to
    // slot `pending` asynchronously; the losses are known after step() (step_losses, which
    // run.h reads through RunHooks::step_losses): returns zeros.
    // The forward and backward are one CUDA graph launch when graphs are on (see "CUDA graphs").
    Losses forward_backward(const int* in, const int* tgts, int B_, int T_in, int n_micro) {
        ensure_slots(pending + 2);  // (+1: the slot of a forward() outside the step)
        stage_inputs(in, tgts, B_, T_in, 1.0f / n_micro);
        const bool reduce = ++micro_done == n_micro;
        graphed(strfmt("micro-batch %dx%d scale %a", B, T_, grad_scale), [&] {  // (reduce: data parallel only)
            forward_kernels();
            backward(reduce);
        });
        copy_statistics(pending++);  // (the backward reads the statistics, never writes them)
        return Losses();
    }

    // ---- CUDA graphs ----
    // A training step is queued in two kinds of pieces. The host's pieces change every step:
    // the inputs' staging and copies, the step's AdamW arguments, the statistics' copies, the
    // aux-free bias. The stream's pieces launch the same work every step: a micro-batch's
    // forward + backward (forward_kernels, backward) and the optimizer's (step_kernels). With
    // --cuda-graphs on, each of those is captured once per shape into a CUDA graph and is one
    // launch afterwards (hundreds of kernel and cuBLAS launches per micro-batch: docs/perf.md).
    // What they read that changes between steps is in device memory (the inputs, the
    // embedding buckets and their count, d_adam, d_bias, the statistics), never a kernel
    // argument: test_gpu_fixtures "step path" holds graphed steps to eager ones bit for bit
    // over steps with different learning rates, and the emulation refuses any wait, copy from
    // pageable memory or allocation inside a capture. Not graphed: data parallelism (NCCL and
    // a second stream), the fp32 MoE path (its cuBLAS loop reads counts on the host), forwards
    // outside a training step. A capture that fails (a GPU refusing something the emulation
    // allowed) turns graphs off with a warning and the work runs without them.
    bool cuda_graphs = false;  // requested (--cuda-graphs); graphs_used() says whether they apply
    std::map<std::string, cudaGraphExec_t> graphs;
    bool graphs_used() const { return cuda_graphs && !dp && (!cfg.is_moe() || grouped_experts()); }
    template <typename F>
    void graphed(const std::string& key, F&& work) {
        if (!graphs_used()) return work();
        auto it = graphs.find(key);
        if (it == graphs.end()) {
            cudaGraph_t g = nullptr;
            cudaGraphExec_t e = nullptr;
            try {
                cudaCheck(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
                work();
                cudaCheck(cudaStreamEndCapture(stream, &g));
                cudaCheck(cudaGraphInstantiate(&e, g, 0));
                cudaCheck(cudaGraphDestroy(g));
            } catch (const Error& err) {
                cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
                if (cudaStreamIsCapturing(stream, &cs) == cudaSuccess && cs != cudaStreamCaptureStatusNone) {
                    cudaGraph_t dropped = nullptr;
                    if (cudaStreamEndCapture(stream, &dropped) == cudaSuccess && dropped) cudaGraphDestroy(dropped);
                }
                (void)cudaGetLastError();
                fprintf(stderr, "warning: capturing a CUDA graph (%s) failed: %s\nwarning: continuing without CUDA "
                        "graphs (as with --cuda-graphs off)\n", key.c_str(), err.what());
                cuda_graphs = false;
                return work();  // nothing of the capture ran: the work runs now
            }
            it = graphs.emplace(key, e).first;
        }
        cudaCheck(cudaGraphLaunch(it->second, stream));
    }
    // of the last forward() or step(): this rank's batch, or the global batch when gathered
    const int* expert_counts(int l) const { return g_expert[l].data(); }

    // Decoding with a KV cache (train_moe.cpp Model::forward_cached): tokens [B, n], sequence
    // b at positions pos[b] .. pos[b] + n - 1 and cache row row0 + b; the forward pass above
    // with its attention reading the cache. Returns the logits [B*n, V] on the host. Not
    // the full forward's arithmetic (a decode kernel instead of the tiled attention): equal
    // to rounding (test_gpu_fixtures "KV cache").
    const float* forward_cached(Cache& c, const int* tokens, const int* pos, int row0, int B_, int n) {
        if (row0 < 0 || row0 + B_ > c.rows) FAIL("internal: cache rows %d..%d of %d", row0, row0 + B_, c.rows);
        std::vector<int> pos_of((size_t)B_ * n);
        for (int b = 0; b < B_; b++) {
            if (pos[b] < 0 || pos[b] + n > c.T_max)
                FAIL("sequence %d reaches position %d, beyond the KV cache's %d", row0 + b, pos[b] + n, c.T_max);
            if (cfg.sliding_window > 0 && pos[b] + n > cfg.sliding_window)
                FAIL("position %d exceeds the model's sliding_window %d, which this trainer does not implement",
                     pos[b] + n, cfg.sliding_window);
            for (int t = 0; t < n; t++) pos_of[(size_t)b * n + t] = pos[b] + t;
        }
        upload(c.pos_of, pos_of.data(), pos_of.size(), stream);
        auto saved_load = step_load;  // generated tokens are not training load
        kv = &c;
        kv_row0 = row0;
        try {
            forward(tokens, nullptr, B_, n);
        } catch (...) {
            kv = nullptr;
            throw;
        }
        kv = nullptr;
        step_load = saved_load;
        logits_host = download_floats(logits, (size_t)B_ * n * cfg.vocab_size, stream);
        return logits_host.data();
    }
    const float* logits_row(int n) {
        logits_host = download_floats(logits + (size_t)n * cfg.vocab_size, cfg.vocab_size, stream);
        return logits_host.data();
    }
};

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
// Training (train_moe.cpp main, the same loop; + mfu in every step record)

struct GpuOptions {
    std::string dtype = "bf16", cuda_graphs = "on";
    int device = 0;
    bool no_sr = false;
    std::string nccl_init = "tcp", nccl_init_file;
    double nccl_timeout = 600;
};

// The shared run (common/run.h) around GPUModel<T>, with the device's MFU in every step record
template <typename T>
int run_gpu_training(TrainArgs& args, Cli& cli, const GpuOptions& go, DataParallel* dp) {
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, go.device));
    const double peak = device_peak_flops(prop);
    const World w = dp ? dp->world : World();
    if (w.root()) {
        printf("device: %s (%s, %s)\n", prop.name, sizeof(T) == 4 ? "fp32" : "bf16 mixed precision",
               peak > 0 ? strfmt("bf16 peak %.0f TFLOP/s", peak / 1e12).c_str() : "unknown device: no MFU");
        if (dp) {
            int nv = 0;
            ncclGetVersion(&nv);
            printf("data parallel: %d ranks (%s), %d per node, NCCL %d.%d.%d, --nccl-init %s; global batch %d x %d; AdamW "
                   "moments sharded (ZeRO-1)\n", w.size, w.launcher.c_str(), w.local_size, nv / 10000, nv / 100 % 100,
                   nv % 100, go.nccl_init.c_str(), w.size, args.batch);
        }
    }
    GPUModel<T> M;
    M.dp = dp;
    M.seed = (uint64_t)args.seed;
    M.stochastic_round = !go.no_sr;
    M.cuda_graphs = go.cuda_graphs == "on";
    RunHooks hooks;
    hooks.mfu = [&](double dt) {  // null in metrics.jsonl on an unknown device
        const double tokens_per_step = (double)args.batch * args.seq * args.grad_accum;
        return peak > 0 ? flops_per_token(M.cfg, args.seq) * tokens_per_step / dt / peak : NAN;
    };
    // memory per parameter: fp32 master + fp32 gradient (+ the bf16 weight copy); activations in T
    hooks.state_bytes = sizeof(T) == 4 ? 8 : 4 + 4 + 2;
    hooks.act_bytes = sizeof(T);
    hooks.stores_attention_matrix = false;  // the attention kernels keep only the softmax statistics
    hooks.ffn_kept = 3;                     // gate and up (fused), h
    hooks.free_memory = []() {
        size_t free_b = 0, total_b = 0;
        cudaCheck(cudaMemGetInfo(&free_b, &total_b));
        return (double)free_b;
    };
    hooks.memory_name = strfmt("GPU %d", go.device);
    hooks.step_losses = [&M](Losses& acc) { acc = M.step_losses; };  // read after step()'s one wait
    if (dp) {
        hooks.rank = w.rank;
        hooks.world = w.size;
        hooks.optimizer_bytes = 8.0 / w.size;
        hooks.all_ok = [&M](bool ok) { return M.dp->all_ok(ok, M.dp_flag, M.stream); };
    }
    try {
        return run_training(M, args, cli, hooks);
    } catch (...) {
        if (dp) dp->abort();  // while M's buffers still exist
        throw;
    }
}

// test/test_gpu_fixtures.cu and dev/bench/bench_gpu.cu include this file as a library
#ifndef TRAIN_MOE_NO_MAIN
int main(int argc, char** argv) {
    TrainArgs args;
    GpuOptions go;
    Cli cli("train_moe_gpu", "GPU trainer for dense and Mixture-of-Experts language models (bf16 mixed precision or fp32).\n"
                             "Same options, files and results as ./train_moe (the CPU reference trainer).\n"
                             "Example: ./train_moe_gpu --data data/tiny --model small --experts 8 --topk 2 --steps 1000");
    args.add_to(cli);
    cli.section("GPU");
    cli.add("--dtype", &go.dtype, "bf16 (fp32 master weights, bf16 compute) or fp32 (everything fp32; for tests)");
    cli.add("--device", &go.device, "CUDA device index (under a launcher: the node-local rank's)");
    cli.flag("--no-stochastic-rounding", &go.no_sr, "bf16: round the weight copy to nearest instead of stochastically");
    cli.add("--cuda-graphs", &go.cuda_graphs, "on: each micro-batch's forward + backward and each optimizer step is one "
            "CUDA graph launch (one GPU, bf16 or dense); off: every kernel launched from the host. Same results");
    cli.section("Several GPUs (one process per GPU, started by torchrun, srun or mpirun: README)");
    cli.add("--nccl-init", &go.nccl_init, "how rank 0 hands out the NCCL id: tcp (MASTER_ADDR, MASTER_PORT + 1), file or mpi");
    cli.add("--nccl-init-file", &go.nccl_init_file, "--nccl-init file: a path on a file system every node shares");
    cli.add("--nccl-timeout", &go.nccl_timeout, "seconds to wait for the other ranks (start-up, each collective) before "
            "stopping with an error", Range::between(1, 1e6));
    cli.epilog("Checkpoints are Hugging Face model directories (config.json + model.safetensors) plus\n"
               "optimizer.safetensors and trainer_state.json; --resume continues bit-identically on the same GPU,\n"
               "and on another number of GPUs with the same global batch (GPUs x --batch).");
    World world;
    std::unique_ptr<DataParallel> dp;  // (declared here: an error aborts the communicator, never waits on it)
    try {
        cli.parse(argc, argv);
        args.validate();
        AuxLoss aux_kind;
        bool dpsl;
        parse_aux_loss(args.aux_loss, &aux_kind, &dpsl);
        if (go.dtype != "bf16" && go.dtype != "fp32") FAIL("--dtype must be bf16 or fp32, found \"%s\"", go.dtype.c_str());
        if (go.cuda_graphs != "on" && go.cuda_graphs != "off")
            FAIL("--cuda-graphs must be on or off, found \"%s\"", go.cuda_graphs.c_str());
        const NcclInit init = parse_nccl_init(go.nccl_init);
        world = world_from_env();
        int ndev = 0;
        cudaCheck(cudaGetDeviceCount(&ndev));
        // under a launcher (even with one process: then NCCL runs on one rank) one GPU per
        // process: the node-local rank's, unless --device says otherwise
        const bool launched = world.launcher != "none";
        if (launched && !cli.was_set("--device")) {
            if (world.local_rank >= ndev)
                FAIL("local rank %d (%s) but this node has %d CUDA device(s): start at most %d processes per node",
                     world.local_rank, world.launcher.c_str(), ndev, ndev);
            go.device = world.local_rank;
        }
        if (go.device < 0 || go.device >= ndev) FAIL("--device %d: this machine has %d CUDA device(s)", go.device, ndev);
        cudaCheck(cudaSetDevice(go.device));
        args.world = world.size;
        // the Dirichlet-prior shaping loss ranks each expert's probabilities over the whole
        // batch: under data parallelism that would need every rank's [B T, E] (not done)
        if (dpsl && launched)
            FAIL("--aux-loss %s: dpsl is not implemented with several GPUs (a launcher's ranks): it ranks each expert's "
                 "probabilities over the global batch; run it on one GPU, or with train_moe (CPU)", args.aux_loss.c_str());
        if (launched) {
            dp.reset(new DataParallel());
            dp->init(world, init, go.nccl_init_file, go.nccl_timeout);
        }
        const bool fp32 = go.dtype == "fp32";
        int rc = fp32 ? run_gpu_training<float>(args, cli, go, dp.get()) : run_gpu_training<bf16>(args, cli, go, dp.get());
        dp.reset();  // the communicator first, then MPI
        mpi_finalize_if_started();
        return rc;
    } catch (const Error& e) {
        if (dp) dp->abort();
        if (world.multi()) fprintf(stderr, "error (rank %d of %d): %s\n", world.rank, world.size, e.what());
        else fprintf(stderr, "error: %s\n", e.what());
        return 1;
    } catch (const std::bad_alloc&) {
        if (dp) dp->abort();
        fprintf(stderr, "error: out of memory (a host allocation failed); use a smaller --batch / --seq or model\n");
        return 1;
    }
}
#endif  // TRAIN_MOE_NO_MAIN
