// logging.h: what a training run prints and writes to metrics.jsonl, the same lines and
// records in both trainers.
//
// defines: EvalResult, log_eval, print_model_summary, print_data_and_run, log_step
#pragma once
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>
#include "checkpoint.h"    // defines: TrainerState
#include "dataloader.h"    // defines: DataLoader (domain names and sizes)
#include "json.h"          // defines: Json
#include "metrics.h"       // defines: MetricsLog
#include "model.h"         // defines: ModelConfig, build_layout, count_active_params
#include "router_losses.h" // defines: Losses, RouterLossSettings, aux_name
#include "schedule.h"      // defines: LRSchedule
#include "train_args.h"    // defines: TrainArgs
#include "util.h"          // defines: strfmt, format_duration

// ---- evaluation: one record and one line ----

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

// ---- what the run is about to do ----

// "model: ..." (ends without a newline: the GPU trainer adds its activation memory)
inline void print_model_summary(const ModelConfig& c, const RouterLossSettings& rl) {
    printf("model: %s, d %d, L %d, H %d/%d kv, F%s %d, vocab %d", c.is_moe() ? "MoE" : "dense", c.d_model, c.n_layer,
           c.n_head, c.n_kv_head, c.is_moe() ? "_e" : "", c.ffn_dim, c.vocab_size);
    if (c.is_moe()) printf(", %d experts top-%d %s, aux %s %g, z %g", c.n_experts, c.top_k, routing_name(c.routing),
                           aux_name(rl.aux_loss), rl.aux_coef, rl.z_coef);
    if (c.has_shared()) printf(", shared expert F_s %d (%s)", c.shared_dim, c.shared_gate ? "sigmoid gate" : "no gate");
    if (c.has_grove())
        printf(", Grove: %d groups of %d, adjugate F_a %d, scale %g", c.grove_groups, c.grove_group_size(), c.grove_dim,
               c.grove_scale);
    if (c.is_moe() && rl.dpsl.on) {
        std::string alpha;
        for (double a : rl.dpsl.alpha) alpha += strfmt("%s%g", alpha.empty() ? "" : ",", a);
        printf(", dpsl %g (alpha %s, %s, %s)", rl.dpsl.coef, alpha.c_str(), dpsl_distance_name(rl.dpsl.distance),
               dpsl_ecdf_name(rl.dpsl.ecdf));
    }
    printf("\nparameters: %.3fM total, %.3fM active per token", build_layout(c).total / 1e6,
           count_active_params(c) / 1e6);
}

inline void print_data_and_run(const TrainArgs& a, const DataLoader& data, const LRSchedule& sched,
                               const std::string& resume_dir, long step) {
    printf("data: %s:", a.data_dir.c_str());
    for (auto& d : data.domains)
        printf(" %s (train %.2fM tok, w %.2f; val %.2fM tok)", d.name.c_str(), d.train.size() / 1e6, d.weight,
               d.val.size() / 1e6);
    printf("\nrun: %d steps x %s%d x %d x %d tokens, lr %g -> %g %s, out %s%s\n", a.steps,
           a.world > 1 ? strfmt("%d ranks x ", a.world).c_str() : "", a.batch, a.seq, a.grad_accum,
           sched.lr, sched.lr_min, sched.kind.c_str(), a.out.c_str(),
           resume_dir.empty() ? "" : (", resumed from " + resume_dir + strfmt(" at step %ld", step)).c_str());
}

// ---- one training step: a record and the progress line ----

// Writes the step's metrics.jsonl record and, every --log-every steps and at the last, the
// progress line. `elapsed` is this process's training time so far (for the ETA).
// mfu: the GPU trainer's model-FLOPs utilization; NaN on a device of unknown peak (written
// as null); the CPU trainer passes has_mfu = false and no field is written.
inline void log_step(MetricsLog& metrics, const TrainArgs& a, bool moe, const TrainerState& state, long start_step,
                     const Losses& acc, double lr, double norm, double dt, double elapsed, bool has_mfu = false,
                     double mfu = NAN) {
    const double tokens_per_step = (double)a.batch * a.world * a.seq * a.grad_accum;  // every rank's
    Json rec = Json::object();
    rec["step"] = state.step;
    rec["tokens"] = state.tokens;
    rec["loss"] = acc.loss;
    rec["ce"] = acc.ce;
    if (moe) { rec["aux"] = acc.aux; rec["z"] = acc.z; }
    const bool dpsl = moe && a.aux_loss.find("dpsl") != std::string::npos;
    if (dpsl) rec["dpsl"] = acc.dpsl;
    rec["lr"] = lr;
    rec["grad_norm"] = norm;
    rec["tok_per_s"] = tokens_per_step / dt;
    if (has_mfu) rec["mfu"] = std::isnan(mfu) ? Json() : Json(mfu);
    metrics.write(rec);
    if (state.step % a.log_every == 0 || state.step == a.steps) {
        double eta = elapsed / (state.step - start_step) * (a.steps - state.step);
        printf("step %5ld/%d | loss %.4f (ce %.4f", state.step, a.steps, acc.loss, acc.ce);
        if (moe) printf(" aux %.4f z %.3f", acc.aux, acc.z);
        if (dpsl) printf(" dpsl %.4f", acc.dpsl);
        printf(") | lr %.2e | norm %.3f | %.0f tok/s", lr, norm, tokens_per_step / dt);
        if (has_mfu && !std::isnan(mfu)) printf(" | MFU %.1f%%", 100 * mfu);
        printf(" | ETA %s\n", format_duration(eta).c_str());
        fflush(stdout);
    }
}
