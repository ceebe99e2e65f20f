// run.h: the training run around the model, one copy for both trainers: settings from the
// command line, a model from scratch / a checkpoint / a resumed run, evaluation, sampling,
// and the training loop with its checkpoints and metrics. train_moe.cpp (Model) and
// train_moe.cu (GPUModel<T>) each call run_training with their model.
//
// defines: AdamWSettings, AdamWStep, adamw_step, config_from_args, schedule_from_args,
//          router_loss_from_args, adamw_from_args, default_out_to_resume_run,
//          load_run_tokenizer, evaluate, evaluate_ensemble, run_ensemble_eval, ensemble_token_loss,
//          sample_token, sample_text, save_run_checkpoint, RunHooks,
//          check_run_output, stop_non_finite, run_training
//
// What the shared code asks of a model type (both trainers' models provide it):
//   cfg, layout, router_loss, expert_bias, step_load, adam_t
//   init_scratch(config, seed, std), load(dir), load_optimizer(path),
//   load_training_state(dir, state, n_domains, &settings), alloc(B, T), summary_note()
//   forward(in, tgt, B, T) -> Losses          a pass without gradient (targets may be null)
//   forward_backward(in, tgt, B, T, n_micro) -> Losses, adding 1/n_micro of the gradient
//   zero_grad(), step(adamw, lr) -> gradient norm before clipping
//   (a model may keep a step's losses on its device until its step, returning zeros from
//   forward_backward: the GPU trainer; RunHooks::step_losses then hands them over)
//   expert_counts(l) [E], logits_row(n) [V]: of the last forward, on the host
//   with_host_state(f): f(params, m, v) with host pointers (for checkpoints)
#pragma once
#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <type_traits>
#include <string>
#include <vector>
#include "bpe.h"           // defines: BpeTokenizer (--sample-prompt)
#include "checkpoint.h"    // defines: TrainerState, save_checkpoint, resolve_resume_dir, ...
#include "cli.h"           // defines: Cli
#include "dataloader.h"    // defines: DataLoader
#include "logging.h"       // defines: EvalResult, log_eval, log_step, print_model_summary, ...
#include "metrics.h"       // defines: MetricsLog
#include "model.h"         // defines: ModelConfig, model_preset, parse_routing
#include "resources.h"     // defines: MemoryPlan, train_memory_plan, check_memory_plan, disk_free_bytes, ...
#include "rng.h"           // defines: RngStream, stream_id, PURPOSE_SAMPLE
#include "router_losses.h" // defines: Losses, RouterLossSettings, parse_aux_loss
#include "schedule.h"      // defines: LRSchedule
#include "tokenizer.h"     // defines: Tokenizer
#include "train_args.h"    // defines: TrainArgs
#include "util.h"          // defines: FAIL, path_join, now_seconds, printable

// ----------------------------------------------------------------------------
// Settings

struct AdamWSettings {  // hyperparameters; each trainer has its own update loop or kernel
    double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1, grad_clip = 1.0;
};
// The per-step numbers of AdamW: the clip factor of global-norm clipping and the bias
// corrections bc1 = 1 - beta1^t, bc2 = 1 - beta2^t of step t (counted from 1).
struct AdamWStep {
    double clip, bc1, bc2;
};
// Device-callable where nvcc compiles this header: the GPU trainer computes the clip factor
// on the device (kernels/adamw.cuh adamw_scalars), with this same function
#ifdef __CUDACC__
#define RUN_HD __host__ __device__
#else
#define RUN_HD
#endif
RUN_HD inline double grad_clip_factor(double grad_clip, double grad_norm) {
    return (grad_clip > 0 && grad_norm > grad_clip) ? grad_clip / grad_norm : 1.0;
}
inline AdamWStep adamw_step(const AdamWSettings& hp, double grad_norm, long t) {
    AdamWStep s;
    s.clip = grad_clip_factor(hp.grad_clip, grad_norm);
    s.bc1 = 1 - std::pow(hp.beta1, (double)t);
    s.bc2 = 1 - std::pow(hp.beta2, (double)t);
    return s;
}

inline ModelConfig config_from_args(const TrainArgs& a, int tokenizer_vocab) {
    ModelConfig c;
    if (model_preset(a.model, &c)) {
        c.vocab_size = a.vocab > 0 ? a.vocab : tokenizer_vocab;
        if (c.vocab_size <= 0)
            FAIL("--model %s: vocabulary size unknown: give --vocab or a data folder with tokenizer.bin", a.model.c_str());
    } else if (path_exists(a.model)) {
        c = ModelConfig::load(a.model);
        if (a.vocab > 0) c.vocab_size = a.vocab;
    } else {
        FAIL("--model %s: neither a preset (%s) nor a config.json file", a.model.c_str(), model_preset_names());
    }
    if (a.experts > 0) {
        c.n_experts = a.experts;
        c.top_k = a.topk;
        if (a.expert_width > 0) c.ffn_dim = a.expert_width;
    }
    // unset: sigmoid, or none with --routing xft (which sets the shared expert's weight itself)
    const std::string gate = !a.shared_gate.empty() ? a.shared_gate : a.routing == "xft" ? "none" : "sigmoid";
    if (gate != "sigmoid" && gate != "none")
        FAIL("--shared-gate must be sigmoid or none, found \"%s\"", gate.c_str());
    if (a.shared_experts > 0) {
        if (c.n_experts == 0)
            FAIL("--shared-experts %d needs routed experts: give --experts E > 0 too (found a dense model)",
                 a.shared_experts);
        if ((long long)a.shared_experts * c.ffn_dim > (1 << 24))
            FAIL("--shared-experts %d x F_e %d: a shared FFN wider than %d", a.shared_experts, c.ffn_dim, 1 << 24);
        c.shared_dim = a.shared_experts * c.ffn_dim;  // S experts of width F_e = one FFN of width S F_e
        c.shared_gate = gate == "sigmoid";
    } else if (!a.shared_gate.empty()) {
        FAIL("--shared-gate %s applies only with --shared-experts S > 0 (a config.json sets it with the key "
             "shared_expert_gating)", a.shared_gate.c_str());
    }
    if (a.grove_groups > 0) {
        if (c.n_experts == 0 || c.n_experts % a.grove_groups)
            FAIL("--grove-groups %d must divide the number of experts (--experts, found %d)", a.grove_groups,
                 c.n_experts);
        if (c.has_shared()) FAIL("--grove-groups with --shared-experts is not supported");
        if (!std::isfinite(a.grove_scale)) FAIL("--grove-scale must be a finite number, found %g", a.grove_scale);
        c.grove_groups = a.grove_groups;
        c.grove_dim = a.grove_width > 0 ? a.grove_width : std::max(1, c.ffn_dim / 4);
        c.grove_scale = (float)a.grove_scale;
    } else if (a.grove_width > 0 || a.grove_scale != 0.05) {
        FAIL("--grove-width / --grove-scale apply only with --grove-groups G > 0");
    }
    c.routing = parse_routing(a.routing, "--routing");
    if (a.tie) c.tie_embeddings = true;
    c.max_seq_len = std::max(c.max_seq_len, a.seq);
    c.validate("--model " + a.model);
    return c;
}

inline LRSchedule schedule_from_args(const TrainArgs& a) {
    LRSchedule s;
    s.kind = a.lr_schedule;
    s.lr = a.lr;
    s.lr_min = a.lr_min >= 0 ? a.lr_min : a.lr / 10;
    s.warmup = a.warmup;
    s.total = a.steps;
    s.decay_frac = a.wsd_decay;
    s.validate();
    return s;
}

inline RouterLossSettings router_loss_from_args(const TrainArgs& a) {
    RouterLossSettings rl;
    parse_aux_loss(a.aux_loss, &rl.aux_loss, &rl.dpsl.on);
    rl.dpsl.coef = a.dpsl_coef;
    rl.dpsl.alpha = parse_dpsl_alpha(a.dpsl_alpha);
    rl.dpsl.distance = parse_dpsl_distance(a.dpsl_distance);
    rl.dpsl.ecdf = parse_dpsl_ecdf(a.dpsl_ecdf);
    rl.aux_coef = a.aux_coef;
    rl.z_coef = a.z_coef;
    rl.aux_free_rate = a.aux_free_bias;
    return rl;
}

inline AdamWSettings adamw_from_args(const TrainArgs& a) {
    AdamWSettings hp;
    hp.beta1 = a.beta1; hp.beta2 = a.beta2; hp.eps = a.eps;
    hp.weight_decay = a.weight_decay; hp.grad_clip = a.grad_clip;
    return hp;
}

// --resume without --out continues in the run directory that holds the checkpoint
inline void default_out_to_resume_run(TrainArgs& a, const Cli& cli) {
    if (a.resume.empty() || cli.was_set("--out")) return;
    std::string dir = resolve_resume_dir(a.resume);
    size_t slash = dir.rfind('/');
    a.out = slash == std::string::npos ? "." : dir.substr(0, slash);
}

// The tokenizer is optional (samples and the vocabulary size); an explicit --tokenizer must
// exist. Returns the path it looked at.
inline std::string load_run_tokenizer(const TrainArgs& a, Tokenizer* tok) {
    std::string path = a.tokenizer.empty() ? path_join(a.data_dir, "tokenizer.bin") : a.tokenizer;
    if (path_exists(path)) tok->load(path);
    else if (!a.tokenizer.empty()) FAIL("%s: tokenizer file not found", path.c_str());
    return path;
}

// ----------------------------------------------------------------------------
// Evaluation and sampling

// Mean cross-entropy of up to max_batches validation batches per domain, and the share of
// assignments each expert received, per domain and layer. Data parallel (world > 1): the
// loader's batches are global, this rank runs rows rank B .. rank B + B - 1 of each, and the
// model returns the global batch's loss and expert counts.
template <typename Model>
EvalResult evaluate(Model& M, const DataLoader& data, int max_batches, int rank = 0, int world = 1) {
    EvalResult r;
    std::vector<int> inp((size_t)data.B * data.T), tgt((size_t)data.B * data.T);
    const int B = data.B / world;
    const size_t mine = (size_t)rank * B * data.T;
    for (size_t d = 0; d < data.domains.size(); d++) {
        int nb = std::min(max_batches, data.val_batches((int)d));
        std::vector<std::vector<double>> load(M.cfg.n_layer, std::vector<double>(M.cfg.n_experts, 0));
        double sum = 0;
        for (int i = 0; i < nb; i++) {
            data.val_batch((int)d, i, inp.data(), tgt.data());
            sum += M.forward(inp.data() + mine, tgt.data() + mine, B, data.T).ce;
            for (int l = 0; l < M.cfg.n_layer && M.cfg.is_moe(); l++)
                for (int e = 0; e < M.cfg.n_experts; e++) load[l][e] += M.expert_counts(l)[e];
        }
        for (auto& row : load) {  // counts -> fractions of the layer's assignments
            double tot = 0;
            for (double c : row) tot += c;
            for (double& c : row) c = tot > 0 ? c / tot : 0;
        }
        r.loss.push_back(nb > 0 ? sum / nb : NAN);
        r.load.push_back(load);
    }
    // evaluation must not count towards the aux-free balancing statistics
    for (auto& s : M.step_load) std::fill(s.begin(), s.end(), 0);
    return r;
}

// ---- the ensemble evaluation (Branch-Train-Merge's output ensemble, docs/METHODS.md 2.10) ----

// -log of the uniform mixture's probability of `target`: -log((1/K) sum_k p_k(target)),
// p_k = softmax of model k's logits row (V entries); in double, with log-sum-exp twice
template <typename R>
double ensemble_token_loss(const std::vector<const R*>& rows, int V, int target) {
    std::vector<double> logp(rows.size());
    for (size_t k = 0; k < rows.size(); k++) {
        const R* z = rows[k];
        double mx = z[0], sum = 0;
        for (int v = 1; v < V; v++) mx = std::max(mx, (double)z[v]);
        for (int v = 0; v < V; v++) sum += std::exp((double)z[v] - mx);
        logp[k] = (double)z[target] - mx - std::log(sum);  // log p_k(target)
    }
    double mx = *std::max_element(logp.begin(), logp.end()), sum = 0;
    for (double x : logp) sum += std::exp(x - mx);
    return -(mx + std::log(sum) - std::log((double)rows.size()));
}

// evaluate() for a uniform mixture of models' next-token distributions: per domain, the mean
// over the same validation batches of the mean ensemble_token_loss over their tokens (no
// expert load: the mixture is of whole models). The models must share the vocabulary.
template <typename Model>
EvalResult evaluate_ensemble(std::vector<std::unique_ptr<Model>>& models, const DataLoader& data, int max_batches) {
    EvalResult r;
    const int B = data.B, T = data.T, N = B * T, V = models[0]->cfg.vocab_size;
    std::vector<int> inp((size_t)N), tgt((size_t)N);
    std::vector<std::vector<float>> logits(models.size(), std::vector<float>((size_t)N * V));
    for (size_t d = 0; d < data.domains.size(); d++) {
        int nb = std::min(max_batches, data.val_batches((int)d));
        double sum = 0;
        for (int i = 0; i < nb; i++) {
            data.val_batch((int)d, i, inp.data(), tgt.data());
            for (size_t k = 0; k < models.size(); k++) {  // each model's logits, kept as floats
                models[k]->forward(inp.data(), nullptr, B, T);
                for (int n = 0; n < N; n++)
                    for (int v = 0; v < V; v++) logits[k][(size_t)n * V + v] = (float)models[k]->logits_row(n)[v];
            }
            double batch = 0;
            std::vector<const float*> rows(models.size());
            for (int n = 0; n < N; n++) {
                for (size_t k = 0; k < models.size(); k++) rows[k] = logits[k].data() + (size_t)n * V;
                batch += ensemble_token_loss(rows, V, tgt[n]);
            }
            sum += batch / N;
        }
        r.loss.push_back(nb > 0 ? sum / nb : NAN);
        r.load.push_back({});
    }
    return r;
}

// ./train_moe --ensemble A,B,...: loads the models, evaluates their mixture on --data's
// validation split (--batch, --seq, --eval-batches, --seed as a training run would) and writes
// --out/metrics.jsonl (one eval record at step 0) and --out/ensemble.json. No training.
template <typename Model>
int run_ensemble_eval(const TrainArgs& args, const Cli& cli, const std::string& members) {
    for (const char* o : {"--init", "--resume", "--model", "--experts", "--steps", "--mix"})
        if (cli.was_set(o)) FAIL("--ensemble evaluates the given models as they are: %s does not apply", o);
    std::vector<std::string> dirs;
    for (size_t at = 0;;) {
        size_t c = members.find(',', at);
        dirs.push_back(members.substr(at, c == std::string::npos ? std::string::npos : c - at));
        if (dirs.back().empty()) FAIL("--ensemble: an empty model directory in \"%s\"", members.c_str());
        if (c == std::string::npos) break;
        at = c + 1;
    }
    TrainArgs a = args;
    std::vector<std::string> inputs = {a.data_dir};
    for (auto& d : dirs) inputs.push_back(d);
    check_output_location(a.out, inputs, a.overwrite);
    std::vector<std::unique_ptr<Model>> models;
    for (auto& d : dirs) {
        if (!is_dir(d)) FAIL("--ensemble: %s: model directory does not exist", d.c_str());
        models.emplace_back(new Model());
        models.back()->load(d);
        if (models.back()->cfg.vocab_size != models[0]->cfg.vocab_size)
            FAIL("--ensemble: %s has a vocabulary of %d but %s has %d; a mixture needs one vocabulary", d.c_str(),
                 models.back()->cfg.vocab_size, dirs[0].c_str(), models[0]->cfg.vocab_size);
    }
    DataLoader data(a.data_dir, a.mix, a.batch, a.seq, models[0]->cfg.vocab_size, (uint64_t)a.seed);
    printf("ensemble: uniform mixture of %zu models' next-token distributions (%s), %d x %d tokens per batch, "
           "%d validation batches per domain\n", dirs.size(), members.c_str(), a.batch, a.seq, a.eval_batches);
    EvalResult ev = evaluate_ensemble(models, data, a.eval_batches);
    check_writable_dir(a.out);
    MetricsLog metrics;
    metrics.open(path_join(a.out, "metrics.jsonl"), -1);
    ModelConfig no_experts = models[0]->cfg;  // the record has no expert load: a mixture of whole models
    no_experts.n_experts = 0;
    log_eval(metrics, no_experts, data, ev, 0, 0);
    Json rec = Json::object(), list = Json::array();
    for (auto& d : dirs) list.push(Json(d));
    rec["members"] = list;
    rec["weights"] = "uniform";
    rec["loss"] = "per token -log((1/K) sum_k p_k(target)), mean over tokens and validation batches per domain";
    rec["paper"] = "Branch-Train-Merge (output ensemble), arXiv 2208.03306";
    write_text_atomic(path_join(a.out, "ensemble.json"), rec.dump(2) + "\n");
    return 0;
}

// The logits after a context (its last T_max tokens), token after token. A model with a KV
// cache (Model::Cache, forward_cached: the CPU trainer) runs each new token alone while the
// context fits in T_max, and the whole window again once it slides (its positions restart);
// one without runs the whole window every token. Both give the
// same logits (test_cpu "KV cache").
template <typename Model, typename = void>
struct has_kv_cache : std::false_type {};
template <typename Model>
struct has_kv_cache<Model, std::void_t<typename Model::Cache>> : std::true_type {};

template <typename Model, bool = has_kv_cache<Model>::value>
struct ContextDecoder {
    Model& M;
    int T_max;
    ContextDecoder(Model& m, int t) : M(m), T_max(t) {}
    const auto* next(const std::vector<int>& ctx) {
        int start = std::max(0, (int)ctx.size() - T_max), len = (int)ctx.size() - start;
        M.forward(ctx.data() + start, nullptr, 1, len);
        return M.logits_row(len - 1);
    }
};
template <typename Model>
struct ContextDecoder<Model, true> {
    Model& M;
    int T_max;
    typename Model::Cache cache;
    int cached = 0;  // leading tokens of the context whose keys and values are in the cache
    ContextDecoder(Model& m, int t) : M(m), T_max(t) { cache.init(M.cfg, 1, T_max); }
    const auto* next(const std::vector<int>& ctx) {
        const int V = M.cfg.vocab_size, size = (int)ctx.size();
        int start = std::max(0, size - T_max), pos = 0;
        if (start > 0) {  // the window slid: its tokens sit at new positions, run it whole
            cached = -1;
            int len = size - start;
            return M.forward_cached(cache, ctx.data() + start, &pos, 0, 1, len) + (size_t)(len - 1) * V;
        }
        if (cached < 0) cached = 0;
        pos = cached;
        const int n = size - cached;
        const auto* z = M.forward_cached(cache, ctx.data() + cached, &pos, 0, 1, n);
        cached = size;
        return z + (size_t)(n - 1) * V;
    }
};

// The next token from logits z [V] (sample_text, generate.cpp): greedy at temperature 0, else
// softmax(z / temperature) cut to the smallest set of most likely tokens whose probability
// reaches top_p, drawn with one uniform number.
template <typename R>
int sample_token(const R* z, int V, double temperature, double top_p, RngStream& rng) {
    if (temperature <= 0) {
        int best = 0;
        for (int i = 1; i < V; i++) if (z[i] > z[best]) best = i;  // lowest index on ties
        return best;
    }
    double mx = z[0];
    for (int i = 1; i < V; i++) mx = std::max(mx, (double)z[i]);
    std::vector<std::pair<double, int>> p(V);
    double sum = 0;
    for (int i = 0; i < V; i++) sum += (p[i] = {std::exp((z[i] - mx) / temperature), i}).first;
    int keep = V;
    if (top_p < 1) {  // most likely first (ties by index), then the shortest prefix reaching top_p
        std::sort(p.begin(), p.end(), [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
        double acc = 0;
        for (keep = 0; keep < V;) {
            acc += p[keep++].first / sum;
            if (acc >= top_p) break;
        }
        sum = 0;
        for (int i = 0; i < keep; i++) sum += p[i].first;
    }
    double u = rng.uniform() * sum, acc = 0;
    for (int i = 0; i < keep; i++) {
        acc += p[i].first;
        if (u < acc) return p[i].second;
    }
    return p[keep - 1].second;
}

// Samples n tokens after an end-of-text token and the prompt's tokens, at temperature 1.
template <typename Model>
std::string sample_text(Model& M, const Tokenizer& tok, int n, int T_max, RngStream& rng,
                        const std::vector<int>& prompt = {}) {
    const int V = M.cfg.vocab_size;
    // the tokenizer's end-of-text id is a valid token of the tokenizer, not necessarily of a
    // model with a smaller --vocab
    std::vector<int> ctx = {tok.eot >= 0 && tok.eot < V ? tok.eot : 0};
    ctx.insert(ctx.end(), prompt.begin(), prompt.end());
    std::string out;
    auto saved = M.step_load;  // sampling is not training load either
    ContextDecoder<Model> decoder(M, T_max);
    for (int i = 0; i < n; i++) {
        const int next = sample_token(decoder.next(ctx), V, 1.0, 1.0, rng);
        if (next == tok.eot) break;
        ctx.push_back(next);
        out += tok.ok() ? tok.decode(next) : strfmt("<%d>", next);
    }
    M.step_load = saved;
    return out;
}

// ----------------------------------------------------------------------------
// The training run

template <typename Model>
void save_run_checkpoint(Model& M, const std::string& dir, const TrainerState& state, const Json& settings,
                         const std::string& tokenizer_json) {
    M.with_host_state([&](const auto* params, const auto* m, const auto* v) {
        save_checkpoint(dir, M.cfg, M.layout, params, m, v, M.adam_t, M.expert_bias, M.router_loss.aux_free_rate > 0,
                        state, settings, tokenizer_json);
    });
}

// The run directory: a new run never writes into a non-empty directory (it would mix its
// checkpoints and metrics.jsonl with another run's) unless --overwrite says so; a resumed run
// continues in its own. No output may be, contain or lie inside an input.
inline void check_run_output(const TrainArgs& a, const std::string& resume_dir) {
    std::vector<std::string> inputs = {a.data_dir, a.init};
    if (path_exists(a.model)) inputs.push_back(a.model);
    if (resume_dir.empty()) {
        if (path_exists(a.out) && is_dir(a.out) && path_exists(path_join(a.out, "latest")) && !a.overwrite)
            FAIL("--out %s holds an earlier run: continue it with --resume %s, choose a new --out, or pass --overwrite "
                 "to write this run into it", a.out.c_str(), a.out.c_str());
        check_output_location(a.out, inputs, a.overwrite);
        return;
    }
    // resuming: the checkpoint's own run directory (its parent) continues that run; any other
    // --out must be new or empty, as for a new run
    size_t slash = resume_dir.rfind('/');
    const std::string run_dir = slash == std::string::npos ? "." : resume_dir.substr(0, slash);
    check_output_location(a.out, inputs, a.overwrite || absolute_path(a.out) == absolute_path(run_dir));
}

// What a trainer adds to the shared run: the GPU trainer's model-FLOPs utilization of a step
// of `dt` seconds (NaN on a device of unknown peak). Empty (the CPU): no "mfu" field.
// And what its memory looks like, for the check before anything is allocated: bytes per
// parameter of weights + gradients, per activation value, whether it keeps the attention
// matrix, how many [F] values per FFN row it keeps, and the free memory of its device (null:
// host RAM).
// Data parallel (the GPU trainer on several GPUs): this process's rank of `world`; rank 0
// alone prints, writes metrics and checkpoints and checks the output directory; all_ok(ok)
// is true on every rank iff ok on every rank (a checkpoint that rank 0 failed to write stops
// every rank). optimizer_bytes: AdamW moments' bytes per parameter on this device.
struct RunHooks {
    std::function<double(double dt)> mfu;
    double state_bytes = 8, act_bytes = 4, optimizer_bytes = 8;
    bool stores_attention_matrix = true;
    double ffn_kept = 4;  // the CPU: gate, up, h, sigmoid(gate)
    std::function<double()> free_memory;
    std::string memory_name = "this machine's RAM";
    int rank = 0, world = 1;
    std::function<bool(bool)> all_ok;
    // The GPU trainer keeps the losses on its device until the end of the optimizer step
    // (no host wait inside the step; its forward_backward returns zeros): after step(), this
    // sets the step's mean losses. Such a model skips the update itself on a non-finite loss.
    std::function<void(Losses&)> step_losses;
};

// A non-finite loss or gradient norm stops the run before the update, so the weights, and
// every checkpoint, stay those of the last good step. Says which term went bad and where
// the last good checkpoint is.
[[noreturn]] inline void stop_non_finite(long step, const Losses& l, double norm, const std::string& last_good) {
    std::string bad;
    auto term = [&](const char* name, double v) { if (!std::isfinite(v)) bad += strfmt("%s%s = %g", bad.empty() ? "" : ", ", name, v); };
    term("cross-entropy", l.ce); term("load-balancing loss", l.aux); term("z-loss", l.z); term("dpsl loss", l.dpsl);
    if (bad.empty()) term("loss", l.loss);
    if (bad.empty()) bad = strfmt("gradient norm = %g (the losses are finite: ce %g)", norm, l.ce);
    FAIL("step %ld: non-finite %s; training stopped before this step's update, no checkpoint written with it. "
         "Last good checkpoint: %s. Try a lower --lr, a --grad-clip, or check the data and the initial weights",
         step, bad.c_str(), last_good.c_str());
}

// The whole run: model, data, then the loop (eval, sample, step, log, checkpoint) to
// --steps, a final eval, sample and checkpoint. Returns the exit code.
template <typename Model>
int run_training_in(Model& M, TrainArgs& args, const Cli& cli, const RunHooks& hooks) {
    const bool root = hooks.rank == 0;  // data parallel: rank 0 alone prints and writes
    Tokenizer tok;  // optional: only for printing samples and for the vocabulary size
    std::string tok_path = load_run_tokenizer(args, &tok);
    std::vector<int> prompt;  // --sample-prompt, encoded with the data's tokenizer.json
    if (!args.sample_prompt.empty()) {
        const std::string bpe_path = path_join(args.data_dir, "tokenizer.json");
        if (!path_exists(bpe_path)) FAIL("--sample-prompt needs %s to encode the prompt", bpe_path.c_str());
        BpeTokenizer bpe;
        bpe.load(bpe_path);
        prompt = bpe.encode(args.sample_prompt);
    }

    // the model: a resumed run, a checkpoint (--init), or from scratch. Its config first, so
    // that the output location, memory and disk are checked before anything is allocated.
    M.router_loss = router_loss_from_args(args);
    std::string resume_dir;
    ModelConfig plan_cfg;
    if (!args.resume.empty()) {
        resume_dir = resolve_resume_dir(args.resume);
        plan_cfg = ModelConfig::load(path_join(resume_dir, "config.json"));
    } else if (!args.init.empty()) {
        if (cli.was_set("--experts"))
            FAIL("--init with --experts: a checkpoint's shape is fixed; make an MoE from a dense model with ./upcycle");
        if (!is_dir(args.init)) FAIL("%s: --init model directory does not exist", args.init.c_str());
        plan_cfg = ModelConfig::load(path_join(args.init, "config.json"));
    } else {
        plan_cfg = config_from_args(args, tok.ok() ? (int)tok.tokens.size() : 0);
    }
    if (plan_cfg.is_moe()) M.router_loss.dpsl.check(plan_cfg.n_experts);
    if (root) check_run_output(args, resume_dir);
    std::string memory_line;  // printed with the summary, once everything is checked
    {
        MemoryPlan mem = train_memory_plan(plan_cfg, args.batch, args.seq, hooks.state_bytes, hooks.act_bytes,
                                           hooks.stores_attention_matrix, hooks.optimizer_bytes, hooks.ffn_kept);
        check_memory_plan(mem, hooks.free_memory ? hooks.free_memory() : host_memory_available(), hooks.memory_name,
                          strfmt("this run (B=%d, T=%d)", args.batch, args.seq));
        double disk = disk_free_bytes(args.out);
        if (root && !args.no_save && disk >= 0 && mem.checkpoint > disk)
            FAIL("%s: a checkpoint of this model takes %s but the disk has %s free", args.out.c_str(),
                 format_bytes(mem.checkpoint).c_str(), format_bytes(disk).c_str());
        const long n_kept = checkpoints_kept(parse_keep_checkpoints(args.keep_checkpoints), args.steps, args.save_every);
        memory_line = strfmt("memory: %s; a checkpoint %s, up to %ld kept (--keep-checkpoints %s): %s (%s free on disk)",
                             mem.str().c_str(), format_bytes(mem.checkpoint).c_str(), n_kept,
                             args.keep_checkpoints.c_str(), format_bytes(mem.checkpoint * n_kept).c_str(),
                             disk >= 0 ? format_bytes(disk).c_str() : "?");
    }
    if (!resume_dir.empty()) {
        M.load(resume_dir);
    } else if (!args.init.empty()) {
        M.load(args.init);
        if (args.init_optimizer) {  // e.g. expert upcycling: the copies carry their AdamW moments
            std::string op = path_join(args.init, "optimizer.safetensors");
            if (!path_exists(op)) FAIL("%s: --init-optimizer needs this file", op.c_str());
            M.load_optimizer(op);
        }
    } else {
        M.init_scratch(plan_cfg, (uint64_t)args.seed, (float)args.init_std);
    }
    const ModelConfig& c = M.cfg;
    for (int id : prompt)
        if (id >= c.vocab_size)
            FAIL("--sample-prompt: token %d of the prompt is outside the model's vocabulary of %d", id, c.vocab_size);
    if (tok.ok() && (int)tok.tokens.size() > c.vocab_size)
        FAIL("%s: tokenizer has %zu tokens but the model's vocab_size is %d", tok_path.c_str(), tok.tokens.size(),
             c.vocab_size);
    if (args.seq > c.max_seq_len)
        fprintf(stderr, "warning: --seq %d exceeds max_position_embeddings %d of the checkpoint\n", args.seq, c.max_seq_len);

    // data, schedule, optimizer, and where a resumed run stands. Data parallel: every rank
    // draws the same global batches of world x --batch rows and trains on its own slice
    const int B_global = args.batch * hooks.world;
    const size_t my_rows = (size_t)hooks.rank * args.batch * args.seq;  // offset of this rank's slice
    DataLoader data(args.data_dir, args.mix, B_global, args.seq, c.vocab_size, (uint64_t)args.seed);
    if (root) {
        check_writable_dir(args.out);
        if (int n = remove_stale_temporaries(args.out))
            memory_line += strfmt("\ncleaned up: %d unfinished file(s) of a killed earlier run in %s", n, args.out.c_str());
    }
    LRSchedule sched = schedule_from_args(args);
    AdamWSettings adamw = adamw_from_args(args);
    TrainerState state;
    if (!resume_dir.empty()) {
        Json saved;
        M.load_training_state(resume_dir, state, data.domains.size(), &saved);
        args.check_resume_settings(saved, resume_dir);
        data.state = state.data;
    }
    M.alloc(args.batch, args.seq);
    MetricsLog metrics;
    if (root) metrics.open(path_join(args.out, "metrics.jsonl"), resume_dir.empty() ? -1 : state.step);
    RngStream sample_rng((uint64_t)args.seed, stream_id(PURPOSE_SAMPLE));
    sample_rng.counter = state.sample_counter;

    // what we are about to do
    if (root) {
        print_model_summary(c, M.router_loss);
        printf("%s\n%s\n", M.summary_note().c_str(), memory_line.c_str());
        print_data_and_run(args, data, sched, resume_dir, state.step);
    }

    // ---- the training loop ----
    std::vector<int> inp((size_t)B_global * args.seq), tgt((size_t)B_global * args.seq);
    const double tokens_per_step = (double)B_global * args.seq * args.grad_accum;
    const long start_step = state.step;
    double t_start = now_seconds();
    long last_saved = -1;
    Json settings = args.settings();
    const KeepCheckpoints keep = parse_keep_checkpoints(args.keep_checkpoints);
    CheckpointManifest manifest;  // the checkpoints this run wrote (checkpoints.json)
    manifest.load(args.out);
    // what to name when a step or a save fails: the newest checkpoint that is complete
    auto last_good = [&]() {
        if (last_saved >= 0) return strfmt("%s (resume with --resume %s)", path_join(args.out, strfmt("step_%06ld", last_saved)).c_str(), args.out.c_str());
        if (!resume_dir.empty()) return strfmt("%s, the one this run resumed from", resume_dir.c_str());
        if (!args.init.empty()) return strfmt("none from this run; it started from %s", args.init.c_str());
        return std::string("none (this run had not saved one; see --save-every)");
    };
    // (data parallel: every rank takes part in gathering the state; rank 0 writes)
    auto save_now = [&]() {
        state.data = data.state;
        state.sample_counter = sample_rng.counter;
        std::string name = strfmt("step_%06ld", state.step);
        std::string failed;
        try {
            save_run_checkpoint(M, path_join(args.out, name), state, settings, path_join(args.data_dir, "tokenizer.json"));
        } catch (const Error& e) {
            failed = e.what();
        }
        const bool all_ok = hooks.all_ok ? hooks.all_ok(failed.empty()) : failed.empty();
        if (!failed.empty())
            FAIL("checkpoint %s could not be written (%s); the last good one is intact and still the latest: %s",
                 name.c_str(), failed.c_str(), last_good().c_str());
        if (!all_ok) FAIL("checkpoint %s: rank 0 could not write it (see its error); stopping", name.c_str());
        last_saved = state.step;
        if (!root) return;
        write_text_atomic(path_join(args.out, "latest"), name + "\n");
        printf("saved %s\n", path_join(args.out, name).c_str());
        for (auto& g : manifest.add_and_prune(args.out, keep, name, state.step, state.tokens))
            printf("removed %s (--keep-checkpoints %s)\n", path_join(args.out, g).c_str(), args.keep_checkpoints.c_str());
    };
    auto print_sample = [&]() {  // rank 0 only: no collectives in a forward without targets
        if (args.sample_tokens <= 0 || !root) return;
        std::string s = sample_text(M, tok, args.sample_tokens, args.seq, sample_rng, prompt);
        printf("sample at step %ld: %s%s\n", state.step,
               prompt.empty() ? "" : ("[" + printable(args.sample_prompt) + "]").c_str(), printable(s).c_str());
    };
    while (state.step < args.steps) {
        if (args.eval_every > 0 && state.step % args.eval_every == 0) {
            EvalResult ev = evaluate(M, data, args.eval_batches, hooks.rank, hooks.world);
            if (root) log_eval(metrics, c, data, ev, state.step, state.tokens);
        }
        if (args.sample_every > 0 && state.step > 0 && state.step % args.sample_every == 0) print_sample();
        double t0 = now_seconds();
        M.zero_grad();
        Losses acc;
        for (int micro = 0; micro < args.grad_accum; micro++) {
            data.next_batch(inp.data(), tgt.data());
            acc.add_mean(M.forward_backward(inp.data() + my_rows, tgt.data() + my_rows, args.batch, args.seq, args.grad_accum),
                         args.grad_accum);
        }
        auto finite = [](const Losses& l) {
            return std::isfinite(l.loss) && std::isfinite(l.ce) && std::isfinite(l.aux) && std::isfinite(l.z) &&
                   std::isfinite(l.dpsl);
        };
        if (!finite(acc)) stop_non_finite(state.step + 1, acc, NAN, last_good());
        double lr = sched.at((int)state.step);
        double norm = M.step(adamw, lr);  // skips the update when norm is not finite
        if (hooks.step_losses) {
            hooks.step_losses(acc);
            if (!finite(acc)) stop_non_finite(state.step + 1, acc, NAN, last_good());
        }
        if (!std::isfinite(norm)) stop_non_finite(state.step + 1, acc, norm, last_good());
        state.step++;
        state.tokens += tokens_per_step;
        double dt = now_seconds() - t0;
        if (root)
            log_step(metrics, args, c.is_moe(), state, start_step, acc, lr, norm, dt, now_seconds() - t_start,
                     (bool)hooks.mfu, hooks.mfu ? hooks.mfu(dt) : NAN);
        const bool due = (args.save_every > 0 && state.step % args.save_every == 0) ||
                         (keep == KEEP_LOG && is_log_step(state.step));
        if (due && state.step < args.steps) {
            state.elapsed += now_seconds() - t_start;
            t_start = now_seconds();
            save_now();
        }
    }
    {
        EvalResult ev = evaluate(M, data, args.eval_batches, hooks.rank, hooks.world);
        if (root) log_eval(metrics, c, data, ev, state.step, state.tokens);
    }
    print_sample();
    if (!args.no_save && last_saved != state.step) save_now();
    return 0;
}

// A run that fails before its first record (bad data, a model that does not fit, a
// divergence at step 1) leaves nothing behind: not the run directory it created, not an
// empty metrics.jsonl.
template <typename Model>
int run_training(Model& M, TrainArgs& args, const Cli& cli, const RunHooks& hooks = RunHooks()) {
    default_out_to_resume_run(args, cli);
    const bool out_existed = path_exists(args.out);
    try {
        return run_training_in(M, args, cli, hooks);
    } catch (...) {
        if (hooks.rank == 0 && !out_existed && is_dir(args.out)) {
            bool empty = true;
            for (const std::string& n : list_dir(args.out))
                empty &= n == "metrics.jsonl" && read_file(path_join(args.out, n)).empty();
            if (empty) remove_tree(args.out);
        }
        throw;
    }
}
