/*
upcycle.cu: builds a Mixture-of-Experts model from trained dense model(s), or a larger MoE
from a trained MoE: every initialization of docs/METHODS.md section 2.

  scratch    FS   every matrix N(0, 0.02) (router too), norms 1                      (2.1)
  naive      NU   every expert = the dense FFN                                        (2.3)
  noise      RNU  NU + N(0, 0.02^2) on floor(F r) random neurons per matrix           (2.4)
  drop       DU   floor(F r) random neurons per matrix redrawn from their own stats   (2.5)
  btx        BTX  expert e = FFN of source e div (E/S); the rest = mean of sources    (2.6)
  btm-average  BTM  a dense model: every tensor = the element-wise mean of S dense  (2.10)
                    branches (Branch-Train-Merge's parameter average; no MoE)
  upit       UpIT experts = the FFNs of S checkpoints of one dense run, then merges of     (2.12)
                  the farthest pairs with random weights up to E; the rest = their mean
  granular   virtual groups: experts = F/G-wide shards, scaled, tied router rows      (2.7)
  partition  LLaMA-MoE: E disjoint random neuron sets, output x E/K (folded into w2)  (2.9)
  expand     E -> mE experts of a trained MoE, copies with their AdamW moments        (2.8)
  shared     dense FFN = the shared expert, routed experts = copies; FFN output split
             evenly between them, so the dense function is kept (topk_softmax)        (2.11)
  qwen2      Qwen2: shared expert as above; routed experts F/G wide, each a set of a
             shuffled partition of a copy of the FFN, a fraction r re-initialized
             (Drop-Upcycling's re-init)                                                (2.11)
  xft        XFT: dense FFN = the shared expert (unscaled), routed experts = copies,
             xft routing (shared weight 1 - p(1)): the dense function is kept         (2.13)
  merge      XFT's merge back: a trained shared-expert MoE -> a dense Llama, FFN =
             lambda shared + (1 - lambda) sum softmax(alpha)_i expert_i, alpha trained (2.13)
  nexus      Nexus: --from seed,branch_1..branch_S; shared expert = the seed's FFN, expert
             e = branch e's FFN; router R = Emb P, Emb = each domain's mean hidden state
             under the seed (a CPU forward over --data), P = s I                       (2.14)
  nexus-add  a trained Nexus MoE + a new branch + its domain data -> E+1 experts: the new
             Emb row from the seed; P, the experts and the rest unchanged              (2.14)
  add-expert the same for an MoE with the usual linear router (the Nexus table's baseline):
             the new expert's router row is a fresh free row (--router init)           (2.14)

Host code only: it builds with g++ (-x c++) on any machine and with nvcc. The math lives in
common/upcycle_ops.h; this file reads the sources, streams the output and records what it did.

Streaming: the output is declared in full (safetensors header first), then each tensor is
produced and written in order; a source tensor is read when it is needed and the dense
FFN of the current layer is the only thing kept. Peak memory is about one layer's worth.
The exceptions: expand with a gradient-based score loads the whole source model into the
CPU trainer to compute real gradients, and upit --upit-router seed loads each checkpoint
whole, one at a time, for its forward passes.
*/
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>
#define TRAIN_MOE_NO_MAIN
#include "train_moe.cpp"  // the CPU trainer's Model: gradients for utility scores
#include "common/sha256.h"
#include "common/upcycle_ops.h"
#include "common/xft_merge.h"  // defines: XftMerger (merge: MoE -> dense, XFT)

#define UPCYCLE_VERSION "1"

// The output must fit on its disk and a tensor in memory: refused before any work (a full
// disk or an allocation failure after minutes of work would leave nothing but an error).
static void check_output_size(const ParamLayout& lay, DType dt, const std::string& out) {
    const double bytes = (double)lay.total * dtype_size(dt);
    const double disk = disk_free_bytes(out);
    if (disk >= 0 && bytes > disk)
        FAIL("--out %s: the output model takes %s but its disk has %s free", out.c_str(), format_bytes(bytes).c_str(),
             format_bytes(disk).c_str());
    size_t largest = 0;  // tensors are streamed one at a time: a few float copies of the largest
    for (auto& t : lay.tensors) largest = std::max(largest, t.numel);
    const double need = 4.0 * sizeof(float) * largest, mem = host_memory_available();
    if (mem > 0 && need > mem)
        FAIL("the output's largest tensor needs %s of working memory but %s is free", format_bytes(need).c_str(),
             format_bytes(mem).c_str());
    printf("output: %.3fM parameters, %s on disk (%s free)\n", lay.total / 1e6, format_bytes(bytes).c_str(),
           disk >= 0 ? format_bytes(disk).c_str() : "?");
}

struct UpcycleArgs {
    std::string method, from, model, out, data = "data/tiny";
    std::string routing = "topk_softmax", router = "uniform", du_index_mode = "independent", dtype = "same";
    std::string select = "uniform", score = "weight_norm", shared_gate = "sigmoid";
    std::string upit_pair = "farthest", upit_shared = "mean", upit_router = "init";
    std::string nexus_domains, nexus_seed, nexus_hidden = "ffn_input", nexus_proj_init = "unit";
    double nexus_down_scale = 1.0;
    double upit_w_min = 0.25, upit_w_max = 0.75;
    double merge_lambda = 0.75, merge_lr = 0.05;
    int merge_steps = 100;
    int experts = 8, topk = 2, vocab = 0, granularity = 1, max_dup = 3, utility_batches = 4, batch = 4, seq = 64;
    int threads = 0;
    long seed = 1337;
    bool overwrite = false;
    double ratio = 0.5;
    int grove_groups = 0, grove_width = 0;
    double grove_scale = 0.05, grove_std = 0.02;

    void add_to(Cli& cli) {
        cli.section("Input and output");
        cli.add("--method", &method, "scratch, naive, noise, drop, btx, granular, partition, shared, qwen2, xft, "
                                     "merge, expand, btm-average, upit, grove, nexus, nexus-add or add-expert (required)");
        cli.add("--from", &from, "source model directory (HF Llama dense; HF Mixtral MoE for expand); btx, "
                                 "btm-average and upit: a,b,c,...");
        cli.add("--model", &model, std::string("scratch without --from: preset shape (") + model_preset_names() + ")");
        cli.add("--vocab", &vocab, "scratch with --model: vocabulary size", Range::between(0, 65536));
        cli.add("--out", &out, "output directory, written atomically (required; must not exist or be empty)");
        cli.flag("--overwrite", &overwrite, "replace an existing non-empty --out directory (never one that is, "
                                             "contains or lies inside an input)");
        cli.add("--dtype", &dtype, "output weights: same (as the input), f32 or bf16");
        cli.section("MoE shape and routing");
        cli.add("--experts", &experts, "number of experts E (expand: the new total, a multiple of the source's; "
                                       "default there: twice the source's)", Range::between(1, 65536));
        cli.add("--topk", &topk, "experts per token K (expand keeps the source's)", Range::between(1, 65536));
        cli.add("--routing", &routing, "topk_softmax (Mixtral) or softmax_topk (Megatron pre-softmax, no renormalization)");
        cli.add("--router", &router, "router init of upcycled models: uniform (zero-mean, std 0.02) or normal (N(0, 0.02))");
        cli.add("--seed", &seed, "seed of every random choice (output is a pure function of it)",
                Range::at_least(0));
        cli.section("Method settings");
        cli.add("--ratio", &ratio, "noise/drop/qwen2: fraction r of neurons per matrix (qwen2: per expert matrix)",
                Range::between(0, 1));
        cli.add("--du-index-mode", &du_index_mode, "drop/qwen2: independent (a set per gate/up/down, as the released "
                                                   "code) or shared (one set per expert, as the paper's text)");
        cli.add("--granularity", &granularity, "granular: G; experts are F/G wide; E and K must be multiples of G. "
                                               "qwen2: G; experts are F/G wide (any E, K)",
                Range::between(1, 65536));
        cli.add("--shared-gate", &shared_gate, "shared/qwen2: sigmoid (Qwen2-MoE, loads in HF as Qwen2MoeForCausalLM; "
                                               "gate vector 0 = a factor 1/2 at init) or none (DeepSeekMoE; the shared "
                                               "down_proj x 1/2 instead)");
        cli.section("UpIT (--method upit; --from = S >= 2 checkpoints of one dense run, E >= S)");
        cli.add("--upit-pair", &upit_pair, "which two experts each merge mixes: farthest (largest L2 distance of their "
                                           "FFNs, all layers) or random; never the same pair twice");
        cli.add("--upit-w-min", &upit_w_min, "merge weight w ~ Uniform[min, max]: new = w a + (1 - w) b",
                Range::between(0, 1));
        cli.add("--upit-w-max", &upit_w_max, "upper end of the merge weight's range", Range::between(0, 1));
        cli.add("--upit-shared", &upit_shared, "non-FFN tensors (attention, embeddings, norms, head): mean (of the "
                                               "checkpoints) or last (the last --from, the final checkpoint)");
        cli.add("--upit-router", &upit_router, "init (the usual router init) or seed: + rows from the mean hidden state of "
                                               "the sequences each checkpoint predicts best (--utility-batches batches "
                                               "of --batch x --seq from --data; loads each checkpoint whole)");
        cli.section("Nexus (--method nexus: --from seed,branch_1,...,branch_S; --method nexus-add: --from moe,branch)");
        cli.add("--nexus-domains", &nexus_domains, "the domain of each branch, in --from's order (names of --data's "
                                                   "<domain>_train_NNN.bin shards): its embedding is the seed's mean "
                                                   "hidden state over --utility-batches x --batch x --seq of its tokens");
        cli.add("--nexus-seed", &nexus_seed, "nexus-add: the seed dense model whose hidden states made the MoE's "
                                             "domain embeddings (default: the seed recorded in the MoE's config.json)");
        cli.add("--nexus-hidden", &nexus_hidden, "which hidden state: ffn_input (each layer's FFN input, after its "
                                                 "RMSNorm: the router's own input) or final (the final norm's output, "
                                                 "one embedding for every layer)");
        cli.add("--nexus-proj-init", &nexus_proj_init, "nexus: P's init: unit (P = I / the layer's mean |Emb row|: R's "
                                                       "rows have mean norm 1) or identity (P = I: R = Emb, logits of "
                                                       "the size of |x| |Emb|)");
        cli.add("--nexus-down-scale", &nexus_down_scale, "nexus: down_proj multiplier of the shared and the routed "
                                                         "experts (1 = the FFNs as trained: output seed FFN + routed mix; "
                                                         "nexus-add: default the MoE's recorded value)",
                Range::between(0, 1e6));
        cli.section("XFT merge (--method merge: a trained shared-expert MoE -> a dense Llama)");
        cli.add("--merge-lambda", &merge_lambda, "W = lambda shared + (1 - lambda) sum_i softmax(alpha)_i expert_i "
                                                 "(XFT's released code: 0.75)", Range::between(0, 1));
        cli.add("--merge-steps", &merge_steps, "Adam steps on alpha (per layer E mixing logits; all else frozen), "
                                               "batches of --batch x --seq from --data (0: uniform alpha)",
                Range::between(0, 1 << 24));
        cli.add("--merge-lr", &merge_lr, "Adam learning rate of alpha", Range::between(0, 1e6));
        cli.section("Expert upcycling (--method expand)");
        cli.add("--select", &select, "uniform (each expert duplicated m-1 times) or utility (greedy by --score)");
        cli.add("--score", &score, "weight_norm, grad_norm, saliency or fisher; the gradient-based ones load the "
                                   "WHOLE source model and run --utility-batches batches of --data");
        cli.add("--max-dup", &max_dup, "utility: at most this many new copies of one expert", Range::at_least(1));
        cli.add("--utility-batches", &utility_batches, "gradient scores (and upit --upit-router seed): training batches",
                Range::between(1, 1 << 20));
        cli.add("--data", &data, "gradient scores, upit seed router, merge: token shard folder (as train_moe --data)");
        cli.add("--batch", &batch, "gradient scores, upit seed router, merge: sequences per batch", Range::between(1, 1 << 20));
        cli.add("--seq", &seq, "gradient scores, upit seed router, merge: tokens per sequence", Range::between(1, 1 << 20));
        cli.section("Grove MoE (--method grove; --from = an MoE checkpoint)");
        cli.add("--grove-groups", &grove_groups, "G: groups of E/G consecutive experts, one adjugate expert each "
                                                 "(required; divides the source's E)", Range::between(0, 65536));
        cli.add("--grove-width", &grove_width, "adjugate FFN width F_a (0 = F_e / 4)", Range::between(0, 1 << 20));
        cli.add("--grove-scale", &grove_scale, "lambda, the adjugate output's scale (GroveMoE's released code: 0.05)");
        cli.add("--grove-std", &grove_std, "std of the adjugates' w1 and w3 (N(0, std^2)); w2 is zero, so the output "
                                           "model computes the source's function exactly", Range::at_least(0));
        cli.section("Run");
        cli.add("--threads", &threads, "OpenMP threads (0 = default); the output does not depend on it",
                Range::between(0, 4096));
    }
};

static const char* method_paper(const std::string& m) {
    if (m == "scratch") return "from scratch (Drop-Upcycling baseline FS, arXiv 2502.19261)";
    if (m == "naive") return "Sparse Upcycling, arXiv 2212.05055";
    if (m == "noise") return "random-noise upcycling (Drop-Upcycling baseline RNU, arXiv 2502.19261)";
    if (m == "drop") return "Drop-Upcycling, arXiv 2502.19261";
    if (m == "btx") return "Branch-Train-MiX, arXiv 2403.07816";
    if (m == "btm-average") return "Branch-Train-Merge (parameter average of the branches), arXiv 2208.03306";
    if (m == "granular") return "Upcycling LLMs into MoE (virtual-group granular upcycling), arXiv 2410.07524";
    if (m == "partition") return "LLaMA-MoE (neuron partition), arXiv 2406.16554";
    if (m == "expand") return "expert upcycling E -> mE, arXiv 2604.19835";
    if (m == "shared") return "shared experts (DeepSeekMoE, arXiv 2401.06066; Qwen2-MoE, arXiv 2407.10671)";
    if (m == "qwen2") return "Qwen2 upcycling (fine-grained shuffled shards, re-init, shared expert), arXiv 2407.10671";
    if (m == "merge") return "XFT's learnable merge of a shared-expert MoE into a dense model, arXiv 2404.15247";
    if (m == "xft") return "XFT (shared expert + routing-weight normalization), arXiv 2404.15247";
    if (m == "upit") return "UpIT, Upcycling Instruction Tuning via parameter merging, arXiv 2410.01610";
    if (m == "nexus" || m == "nexus-add") return "Nexus: Specialization meets Adaptability, arXiv 2408.15901";
    if (m == "add-expert") return "one expert appended to a trained MoE (the linear-router baseline of Nexus, arXiv 2408.15901)";
    if (m == "grove") return "Grove MoE (adjugate experts), arXiv 2508.07785";
    return "?";
}

// ----------------------------------------------------------------------------
// Sources: a model directory whose tensors are read one at a time.

struct Source {
    std::string dir;
    ModelConfig cfg;
    ParamLayout layout;
    std::unique_ptr<CheckpointTensors> ck;

    // Checks up front that every tensor the config implies is there with the right shape
    // and a float dtype, so a bad source fails before any output is written.
    void open(const std::string& d) {
        dir = d;
        if (!is_dir(d)) FAIL("%s: model directory does not exist", d.c_str());
        std::string cp = path_join(d, "config.json");
        if (!path_exists(cp)) FAIL("%s: no config.json in this directory", d.c_str());
        cfg = ModelConfig::load(cp);
        layout = build_layout(cfg);
        ck.reset(new CheckpointTensors(d));
        for (auto& t : layout.tensors) {
            if (!ck->has(t.name))
                FAIL("%s: missing tensor \"%s\", which %s/config.json implies", d.c_str(), t.name.c_str(), d.c_str());
            const TensorInfo& ti = ck->info(t.name);
            if (ti.shape != t.shape)
                FAIL("%s: tensor \"%s\" has shape %s but config.json implies %s", d.c_str(), t.name.c_str(),
                     shape_str(ti.shape).c_str(), shape_str(t.shape).c_str());
            if (ti.dtype != DType::F32 && ti.dtype != DType::BF16 && ti.dtype != DType::F16)
                FAIL("%s: tensor \"%s\" has dtype %s; expected F32, BF16 or F16", d.c_str(), t.name.c_str(),
                     dtype_name(ti.dtype));
        }
    }
    std::vector<float> read(const std::string& name) const {
        const TensorInfo& ti = ck->info(name);
        std::vector<float> v((size_t)ti.numel());
        ck->read(name, ti.shape, v.data());
        return v;
    }
    std::vector<float> read(int tensor_index) const { return read(layout.tensors[tensor_index].name); }
    // The weight files (one, or the shards of model.safetensors.index.json), for digests.
    std::vector<std::string> weight_files() const {
        std::string index = path_join(dir, "model.safetensors.index.json");
        if (!path_exists(index)) return {"model.safetensors"};
        std::vector<std::string> files;
        Json j = Json::parse_file(index);
        for (auto& kv : j.find("weight_map")->obj)
            if (std::find(files.begin(), files.end(), kv.second.str) == files.end()) files.push_back(kv.second.str);
        std::sort(files.begin(), files.end());
        return files;
    }
    Json record() const {
        Json s = Json::object();
        s["dir"] = dir;
        Json files = Json::array();
        for (auto& f : weight_files()) {
            Json e = Json::object();
            e["file"] = f;
            e["sha256"] = sha256_file(path_join(dir, f));
            files.push(e);
        }
        s["files"] = files;
        return s;
    }
};

static std::vector<std::string> split_commas(const std::string& s) {
    std::vector<std::string> v;
    size_t start = 0;
    while (true) {
        size_t c = s.find(',', start);
        v.push_back(s.substr(start, c == std::string::npos ? std::string::npos : c - start));
        if (c == std::string::npos) break;
        start = c + 1;
    }
    return v;
}

static DType output_dtype(const std::string& opt, DType input) {
    if (opt == "f32") return DType::F32;
    if (opt == "bf16") return DType::BF16;
    if (opt != "same") FAIL("--dtype must be same, f32 or bf16, found \"%s\"", opt.c_str());
    return input == DType::BF16 ? DType::BF16 : DType::F32;  // F16 inputs are widened (no F16 output)
}

// ----------------------------------------------------------------------------
// Streaming output: declare every tensor, then produce and write them in order.

struct OutTensor {
    std::string name;
    std::vector<int64_t> shape;
    int layer;  // -1 outside the layers
};

struct Progress {
    double t0 = now_seconds();
    double bytes = 0;
    int n_layer = 0;
    std::string what;
    void layer_done(int l) {
        printf("%s: layer %d/%d | %.1f MB written | %.1fs\n", what.c_str(), l + 1, n_layer, bytes / 1e6,
               now_seconds() - t0);
        fflush(stdout);
    }
};

static void stream_write(const std::string& path, const std::vector<OutTensor>& list, DType dt,
                         const std::map<std::string, std::string>& metadata,
                         const std::function<void(size_t, std::vector<float>&)>& produce, Progress& prog) {
    SafeTensorsWriter w;
    w.metadata = metadata;
    for (auto& t : list) w.declare(t.name, dt, t.shape);
    w.begin(path);
    std::vector<float> buf;
    for (size_t i = 0; i < list.size(); i++) {
        buf.assign((size_t)shape_numel(list[i].shape), 0.0f);
        produce(i, buf);
        w.write(list[i].name, buf.data());
        prog.bytes += (double)buf.size() * dtype_size(dt);
        bool layer_ends = list[i].layer >= 0 && (i + 1 == list.size() || list[i + 1].layer != list[i].layer);
        if (layer_ends) prog.layer_done(list[i].layer);
    }
    w.finish();
}

static std::vector<OutTensor> layout_tensors(const ParamLayout& lay) {
    std::vector<OutTensor> v;
    for (auto& t : lay.tensors) v.push_back({t.name, t.shape, t.layer});
    return v;
}

static void write_config(const std::string& path, const ModelConfig& cfg, DType dt) {
    Json j = cfg.to_json();
    j["torch_dtype"] = dt == DType::BF16 ? "bfloat16" : "float32";
    write_text_atomic(path, j.dump(2) + "\n");
}

// Tokenizer files travel with the model so the output is a complete HF directory.
static void copy_tokenizer_files(const std::string& src_dir, const AtomicDir& out) {
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                          "tokenizer.bin"}) {
        std::string p = path_join(src_dir, f);
        if (!path_exists(p)) continue;
        std::vector<uint8_t> b = read_file(p);
        AtomicFile af(out.file(f));
        af.write(b.data(), b.size());
        af.commit();
    }
}

static std::string same_path_key(const std::string& p) {
    char buf[4096];
    if (realpath(p.c_str(), buf)) return buf;
    std::string s = p;
    while (s.size() > 1 && s.back() == '/') s.pop_back();
    return s;
}

// ----------------------------------------------------------------------------
// Nexus (docs/METHODS.md 2.14): domain embeddings from the seed model. For each domain, the
// first --utility-batches batches of --batch x --seq tokens that a DataLoader of that domain
// alone gives (the trainer's order with --seed) run through the seed; the embedding at layer
// l is the mean over those tokens of the hidden state named by --nexus-hidden: ffn_input =
// layer l's FFN input after its RMSNorm (what the router multiplies), final = the final norm's
// output (the same row at every layer). Computed in double. Returns [domain][layer][d].

static std::vector<std::vector<std::vector<float>>> nexus_domain_embeddings(const UpcycleArgs& a,
                                                                            const std::string& seed_dir,
                                                                            const std::vector<std::string>& domains,
                                                                            Json* rec) {
    if (a.nexus_hidden != "ffn_input" && a.nexus_hidden != "final")
        FAIL("--nexus-hidden must be ffn_input or final, found \"%s\"", a.nexus_hidden.c_str());
    std::vector<DomainFiles> files = discover_domains(a.data);
    for (auto& dom : domains) {
        bool ok = false;
        std::string have;
        for (auto& f : files) {
            ok |= f.name == dom && !f.train.empty();
            if (!f.train.empty()) have += (have.empty() ? "" : ", ") + f.name;
        }
        if (!ok) FAIL("--nexus-domains: no %s_train_NNN.bin shard in --data %s (domains with train data: %s)", dom.c_str(),
                      a.data.c_str(), have.c_str());
    }
    Model M;
    M.training = false;  // forward only: no gradients or moments
    M.load(seed_dir);
    if (M.cfg.is_moe()) FAIL("%s: the Nexus seed must be a dense model, found %d experts", seed_dir.c_str(), M.cfg.n_experts);
    const int L = M.cfg.n_layer, d = M.cfg.d_model, B = a.batch, T = a.seq, NB = a.utility_batches;
    const bool final_h = a.nexus_hidden == "final";
    std::vector<std::vector<std::vector<float>>> emb;
    Json norms = Json::array();
    for (auto& dom : domains) {
        DataLoader dl(a.data, dom + "=1", B, T, M.cfg.vocab_size, (uint64_t)a.seed);
        std::vector<int> in((size_t)B * T), tg = in;
        std::vector<std::vector<double>> sum(L, std::vector<double>(d, 0.0));
        for (int b = 0; b < NB; b++) {
            dl.next_batch(in.data(), tg.data());
            M.forward(in.data(), nullptr, B, T);
            for (int l = 0; l < L; l++) {
                const std::vector<real>& h = final_h ? M.lnf : M.acts[l].ln2;
                for (size_t n = 0; n < (size_t)B * T; n++)
                    for (int i = 0; i < d; i++) sum[l][i] += h[n * d + i];
            }
        }
        std::vector<std::vector<float>> e(L, std::vector<float>(d));
        Json nj = Json::array();
        for (int l = 0; l < L; l++) {
            double sq = 0;
            for (int i = 0; i < d; i++) {
                e[l][i] = (float)(sum[l][i] / ((double)NB * B * T));
                sq += (double)e[l][i] * e[l][i];
            }
            nj.push(Json(std::sqrt(sq)));
        }
        norms.push(nj);
        emb.push_back(e);
        printf("nexus: domain %s: embedding from %d tokens of %s under %s (%s), |Emb| per layer", dom.c_str(),
               NB * B * T, a.data.c_str(), seed_dir.c_str(), a.nexus_hidden.c_str());
        for (auto& x : nj.arr) printf(" %.3f", x.num);
        printf("\n");
    }
    Json dj = Json::array();
    for (auto& dom : domains) dj.push(Json(dom));
    (*rec)["domains"] = dj;
    (*rec)["domain_data"] = a.data;
    (*rec)["domain_tokens"] = NB * B * T;
    (*rec)["domain_batches"] = NB;
    (*rec)["domain_batch"] = B;
    (*rec)["domain_seq"] = T;
    (*rec)["domain_hidden"] = a.nexus_hidden;
    (*rec)["domain_embedding_norms"] = norms;
    (*rec)["nexus_seed"] = seed_dir;
    return emb;
}

// ----------------------------------------------------------------------------
// Dense -> MoE: scratch, naive, noise, drop, btx, granular, partition; and dense -> dense:
// btm-average (the one method whose output is not an MoE)

struct DenseUpcycler {
    const UpcycleArgs& a;
    std::vector<std::unique_ptr<Source>> src;  // btx, btm-average, upit: S sources; others: at most one
    ModelConfig out_cfg;
    ParamLayout out_lay;
    int method_F = 0;         // dense FFN width F
    RouterInit router_kind = ROUTER_UNIFORM;
    bool shared_index = false;
    int n_reinit = 0;         // noise/drop: floor(F r)
    float granular_mult = 1;  // granular: c = s^(1/3)
    float partition_mult = 1; // partition: E / K
    float routed_mult = 1;    // shared/qwen2: the routed experts' down_proj multiplier
    // the current layer's dense FFN per source: [s][matrix]
    int cached_layer = -1;
    std::vector<std::array<std::vector<float>, 3>> ffn;
    std::vector<std::vector<int>> partition_sets;
    UpitPlan upit;                            // upit: every expert's coefficients over the sources
    std::vector<std::vector<float>> upit_router_add;  // upit --upit-router seed: [L][E*d] added to the router init
    std::vector<std::vector<double>> upit_D2; // upit: the sources' pairwise squared FFN distances
    std::vector<std::vector<float>> nexus_emb, nexus_R;  // nexus: [L][E*d] Emb and R = Emb P
    std::vector<std::vector<float>> nexus_P;             // nexus: [L][d*d] P = s_l I

    explicit DenseUpcycler(const UpcycleArgs& args) : a(args) {}

    void load_layer(int l) {
        if (cached_layer == l) return;
        ffn.assign(src.size(), {});
        for (size_t s = 0; s < src.size(); s++) {
            const Source& S = *src[s];
            ffn[s][MAT_GATE] = S.read(S.layout.by_layer[l][P_GATE]);
            ffn[s][MAT_UP] = S.read(S.layout.by_layer[l][P_UP]);
            ffn[s][MAT_DOWN] = S.read(S.layout.by_layer[l][P_DOWN]);
        }
        if (a.method == "partition") partition_sets = partition_neurons(method_F, out_cfg.n_experts, a.seed, l);
        cached_layer = l;
    }

    // From-scratch init of output tensor `ti`, exactly init_from_scratch of common/model.h
    // (same streams, same formula) one tensor at a time; a test holds the two equal.
    void scratch_tensor(size_t ti, std::vector<float>& out) const {
        const ParamTensor& t = out_lay.tensors[ti];
        if (t.shape.size() == 1) { std::fill(out.begin(), out.end(), 1.0f); return; }
        uint64_t stream = stream_id(PURPOSE_INIT, (uint32_t)ti);
        uint64_t seed = (uint64_t)a.seed;
#pragma omp parallel for
        for (long i = 0; i < (long)t.numel; i++) out[i] = (float)(0.02f * rng_normal(seed, stream, (uint64_t)i));
    }

    void produce(size_t ti, std::vector<float>& out) {
        if (ti >= out_lay.tensors.size()) return;  // Qwen2-MoE's attention biases: zeros
        const ParamTensor& t = out_lay.tensors[ti];
        const uint64_t seed = (uint64_t)a.seed;
        if (a.method == "scratch") return scratch_tensor(ti, out);
        if (a.method == "btm-average") {  // every tensor, FFNs included: the mean of the branches
            std::vector<std::vector<float>> all;
            for (auto& s : src) all.push_back(s->read(t.name));
            mean_of_sources(out.data(), all, out.size());
            return;
        }
        if (a.method == "nexus" && (t.kind == P_ROUTER || t.kind == P_NEXUS_EMB || t.kind == P_NEXUS_PROJ)) {
            out = t.kind == P_ROUTER ? nexus_R[t.layer] : t.kind == P_NEXUS_EMB ? nexus_emb[t.layer] : nexus_P[t.layer];
            return;
        }
        if (t.kind == P_ROUTER) {
            if (a.method == "granular")
                granular_router(out.data(), out_cfg.n_experts, a.granularity, out_cfg.d_model, router_kind, seed, t.layer);
            else
                router_init(out.data(), out_cfg.n_experts, out_cfg.d_model, router_kind, seed, t.layer);
            if (!upit_router_add.empty())
                for (size_t i = 0; i < out.size(); i++) out[i] += upit_router_add[t.layer][i];
            return;
        }
        if (t.kind == P_SGATE || t.kind == P_SUP || t.kind == P_SDOWN || t.kind == P_SGATE_W)
            return shared_expert_tensor(t, out);
        if (t.expert < 0) {  // embeddings, attention, norms, LM head: copied (btx, upit: averaged)
            if (src.size() == 1) { out = src[0]->read(t.name); return; }
            if (a.method == "upit" && a.upit_shared == "last") { out = src.back()->read(t.name); return; }
            std::vector<std::vector<float>> all;
            for (auto& s : src) all.push_back(s->read(t.name));
            mean_of_sources(out.data(), all, out.size());
            return;
        }
        load_layer(t.layer);
        const int l = t.layer, e = t.expert, mat = t.kind - P_EGATE, F = method_F, d = out_cfg.d_model;
        if (a.method == "granular") {
            gather_neurons(out.data(), ffn[0][mat].data(), mat, F, d, granular_shard(F, a.granularity, e), granular_mult);
            return;
        }
        if (a.method == "upit") {
            std::vector<const float*> from;
            for (auto& f : ffn) from.push_back(f[mat].data());
            combine_sources(out.data(), from, upit.coef[e], out.size());
            return;
        }
        if (a.method == "partition") {
            gather_neurons(out.data(), ffn[0][mat].data(), mat, F, d, partition_sets[e],
                           mat == MAT_DOWN ? partition_mult : 1.0f);
            return;
        }
        if (a.method == "qwen2") return qwen2_routed_expert(l, e, mat, out);
        if (a.method == "nexus") {  // expert e = branch e's FFN (source e + 1; source 0 is the seed)
            out = ffn[e + 1][mat];
            if (mat == MAT_DOWN) for (float& x : out) x *= routed_mult;
            return;
        }
        if (a.method == "shared") {  // a copy of the FFN, down_proj x 1/2 (2.11)
            out = ffn[0][mat];
            if (mat == MAT_DOWN) for (float& x : out) x *= routed_mult;
            return;
        }
        int s = a.method == "btx" ? btx_source(e, out_cfg.n_experts, (int)src.size()) : 0;
        out = ffn[s][mat];
        if (a.method == "noise") {
            std::vector<int> S = sample_neurons(F, n_reinit, seed, stream_id(PURPOSE_NOISE_INDEX, l, e, mat));
            add_noise_to_neurons(out.data(), mat, F, d, S, 0.02f, seed, stream_id(PURPOSE_NOISE_VALUES, l, e, mat));
        } else if (a.method == "drop") {
            // shared mode: one set per expert (index stream 3), used for all three matrices
            std::vector<int> S = sample_neurons(F, n_reinit, seed, stream_id(PURPOSE_DROP_INDEX, l, e, shared_index ? 3 : mat));
            drop_neurons(out.data(), mat, F, d, S, seed, stream_id(PURPOSE_DROP_VALUES, l, e, mat));
        }
    }

    // shared/qwen2 (docs/METHODS.md 2.11): the shared expert is the dense FFN (down_proj x 1/2
    // when ungated); the sigmoid gate's vector is 0, so the gate is 1/2 on every token
    void shared_expert_tensor(const ParamTensor& t, std::vector<float>& out) {
        if (t.kind == P_SGATE_W) { std::fill(out.begin(), out.end(), 0.0f); return; }
        load_layer(t.layer);
        const int mat = t.kind - P_SGATE;
        out = ffn[0][mat];
        // xft: unscaled, its routing weighs it by 1 - p(1) (METHODS 2.13)
        const float mult = a.method == "nexus" ? (float)a.nexus_down_scale : shared_down_mult(out_cfg.shared_gate);
        if (mat == MAT_DOWN && a.method != "xft")
            for (float& x : out) x *= mult;
    }
    // qwen2: expert e = set (e mod G) of replica (e div G)'s shuffled partition; then floor(F_e r)
    // of its neurons re-initialized from their own statistics (drop_neurons, Drop-Upcycling's
    // re-init); then down_proj x the routed multiplier (granular's output scale s, halved)
    void qwen2_routed_expert(int l, int e, int mat, std::vector<float>& out) {
        const int F = method_F, d = out_cfg.d_model, Fe = out_cfg.ffn_dim;
        const uint64_t seed = (uint64_t)a.seed;
        gather_neurons(out.data(), ffn[0][mat].data(), mat, F, d, qwen2_expert_neurons(F, a.granularity, e, seed, l),
                       1.0f);
        std::vector<int> S = sample_neurons(Fe, n_reinit, seed, stream_id(PURPOSE_DROP_INDEX, l, e, shared_index ? 3 : mat));
        drop_neurons(out.data(), mat, Fe, d, S, seed, stream_id(PURPOSE_DROP_VALUES, l, e, mat));
        if (mat == MAT_DOWN) for (float& x : out) x *= routed_mult;
    }

    void run(const Cli& cli) {
        const std::string& m = a.method;
        std::vector<std::string> dirs;
        if (!a.from.empty()) dirs = split_commas(a.from);
        const bool multi = m == "btx" || m == "btm-average" || m == "upit" || m == "nexus";  // S >= 1 sources
        if (m == "nexus" && dirs.size() < 2)
            FAIL("--method nexus needs --from seed,branch_1,...: the seed dense model and at least one branch, found %zu "
                 "director%s", dirs.size(), dirs.size() == 1 ? "y" : "ies");
        if (m == "upit" && dirs.size() < 2)
            FAIL("--method upit needs at least 2 --from checkpoints (a,b,...: checkpoints of one dense run), found %zu",
                 dirs.size());
        if (!multi && dirs.size() > 1) FAIL("--method %s takes one --from directory, found %zu", m.c_str(), dirs.size());
        if (m != "scratch" && dirs.empty()) FAIL("--method %s needs --from (a dense model directory)", m.c_str());
        for (auto& d : dirs) {
            if (same_path_key(d) == same_path_key(a.out)) FAIL("--out %s is the source directory itself", a.out.c_str());
            src.emplace_back(new Source());
            src.back()->open(d);
            if (src.back()->cfg.is_moe())
                FAIL("%s: is an MoE (num_local_experts = %d); --method %s needs a dense (Llama) model "
                     "(use --method expand to grow an MoE)", d.c_str(), src.back()->cfg.n_experts, m.c_str());
        }
        // the output shape
        if (!src.empty()) {
            out_cfg = src[0]->cfg;
            if (m == "scratch" && cli.was_set("--model")) FAIL("--method scratch: give --from or --model, not both");
        } else {
            if (a.model.empty()) FAIL("--method scratch needs --from (a dense model for the shape) or --model PRESET --vocab V");
            if (!model_preset(a.model, &out_cfg))
                FAIL("--model %s: not a preset (%s)", a.model.c_str(), model_preset_names());
            if (a.vocab <= 0) FAIL("--method scratch --model %s needs --vocab V", a.model.c_str());
            out_cfg.vocab_size = a.vocab;
        }
        if (multi) {
            int S = (int)src.size();
            if (m == "btx" && a.experts % S)
                FAIL("--method btx: the number of sources S = %d must divide --experts E = %d", S, a.experts);
            for (int s = 1; s < S; s++) {
                const ModelConfig &c0 = src[0]->cfg, &c = src[s]->cfg;
                const char* what = nullptr;
                long v0 = 0, v = 0;
                auto cmp = [&](const char* k, long x0, long x) { if (!what && x0 != x) { what = k; v0 = x0; v = x; } };
                cmp("vocab_size", c0.vocab_size, c.vocab_size); cmp("hidden_size", c0.d_model, c.d_model);
                cmp("num_hidden_layers", c0.n_layer, c.n_layer); cmp("num_attention_heads", c0.n_head, c.n_head);
                cmp("num_key_value_heads", c0.n_kv_head, c.n_kv_head); cmp("head_dim", c0.head_dim, c.head_dim);
                cmp("intermediate_size", c0.ffn_dim, c.ffn_dim);
                cmp("tie_word_embeddings", c0.tie_embeddings, c.tie_embeddings);
                if (what)
                    FAIL("--method %s: sources must have identical shapes, but %s is %ld in %s and %ld in %s", m.c_str(),
                         what, v0, src[0]->dir.c_str(), v, src[s]->dir.c_str());
            }
        }
        if (m == "btm-average") {  // a dense model of the sources' shape: no experts, router or routing
            for (const char* o : {"--experts", "--topk", "--routing", "--router", "--ratio", "--granularity"})
                if (cli.was_set(o)) FAIL("--method btm-average makes a dense model: %s does not apply", o);
            return write_output(dense_record());
        }
        method_F = out_cfg.ffn_dim;
        const int F = method_F, E = a.experts, K = a.topk, G = a.granularity;
        out_cfg.n_experts = E;
        out_cfg.top_k = K;
        out_cfg.routing = parse_routing(a.routing, "--routing");
        if (m == "xft") {  // XFT's model: its own routing, an ungated shared expert (METHODS 1.8, 2.13)
            if (cli.was_set("--routing") && out_cfg.routing != ROUTING_XFT)
                FAIL("--method xft makes an XFT model: --routing must be xft (or left out), found %s", a.routing.c_str());
            out_cfg.routing = ROUTING_XFT;
        } else if (out_cfg.routing == ROUTING_XFT) {
            FAIL("--routing xft needs the shared expert --method xft makes (found --method %s)", m.c_str());
        }
        if (a.router == "uniform") router_kind = ROUTER_UNIFORM;
        else if (a.router == "normal") router_kind = ROUTER_NORMAL;
        else FAIL("--router must be uniform or normal, found \"%s\"", a.router.c_str());
        if (m == "noise" || m == "drop") {
            if (!(a.ratio >= 0 && a.ratio <= 1)) FAIL("--ratio %g is outside [0, 1]", a.ratio);
            n_reinit = neurons_of_ratio(F, a.ratio);
        }
        const bool with_shared = m == "shared" || m == "qwen2" || m == "xft" || m == "nexus";
        if (!(m == "shared" || m == "qwen2" || m == "nexus") && cli.was_set("--shared-gate"))
            FAIL("--shared-gate applies to --method shared, qwen2 or nexus, not %s", m.c_str());
        if (m == "xft") {
            out_cfg.shared_dim = F;  // the dense FFN itself, ungated: xft routing weighs it
            out_cfg.shared_gate = false;
        } else if (with_shared) {
            if (a.shared_gate != "sigmoid" && a.shared_gate != "none")
                FAIL("--shared-gate must be sigmoid or none, found \"%s\"", a.shared_gate.c_str());
            out_cfg.shared_dim = F;  // the whole dense FFN: S = 1 shared expert of width F
            out_cfg.shared_gate = a.shared_gate == "sigmoid";
            routed_mult = m == "nexus" ? (float)a.nexus_down_scale : routed_down_mult();
        }
        for (const char* o : {"--nexus-domains", "--nexus-hidden", "--nexus-proj-init", "--nexus-down-scale"})
            if (m != "nexus" && cli.was_set(o)) FAIL("%s applies to --method nexus or nexus-add, not %s", o, m.c_str());
        if (cli.was_set("--nexus-seed")) FAIL("--nexus-seed applies to --method nexus-add (nexus: the first --from)");
        if (m == "qwen2") {
            if (G < 1 || F % G) FAIL("--granularity %d must divide the dense FFN width F = %d (experts are F/G wide)", G, F);
            if (!(a.ratio >= 0 && a.ratio <= 1)) FAIL("--ratio %g is outside [0, 1]", a.ratio);
            out_cfg.ffn_dim = F / G;
            n_reinit = neurons_of_ratio(F / G, a.ratio);
            routed_mult = (float)(routed_down_mult() * granular_scale(E, G, K, out_cfg.routing));
        }
        if (m == "drop" || m == "qwen2") {
            if (a.du_index_mode == "shared") shared_index = true;
            else if (a.du_index_mode != "independent")
                FAIL("--du-index-mode must be independent or shared, found \"%s\"", a.du_index_mode.c_str());
        }
        if (m == "granular") {
            if (G < 1) FAIL("--granularity must be >= 1, found %d", G);
            if (F % G) FAIL("--granularity %d does not divide the dense FFN width F = %d", G, F);
            if (E % G) FAIL("--granularity %d does not divide --experts %d (E = R G with R copies)", G, E);
            if (K % G) FAIL("--topk %d is not a multiple of --granularity %d (top-K must pick whole groups)", K, G);
            out_cfg.ffn_dim = F / G;
            granular_mult = granular_weight_mult(E, G, K, out_cfg.routing);
        }
        if (m == "partition") {
            if (F % E) FAIL("--experts %d does not divide the dense FFN width F = %d (partition needs F/E neurons each)", E, F);
            out_cfg.ffn_dim = F / E;
            partition_mult = (float)E / (float)K;
        }
        // what we do, recorded in config.json
        Json rec = Json::object();
        rec["method"] = m;
        rec["paper"] = method_paper(m);
        rec["tool"] = "upcycle " UPCYCLE_VERSION;
        rec["seed"] = a.seed;
        rec["experts"] = E;
        rec["top_k"] = K;
        rec["routing"] = routing_name(out_cfg.routing);
        if (m != "scratch") rec["router_init"] = a.router == "uniform" ? "uniform: (U - mean U) * 0.02 sqrt(12), std 0.02"
                                                                      : "normal: N(0, 0.02^2)";
        if (m == "noise") { rec["ratio"] = a.ratio; rec["neurons_per_matrix"] = n_reinit; rec["noise_std"] = 0.02; }
        if (m == "drop") { rec["ratio"] = a.ratio; rec["neurons_per_matrix"] = n_reinit; rec["index_mode"] = a.du_index_mode; }
        if (m == "granular") {
            rec["granularity"] = G;
            rec["expert_width"] = F / G;
            rec["weight_scale_s"] = granular_scale(E, G, K, out_cfg.routing);
            rec["weight_multiplier_per_matrix"] = (double)granular_mult;
        }
        if (m == "partition") {
            rec["expert_width"] = F / E;
            rec["output_multiplier"] = (double)E / K;
            rec["note"] = strfmt("the LLaMA-MoE output multiplier E/K = %g is folded into every expert's down "
                                 "projection (w2); the model itself has no output multiplier", (double)E / K);
        }
        if (m == "scratch") rec["init"] = "every matrix N(0, 0.02^2) (router included), norms 1";
        if (m == "xft") {
            rec["shared_expert"] = "the dense FFN unchanged (no gate; xft routing weighs it by 1 - p(1))";
            rec["shared_expert_width"] = F;
            rec["routed_experts"] = "copies of the dense FFN (routed weights p(1) softmax(top-K probabilities))";
        } else if (with_shared) {
            rec["shared_expert"] = out_cfg.shared_gate
                ? "the dense FFN; sigmoid gate vector 0 (gate 1/2 on every token)"
                : "the dense FFN with down_proj x 1/2 (no gate)";
            rec["shared_expert_width"] = F;
            rec["routed_down_multiplier"] = (double)routed_mult;
        }
        if (m == "shared") rec["routed_experts"] = "copies of the dense FFN, down_proj x 1/2";
        if (m == "qwen2") {
            rec["granularity"] = G;
            rec["expert_width"] = F / G;
            rec["replicas"] = (E + G - 1) / G;
            rec["routed_experts"] = "expert e = set (e mod G) of a random partition of the FFN's neurons into G sets, "
                                    "one partition per replica e div G; then floor(F_e r) neurons per matrix "
                                    "re-initialized from their own mean and std (Drop-Upcycling); down_proj x "
                                    "routed_down_multiplier = 1/2 x granular scale s";
            rec["ratio"] = a.ratio;
            rec["neurons_per_matrix"] = n_reinit;
            rec["index_mode"] = a.du_index_mode;
        }
        if (m == "upit") plan_upit(rec);
        if (m == "nexus") plan_nexus(rec);
        write_output(rec);
    }

    // UpIT (docs/METHODS.md 2.12): the sources' pairwise FFN distances (one pass over every
    // layer), the merge plan from them, and both in the record.
    void plan_upit(Json& rec) {
        const int S = (int)src.size(), L = out_cfg.n_layer;
        if (a.upit_shared != "mean" && a.upit_shared != "last")
            FAIL("--upit-shared must be mean or last, found \"%s\"", a.upit_shared.c_str());
        if (a.upit_w_min > a.upit_w_max)
            FAIL("--upit-w-min %g is above --upit-w-max %g", a.upit_w_min, a.upit_w_max);
        const UpitPair rule = parse_upit_pair(a.upit_pair);
        if (a.upit_router != "init" && a.upit_router != "seed")
            FAIL("--upit-router must be init or seed, found \"%s\"", a.upit_router.c_str());
        upit_D2.assign(S, std::vector<double>(S, 0.0));
        for (int l = 0; l < L; l++) {
            load_layer(l);
            for (int s = 0; s < S; s++)
                for (int t = s + 1; t < S; t++)
                    for (int k = 0; k < 3; k++) {
                        double d = sq_distance(ffn[s][k].data(), ffn[t][k].data(), ffn[s][k].size());
                        upit_D2[s][t] += d;
                        upit_D2[t][s] += d;
                    }
        }
        cached_layer = -1;
        upit = upit_plan(S, a.experts, upit_D2, rule, a.upit_w_min, a.upit_w_max, (uint64_t)a.seed);
        rec["checkpoints"] = S;
        rec["pair_rule"] = a.upit_pair;
        rec["merge_weight_range"] = json_array(std::vector<double>{a.upit_w_min, a.upit_w_max});
        rec["shared_tensors"] = a.upit_shared == "mean" ? "element-wise mean of the checkpoints"
                                                        : "copied from the last --from (the final checkpoint)";
        rec["source_sq_distances"] = json_array(upit_D2);
        Json pj = Json::array();
        for (int e = 0; e < a.experts; e++) {
            Json x = Json::object();
            x["expert"] = e;
            x["coefficients"] = json_array(upit.coef[e]);
            if (upit.parent_a[e] >= 0) {
                x["merged_from"] = json_array(std::vector<int>{upit.parent_a[e], upit.parent_b[e]});
                x["weight"] = upit.weight[e];
                x["parents_sq_distance"] = upit.dist2[e];
            }
            pj.push(x);
        }
        rec["experts_plan"] = pj;
        rec["expert_source"] = "expert e = sum_s coefficients[s] * FFN of source s (in double, stored once); merged "
                               "experts: coefficients = weight * those of merged_from[0] + (1 - weight) * those of "
                               "merged_from[1]";
        if (a.upit_router == "seed") upit_seed_router(rec);
        else
            rec["router_note"] = "the paper pre-optimizes the router on seed data each expert is best at; not done "
                                 "here: the router is the usual upcycling init above (see --upit-router seed)";
        printf("upit: %d checkpoints -> %d experts (%d merged, pairs %s, w ~ U[%g, %g]); non-FFN tensors: %s\n", S,
               a.experts, a.experts - S, a.upit_pair.c_str(), a.upit_w_min, a.upit_w_max, a.upit_shared.c_str());
        for (int e = S; e < a.experts; e++)
            printf("  expert %d = %.4f * expert %d + %.4f * expert %d (their distance %.4g)\n", e, upit.weight[e],
                   upit.parent_a[e], 1.0 - upit.weight[e], upit.parent_b[e], std::sqrt(upit.dist2[e]));
    }

    // --upit-router seed (docs/METHODS.md 2.12): a closed-form stand-in for the paper's router
    // pre-optimization on seed data. Sequences from --data are scored by every checkpoint
    // (mean cross-entropy per sequence); each sequence is the seed data of the checkpoint with
    // the lowest loss on it (ties: the earlier checkpoint). At every layer, with x = the FFN
    // input (RMSNorm output) of the final checkpoint, m_s = mean x over the tokens of s's
    // seed sequences (mu, the mean over all tokens, if s has none) and u_s = m_s - mu, expert j
    // gets the row sum_s c_j[s] u_s, and the rows are scaled by alpha = 0.02 / rms(rows) (the
    // usual init's std; alpha = 0 when every u_s is 0) and added to the usual router init.
    void upit_seed_router(Json& rec) {
        const int S = (int)src.size(), L = out_cfg.n_layer, d = out_cfg.d_model, E = a.experts, B = a.batch,
                  T = a.seq, NB = a.utility_batches;
        DataLoader data(a.data, "", B, T, out_cfg.vocab_size, (uint64_t)a.seed);  // bad data fails first
        std::vector<std::vector<int>> ins(NB, std::vector<int>((size_t)B * T)), tgs = ins;
        for (int b = 0; b < NB; b++) data.next_batch(ins[b].data(), tgs[b].data());
        const int Q = NB * B;  // sequences
        std::vector<std::vector<double>> loss(S, std::vector<double>(Q, 0.0));
        std::vector<std::vector<double>> xsum((size_t)Q * L, std::vector<double>(d, 0.0));  // final ckpt, per sequence
        printf("upit seed router: scoring %d sequences of %d tokens from %s with each of the %d checkpoints\n", Q, T,
               a.data.c_str(), S);
        for (int s = 0; s < S; s++) {
            Model M;  // one checkpoint at a time, whole
            M.load(src[s]->dir);
            const int V = M.cfg.vocab_size;
            for (int b = 0; b < NB; b++) {
                M.forward(ins[b].data(), tgs[b].data(), B, T);
                for (int r = 0; r < B; r++) {
                    double sum = 0;
                    for (int t = 0; t < T; t++) {
                        size_t n = (size_t)r * T + t;
                        sum += (double)M.lse[n] - (double)M.logits[n * V + tgs[b][n]];
                    }
                    loss[s][b * B + r] = sum / T;
                    if (s != S - 1) continue;
                    for (int l = 0; l < L; l++) {
                        std::vector<double>& xs = xsum[(size_t)(b * B + r) * L + l];
                        for (int t = 0; t < T; t++)
                            for (int i = 0; i < d; i++) xs[i] += M.acts[l].ln2[((size_t)r * T + t) * d + i];
                    }
                }
            }
        }
        std::vector<int> owner(Q, 0), count(S, 0);
        for (int q = 0; q < Q; q++) {
            for (int s = 1; s < S; s++)
                if (loss[s][q] < loss[owner[q]][q]) owner[q] = s;
            count[owner[q]]++;
        }
        upit_router_add.assign(L, std::vector<float>((size_t)E * d, 0.0f));
        Json alphas = Json::array();
        for (int l = 0; l < L; l++) {
            std::vector<std::vector<double>> m(S, std::vector<double>(d, 0.0));
            std::vector<double> mu(d, 0.0);
            for (int q = 0; q < Q; q++)
                for (int i = 0; i < d; i++) {
                    m[owner[q]][i] += xsum[(size_t)q * L + l][i];
                    mu[i] += xsum[(size_t)q * L + l][i];
                }
            for (int i = 0; i < d; i++) mu[i] /= (double)Q * T;
            for (int s = 0; s < S; s++)
                for (int i = 0; i < d; i++) m[s][i] = count[s] ? m[s][i] / ((double)count[s] * T) - mu[i] : 0.0;
            std::vector<double> rows((size_t)E * d, 0.0);
            double sq = 0;
            for (int j = 0; j < E; j++)
                for (int i = 0; i < d; i++) {
                    double v = 0;
                    for (int s = 0; s < S; s++) v += upit.coef[j][s] * m[s][i];
                    rows[(size_t)j * d + i] = v;
                    sq += v * v;
                }
            const double rms = std::sqrt(sq / ((double)E * d)), alpha = rms > 0 ? 0.02 / rms : 0.0;
            for (size_t i = 0; i < rows.size(); i++) upit_router_add[l][i] = (float)(alpha * rows[i]);
            alphas.push(Json(alpha));
        }
        Json cj = Json::array(), lj = Json::array();
        for (int s = 0; s < S; s++) {
            cj.push(Json(count[s]));
            double mean = 0;
            for (double x : loss[s]) mean += x / Q;
            lj.push(Json(mean));
        }
        rec["router_seed"] = "seed data: each sequence goes to the checkpoint with the lowest mean cross-entropy on it; "
                             "router = usual init + alpha * (row j = sum_s coefficients[s] * (mean FFN input of s's seed "
                             "tokens - mean over all tokens), FFN inputs of the final checkpoint), alpha per layer = "
                             "0.02 / rms of those rows";
        rec["router_seed_data"] = a.data;
        rec["router_seed_batches"] = NB;
        rec["router_seed_batch"] = B;
        rec["router_seed_seq"] = T;
        rec["router_seed_counts"] = cj;
        rec["router_seed_mean_loss"] = lj;
        rec["router_seed_alpha"] = alphas;
        printf("upit seed router: sequences won per checkpoint:");
        for (int s = 0; s < S; s++) printf(" %d", count[s]);
        printf(" (of %d)\n", Q);
    }

    // Nexus (docs/METHODS.md 2.14): E = S - 1 branches; the domain embeddings (one domain per
    // branch, from the seed = --from's first), P = s I and R = Emb P, and the record.
    void plan_nexus(Json& rec) {
        const int E = out_cfg.n_experts, L = out_cfg.n_layer, d = out_cfg.d_model;
        if (E != (int)src.size() - 1)
            FAIL("--method nexus: --experts %d must equal the number of branches (%zu: --from minus the seed)", E,
                 src.size() - 1);
        std::vector<std::string> domains = a.nexus_domains.empty() ? std::vector<std::string>() : split_commas(a.nexus_domains);
        if ((int)domains.size() != E)
            FAIL("--nexus-domains must name one domain per branch (%d), found %zu: \"%s\"", E, domains.size(),
                 a.nexus_domains.c_str());
        if (a.nexus_proj_init != "unit" && a.nexus_proj_init != "identity")
            FAIL("--nexus-proj-init must be unit or identity, found \"%s\"", a.nexus_proj_init.c_str());
        out_cfg.nexus_router = true;
        auto emb = nexus_domain_embeddings(a, src[0]->dir, domains, &rec);
        nexus_P.assign(L, std::vector<float>((size_t)d * d, 0.0f));
        nexus_emb.assign(L, std::vector<float>((size_t)E * d));
        nexus_R.assign(L, std::vector<float>((size_t)E * d));
        Json scales = Json::array();
        for (int l = 0; l < L; l++) {
            double mean_norm = 0;
            for (int e = 0; e < E; e++) {
                std::copy(emb[e][l].begin(), emb[e][l].end(), nexus_emb[l].begin() + (size_t)e * d);
                double sq = 0;
                for (float x : emb[e][l]) sq += (double)x * x;
                mean_norm += std::sqrt(sq) / E;
            }
            const float sc = a.nexus_proj_init == "identity" || mean_norm == 0 ? 1.0f : (float)(1.0 / mean_norm);
            for (int i = 0; i < d; i++) nexus_P[l][(size_t)i * d + i] = sc;
            scales.push(Json((double)sc));
            nexus_router_forward(nexus_R[l].data(), nexus_emb[l].data(), nexus_P[l].data(), E, d, d);
        }
        rec["proj_scale_per_layer"] = scales;
        rec["router"] = "Nexus: R = Emb P; Emb row e = domain e's mean hidden state under the seed (fixed); P learned";
        rec["proj_init"] = a.nexus_proj_init == "unit" ? "P = s_l I, s_l = 1 / mean_e |Emb_e| at layer l (R's rows of mean "
                                                         "norm 1)" : "P = I (R = Emb)";
        rec["nexus_down_scale"] = a.nexus_down_scale;
        rec["shared_expert"] = strfmt("the seed's FFN (source 0), down_proj x %g, %s", a.nexus_down_scale,
                                      out_cfg.shared_gate ? "sigmoid gate vector 0 (gate 1/2)" : "no gate");
        rec["routed_experts"] = strfmt("expert e = the FFN of branch e (source e + 1), down_proj x %g", a.nexus_down_scale);
        rec["other_tensors"] = "element-wise mean of all sources (seed and branches), as btx";
        rec.erase("router_init");
    }

    // btm-average's record (it has no experts, routing or router)
    Json dense_record() const {
        Json rec = Json::object();
        rec["method"] = a.method;
        rec["paper"] = method_paper(a.method);
        rec["tool"] = "upcycle " UPCYCLE_VERSION;
        rec["combine"] = strfmt("every tensor = element-wise mean of the %zu sources (in double, stored once)", src.size());
        return rec;
    }

    // Validates out_cfg, records `rec` (plus dtype and the sources) under "upcycling" in
    // config.json and streams the output directory.
    void write_output(Json rec) {
        const std::string& m = a.method;
        out_cfg.validate("output model");
        out_lay = build_layout(out_cfg);
        DType dt = output_dtype(a.dtype, src.empty() ? DType::F32 : src[0]->ck->dtype());
        check_output_size(out_lay, dt, a.out);
        rec["dtype"] = dtype_name(dt);
        Json sources = Json::array();
        for (auto& s : src) sources.push(s->record());
        rec["sources"] = sources;
        if (m == "btx")
            rec["expert_source"] = strfmt("expert e = FFN of source e div %d; other tensors = mean of sources",
                                          out_cfg.n_experts / (int)src.size());
        out_cfg.extra.erase("upcycling");
        out_cfg.extra["upcycling"] = rec;

        if (out_cfg.is_moe())
            printf("upcycle %s (%s): %s -> %d experts top-%d, F_e %d, %s, seed %ld, %s\n", m.c_str(), method_paper(m),
                   src.empty() ? a.model.c_str() : a.from.c_str(), out_cfg.n_experts, out_cfg.top_k, out_cfg.ffn_dim,
                   routing_name(out_cfg.routing), a.seed, dtype_name(dt));
        else
            printf("upcycle %s (%s): %s -> a dense model, F %d, %s\n", m.c_str(), method_paper(m), a.from.c_str(),
                   out_cfg.ffn_dim, dtype_name(dt));
        AtomicDir out(a.out);
        Progress prog;
        prog.n_layer = out_cfg.n_layer;
        prog.what = "model.safetensors";
        std::vector<OutTensor> list = layout_tensors(out_lay);
        for (auto& z : zero_bias_tensors(out_cfg)) list.push_back({z.name, z.shape, -1});  // produce: zeros
        stream_write(out.file("model.safetensors"), list, dt, {{"format", "pt"}},
                     [&](size_t i, std::vector<float>& buf) { produce(i, buf); }, prog);
        write_config(out.file("config.json"), out_cfg, dt);
        if (!src.empty()) copy_tokenizer_files(src[0]->dir, out);
        out.commit();
        printf("wrote %s (%.1f MB, %.1fs)\n", a.out.c_str(), prog.bytes / 1e6, now_seconds() - prog.t0);
    }
};

// ----------------------------------------------------------------------------
// MoE -> larger MoE (expert upcycling, docs/METHODS.md 2.8)

struct Expander {
    const UpcycleArgs& a;
    Source src;
    std::unique_ptr<SafeTensorsReader> opt;  // the source's optimizer.safetensors, if any
    long adam_t = 0;
    ModelConfig out_cfg;
    ParamLayout out_lay;
    int m = 2;
    std::vector<std::vector<int>> sel;        // [layer][new slot] -> source expert
    std::vector<std::vector<double>> scores;  // [layer][source expert]
    bool has_bias = false;
    // gradient scores only: the whole source model and the utility batches, kept to report
    // the step-0 loss of the expanded model on the same batches
    std::unique_ptr<Model> whole;
    std::vector<std::vector<int>> batch_in, batch_tg;
    double loss_src = NAN, loss_new = NAN;

    explicit Expander(const UpcycleArgs& args) : a(args) {}

    std::string src_name(const ParamTensor& t) const {
        if (t.expert < 0) return t.name;
        return src.layout.tensors[src.layout.experts[t.layer][sel[t.layer][t.expert]][t.kind - P_EGATE]].name;
    }
    // One output tensor read from `read` (the weights, or one of the moments), its
    // expert or router rows mapped through the selection.
    void produce(const ParamTensor& t, std::vector<float>& out, const std::function<std::vector<float>(const std::string&)>& read) {
        if (t.kind == P_ROUTER) {
            std::vector<float> r = read(t.name);
            int d = out_cfg.d_model;
            for (size_t j = 0; j < sel[t.layer].size(); j++)
                std::copy(r.begin() + (size_t)sel[t.layer][j] * d, r.begin() + (size_t)(sel[t.layer][j] + 1) * d,
                          out.begin() + j * d);
            return;
        }
        out = read(src_name(t));
    }

    // docs/METHODS.md 2.8: a duplicated pair ties in top-K, so the expanded model does not start
    // at the source's loss. Measured on the utility batches (the model is in memory anyway).
    void step0_loss() {
        Model X;
        X.cfg = out_cfg;
        X.init_layout();
        X.router_loss = whole->router_loss;
        X.params.assign(X.layout.total, 0);
        const int d = out_cfg.d_model;
        for (auto& t : X.layout.tensors) {
            const ParamTensor& s = whole->layout.tensors[whole->layout.find(t.kind == P_ROUTER ? t.name : src_name(t))];
            const float* from = whole->params.data() + s.offset;
            float* to = X.params.data() + t.offset;
            if (t.kind != P_ROUTER) { std::copy(from, from + t.numel, to); continue; }
            for (size_t j = 0; j < sel[t.layer].size(); j++)
                std::copy(from + (size_t)sel[t.layer][j] * d, from + (size_t)(sel[t.layer][j] + 1) * d, to + j * d);
        }
        for (int l = 0; l < out_cfg.n_layer; l++)
            for (int j = 0; j < out_cfg.n_experts; j++) X.expert_bias[l][j] = whole->expert_bias[l][sel[l][j]];
        whole.reset();  // one copy of the weights at a time is enough from here
        loss_new = 0;
        for (size_t b = 0; b < batch_in.size(); b++)
            loss_new += X.forward(batch_in[b].data(), batch_tg[b].data(), a.batch, a.seq).ce / batch_in.size();
        printf("step-0 loss on the utility batches: source %.5f, expanded %.5f (change %+.5f)\n", loss_src, loss_new,
               loss_new - loss_src);
    }

    void compute_scores(UtilityScore kind) {
        const int L = src.cfg.n_layer, E = src.cfg.n_experts;
        if (kind == SCORE_FISHER && !opt)
            FAIL("--score fisher needs Adam's second moment: %s/optimizer.safetensors does not exist", src.dir.c_str());
        std::vector<std::vector<double>> wsq(L, std::vector<double>(E, 0)), gsq = wsq, vsq = wsq;
        auto sumsq = [](const float* p, size_t n) { double s = 0; for (size_t i = 0; i < n; i++) s += (double)p[i] * p[i]; return s; };
        if (score_needs_grads(kind)) {
            if (a.utility_batches < 1) FAIL("--utility-batches must be >= 1, found %d", a.utility_batches);
            // the whole source model in the CPU trainer: mean gradient of the cross-entropy
            // (aux and z losses off: the score is about language modeling) over N batches
            DataLoader data(a.data, "", a.batch, a.seq, src.cfg.vocab_size, (uint64_t)a.seed);  // bad data fails first
            printf("utility scores: loading the whole source model for gradients (%d batches of %d x %d from %s)\n",
                   a.utility_batches, a.batch, a.seq, a.data.c_str());
            whole.reset(new Model());
            Model& M = *whole;
            M.load(src.dir);
            M.router_loss.aux_loss = AUX_NONE;
            M.router_loss.aux_coef = 0;
            M.router_loss.z_coef = 0;
            if (has_bias) M.router_loss.aux_free_rate = 1e-3;  // route with the saved biases, as training did
            std::vector<int> in((size_t)a.batch * a.seq), tg(in.size());
            M.zero_grad();
            loss_src = 0;
            for (int b = 0; b < a.utility_batches; b++) {
                data.next_batch(in.data(), tg.data());
                batch_in.push_back(in);
                batch_tg.push_back(tg);
                loss_src += M.forward(in.data(), tg.data(), a.batch, a.seq).ce / a.utility_batches;
                M.backward((real)1 / a.utility_batches);
            }
            for (int l = 0; l < L; l++)
                for (int e = 0; e < E; e++)
                    for (int k = 0; k < 3; k++) {
                        const ParamTensor& t = M.layout.tensors[M.layout.experts[l][e][k]];
                        wsq[l][e] += sumsq(M.params.data() + t.offset, t.numel);
                        gsq[l][e] += sumsq(M.grads.data() + t.offset, t.numel);
                    }
        } else {
            for (int l = 0; l < L; l++)
                for (int e = 0; e < E; e++)
                    for (int k = 0; k < 3; k++) {
                        std::vector<float> w = src.read(src.layout.experts[l][e][k]);
                        wsq[l][e] += sumsq(w.data(), w.size());
                    }
        }
        if (kind == SCORE_FISHER) {
            for (int l = 0; l < L; l++)
                for (int e = 0; e < E; e++)
                    for (int k = 0; k < 3; k++) {
                        std::vector<float> v = opt->read_vec<float>(src.layout.tensors[src.layout.experts[l][e][k]].name + ".exp_avg_sq");
                        vsq[l][e] += sumsq(v.data(), v.size());
                    }
        }
        scores.assign(L, std::vector<double>(E));
        for (int l = 0; l < L; l++)
            for (int e = 0; e < E; e++) scores[l][e] = utility_score(kind, wsq[l][e], gsq[l][e], vsq[l][e]);
    }

    void run(const Cli& cli) {
        if (a.from.empty()) FAIL("--method expand needs --from (a trained MoE checkpoint directory)");
        if (a.from.find(',') != std::string::npos) FAIL("--method expand takes one --from directory");
        if (same_path_key(a.from) == same_path_key(a.out)) FAIL("--out %s is the source directory itself", a.out.c_str());
        src.open(a.from);
        if (src.cfg.nexus_router)
            FAIL("%s: has the Nexus router (R = Emb P); --method expand does not handle it (add an expert with "
                 "--method nexus-add)", a.from.c_str());
        if (!src.cfg.is_moe())
            FAIL("%s: is a dense model (no num_local_experts in config.json); --method expand needs an MoE checkpoint "
                 "(make one with --method naive/drop/...)", a.from.c_str());
        const int E = src.cfg.n_experts, L = src.cfg.n_layer;
        int E_new = cli.was_set("--experts") ? a.experts : 2 * E;
        if (E_new < E || E_new % E)
            FAIL("--experts %d: expand needs a multiple of the source's %d experts", E_new, E);
        if (cli.was_set("--topk") && a.topk != src.cfg.top_k)
            FAIL("--topk %d: expand keeps the source's top-K (%d)", a.topk, src.cfg.top_k);
        if (cli.was_set("--routing") && parse_routing(a.routing, "--routing") != src.cfg.routing)
            FAIL("--routing %s: expand keeps the source's routing (%s)", a.routing.c_str(), routing_name(src.cfg.routing));
        m = E_new / E;
        UtilityScore kind = parse_score(a.score);
        if (a.select != "uniform" && a.select != "utility")
            FAIL("--select must be uniform or utility, found \"%s\"", a.select.c_str());
        if (a.select == "utility" && a.max_dup < 1) FAIL("--max-dup must be >= 1, found %d", a.max_dup);
        for (int l = 0; l < L; l++)
            has_bias |= src.ck->has(bias_tensor_name(l));
        std::string op = path_join(a.from, "optimizer.safetensors");
        if (path_exists(op)) {
            opt.reset(new SafeTensorsReader(op));
            for (auto& t : src.layout.tensors)
                for (const char* sfx : {".exp_avg", ".exp_avg_sq"}) {
                    if (!opt->has(t.name + sfx)) FAIL("%s: missing tensor \"%s%s\"", op.c_str(), t.name.c_str(), sfx);
                    if (opt->info(t.name + sfx).shape != t.shape)
                        FAIL("%s: tensor \"%s%s\" has shape %s, the model's is %s", op.c_str(), t.name.c_str(), sfx,
                             shape_str(opt->info(t.name + sfx).shape).c_str(), shape_str(t.shape).c_str());
                }
            auto it = opt->metadata.find("adam_t");
            adam_t = it == opt->metadata.end()
                         ? 0 : (long)std::min<uint64_t>(parse_uint64(it->second, op + ": adam_t"), LONG_MAX);
        }

        // selection, per layer
        sel.assign(L, {});
        if (a.select == "utility") compute_scores(kind);
        if (!opt)
            printf("note: %s has no optimizer.safetensors: the AdamW moments are written as zeros (adam_t 0)\n",
                   a.from.c_str());
        for (int l = 0; l < L; l++) {
            sel[l] = a.select == "uniform" ? select_uniform(E, m) : select_utility(scores[l], m, a.max_dup);
            printf("layer %d: new slot <- source expert:", l);
            for (int j = E; j < E * m; j++) printf(" %d<-%d", j, sel[l][j]);
            printf("\n");
        }

        out_cfg = src.cfg;
        out_cfg.n_experts = E_new;
        out_cfg.validate("output model");
        out_lay = build_layout(out_cfg);
        DType dt = output_dtype(a.dtype, src.ck->dtype());
        check_output_size(out_lay, dt, a.out);
        if (whole) step0_loss();

        Json rec = Json::object();
        rec["method"] = "expand";
        rec["paper"] = method_paper("expand");
        rec["tool"] = "upcycle " UPCYCLE_VERSION;
        rec["seed"] = a.seed;
        rec["experts_from"] = E;
        rec["experts"] = E_new;
        rec["top_k"] = out_cfg.top_k;
        rec["select"] = a.select;
        if (a.select == "utility") {
            rec["score"] = a.score;
            rec["max_dup"] = a.max_dup;
            if (score_needs_grads(kind)) {
                rec["utility_data"] = a.data;
                rec["utility_batches"] = a.utility_batches;
                rec["utility_batch"] = a.batch;
                rec["utility_seq"] = a.seq;
                rec["utility_loss"] = "mean cross-entropy (aux and z losses off)";
                rec["step0_loss_source"] = loss_src;
                rec["step0_loss_expanded"] = loss_new;
            }
            rec["scores"] = json_array(scores);
        }
        rec["selection"] = json_array(sel);
        rec["selection_note"] = "selection[layer][slot] = the source expert copied into that slot (weights, router row, "
                                "AdamW moments); slots < experts_from keep the originals";
        rec["optimizer"] = opt ? strfmt("AdamW moments copied with their experts, adam_t %ld", adam_t)
                               : std::string("source had no optimizer.safetensors: moments are zeros, adam_t 0");
        rec["dtype"] = dtype_name(dt);
        Json sources = Json::array();
        sources.push(src.record());
        rec["sources"] = sources;
        if (const Json* prev = src.cfg.extra.find("upcycling")) rec["source_upcycling"] = *prev;
        out_cfg.extra.erase("upcycling");
        out_cfg.extra["upcycling"] = rec;

        printf("upcycle expand (%s): %s, %d -> %d experts top-%d, select %s%s\n", method_paper("expand"), a.from.c_str(),
               E, E_new, out_cfg.top_k, a.select.c_str(), a.select == "utility" ? (" by " + a.score).c_str() : "");
        AtomicDir out(a.out);
        Progress prog;
        prog.n_layer = L;
        // the model (+ aux-loss-free biases, mapped like the router rows)
        std::vector<OutTensor> list = layout_tensors(out_lay);
        if (has_bias)
            for (int l = 0; l < L; l++) list.push_back({bias_tensor_name(l), {E_new}, -1});
        const size_t n_before_zeros = list.size();
        for (auto& z : zero_bias_tensors(out_cfg)) list.push_back({z.name, z.shape, -1});  // Qwen2-MoE's: zeros
        auto read_w = [&](const std::string& n) { return src.read(n); };
        prog.what = "model.safetensors";
        stream_write(out.file("model.safetensors"), list, dt, {{"format", "pt"}},
                     [&](size_t i, std::vector<float>& buf) {
                         if (i < out_lay.tensors.size()) return produce(out_lay.tensors[i], buf, read_w);
                         if (i >= n_before_zeros) return;  // zeros
                         int l = (int)(i - out_lay.tensors.size());
                         std::string n = bias_tensor_name(l);
                         std::vector<float> b(E, 0.0f);
                         if (src.ck->has(n)) b = src.read(n);
                         for (int j = 0; j < E_new; j++) buf[j] = b[sel[l][j]];
                     },
                     prog);
        // the optimizer, in write_optimizer_file's format (common/run.h): per tensor
        // "<name>.exp_avg" then "<name>.exp_avg_sq", F32, metadata adam_t
        std::vector<OutTensor> olist;
        for (auto& t : out_lay.tensors) {
            olist.push_back({t.name + ".exp_avg", t.shape, t.layer});
            olist.push_back({t.name + ".exp_avg_sq", t.shape, t.layer});
        }
        prog.what = "optimizer.safetensors";
        stream_write(out.file("optimizer.safetensors"), olist, DType::F32, {{"adam_t", std::to_string(adam_t)}},
                     [&](size_t i, std::vector<float>& buf) {
                         if (!opt) return;  // zeros
                         const char* sfx = i % 2 ? ".exp_avg_sq" : ".exp_avg";
                         produce(out_lay.tensors[i / 2], buf,
                                 [&](const std::string& n) { return opt->read_vec<float>(n + sfx); });
                     },
                     prog);
        write_config(out.file("config.json"), out_cfg, dt);
        copy_tokenizer_files(src.dir, out);
        out.commit();
        printf("wrote %s (%.1f MB, %.1fs); continue training with: ./train_moe --init %s --init-optimizer ...\n",
               a.out.c_str(), prog.bytes / 1e6, now_seconds() - prog.t0, a.out.c_str());
    }
};

// ----------------------------------------------------------------------------
// MoE -> Grove MoE (docs/METHODS.md 2.15): the source's tensors as they are, plus G adjugate
// experts per layer with w1, w3 ~ N(0, std^2) and w2 = 0. An adjugate's output is then
// exactly zero, so the output model computes the source's function (bit for bit in the
// trainers: out += lambda gw * 0), while w2's gradient (h^T dy, h != 0) is not zero: the
// adjugates start learning at the first step.

struct GroveUpcycler {
    const UpcycleArgs& a;
    explicit GroveUpcycler(const UpcycleArgs& args) : a(args) {}

    void run(const Cli& cli) {
        if (a.from.empty()) FAIL("--method grove needs --from (an MoE checkpoint directory)");
        if (a.from.find(',') != std::string::npos) FAIL("--method grove takes one --from directory");
        for (const char* o : {"--experts", "--topk", "--routing", "--router", "--ratio", "--granularity"})
            if (cli.was_set(o)) FAIL("%s: --method grove keeps the source MoE's experts and routing", o);
        Source src;
        src.open(a.from);
        if (!src.cfg.is_moe())
            FAIL("%s: is a dense model (no num_local_experts in config.json); --method grove needs an MoE checkpoint "
                 "(make one with --method naive/drop/...)", a.from.c_str());
        if (src.cfg.has_shared()) FAIL("%s: has a shared expert; Grove adjugates with one are not supported", a.from.c_str());
        if (src.cfg.has_grove()) FAIL("%s: already has Grove adjugate experts (grove_groups %d)", a.from.c_str(),
                                      src.cfg.grove_groups);
        const int E = src.cfg.n_experts, G = a.grove_groups;
        if (G < 1 || E % G)
            FAIL("--grove-groups %d must be given and divide the source's %d experts", G, E);
        if (!std::isfinite(a.grove_scale)) FAIL("--grove-scale must be a finite number, found %g", a.grove_scale);
        ModelConfig out_cfg = src.cfg;
        out_cfg.grove_groups = G;
        out_cfg.grove_dim = a.grove_width > 0 ? a.grove_width : std::max(1, src.cfg.ffn_dim / 4);
        out_cfg.grove_scale = (float)a.grove_scale;
        out_cfg.validate("output model");
        ParamLayout out_lay = build_layout(out_cfg);
        DType dt = output_dtype(a.dtype, src.ck->dtype());
        check_output_size(out_lay, dt, a.out);
        bool has_bias = false;
        for (int l = 0; l < src.cfg.n_layer; l++) has_bias |= src.ck->has(bias_tensor_name(l));

        Json rec = Json::object();
        rec["method"] = "grove";
        rec["paper"] = method_paper("grove");
        rec["tool"] = "upcycle " UPCYCLE_VERSION;
        rec["seed"] = a.seed;
        rec["grove_groups"] = G;
        rec["group_size"] = E / G;
        rec["grove_intermediate_size"] = out_cfg.grove_dim;
        rec["grove_scale"] = a.grove_scale;
        rec["adjugate_init"] = strfmt("w1, w3 ~ N(0, %g^2) (stream of the output tensor's index, as a from-scratch "
                                      "init); w2 = 0: the output computes the source's function", a.grove_std);
        rec["optimizer"] = "none written: start AdamW fresh (./train_moe --init without --init-optimizer)";
        rec["dtype"] = dtype_name(dt);
        Json sources = Json::array();
        sources.push(src.record());
        rec["sources"] = sources;
        if (const Json* prev = src.cfg.extra.find("upcycling")) rec["source_upcycling"] = *prev;
        out_cfg.extra.erase("upcycling");
        out_cfg.extra["upcycling"] = rec;

        printf("upcycle grove (%s): %s, %d experts in %d groups of %d, adjugate F_a %d, scale %g\n",
               method_paper("grove"), a.from.c_str(), E, G, E / G, out_cfg.grove_dim, a.grove_scale);
        AtomicDir out(a.out);
        Progress prog;
        prog.n_layer = out_cfg.n_layer;
        prog.what = "model.safetensors";
        std::vector<OutTensor> list = layout_tensors(out_lay);
        if (has_bias)
            for (int l = 0; l < out_cfg.n_layer; l++) list.push_back({bias_tensor_name(l), {E}, -1});
        const uint64_t seed = (uint64_t)a.seed;
        stream_write(out.file("model.safetensors"), list, dt, {{"format", "pt"}},
                     [&](size_t i, std::vector<float>& buf) {
                         if (i >= out_lay.tensors.size()) {  // aux-loss-free biases: as they were (zeros if absent)
                             std::string n = list[i].name;
                             if (src.ck->has(n)) buf = src.read(n);
                             return;
                         }
                         const ParamTensor& t = out_lay.tensors[i];
                         if (t.kind == P_ADOWN) return;  // zeros: the adjugate adds nothing
                         if (t.kind == P_AGATE || t.kind == P_AUP) {
                             const uint64_t stream = stream_id(PURPOSE_INIT, (uint32_t)i);
                             for (size_t k = 0; k < t.numel; k++)
                                 buf[k] = (float)(a.grove_std * rng_normal(seed, stream, (uint64_t)k));
                             return;
                         }
                         buf = src.read(t.name);
                     },
                     prog);
        write_config(out.file("config.json"), out_cfg, dt);
        copy_tokenizer_files(src.dir, out);
        out.commit();
        printf("wrote %s (%.1f MB, %.1fs); continue training with: ./train_moe --init %s ...\n", a.out.c_str(),
               prog.bytes / 1e6, now_seconds() - prog.t0, a.out.c_str());
    }
};

// ----------------------------------------------------------------------------
// MoE -> dense: XFT's learnable merge (docs/METHODS.md 2.13; common/xft_merge.h)

struct Merger {
    const UpcycleArgs& a;
    explicit Merger(const UpcycleArgs& args) : a(args) {}

    void run(const Cli& cli) {
        for (const char* o : {"--experts", "--topk", "--routing", "--router", "--ratio", "--granularity"})
            if (cli.was_set(o)) FAIL("--method merge makes a dense model from the --from MoE: %s does not apply", o);
        if (a.from.empty()) FAIL("--method merge needs --from (a trained MoE with a shared expert)");
        if (split_commas(a.from).size() != 1) FAIL("--method merge takes one --from directory");
        if (same_path_key(a.from) == same_path_key(a.out)) FAIL("--out %s is the source directory itself", a.out.c_str());
        Source src;
        src.open(a.from);
        XftMerger X;
        X.init(a.from, a.merge_lambda);
        const int L = X.dense.cfg.n_layer, E = X.moe.cfg.n_experts, B = a.batch, T = a.seq;
        printf("upcycle merge (%s): %s, shared + %d experts per layer -> a dense model, lambda %g; alpha: %d Adam "
               "steps, lr %g, batches of %d x %d from %s\n", method_paper("merge"), a.from.c_str(), E, a.merge_lambda,
               a.merge_steps, a.merge_lr, B, T, a.data.c_str());
        Json losses = Json::array();
        if (a.merge_steps > 0) {
            DataLoader data(a.data, "", B, T, X.dense.cfg.vocab_size, (uint64_t)a.seed);
            std::vector<int> in((size_t)B * T), tg((size_t)B * T);
            for (int s = 0; s < a.merge_steps; s++) {
                data.next_batch(in.data(), tg.data());
                double loss = X.step(in.data(), tg.data(), B, T, a.merge_lr);
                losses.push(Json(loss));
                if (s == 0 || (s + 1) % 10 == 0 || s + 1 == a.merge_steps)
                    printf("  step %d/%d: loss %.4f (before the step)\n", s + 1, a.merge_steps, loss);
            }
        }
        X.set_ffns();  // the final alpha's FFNs
        Json rec = Json::object(), al = Json::array(), ml = Json::array();
        rec["method"] = "merge";
        rec["paper"] = method_paper("merge");
        rec["tool"] = "upcycle " UPCYCLE_VERSION;
        rec["formula"] = "per layer and FFN matrix: W = lambda shared + (1 - lambda) sum_i softmax(alpha)_i expert_i "
                         "(in double, rounded once); alpha trained by Adam with every other tensor frozen; router dropped";
        rec["lambda"] = a.merge_lambda;
        rec["steps"] = a.merge_steps;
        rec["lr"] = a.merge_lr;
        rec["optimizer"] = "Adam on alpha (betas 0.9, 0.999, eps 1e-8, no weight decay), alpha init 0 (uniform)";
        rec["data"] = a.data;
        rec["batch"] = B;
        rec["seq"] = T;
        rec["seed"] = a.seed;
        rec["losses"] = losses;
        for (int l = 0; l < L; l++) {
            Json aj = Json::array(), mj = Json::array();
            std::vector<double> m = softmax_of(X.alpha[l]);
            for (int e = 0; e < E; e++) { aj.push(Json(X.alpha[l][e])); mj.push(Json(m[e])); }
            al.push(aj);
            ml.push(mj);
        }
        rec["alpha"] = al;
        rec["weights"] = ml;
        rec["source_routing"] = routing_name(X.moe.cfg.routing);
        if (const Json* up = X.moe.cfg.extra.find("upcycling")) rec["source_upcycling"] = *up;
        ModelConfig out_cfg = X.dense.cfg;
        const ParamLayout& lay = X.dense.layout;
        DType dt = output_dtype(a.dtype, src.ck->dtype());
        check_output_size(lay, dt, a.out);
        rec["dtype"] = dtype_name(dt);
        Json sources = Json::array();
        sources.push(src.record());
        rec["sources"] = sources;
        out_cfg.extra.erase("upcycling");
        out_cfg.extra["upcycling"] = rec;
        AtomicDir out(a.out);
        Progress prog;
        prog.n_layer = L;
        prog.what = "model.safetensors";
        stream_write(out.file("model.safetensors"), layout_tensors(lay), dt, {{"format", "pt"}},
                     [&](size_t i, std::vector<float>& buf) {
                         const ParamTensor& t = lay.tensors[i];
                         for (size_t j = 0; j < t.numel; j++) buf[j] = (float)X.dense.params[t.offset + j];
                     },
                     prog);
        write_config(out.file("config.json"), out_cfg, dt);
        copy_tokenizer_files(src.dir, out);
        out.commit();
        printf("wrote %s (a dense Llama, %.1f MB, %.1fs)\n", a.out.c_str(), prog.bytes / 1e6, now_seconds() - prog.t0);
    }
};

// ----------------------------------------------------------------------------
// Nexus: adding an expert to a trained Nexus MoE (docs/METHODS.md 2.14). The new expert is the
// new branch's FFN; its router row is Emb_new P with the MoE's own P: no new free router
// parameter. Every other tensor (experts 0..E-1, P, the old Emb rows, shared expert,
// attention, embeddings, norms) is copied bit for bit; R = Emb' P is recomputed. Loads the
// MoE whole (the output is built in memory, then written like a trainer checkpoint).
// add-expert: the same for an MoE with the usual linear router; the new router row is the
// last row of the upcycling router init for E+1 experts (--router, --seed), a free row.

struct NexusAdder {
    const UpcycleArgs& a;
    explicit NexusAdder(const UpcycleArgs& args) : a(args) {}

    void run(const Cli& cli) {
        std::vector<std::string> dirs = a.from.empty() ? std::vector<std::string>() : split_commas(a.from);
        const bool nexus = a.method == "nexus-add";
        if (dirs.size() != 2)
            FAIL("--method %s needs --from moe,branch (a trained MoE and the new domain's dense branch), "
                 "found %zu director%s", a.method.c_str(), dirs.size(), dirs.size() == 1 ? "y" : "ies");
        for (auto& d : dirs)
            if (same_path_key(d) == same_path_key(a.out)) FAIL("--out %s is a source directory itself", a.out.c_str());
        for (const char* o : {"--experts", "--topk", "--routing", "--shared-gate", "--nexus-proj-init"})
            if (cli.was_set(o)) FAIL("--method %s keeps the MoE's settings: %s does not apply", a.method.c_str(), o);
        if (!nexus)
            for (const char* o : {"--nexus-domains", "--nexus-seed", "--nexus-hidden", "--nexus-down-scale"})
                if (cli.was_set(o)) FAIL("%s applies to --method nexus or nexus-add, not add-expert", o);
        if (nexus && cli.was_set("--router")) FAIL("--method nexus-add: --router does not apply (the new row is Emb_new P)");
        ModelConfig cfg;
        ParamLayout lay;
        std::vector<float> p;
        load_model_dir(dirs[0], &cfg, &lay, &p);
        if (!cfg.is_moe()) FAIL("%s: is a dense model; --method %s needs a trained MoE", dirs[0].c_str(), a.method.c_str());
        if (nexus && !cfg.nexus_router)
            FAIL("%s: not a Nexus MoE (config.json has no moe_router nexus); make one with --method nexus", dirs[0].c_str());
        if (!nexus && cfg.nexus_router)
            FAIL("%s: has the Nexus router; add an expert with --method nexus-add", dirs[0].c_str());
        RouterInit rkind = ROUTER_UNIFORM;
        if (a.router == "normal") rkind = ROUTER_NORMAL;
        else if (a.router != "uniform") FAIL("--router must be uniform or normal, found \"%s\"", a.router.c_str());
        Source br;
        br.open(dirs[1]);
        if (br.cfg.is_moe()) FAIL("%s: the new branch must be a dense model, found %d experts", dirs[1].c_str(), br.cfg.n_experts);
        if (br.cfg.d_model != cfg.d_model || br.cfg.n_layer != cfg.n_layer || br.cfg.ffn_dim != cfg.ffn_dim ||
            br.cfg.vocab_size != cfg.vocab_size)
            FAIL("%s: the branch's shape (hidden %d, layers %d, FFN %d, vocab %d) differs from the MoE's (hidden %d, "
                 "layers %d, expert FFN %d, vocab %d)", dirs[1].c_str(), br.cfg.d_model, br.cfg.n_layer, br.cfg.ffn_dim,
                 br.cfg.vocab_size, cfg.d_model, cfg.n_layer, cfg.ffn_dim, cfg.vocab_size);
        const Json* prev = cfg.extra.find("upcycling");
        std::string seed = a.nexus_seed;
        if (seed.empty() && prev && prev->find("nexus_seed")) seed = prev->find("nexus_seed")->str;
        if (nexus && seed.empty())
            FAIL("--method nexus-add: give --nexus-seed (the dense seed model of the MoE's domain embeddings): %s records "
                 "none", dirs[0].c_str());
        double down = nexus ? a.nexus_down_scale : 1.0;
        if (nexus && !cli.was_set("--nexus-down-scale") && prev && prev->find("nexus_down_scale"))
            down = prev->find("nexus_down_scale")->num;
        std::vector<std::string> domains = a.nexus_domains.empty() ? std::vector<std::string>() : split_commas(a.nexus_domains);
        if (nexus && domains.size() != 1)
            FAIL("--nexus-domains must name the new branch's one domain, found \"%s\"", a.nexus_domains.c_str());
        Json rec = Json::object();
        rec["method"] = a.method;
        rec["paper"] = method_paper(a.method);
        rec["tool"] = "upcycle " UPCYCLE_VERSION;
        rec["seed"] = a.seed;
        std::vector<std::vector<std::vector<float>>> emb;
        if (nexus) emb = nexus_domain_embeddings(a, seed, domains, &rec);
        const int E = cfg.n_experts, E1 = E + 1, L = cfg.n_layer, d = cfg.d_model;
        ModelConfig oc = cfg;
        oc.n_experts = E1;
        oc.extra.erase("upcycling");
        oc.validate("output model");
        ParamLayout ol = build_layout(oc);
        std::vector<float> q(ol.total, 0.0f);
        for (auto& t : ol.tensors) {
            float* o = q.data() + t.offset;
            if (t.kind == P_ROUTER && nexus) continue;  // R = Emb' P below
            if (t.kind == P_ROUTER) {  // the old rows, then a fresh one (the init's row E of E + 1)
                const float* old = p.data() + lay.get(t.layer, P_ROUTER).offset;
                std::copy(old, old + (size_t)E * d, o);
                std::vector<float> init((size_t)E1 * d);
                router_init(init.data(), E1, d, rkind, (uint64_t)a.seed, t.layer);
                std::copy(init.begin() + (size_t)E * d, init.end(), o + (size_t)E * d);
                continue;
            }
            if (t.kind == P_NEXUS_EMB) {       // the old rows, then the new domain's
                const float* old = p.data() + lay.get(t.layer, P_NEXUS_EMB).offset;
                std::copy(old, old + (size_t)E * d, o);
                std::copy(emb[0][t.layer].begin(), emb[0][t.layer].end(), o + (size_t)E * d);
                continue;
            }
            if (t.expert == E) {  // the new expert: the branch's FFN
                std::vector<float> w = br.read(br.layout.by_layer[t.layer][P_GATE + (t.kind - P_EGATE)]);
                if (t.kind == P_EDOWN) for (float& x : w) x *= (float)down;
                std::copy(w.begin(), w.end(), o);
                continue;
            }
            const int si = t.expert >= 0 ? lay.experts[t.layer][t.expert][t.kind - P_EGATE] : lay.find(t.name);
            if (si < 0) FAIL("internal: nexus-add found no source tensor for %s", t.name.c_str());
            const ParamTensor& st = lay.tensors[si];
            std::copy(p.begin() + st.offset, p.begin() + st.offset + st.numel, o);
        }
        nexus_refresh_routers(oc, ol, q.data());
        Json sources = Json::array();
        Source moe;
        moe.open(dirs[0]);
        sources.push(moe.record());
        sources.push(br.record());
        rec["sources"] = sources;
        rec["experts"] = E1;
        if (nexus) {
            rec["new_expert"] = strfmt("expert %d = the FFN of %s, down_proj x %g; its router row = Emb_new P (the "
                                       "MoE's P)", E, dirs[1].c_str(), down);
            rec["nexus_down_scale"] = down;
            rec["kept"] = "experts 0..E-1, P, the old Emb rows, the shared expert, attention, embeddings and norms: "
                          "copied bit for bit; R = Emb' P recomputed; AdamW moments and aux-free biases not carried";
        } else {
            rec["new_expert"] = strfmt("expert %d = the FFN of %s; its router row = row %d of the %s router init for "
                                       "%d experts (seed %ld): a free row", E, dirs[1].c_str(), E, a.router.c_str(), E1,
                                       a.seed);
            rec["kept"] = "experts 0..E-1, the old router rows and every other tensor: copied bit for bit; AdamW "
                          "moments and aux-free biases not carried";
        }
        if (prev) rec["base_upcycling"] = *prev;
        oc.extra["upcycling"] = rec;
        DType dt = output_dtype(a.dtype, moe.ck->dtype());
        check_output_size(ol, dt, a.out);
        AtomicDir out(a.out);
        std::string tmpdir = out.file("");
        while (tmpdir.size() > 1 && tmpdir.back() == '/') tmpdir.pop_back();
        save_model_files(tmpdir, oc, ol, q.data(), dt);
        copy_tokenizer_files(dirs[0], out);
        out.commit();
        printf("upcycle %s (%s): %s + %s -> %d experts top-%d; wrote %s\n", a.method.c_str(), method_paper(a.method),
               dirs[0].c_str(), dirs[1].c_str(), E1, oc.top_k, a.out.c_str());
        (void)L;
    }
};

// ----------------------------------------------------------------------------

int main(int argc, char** argv) {
    UpcycleArgs a;
    Cli cli("upcycle", "Builds a Mixture-of-Experts model (Hugging Face Mixtral format; Qwen2-MoE with a shared expert)\n"
                       "from dense Llama model(s), or a\n"
                       "larger MoE from a trained MoE: every initialization of docs/METHODS.md section 2. Streams\n"
                       "tensor by tensor (memory ~ one layer), except expand with a gradient score, which loads the\n"
                       "whole source model. The same --seed gives byte-identical output on any thread count.");
    a.add_to(cli);
    cli.epilog(
        "Examples (one per method):\n"
        "  ./upcycle --method scratch   --from dense/ --experts 8 --topk 2 --out moe_fs\n"
        "  ./upcycle --method scratch   --model small --vocab 4096 --experts 8 --topk 2 --out moe_fs\n"
        "  ./upcycle --method naive     --from dense/ --experts 8 --topk 2 --out moe_nu\n"
        "  ./upcycle --method noise     --from dense/ --experts 8 --topk 2 --ratio 0.5 --out moe_rnu\n"
        "  ./upcycle --method drop      --from dense/ --experts 8 --topk 2 --ratio 0.5 --out moe_du\n"
        "  ./upcycle --method btx       --from seed/,ja/,en/,code/ --experts 8 --topk 2 --out moe_btx\n"
        "  ./upcycle --method btm-average --from ja/,en/,code/ --out dense_btm   (a dense model)\n"
        "  ./upcycle --method upit      --from run/step_000100,run/step_000200,run/step_000300,run/step_000400\n"
        "            --experts 8 --topk 2 --out moe_upit   (4 checkpoint experts + 4 merged)\n"
        "  ./upcycle --method granular  --from dense/ --experts 16 --topk 4 --granularity 2 --out moe_gran\n"
        "  ./upcycle --method partition --from dense/ --experts 8 --topk 2 --out moe_part\n"
        "  ./upcycle --method shared    --from dense/ --experts 8 --topk 2 --out moe_sh   (+ a shared expert)\n"
        "  ./upcycle --method qwen2     --from dense/ --experts 16 --topk 4 --granularity 4 --ratio 0.5 --out moe_q2\n"
        "  ./upcycle --method nexus     --from seed/,en/,code/,de/ --nexus-domains en,code,de --data data/tiny\n"
        "            --topk 1 --out moe_nexus   (shared expert = seed FFN, 3 routed experts, R = Emb P)\n"
        "  ./upcycle --method nexus-add --from moe_nexus/,go/ --nexus-domains go --data data/tiny4 --out moe_nexus4\n"
        "  ./upcycle --method add-expert --from moe_btx/,go/ --out moe_btx_go   (linear router: a fresh row)\n"
        "  ./upcycle --method xft       --from dense/ --experts 8 --topk 2 --out moe_xft   (XFT; train with train_moe)\n"
        "  ./upcycle --method merge     --from runs/xft/step_001000 --data data/tiny --merge-steps 100 --out dense_xft\n"
        "  ./upcycle --method expand    --from runs/moe/step_001000 --experts 16 --select utility --score grad_norm\n"
        "            --data data/tiny --utility-batches 8 --out moe_x2\n"
        "  ./upcycle --method grove     --from moe_nu --grove-groups 4 --grove-width 64 --out moe_grove\n"
        "  then: ./train_moe --init moe_x2 --init-optimizer --data data/tiny ...\n"
        "See docs/UPCYCLING.md for what each method preserves.");
    try {
        cli.parse(argc, argv);
#ifdef _OPENMP
        if (a.threads > 0) omp_set_num_threads(a.threads);
#endif
        if (a.method.empty())
            FAIL("--method is required (scratch, naive, noise, drop, btx, granular, partition, shared, qwen2, xft, "
                 "merge, expand, btm-average, upit, grove, nexus, nexus-add, add-expert)");
        if (a.out.empty()) FAIL("--out is required (the output directory)");
        {  // nothing the user did not ask to lose: inputs, an existing file, a non-empty directory
            std::vector<std::string> inputs = a.from.empty() ? std::vector<std::string>() : split_commas(a.from);
            if (a.method == "expand" || a.method == "upit" || a.method == "merge" || a.method == "nexus" ||
                a.method == "nexus-add")
                inputs.push_back(a.data);  // read for scores / seed router / merge batches / domain embeddings
            if (!a.nexus_seed.empty()) inputs.push_back(a.nexus_seed);
            check_output_location(a.out, inputs, a.overwrite);
        }
        static const char* methods[] = {"scratch", "naive", "noise", "drop", "btx", "granular", "partition", "shared",
                                        "qwen2", "xft", "merge", "expand", "btm-average", "upit", "grove", "nexus",
                                        "nexus-add", "add-expert"};
        bool known = false;
        for (const char* k : methods) known |= a.method == k;
        if (!known)
            FAIL("--method \"%s\" is not one of scratch, naive, noise, drop, btx, granular, partition, shared, qwen2, "
                 "xft, merge, expand, btm-average, upit, grove, nexus, nexus-add, add-expert", a.method.c_str());
        for (const char* o : {"--upit-pair", "--upit-w-min", "--upit-w-max", "--upit-shared", "--upit-router"})
            if (a.method != "upit" && cli.was_set(o)) FAIL("%s applies to --method upit only", o);
        for (const char* o : {"--grove-groups", "--grove-width", "--grove-scale", "--grove-std"})
            if (a.method != "grove" && cli.was_set(o)) FAIL("%s applies to --method grove only", o);
        for (const char* o : {"--merge-lambda", "--merge-steps", "--merge-lr"})
            if (a.method != "merge" && cli.was_set(o)) FAIL("%s applies to --method merge only", o);
        if (a.method == "nexus") {  // E = the number of branches; the shared expert ungated unless asked
            if (!cli.was_set("--experts")) a.experts = std::max(1, (int)split_commas(a.from).size() - 1);
            if (!cli.was_set("--topk")) a.topk = std::min(a.topk, a.experts);
            // top-1 renormalized would give the one routed expert the weight 1 and the router no
            // gradient from the language-model loss: top-1 defaults to the unrenormalized softmax
            if (!cli.was_set("--routing") && a.topk == 1) a.routing = "softmax_topk";
            if (!cli.was_set("--shared-gate")) a.shared_gate = "none";
        }
        if (a.method == "expand") {
            Expander x(a);
            x.run(cli);
        } else if (a.method == "merge") {
            Merger x(a);
            x.run(cli);
        } else if (a.method == "grove") {
            GroveUpcycler g(a);
            g.run(cli);
        } else if (a.method == "nexus-add" || a.method == "add-expert") {
            NexusAdder x(a);
            x.run(cli);
        } else {
            if (a.experts < 1) FAIL("--experts must be >= 1, found %d", a.experts);
            if (a.topk < 1 || a.topk > a.experts) FAIL("--topk %d must be in [1, --experts %d]", a.topk, a.experts);
            DenseUpcycler u(a);
            u.run(cli);
        }
        return 0;
    } catch (const Error& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    } catch (const std::bad_alloc&) {
        fprintf(stderr, "error: out of memory (a host allocation failed); nothing was written to --out\n");
        return 1;
    }
}
