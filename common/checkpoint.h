// checkpoint.h: a training checkpoint on disk, the same for both trainers.
//
// defines: TrainerState, bias_tensors, read_bias_tensors, write_optimizer_file, KeepCheckpoints,
//          CheckpointManifest, is_log_step,
//          read_optimizer_file, save_checkpoint, load_training_state, resolve_resume_dir
//
// A checkpoint directory step_NNNNNN/ holds config.json + model.safetensors (a Hugging Face
// model, with the aux-loss-free biases as extra tensors), optimizer.safetensors (AdamW
// moments "<name>.exp_avg", "<name>.exp_avg_sq"; metadata adam_t) and trainer_state.json
// (step, tokens, data position, RNG counters, settings). A run directory's "latest" file
// names its newest checkpoint.
#pragma once
#include <climits>
#include <string>
#include <vector>
#include "dataloader.h"    // defines: DataState (the data loader's position)
#include "json.h"          // defines: Json
#include "model.h"         // defines: ModelConfig, ParamLayout, save_model_files, CheckpointTensors
#include "safetensors.h"   // defines: SafeTensorsReader, SafeTensorsWriter
#include "util.h"          // defines: AtomicDir, write_text_atomic, path_join, FAIL

// Where a run stands: trainer_state.json, minus the optimizer's adam_t
struct TrainerState {
    long step = 0;          // optimizer steps done
    double tokens = 0;      // training tokens seen
    DataState data;         // data loader position
    uint64_t sample_counter = 0;
    double elapsed = 0;     // training seconds before this process
};

// Aux-loss-free routing biases [L][E] travel in model.safetensors as extra tensors.
inline std::string bias_tensor_name(int layer) {
    return strfmt("model.layers.%d.block_sparse_moe.expert_bias", layer);
}
inline std::vector<ExtraTensor> bias_tensors(const ModelConfig& c, const std::vector<std::vector<float>>& bias) {
    std::vector<ExtraTensor> out;
    for (int l = 0; l < c.n_layer && c.is_moe(); l++) out.push_back({bias_tensor_name(l), {(int64_t)c.n_experts}, bias[l]});
    return out;
}
inline void read_bias_tensors(const std::string& dir, const ModelConfig& c, std::vector<std::vector<float>>* bias) {
    bias->assign(c.n_layer, std::vector<float>(c.n_experts, 0.0f));
    if (!c.is_moe()) return;
    CheckpointTensors ck(dir);
    for (int l = 0; l < c.n_layer; l++)
        if (ck.has(bias_tensor_name(l))) ck.read(bias_tensor_name(l), {(int64_t)c.n_experts}, (*bias)[l].data());
}

template <typename T>
void write_optimizer_file(const std::string& path, const ParamLayout& layout, const T* m, const T* v, long adam_t) {
    SafeTensorsWriter w;
    w.metadata["adam_t"] = std::to_string(adam_t);
    for (auto& t : layout.tensors) {
        w.declare(t.name + ".exp_avg", DType::F32, t.shape);
        w.declare(t.name + ".exp_avg_sq", DType::F32, t.shape);
    }
    w.begin(path);
    for (auto& t : layout.tensors) {
        w.write(t.name + ".exp_avg", m + t.offset);
        w.write(t.name + ".exp_avg_sq", v + t.offset);
    }
    w.finish();
}
// Reads AdamW moments; returns adam_t from the file's metadata (0 if absent).
template <typename T>
long read_optimizer_file(const std::string& path, const ParamLayout& layout, T* m, T* v) {
    SafeTensorsReader opt(path);
    for (auto& t : layout.tensors) {
        opt.read(t.name + ".exp_avg", t.shape, m + t.offset);
        opt.read(t.name + ".exp_avg_sq", t.shape, v + t.offset);
    }
    auto it = opt.metadata.find("adam_t");
    return it == opt.metadata.end() ? 0 : (long)std::min<uint64_t>(parse_uint64(it->second, path + ": adam_t"), LONG_MAX);
}

// Writes a whole checkpoint directory atomically (built aside, then renamed into place).
template <typename T>
void save_checkpoint(const std::string& dir, const ModelConfig& cfg, const ParamLayout& layout, const T* params,
                     const T* m, const T* v, long adam_t, const std::vector<std::vector<float>>& bias, bool save_bias,
                     const TrainerState& state, const Json& settings, const std::string& tokenizer_json = "") {
    AtomicDir out(dir);
    if (!tokenizer_json.empty() && path_exists(tokenizer_json))  // so HF tools can use the model as is
        write_text_atomic(out.file("tokenizer.json"), read_text(tokenizer_json));
    save_model_files(out.tmp, cfg, layout, params, DType::F32,
                     save_bias ? bias_tensors(cfg, bias) : std::vector<ExtraTensor>());
    write_optimizer_file(out.file("optimizer.safetensors"), layout, m, v, adam_t);
    Json st = Json::object();
    st["step"] = state.step;
    st["tokens"] = state.tokens;
    st["adam_t"] = adam_t;
    st["data"] = state.data.to_json();
    st["sample_rng_counter"] = std::to_string(state.sample_counter);
    st["elapsed_seconds"] = state.elapsed;
    st["settings"] = settings;
    write_text_atomic(out.file("trainer_state.json"), st.dump(2) + "\n");
    out.commit();
}

// trainer_state.json's contents (`what` names the file in messages); dev/fuzz fuzzes this.
inline void parse_trainer_state(const Json& st, size_t n_domains, const std::string& what, TrainerState& state,
                                long* adam_t, Json* settings) {
    if (st.type != Json::OBJ) FAIL("%s: not a JSON object", what.c_str());
    state.step = (long)st.get_int("step", what);
    state.tokens = st.get_num("tokens", what);
    *adam_t = (long)st.get_int("adam_t", what);
    if (state.step < 0 || *adam_t < 0) FAIL("%s: step and adam_t must be >= 0", what.c_str());
    state.elapsed = st.get_num("elapsed_seconds", 0.0, what);
    state.sample_counter = parse_uint64(st.get_str("sample_rng_counter", "0", what), what + ": sample_rng_counter");
    const Json* d = st.find("data");
    if (!d) FAIL("%s: missing \"data\" (data loader position)", what.c_str());
    state.data = DataState::from_json(*d, n_domains, what);
    if (const Json* s = st.find("settings")) *settings = *s;
}

// Loads a checkpoint's optimizer and trainer state (the model is loaded separately).
template <typename T>
void load_training_state(const std::string& dir, const ParamLayout& layout, T* m, T* v, long* adam_t,
                         TrainerState& state, size_t n_domains, Json* settings) {
    std::string sp = path_join(dir, "trainer_state.json");
    if (!path_exists(sp)) FAIL("%s: no trainer_state.json: not a training checkpoint (use --init to start from it)", dir.c_str());
    parse_trainer_state(Json::parse_file(sp), n_domains, sp, state, adam_t, settings);
    read_optimizer_file(path_join(dir, "optimizer.safetensors"), layout, m, v);
}

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

// ----------------------------------------------------------------------------
// Which checkpoints a run keeps (--keep-checkpoints), and its manifest checkpoints.json.
//   all:  every checkpoint written (the default)
//   last: only the newest; each new one replaces the previous (rolling)
//   log:  the newest, plus those at log-spaced steps 1, 2, 4, 8, ... (as Pythia kept them:
//         early training changes fastest), which are saved even between --save-every steps
// Only checkpoints the manifest lists (this run wrote them) are ever deleted, and only
// after the newer one and `latest` are in place.
enum KeepCheckpoints { KEEP_ALL = 0, KEEP_LAST = 1, KEEP_LOG = 2 };
inline KeepCheckpoints parse_keep_checkpoints(const std::string& s) {
    if (s == "all") return KEEP_ALL;
    if (s == "last") return KEEP_LAST;
    if (s == "log") return KEEP_LOG;
    FAIL("--keep-checkpoints must be all, last or log, found \"%s\"", s.c_str());
}
inline bool is_log_step(long step) { return step > 0 && (step & (step - 1)) == 0; }
// the most checkpoints a run of `steps` keeps at once (+1 while a new one is written)
inline long checkpoints_kept(KeepCheckpoints k, long steps, long save_every) {
    if (k == KEEP_LAST) return 1;
    long n = 1;  // the final one
    if (k == KEEP_ALL) return n + (save_every > 0 ? (steps - 1) / save_every : 0);
    for (long s = 1; s < steps; s *= 2) n++;
    return n + 1;  // + the newest rolling one
}

struct CheckpointManifest {
    struct Entry { std::string name; long step; double tokens; };
    std::vector<Entry> entries;  // in step order
    static std::string path(const std::string& run_dir) { return path_join(run_dir, "checkpoints.json"); }
    void load(const std::string& run_dir) {
        entries.clear();
        const std::string p = path(run_dir);
        if (!path_exists(p)) return;
        Json j = Json::parse_file(p);
        const Json* list = j.find("checkpoints");
        if (!list || list->type != Json::ARR) FAIL("%s: missing the \"checkpoints\" list", p.c_str());
        for (auto& e : list->arr)
            entries.push_back({e.get_str("name", "", p), (long)e.get_int("step", 0, LONG_MAX, p), e.get_num("tokens", 0.0, p)});
    }
    void save(const std::string& run_dir, KeepCheckpoints k) const {
        Json j = Json::object(), list = Json::array();
        static const char* modes[] = {"all", "last", "log"};
        j["keep"] = modes[k];
        for (auto& e : entries) {
            Json x = Json::object();
            x["name"] = e.name;
            x["step"] = e.step;
            x["tokens"] = e.tokens;
            x["log_spaced"] = is_log_step(e.step);
            list.push(x);
        }
        j["checkpoints"] = list;
        write_text_atomic(path(run_dir), j.dump(2) + "\n");
    }
    // records `name` (just written and made `latest`), then deletes the checkpoints of this
    // run that the policy no longer keeps; returns the names deleted
    std::vector<std::string> add_and_prune(const std::string& run_dir, KeepCheckpoints k, const std::string& name,
                                           long step, double tokens) {
        std::vector<Entry> kept;
        for (auto& e : entries) if (e.step != step) kept.push_back(e);
        kept.push_back({name, step, tokens});
        std::vector<std::string> gone;
        std::vector<Entry> now;
        for (auto& e : kept) {
            bool keep = k == KEEP_ALL || e.step == step || (k == KEEP_LOG && is_log_step(e.step));
            if (keep) now.push_back(e); else gone.push_back(e.name);
        }
        entries = now;
        save(run_dir, k);  // the manifest first: a crash now leaves extra directories, never a missing one listed
        for (auto& g : gone) remove_tree(path_join(run_dir, g));
        if (!gone.empty()) fsync_dir(run_dir);
        return gone;
    }
};
