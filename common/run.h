// run.h: what a training run does besides the math, shared by both trainers:
// checkpoint directories (model + optimizer + trainer state), resume, the model config,
// schedule and optimizer settings from the command line, the run's summary lines, and the
// per-step and eval records in metrics.jsonl with the progress line.
//
// A checkpoint directory holds config.json + model.safetensors (a Hugging Face model),
// optimizer.safetensors (AdamW moments "<name>.exp_avg", "<name>.exp_avg_sq"; metadata
// adam_t) and trainer_state.json (step, tokens, data position, RNG counters, settings).
#pragma once
#include <cmath>
#include <string>
#include <vector>
#include "cli.h"
#include "dataloader.h"
#include "json.h"
#include "metrics.h"
#include "model.h"
#include "router_losses.h"
#include "safetensors.h"
#include "schedule.h"
#include "tokenizer.h"
#include "train_args.h"
#include "util.h"

struct Losses {  // one optimizer step's losses (means over its micro-batches)
    double loss = 0, ce = 0, aux = 0, z = 0;
    void add_mean(const Losses& l, int n) {  // += l / n: one of n micro-batches
        loss += l.loss / n;
        ce += l.ce / n;
        aux += l.aux / n;
        z += l.z / n;
    }
};

struct AdamW {  // hyperparameters; the update itself is in each trainer
    double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1, grad_clip = 1.0;
};

struct RunState {
    long step = 0;          // optimizer steps done
    double tokens = 0;      // training tokens seen
    DataState data;
    uint64_t sample_counter = 0;
    double elapsed = 0;     // training seconds before this process
};

// Aux-loss-free routing biases [L][E] travel in model.safetensors as extra tensors.
inline std::vector<ExtraTensor> bias_tensors(const ModelConfig& c, const std::vector<std::vector<float>>& bias) {
    std::vector<ExtraTensor> out;
    for (int l = 0; l < c.n_layer && c.is_moe(); l++)
        out.push_back({strfmt("model.layers.%d.block_sparse_moe.expert_bias", l), {(int64_t)c.n_experts}, bias[l]});
    return out;
}
inline void read_bias_tensors(const std::string& dir, const ModelConfig& c, std::vector<std::vector<float>>* bias) {
    bias->assign(c.n_layer, std::vector<float>(c.n_experts, 0.0f));
    if (!c.is_moe()) return;
    CheckpointTensors ck(dir);
    for (int l = 0; l < c.n_layer; l++) {
        std::string name = strfmt("model.layers.%d.block_sparse_moe.expert_bias", l);
        if (ck.has(name)) ck.read(name, {(int64_t)c.n_experts}, (*bias)[l].data());
    }
}

template <typename T>
void write_optimizer_file(const std::string& path, const ParamLayout& lay, const T* m, const T* v, long adam_t) {
    SafeTensorsWriter w;
    w.metadata["adam_t"] = std::to_string(adam_t);
    for (auto& t : lay.tensors) {
        w.declare(t.name + ".exp_avg", DType::F32, t.shape);
        w.declare(t.name + ".exp_avg_sq", DType::F32, t.shape);
    }
    w.begin(path);
    for (auto& t : lay.tensors) {
        w.write(t.name + ".exp_avg", m + t.offset);
        w.write(t.name + ".exp_avg_sq", v + t.offset);
    }
    w.finish();
}
// Reads AdamW moments; returns adam_t from the file's metadata (0 if absent).
template <typename T>
long read_optimizer_file(const std::string& path, const ParamLayout& lay, T* m, T* v) {
    SafeTensorsReader opt(path);
    for (auto& t : lay.tensors) {
        opt.read(t.name + ".exp_avg", t.shape, m + t.offset);
        opt.read(t.name + ".exp_avg_sq", t.shape, v + t.offset);
    }
    auto it = opt.metadata.find("adam_t");
    return it == opt.metadata.end() ? 0 : std::stol(it->second);
}

// Writes a whole checkpoint directory atomically (built aside, then renamed into place).
template <typename T>
void save_checkpoint(const std::string& dir, const ModelConfig& cfg, const ParamLayout& lay, const T* params,
                     const T* m, const T* v, long adam_t, const std::vector<std::vector<float>>& bias, bool save_bias,
                     const RunState& rs, const Json& settings, const std::string& tokenizer_json = "") {
    AtomicDir out(dir);
    if (!tokenizer_json.empty() && path_exists(tokenizer_json))  // so HF tools can use the model as is
        write_text_atomic(out.file("tokenizer.json"), read_text(tokenizer_json));
    save_model_files(out.tmp, cfg, lay, params, DType::F32,
                     save_bias ? bias_tensors(cfg, bias) : std::vector<ExtraTensor>());
    write_optimizer_file(out.file("optimizer.safetensors"), lay, m, v, adam_t);
    Json st = Json::object();
    st["step"] = rs.step;
    st["tokens"] = rs.tokens;
    st["adam_t"] = adam_t;
    st["data"] = rs.data.to_json();
    st["sample_rng_counter"] = std::to_string(rs.sample_counter);
    st["elapsed_seconds"] = rs.elapsed;
    st["settings"] = settings;
    write_text_atomic(out.file("trainer_state.json"), st.dump(2) + "\n");
    out.commit();
}

// Loads a checkpoint's optimizer and trainer state (the model is loaded separately).
template <typename T>
void load_training_state(const std::string& dir, const ParamLayout& lay, T* m, T* v, long* adam_t, RunState& rs,
                         size_t n_domains, Json* settings) {
    std::string sp = path_join(dir, "trainer_state.json");
    if (!path_exists(sp)) FAIL("%s: no trainer_state.json: not a training checkpoint (use --init to start from it)", dir.c_str());
    Json st = Json::parse_file(sp);
    rs.step = (long)st.get_int("step", sp);
    rs.tokens = st.get_num("tokens", sp);
    *adam_t = (long)st.get_int("adam_t", sp);
    rs.elapsed = st.get_num("elapsed_seconds", 0.0, sp);
    rs.sample_counter = std::stoull(st.get_str("sample_rng_counter", "0", sp));
    const Json* d = st.find("data");
    if (!d) FAIL("%s: missing \"data\" (data loader position)", sp.c_str());
    rs.data = DataState::from_json(*d, n_domains, sp);
    if (const Json* s = st.find("settings")) *settings = *s;
    read_optimizer_file(path_join(dir, "optimizer.safetensors"), lay, m, v);
}

// ---- setting up a run: the model from scratch / a checkpoint / a resumed run ----

// "runs/x" -> "runs/x/step_000100" via the run's "latest" file; a checkpoint dir as is.
inline std::string resolve_resume_dir(const std::string& p) {
    if (path_exists(path_join(p, "trainer_state.json"))) return p;
    std::string latest = path_join(p, "latest");
    if (path_exists(latest)) {
        std::string name = read_text(latest);
        while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
        return path_join(p, name);
    }
    if (!path_exists(p)) FAIL("%s: --resume directory does not exist", p.c_str());
    FAIL("%s: neither a checkpoint (no trainer_state.json) nor a run directory (no latest)", p.c_str());
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
    c.routing = parse_routing(a.routing, "--routing");
    if (a.tie) c.tie_embeddings = true;
    c.max_seq_len = std::max(c.max_seq_len, a.seq);
    c.validate("--model " + a.model);
    return c;
}

// ---- evaluation records ----

struct EvalResult {
    std::vector<double> loss;                            // per domain (NaN: no val data)
    std::vector<std::vector<std::vector<double>>> load;  // [domain][layer][expert] fraction of assignments
};

inline void log_eval(MetricsLog& metrics, const ModelConfig& cfg, const DataLoader& data, const EvalResult& ev, long step,
                     double tokens) {
    Json rec = Json::object();
    rec["step"] = step;
    rec["tokens"] = tokens;
    Json val = Json::object();
    double sum = 0;
    int n = 0;
    std::string line = strfmt("eval step %ld |", step);
    for (size_t d = 0; d < data.domains.size(); d++) {
        if (std::isnan(ev.loss[d])) continue;
        val[data.domains[d].name] = ev.loss[d];
        sum += ev.loss[d];
        n++;
        line += strfmt(" %s %.4f", data.domains[d].name.c_str(), ev.loss[d]);
    }
    rec["val"] = val;
    if (n) rec["val_loss"] = sum / n;
    if (cfg.is_moe()) {
        Json load = Json::object();
        for (size_t d = 0; d < data.domains.size(); d++) {
            if (std::isnan(ev.loss[d])) continue;
            Json layers = Json::array();
            for (auto& row : ev.load[d]) {
                Json r = Json::array();
                for (double x : row) r.push(Json(std::round(x * 1e5) / 1e5));
                layers.push(r);
            }
            load[data.domains[d].name] = layers;
        }
        rec["expert_load"] = load;
    }
    metrics.write(rec);
    printf("%s | mean %.4f\n", line.c_str(), n ? sum / n : NAN);
}

// ---- settings from the command line ----

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

inline TrainSettings train_settings_from_args(const TrainArgs& a) {
    TrainSettings ts;
    ts.aux_type = parse_aux(a.aux_loss);
    ts.aux_coef = a.aux_coef;
    ts.z_coef = a.z_coef;
    ts.aux_free_rate = a.aux_free_bias;
    return ts;
}

inline AdamW adamw_from_args(const TrainArgs& a) {
    AdamW hp;
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

// ---- what the run is about to do ----

// "model: ..." (ends without a newline: the GPU trainer adds its activation memory)
inline void print_model_summary(const ModelConfig& c, int aux_type, double aux_coef, double z_coef) {
    printf("model: %s, d %d, L %d, H %d/%d kv, F%s %d, vocab %d", c.is_moe() ? "MoE" : "dense", c.d_model, c.n_layer,
           c.n_head, c.n_kv_head, c.is_moe() ? "_e" : "", c.ffn_dim, c.vocab_size);
    if (c.is_moe()) printf(", %d experts top-%d %s, aux %s %g, z %g", c.n_experts, c.top_k, routing_name(c.routing),
                           aux_name(aux_type), aux_coef, z_coef);
    printf("\nparameters: %.3fM total, %.3fM active per token", build_layout(c).total / 1e6,
           count_active_params(c) / 1e6);
}

inline void print_data_and_run(const TrainArgs& a, const DataLoader& data, const LRSchedule& sched,
                               const std::string& resume_dir, long step) {
    printf("data: %s:", a.data_dir.c_str());
    for (auto& d : data.domains)
        printf(" %s (train %.2fM tok, w %.2f; val %.2fM tok)", d.name.c_str(), d.train.size() / 1e6, d.weight,
               d.val.size() / 1e6);
    printf("\nrun: %d steps x %d x %d x %d tokens, lr %g -> %g %s, out %s%s\n", a.steps, a.batch, a.seq, a.grad_accum,
           sched.lr, sched.lr_min, sched.kind.c_str(), a.out.c_str(),
           resume_dir.empty() ? "" : (", resumed from " + resume_dir + strfmt(" at step %ld", step)).c_str());
}

// ---- one training step's record ----

// Writes the step's metrics.jsonl record and, every --log-every steps and at the last, the
// progress line. `elapsed` is this process's training time so far (for the ETA).
// mfu: the GPU trainer's model-FLOPs utilization; NaN on a device of unknown peak (written
// as null); the CPU trainer passes has_mfu = false and no field is written.
inline void log_step(MetricsLog& metrics, const TrainArgs& a, bool moe, const RunState& rs, long start_step,
                     const Losses& acc, double lr, double norm, double dt, double elapsed, bool has_mfu = false,
                     double mfu = NAN) {
    const double tokens_per_step = (double)a.batch * a.seq * a.grad_accum;
    Json rec = Json::object();
    rec["step"] = rs.step;
    rec["tokens"] = rs.tokens;
    rec["loss"] = acc.loss;
    rec["ce"] = acc.ce;
    if (moe) { rec["aux"] = acc.aux; rec["z"] = acc.z; }
    rec["lr"] = lr;
    rec["grad_norm"] = norm;
    rec["tok_per_s"] = tokens_per_step / dt;
    if (has_mfu) rec["mfu"] = std::isnan(mfu) ? Json() : Json(mfu);
    metrics.write(rec);
    if (rs.step % a.log_every == 0 || rs.step == a.steps) {
        double eta = elapsed / (rs.step - start_step) * (a.steps - rs.step);
        printf("step %5ld/%d | loss %.4f (ce %.4f", rs.step, a.steps, acc.loss, acc.ce);
        if (moe) printf(" aux %.4f z %.3f", acc.aux, acc.z);
        printf(") | lr %.2e | norm %.3f | %.0f tok/s", lr, norm, tokens_per_step / dt);
        if (has_mfu && !std::isnan(mfu)) printf(" | MFU %.1f%%", 100 * mfu);
        printf(" | ETA %s\n", format_duration(eta).c_str());
        fflush(stdout);
    }
}
