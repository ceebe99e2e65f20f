// train_args.h: the command line shared by train_moe.cpp and train_moe.cu (one table, so
// the two trainers cannot drift apart), and what a checkpoint records of it.
//
// defines: TrainArgs
#pragma once
#include <string>
#include "checkpoint.h"    // defines: parse_keep_checkpoints
#include "cli.h"           // defines: Cli
#include "json.h"          // defines: Json
#include "model.h"         // defines: ModelConfig, ParamLayout
#include "util.h"          // defines: Error, FAIL, strfmt, file helpers

struct TrainArgs {
    // data
    std::string data_dir = "data/tiny", mix, tokenizer;
    // model
    std::string model = "tiny", init, resume, routing = "topk_softmax";
    int experts = 0, topk = 2, expert_width = 0, vocab = 0, shared_experts = 0;
    int grove_groups = 0, grove_width = 0;
    double grove_scale = 0.05;
    std::string shared_gate;  // "" = sigmoid (none with --routing xft)
    bool tie = false, init_optimizer = false;
    double init_std = 0.02;
    // optimization
    int steps = 100, batch = 8, seq = 64, grad_accum = 1, warmup = 0;
    double lr = 1e-3, lr_min = -1, wsd_decay = 0.2;
    std::string lr_schedule = "cosine";
    double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1, grad_clip = 1.0;
    // MoE losses
    std::string aux_loss = "switch";
    double aux_coef = 0.01, z_coef = 0.001, aux_free_bias = 0;
    double dpsl_coef = 0.01;
    std::string dpsl_alpha = "1", dpsl_distance = "sq", dpsl_ecdf = "mid";
    // run
    std::string out = "runs/train", keep_checkpoints = "all", sample_prompt;
    int eval_every = 0, eval_batches = 8, sample_every = 0, sample_tokens = 64, save_every = 0, log_every = 1;
    long seed = 1337;
    // not an option: the number of data-parallel ranks (train_moe_gpu sets it from the
    // launcher's variables); --batch is per rank, the global batch is world * batch
    int world = 1;
    int threads = 0;
    bool no_save = false, overwrite = false;

    void add_to(Cli& cli) {
        cli.section("Data");
        cli.add("--data", &data_dir, "folder of <domain>_train_NNN.bin / <domain>_val_NNN.bin token shards");
        cli.add("--mix", &mix, "training mixture, e.g. en=1,code=1,de=2 (default: every domain with train shards, equal)");
        cli.add("--tokenizer", &tokenizer, "tokenizer.bin for printing samples (default: <data>/tokenizer.bin)");
        cli.section("Model (one of --model, --init, --resume)");
        cli.add("--model", &model, std::string("from scratch: preset (") + model_preset_names() + ") or a config.json");
        cli.add("--init", &init, "start from a checkpoint directory (Hugging Face Llama/Mixtral), fresh optimizer");
        cli.flag("--init-optimizer", &init_optimizer, "with --init: also load its optimizer.safetensors (AdamW moments)");
        cli.add("--resume", &resume, "continue a run: a checkpoint directory, or a run directory (uses its latest)");
        cli.add("--experts", &experts, "with --model: number of experts E (0 = dense)", Range::between(0, 65536));
        cli.add("--topk", &topk, "with --model: experts per token K", Range::between(1, 65536));
        cli.add("--expert-width", &expert_width, "with --model: expert FFN width F_e (default: the preset's F)",
                Range::between(0, 1 << 24));
        cli.add("--shared-experts", &shared_experts, "with --model and --experts: S always-on shared experts beside the "
                                                      "routed ones, stored as one shared FFN of width S x F_e "
                                                      "(DeepSeekMoE / Qwen2-MoE; saved as Qwen2MoeForCausalLM)",
                Range::between(0, 1 << 16));
        cli.add("--shared-gate", &shared_gate, "with --shared-experts: sigmoid (Qwen2-MoE: the shared output times "
                                               "sigmoid(x . g), a learned d-vector g) or none (DeepSeekMoE: added as is); "
                                               "default sigmoid, none with --routing xft");
        cli.add("--grove-groups", &grove_groups, "with --model and --experts: G groups of E/G consecutive experts, each "
                                                  "with one small adjugate expert run once per token when any expert "
                                                  "of its group is chosen (Grove MoE, arXiv 2508.07785)",
                Range::between(0, 65536));
        cli.add("--grove-width", &grove_width, "with --grove-groups: the adjugate experts' FFN width F_a (default "
                                               "F_e / 4)", Range::between(0, 1 << 20));
        cli.add("--grove-scale", &grove_scale, "with --grove-groups: lambda, the adjugate output's scale (default 0.05, "
                                               "GroveMoE's released code)");
        cli.add("--routing", &routing, "with --model: topk_softmax (Mixtral), softmax_topk (no renormalization) or "
                                         "xft (XFT: needs --shared-experts; shared weight 1 - p(1), routed weights "
                                         "p(1) softmax(top-K probabilities))");
        cli.flag("--tie", &tie, "with --model: tie the LM head to the token embedding");
        cli.add("--vocab", &vocab, "with --model: vocabulary size (default: the tokenizer's)",
                Range::between(0, 65536));
        cli.add("--init-std", &init_std, "with --model: std of the N(0, std) init of every matrix",
                Range::between(0, 10));
        cli.section("Optimization");
        cli.add("--steps", &steps, "optimizer steps in total (a resumed run stops at the same total)",
                Range::at_least(0));
        cli.add("--batch", &batch, "sequences per micro-batch B", Range::between(1, 1 << 20));
        cli.add("--seq", &seq, "tokens per sequence T", Range::between(1, 1 << 20));
        cli.add("--grad-accum", &grad_accum, "micro-batches per optimizer step", Range::between(1, 1 << 20));
        cli.add("--lr", &lr, "peak learning rate", Range::at_least(0));
        cli.add("--lr-min", &lr_min, "final learning rate (default: lr / 10)", Range::at_least(0));
        cli.add("--lr-schedule", &lr_schedule, "cosine, wsd (warmup-stable-decay) or constant");
        cli.add("--warmup", &warmup, "linear warmup steps", Range::at_least(0));
        cli.add("--wsd-decay", &wsd_decay, "wsd: fraction of the steps spent decaying", Range::between(0, 1));
        cli.add("--beta1", &beta1, "AdamW beta1", Range::unit_open());
        cli.add("--beta2", &beta2, "AdamW beta2", Range::unit_open());
        cli.add("--eps", &eps, "AdamW epsilon", Range::positive());
        cli.add("--weight-decay", &weight_decay, "AdamW weight decay (matrices only)", Range::at_least(0));
        cli.add("--grad-clip", &grad_clip, "clip the global gradient norm to this (0 = off)", Range::at_least(0));
        cli.section("MoE losses");
        cli.add("--aux-loss", &aux_loss, "load balancing: switch (per layer, 1 at balance), pooled (HF Mixtral, K at "
                                         "balance), seq (per sequence) or none; and/or dpsl (Dirichlet-prior shaping; "
                                         "GPU trainer: one GPU), e.g. switch+dpsl");
        cli.add("--aux-coef", &aux_coef, "load-balancing loss coefficient", Range::at_least(0));
        cli.add("--z-coef", &z_coef, "router z-loss coefficient", Range::at_least(0));
        cli.add("--dpsl-coef", &dpsl_coef, "with --aux-loss ...dpsl: its coefficient", Range::at_least(0));
        cli.add("--dpsl-alpha", &dpsl_alpha, "with dpsl: Dirichlet prior concentration, one value for every expert or "
                                             "one per expert (comma-separated)");
        cli.add("--dpsl-distance", &dpsl_distance, "with dpsl: sq (squared, Cramer-von Mises) or abs, between the "
                                                   "Beta CDF and the empirical CDF at each sample");
        cli.add("--dpsl-ecdf", &dpsl_ecdf, "with dpsl: the empirical CDF at the r-th of N samples, mid ((r-1/2)/N) "
                                           "or right (r/N)");
        cli.add("--aux-free-bias", &aux_free_bias, "aux-loss-free balancing bias update rate u (0 = off; DeepSeek-V3 uses 1e-3)",
                Range::at_least(0));
        cli.section("Run");
        cli.add("--out", &out, "run directory: metrics.jsonl and step_NNNNNN checkpoints (new or empty, unless --overwrite)");
        cli.flag("--overwrite", &overwrite, "let a new run write into a non-empty --out (files of the same name are replaced)");
        cli.add("--eval-every", &eval_every, "evaluate every N steps, at step 0 and at the end (0 = only at the end)",
                Range::at_least(0));
        cli.add("--eval-batches", &eval_batches, "validation batches per domain", Range::at_least(1));
        cli.add("--sample-every", &sample_every, "print a generated sample every N steps (0 = only at the end)",
                Range::at_least(0));
        cli.add("--sample-tokens", &sample_tokens, "length of generated samples (0 = no samples)",
                Range::between(0, 1 << 20));
        cli.add("--sample-prompt", &sample_prompt, "samples continue this text (encoded with the data's tokenizer.json)");
        cli.add("--save-every", &save_every, "write a checkpoint every N steps (0 = only at the end)",
                Range::at_least(0));
        cli.flag("--no-save", &no_save, "write no checkpoint at the end");
        cli.add("--keep-checkpoints", &keep_checkpoints, "all (every one written), last (only the newest: rolling) or "
                                                         "log (the newest plus steps 1, 2, 4, 8, ...; a manifest in "
                                                         "checkpoints.json)");
        cli.add("--log-every", &log_every, "print a progress line every N steps", Range::at_least(1));
        cli.add("--seed", &seed, "seed of the init, data order and sampling", Range::at_least(0));
        cli.add("--threads", &threads, "CPU threads (0 = OpenMP's default)", Range::between(0, 4096));
    }

    void validate() const {
        if (steps < 0) FAIL("--steps must be >= 0");
        if (batch < 1 || seq < 1 || grad_accum < 1) FAIL("--batch, --seq and --grad-accum must be >= 1");
        if (!init.empty() && !resume.empty()) FAIL("give --init or --resume, not both");
        if (init_optimizer && init.empty()) FAIL("--init-optimizer needs --init");
        if (eval_batches < 1) FAIL("--eval-batches must be >= 1");
        if (log_every < 1) FAIL("--log-every must be >= 1");
        parse_keep_checkpoints(keep_checkpoints);
    }

    // What must stay the same for a resumed run to continue the same run.
    Json settings() const {
        Json j = Json::object();
        j["data"] = data_dir;
        j["mix"] = mix;
        j["batch"] = batch;
        if (world > 1) j["world_size"] = world;
        j["seq"] = seq;
        j["grad_accum"] = grad_accum;
        j["seed"] = seed;
        j["steps"] = steps;
        j["lr"] = lr;
        j["lr_min"] = lr_min;
        j["lr_schedule"] = lr_schedule;
        j["warmup"] = warmup;
        j["aux_loss"] = aux_loss;
        j["aux_coef"] = aux_coef;
        j["z_coef"] = z_coef;
        j["aux_free_bias"] = aux_free_bias;
        if (aux_loss.find("dpsl") != std::string::npos) {  // only then: older runs' records stay as they were
            j["dpsl_coef"] = dpsl_coef;
            j["dpsl_alpha"] = dpsl_alpha;
            j["dpsl_distance"] = dpsl_distance;
            j["dpsl_ecdf"] = dpsl_ecdf;
        }
        return j;
    }
    // A resumed run with other data/batch settings would silently train something else.
    // The global batch (ranks x --batch) must stay, not the number of ranks: a run may go
    // on with fewer or more GPUs, --batch scaled to match.
    void check_resume_settings(const Json& saved, const std::string& what) const {
        Json now = settings();
        const Json* sb = saved.find("batch");
        const Json* sw = saved.find("world_size");
        if (sb && sb->type == Json::NUM) {
            const long ranks = sw && sw->type == Json::NUM ? (long)sw->num : 1, global = (long)sb->num * ranks;
            if (global != (long)batch * world)
                FAIL("%s: the checkpoint was trained with a global batch of %ld sequences (%ld rank(s) x --batch %ld) but "
                     "this run has %d x %d = %d; resume needs the same global batch%s", what.c_str(), global, ranks,
                     (long)sb->num, world, batch, batch * world,
                     global % world == 0 ? strfmt(": use --batch %ld with %d rank(s)", global / world, world).c_str() : "");
        }
        for (const char* k : {"data", "mix", "seq", "grad_accum", "seed"}) {
            const Json* a = saved.find(k);
            const Json* b = now.find(k);
            if (a && b && a->dump() != b->dump())
                FAIL("%s: the checkpoint was trained with %s = %s but this run says %s; resume needs the same value",
                     what.c_str(), k, a->dump().c_str(), b->dump().c_str());
        }
    }
};
