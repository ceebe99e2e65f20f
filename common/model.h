// model.h: the model's configuration, its parameter layout (one flat buffer with named
// tensor views), the from-scratch init, and checkpoint directories in Hugging Face format.
//
// The model is a Llama (dense), Mixtral (MoE) or Qwen2-MoE (MoE with a shared expert)
// decoder; see docs/ARCHITECTURE.md. config.json uses Hugging Face's keys so that HF
// Llama/Mixtral/Qwen2-MoE directories load as they are; settings HF has no key for (routing
// variant, ...) are extra keys HF ignores.
//
// defines: Routing, ModelConfig, model_preset, ParamKind, ParamTensor, ParamLayout, build_layout,
//          count_params, count_active_params, init_from_scratch, load_model_dir, save_model_files,
//          ExtraTensor
#pragma once
#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <string>
#include <vector>
#include "json.h"          // defines: Json
#include "rng.h"           // defines: stream_id, rng_normal, RngStream
#include "safetensors.h"   // defines: SafeTensorsReader, SafeTensorsWriter, CheckpointTensors
#include "util.h"          // defines: Error, FAIL, strfmt, file helpers

// xft: XFT's routing-weight normalization (docs/METHODS.md 1.8); needs an ungated shared
// expert, whose weight it sets to 1 - (the routed weights' sum)
enum Routing { ROUTING_TOPK_SOFTMAX = 0, ROUTING_SOFTMAX_TOPK = 1, ROUTING_XFT = 2 };
inline const char* routing_name(Routing r) {
    return r == ROUTING_SOFTMAX_TOPK ? "softmax_topk" : r == ROUTING_XFT ? "xft" : "topk_softmax";
}
inline Routing parse_routing(const std::string& s, const std::string& what) {
    if (s == "topk_softmax") return ROUTING_TOPK_SOFTMAX;
    if (s == "softmax_topk") return ROUTING_SOFTMAX_TOPK;
    if (s == "xft") return ROUTING_XFT;
    FAIL("%s: routing must be topk_softmax, softmax_topk or xft, found \"%s\"", what.c_str(), s.c_str());
}

struct ModelConfig {
    int vocab_size = 0;
    int d_model = 0;       // d
    int n_layer = 0;       // L
    int n_head = 0;        // H
    int n_kv_head = 0;     // H_kv (divides H)
    int head_dim = 0;      // usually d / H
    int ffn_dim = 0;       // F: dense FFN width, or each expert's width F_e
    int n_experts = 0;     // E; 0 = dense model
    int top_k = 0;         // K
    Routing routing = ROUTING_TOPK_SOFTMAX;
    // Shared experts (DeepSeekMoE, Qwen2-MoE; docs/METHODS.md 1.7): S always-on experts of
    // width F_e are one SwiGLU FFN of width S F_e (a sum of SwiGLUs is the SwiGLU of the
    // concatenated neurons), stored as one FFN per layer of width shared_dim; 0 = none.
    // With shared_gate its output is scaled by sigmoid(x . g) per token (Qwen2-MoE).
    // A model with a shared expert is written as HF's Qwen2MoeForCausalLM.
    int shared_dim = 0;
    bool shared_gate = true;
    // Grove MoE (arXiv 2508.07785; docs/METHODS.md 1.10): the E experts in G groups of E/G
    // consecutive experts (expert e is in group e / (E/G)), each group with one small SwiGLU
    // "adjugate" expert of width F_a. A token runs group j's adjugate once when any of its K
    // experts is in group j, its output times grove_scale * (the sum of those experts' gate
    // weights). 0 groups = none. Written as Mixtral with our own keys and tensor names.
    int grove_groups = 0;      // G; divides E
    int grove_dim = 0;         // F_a
    float grove_scale = 0.05f; // lambda
    // Nexus router (docs/METHODS.md 1.9, arXiv 2408.15901): each layer's router weight is
    // R = Emb P, Emb [E, d] fixed domain embeddings (one row per expert: the mean hidden state
    // of its domain's data under the seed model), P [d, d] learned. Emb and R are stored but
    // never trained (ParamTensor::trainable); R is recomputed from Emb and P before every
    // use, and kept in the file so that Hugging Face loads the router it computes.
    bool nexus_router = false;
    bool tie_embeddings = false;
    float rms_eps = 1e-5f;
    float rope_theta = 10000.0f;
    int max_seq_len = 2048;
    // Llama-3 style RoPE frequency scaling (rope_scaling.rope_type == "llama3"); 0 = off
    float rope_scale_factor = 0, rope_low_freq = 1, rope_high_freq = 4;
    int rope_orig_max_pos = 8192;
    int sliding_window = 0;  // HF Mistral/Mixtral key; 0 = none. We attend to the whole context,
                             // which is the same function only while T <= sliding_window.
    Json extra;  // other config.json keys to carry along (upcycling record, ...)

    bool is_moe() const { return n_experts > 0; }
    bool has_shared() const { return shared_dim > 0; }
    bool has_grove() const { return grove_groups > 0; }
    int grove_group_size() const { return n_experts / grove_groups; }  // E/G experts per group
    int q_dim() const { return n_head * head_dim; }
    int kv_dim() const { return n_kv_head * head_dim; }

    void validate(const std::string& what) const {
        auto pos = [&](const char* k, long v) { if (v <= 0) FAIL("%s: %s must be positive, found %ld", what.c_str(), k, v); };
        pos("vocab_size", vocab_size); pos("hidden_size", d_model); pos("num_hidden_layers", n_layer);
        pos("num_attention_heads", n_head); pos("num_key_value_heads", n_kv_head); pos("head_dim", head_dim);
        pos("intermediate_size", ffn_dim);
        // positive finite floats: a NaN epsilon or RoPE base would train a model of NaNs
        if (!(rms_eps > 0 && rms_eps < 1)) FAIL("%s: rms_norm_eps must be in (0, 1), found %g", what.c_str(), rms_eps);
        if (!(rope_theta > 1 && std::isfinite(rope_theta)))
            FAIL("%s: rope_theta must be a finite number > 1, found %g", what.c_str(), rope_theta);
        if (n_head % n_kv_head)
            FAIL("%s: num_key_value_heads (%d) must divide num_attention_heads (%d)", what.c_str(), n_kv_head, n_head);
        if (head_dim % 2) FAIL("%s: head_dim (%d) must be even for RoPE", what.c_str(), head_dim);
        if (n_experts < 0) FAIL("%s: num_local_experts must be >= 0", what.c_str());
        if (n_experts > 0 && (top_k < 1 || top_k > n_experts))
            FAIL("%s: num_experts_per_tok (%d) must be in [1, num_local_experts = %d]", what.c_str(), top_k, n_experts);
        if (nexus_router && n_experts == 0)
            FAIL("%s: moe_router nexus needs routed experts (num_local_experts / num_experts > 0)", what.c_str());
        if (nexus_router && grove_groups > 0)
            FAIL("%s: moe_router nexus with Grove adjugate experts (grove_groups %d) is not supported", what.c_str(),
                 grove_groups);
        if (shared_dim < 0) FAIL("%s: shared_expert_intermediate_size must be >= 0, found %d", what.c_str(), shared_dim);
        if (shared_dim > 0 && n_experts == 0)
            FAIL("%s: shared_expert_intermediate_size %d needs routed experts (num_experts > 0): a dense model's FFN "
                 "is already always on", what.c_str(), shared_dim);
        if (grove_groups < 0) FAIL("%s: grove_groups must be >= 0, found %d", what.c_str(), grove_groups);
        if (grove_groups > 0) {
            if (n_experts == 0 || n_experts % grove_groups)
                FAIL("%s: grove_groups %d must divide the number of experts (found %d experts)", what.c_str(),
                     grove_groups, n_experts);
            if (grove_dim <= 0)
                FAIL("%s: grove_intermediate_size must be positive with grove_groups %d, found %d", what.c_str(),
                     grove_groups, grove_dim);
            if (!std::isfinite(grove_scale))
                FAIL("%s: grove_scale must be a finite number, found %g", what.c_str(), grove_scale);
            if (shared_dim > 0)
                FAIL("%s: Grove adjugate experts (grove_groups %d) with a shared expert are not supported",
                     what.c_str(), grove_groups);
        }
        if (routing == ROUTING_XFT && (shared_dim == 0 || shared_gate))
            FAIL("%s: routing xft needs an ungated shared expert (shared_expert_intermediate_size > 0, "
                 "shared_expert_gating none): it gives the shared expert the weight 1 - p(1); found %s", what.c_str(),
                 shared_dim == 0 ? "no shared expert" : "shared_expert_gating sigmoid");
        if (vocab_size > 65536)
            FAIL("%s: vocab_size %d does not fit the uint16 token shards", what.c_str(), vocab_size);
        if ((long long)n_head * head_dim > INT32_MAX || (long long)n_kv_head * head_dim > INT32_MAX)
            FAIL("%s: num_attention_heads x head_dim (%d x %d) is too large", what.c_str(), n_head, head_dim);
        // counted in double so that no shape can overflow the count; 2^40 parameters is far
        // beyond what this trainer can hold, and keeps every later size_t product exact
        double per_ffn = 3.0 * ffn_dim * d_model, attn = 2.0 * d_model * ((double)q_dim() + kv_dim());
        double params = 2.0 * vocab_size * d_model +
                        (double)n_layer * (attn + 2.0 * d_model + (is_moe() ? n_experts * (per_ffn + d_model) : per_ffn) +
                                      (3.0 * shared_dim + 1) * d_model + 3.0 * grove_groups * grove_dim * d_model +
                                      (nexus_router ? (double)d_model * d_model : 0));
        if (params > 1099511627776.0)
            FAIL("%s: these sizes make a model of %.3g parameters: implausibly large (corrupt config?)", what.c_str(),
                 params);
        if (max_seq_len <= 0) FAIL("%s: max_position_embeddings must be positive, found %d", what.c_str(), max_seq_len);
        if (sliding_window < 0) FAIL("%s: sliding_window must be >= 0, found %d", what.c_str(), sliding_window);
        if (rope_scale_factor != 0 &&
            (!(rope_scale_factor > 0) || !std::isfinite(rope_scale_factor) || !(rope_low_freq > 0) ||
             !(rope_high_freq > rope_low_freq) || !std::isfinite(rope_high_freq) || rope_orig_max_pos <= 0))
            FAIL("%s: rope_scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and "
                 "original_max_position_embeddings > 0", what.c_str());
    }

    // RoPE inverse frequencies, HF convention: inv_freq[i] = theta^(-2i/hd), i < hd/2.
    std::vector<double> rope_inv_freq() const {
        std::vector<double> f(head_dim / 2);
        for (int i = 0; i < head_dim / 2; i++) {
            double inv = 1.0 / pow((double)rope_theta, (2.0 * i) / head_dim);
            if (rope_scale_factor > 0) {  // Llama 3.1: stretch the low frequencies only
                double low_wl = rope_orig_max_pos / rope_low_freq, high_wl = rope_orig_max_pos / rope_high_freq;
                double wl = 2 * M_PI / inv;
                if (wl > low_wl) inv = inv / rope_scale_factor;
                else if (wl >= high_wl) {
                    double s = (rope_orig_max_pos / wl - rope_low_freq) / (rope_high_freq - rope_low_freq);
                    inv = (1 - s) * inv / rope_scale_factor + s * inv;
                }
            }
            f[i] = inv;
        }
        return f;
    }
    // RoPE tables [T, head_dim/2]: cos and sin of t * inv_freq[i], computed in double (both
    // trainers build theirs here, then the GPU trainer uploads them)
    template <typename R>
    void rope_tables(int T, std::vector<R>* cos_t, std::vector<R>* sin_t) const {
        std::vector<double> inv = rope_inv_freq();
        const int h2 = head_dim / 2;
        cos_t->resize((size_t)T * h2);
        sin_t->resize((size_t)T * h2);
        for (int t = 0; t < T; t++)
            for (int i = 0; i < h2; i++) {
                (*cos_t)[(size_t)t * h2 + i] = (R)std::cos(t * inv[i]);
                (*sin_t)[(size_t)t * h2 + i] = (R)std::sin(t * inv[i]);
            }
    }

    Json to_json() const {
        Json j = Json::object();
        Json arch = Json::array();
        arch.push(has_shared() ? "Qwen2MoeForCausalLM" : is_moe() ? "MixtralForCausalLM" : "LlamaForCausalLM");
        j["architectures"] = arch;
        j["model_type"] = has_shared() ? "qwen2_moe" : is_moe() ? "mixtral" : "llama";
        j["vocab_size"] = vocab_size;
        j["hidden_size"] = d_model;
        j["intermediate_size"] = ffn_dim;
        j["num_hidden_layers"] = n_layer;
        j["num_attention_heads"] = n_head;
        j["num_key_value_heads"] = n_kv_head;
        j["head_dim"] = head_dim;
        j["hidden_act"] = "silu";
        j["max_position_embeddings"] = max_seq_len;
        j["rms_norm_eps"] = (double)rms_eps;
        j["rope_theta"] = (double)rope_theta;
        if (rope_scale_factor > 0) {
            Json rs = Json::object();
            rs["rope_type"] = "llama3";
            rs["factor"] = (double)rope_scale_factor;
            rs["low_freq_factor"] = (double)rope_low_freq;
            rs["high_freq_factor"] = (double)rope_high_freq;
            rs["original_max_position_embeddings"] = rope_orig_max_pos;
            j["rope_scaling"] = rs;
        }
        if (sliding_window > 0) j["sliding_window"] = sliding_window;
        j["tie_word_embeddings"] = tie_embeddings;
        j["attention_bias"] = false;
        j["mlp_bias"] = false;
        j["torch_dtype"] = "float32";
        if (has_shared()) {  // Qwen2MoeConfig's keys (every layer sparse, no dense-MLP layers)
            j["num_experts"] = n_experts;
            j["num_experts_per_tok"] = top_k;
            j["moe_intermediate_size"] = ffn_dim;
            j["shared_expert_intermediate_size"] = shared_dim;
            // HF's Qwen2-MoE: softmax over all E, top-K, renormalized iff norm_topk_prob;
            // that is our topk_softmax (renormalized) or softmax_topk (not): both load in HF
            j["norm_topk_prob"] = routing == ROUTING_TOPK_SOFTMAX;  // false for xft (moe_routing says so)
            j["decoder_sparse_step"] = 1;
            j["mlp_only_layers"] = Json::array();
            j["use_sliding_window"] = sliding_window > 0;
            j["moe_routing"] = routing_name(routing);
            // our key: HF's Qwen2MoeSparseMoeBlock always applies the sigmoid gate
            j["shared_expert_gating"] = shared_gate ? "sigmoid" : "none";
            if (routing == ROUTING_XFT)
                j["moe_note"] = "xft routing (shared expert weight 1 - p(1), routed weights p(1) softmax over the "
                                "top-K probabilities): Hugging Face Qwen2MoeForCausalLM does NOT compute this "
                                "model's function; use this project's trainers";
            else if (!shared_gate)
                j["moe_note"] = "ungated shared expert (shared_expert_gating none): Hugging Face Qwen2MoeForCausalLM "
                                "always applies a sigmoid gate and so does NOT compute this model's function; use "
                                "this project's trainers";
        } else if (is_moe()) {
            j["num_local_experts"] = n_experts;
            j["num_experts_per_tok"] = top_k;
            j["moe_routing"] = routing_name(routing);
            // HF's MixtralForCausalLM always renormalizes the top-K weights: it computes
            // our function only for topk_softmax. Say so in the file itself.
            if (routing == ROUTING_SOFTMAX_TOPK)
                j["moe_note"] = "softmax_topk routing: Hugging Face MixtralForCausalLM renormalizes top-K weights "
                                "and so does NOT compute this model's function; use this project's trainers";
            if (has_grove()) {  // our keys: HF transformers has no Grove MoE class (4.40.2 checked)
                j["grove_groups"] = grove_groups;
                j["grove_intermediate_size"] = grove_dim;
                j["grove_scale"] = (double)grove_scale;
                j["moe_note"] = "Grove MoE adjugate experts (grove_groups; tensors block_sparse_moe.adjugate_experts.*): "
                                "Hugging Face transformers has no Grove MoE class and MixtralForCausalLM ignores "
                                "these tensors, so it does NOT compute this model's function; use this project's "
                                "trainers";
            }
        }
        if (nexus_router) j["moe_router"] = "nexus";  // our key; HF reads gate.weight (= Emb P) instead
        for (auto& kv : extra.obj) if (!j.has(kv.first)) j[kv.first] = kv.second;
        return j;
    }

    static ModelConfig from_json(const Json& j, const std::string& what) {
        if (j.type != Json::OBJ) FAIL("%s: not a JSON object", what.c_str());
        ModelConfig c;
        std::string mt = j.get_str("model_type", "", what);
        if (!mt.empty() && mt != "llama" && mt != "mixtral" && mt != "qwen2_moe")
            FAIL("%s: model_type \"%s\" is not supported (expected llama, mixtral or qwen2_moe)", what.c_str(),
                 mt.c_str());
        const bool qwen = mt == "qwen2_moe";
        c.vocab_size = (int)j.get_int("vocab_size", 1, 65536, what);
        c.d_model = (int)j.get_int("hidden_size", 1, 1 << 16, what);
        // Qwen2-MoE: intermediate_size is the width of dense-MLP layers, which we do not
        // have (mlp_only_layers must be empty); the experts' width is moe_intermediate_size
        c.ffn_dim = qwen ? (int)j.get_int("moe_intermediate_size", 1, 1 << 20, what)
                         : (int)j.get_int("intermediate_size", 1, 1 << 20, what);
        c.n_layer = (int)j.get_int("num_hidden_layers", 1, 4096, what);
        c.n_head = (int)j.get_int("num_attention_heads", 1, 4096, what);
        c.n_kv_head = (int)j.get_int("num_key_value_heads", c.n_head, 1, 4096, what);
        if (c.n_head <= 0) FAIL("%s: num_attention_heads must be positive", what.c_str());
        c.head_dim = (int)j.get_int("head_dim", c.d_model / c.n_head, 1, 4096, what);
        if (!qwen) {
            c.n_experts = (int)j.get_int("num_local_experts", 0, 0, 65536, what);
            c.top_k = (int)j.get_int("num_experts_per_tok", c.n_experts > 0 ? 2 : 0, 0, 65536, what);
            c.routing = parse_routing(j.get_str("moe_routing", "topk_softmax", what), what);
            if (j.has("shared_expert_intermediate_size"))
                FAIL("%s: shared_expert_intermediate_size needs model_type qwen2_moe, found \"%s\"", what.c_str(),
                     mt.c_str());
            c.grove_groups = (int)j.get_int("grove_groups", 0, 0, 65536, what);
            if (c.grove_groups > 0) {  // Grove MoE (our keys)
                c.grove_dim = (int)j.get_int("grove_intermediate_size", 1, 1 << 20, what);
                c.grove_scale = (float)j.get_num("grove_scale", what);
            } else if (j.has("grove_intermediate_size") || j.has("grove_scale")) {
                FAIL("%s: grove_intermediate_size / grove_scale given without grove_groups > 0", what.c_str());
            }
        } else {
            if (j.has("grove_groups"))
                FAIL("%s: grove_groups (Grove adjugate experts) with qwen2_moe (a shared expert) is not supported",
                     what.c_str());
            c.n_experts = (int)j.get_int("num_experts", 1, 65536, what);
            c.top_k = (int)j.get_int("num_experts_per_tok", 1, 65536, what);
            c.shared_dim = (int)j.get_int("shared_expert_intermediate_size", 1, 1 << 20, what);
            // HF's default for norm_topk_prob is false (no renormalization: softmax_topk)
            c.routing = j.get_bool("norm_topk_prob", false, what) ? ROUTING_TOPK_SOFTMAX : ROUTING_SOFTMAX_TOPK;
            // xft is our own key's value (HF has no such routing); norm_topk_prob false beside it
            if (j.has("moe_routing") && j.get_str("moe_routing", "", what) == "xft" && c.routing == ROUTING_SOFTMAX_TOPK)
                c.routing = ROUTING_XFT;
            if (j.has("moe_routing") && parse_routing(j.get_str("moe_routing", "", what), what) != c.routing)
                FAIL("%s: moe_routing \"%s\" contradicts norm_topk_prob %s (topk_softmax renormalizes: "
                     "norm_topk_prob true)", what.c_str(), j.get_str("moe_routing", "", what).c_str(),
                     c.routing == ROUTING_TOPK_SOFTMAX ? "true" : "false");
            std::string gating = j.get_str("shared_expert_gating", "sigmoid", what);
            if (gating != "sigmoid" && gating != "none")
                FAIL("%s: shared_expert_gating must be sigmoid or none, found \"%s\"", what.c_str(), gating.c_str());
            c.shared_gate = gating == "sigmoid";
            if (j.get_int("decoder_sparse_step", 1, 1, INT_MAX, what) != 1)
                FAIL("%s: decoder_sparse_step must be 1 (every layer an MoE layer); dense-MLP layers are not "
                     "supported", what.c_str());
            if (const Json* m = j.find("mlp_only_layers"))
                if (!m->is_null() && !(m->type == Json::ARR && m->arr.empty()))
                    FAIL("%s: mlp_only_layers must be empty (every layer an MoE layer); dense-MLP layers are not "
                         "supported, found %s", what.c_str(), m->dump().c_str());
        }
        // found by fuzzing: a dense config with MoE settings kept them, a save dropped them,
        // and the model read back differed from the one written
        if (c.n_experts == 0 && (c.top_k != 0 || c.routing != ROUTING_TOPK_SOFTMAX))
            FAIL("%s: num_experts_per_tok or moe_routing given, but num_local_experts is missing or 0 (a dense model)",
                 what.c_str());
        {
            std::string r = j.get_str("moe_router", "linear", what);
            if (r != "linear" && r != "nexus")
                FAIL("%s: moe_router must be linear or nexus, found \"%s\"", what.c_str(), r.c_str());
            c.nexus_router = r == "nexus";
        }
        c.tie_embeddings = j.get_bool("tie_word_embeddings", false, what);
        c.rms_eps = (float)j.get_num("rms_norm_eps", 1e-5, what);
        c.rope_theta = (float)j.get_num("rope_theta", 10000.0, what);
        c.max_seq_len = (int)j.get_int("max_position_embeddings", 2048, 1, 1 << 24, what);
        std::string act = j.get_str("hidden_act", "silu", what);
        if (act != "silu") FAIL("%s: hidden_act \"%s\" is not supported (SwiGLU needs silu)", what.c_str(), act.c_str());
        if (j.get_bool("attention_bias", false, what) || j.get_bool("mlp_bias", false, what))
            FAIL("%s: attention_bias/mlp_bias are not supported (the model has no biases)", what.c_str());
        c.sliding_window = (int)j.get_int("sliding_window", 0, 0, INT_MAX, what);
        // Qwen2: sliding_window is set (4096) even when off; use_sliding_window says
        if (qwen && !j.get_bool("use_sliding_window", false, what)) c.sliding_window = 0;
        if (const Json* rs = j.find("rope_scaling")) {
            if (!rs->is_null()) {
                std::string t = rs->get_str("rope_type", rs->get_str("type", "", what), what);
                if (t != "llama3")
                    FAIL("%s: rope_scaling type \"%s\" is not supported (only llama3)", what.c_str(), t.c_str());
                c.rope_scale_factor = (float)rs->get_num("factor", what);
                c.rope_low_freq = (float)rs->get_num("low_freq_factor", 1.0, what);
                c.rope_high_freq = (float)rs->get_num("high_freq_factor", 4.0, what);
                c.rope_orig_max_pos = (int)rs->get_int("original_max_position_embeddings", 8192, 1, INT_MAX, what);
            }
        }
        // keep keys we do not interpret (upcycling records, ...) so they survive a save
        static const char* known[] = {"architectures", "model_type", "vocab_size", "hidden_size",
            "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "num_local_experts", "num_experts_per_tok", "moe_routing", "moe_note", "tie_word_embeddings",
            "rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act", "attention_bias", "mlp_bias",
            "rope_scaling", "torch_dtype", "sliding_window", "num_experts", "moe_intermediate_size",
            "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
            "use_sliding_window", "shared_expert_gating", "grove_groups", "grove_intermediate_size", "grove_scale",
            "moe_router"};
        c.extra = Json::object();
        for (auto& kv : j.obj) {
            bool k = false;
            for (const char* n : known) if (kv.first == n) k = true;
            if (!k) c.extra[kv.first] = kv.second;
        }
        c.validate(what);
        return c;
    }
    static ModelConfig load(const std::string& path) { return from_json(Json::parse_file(path), path); }
};

// Built-in presets (dense shapes; --experts/--topk turn them into MoEs).
inline bool model_preset(const std::string& name, ModelConfig* c) {
    struct P { const char* name; int d, L, H, Hkv, F; };
    static const P presets[] = {
        {"tiny", 64, 2, 4, 4, 256},      // seconds per step on a laptop CPU
        {"small", 256, 4, 8, 8, 1024},   // minutes on CPU; the tiny reproductions' dense base
        {"d512", 512, 12, 8, 8, 2048},   // Drop-Upcycling's 152M dense shape (docs/METHODS.md 3)
        {"d768", 768, 12, 12, 12, 3072}, // GPT-2 small shape: the benchmark config
    };
    for (auto& p : presets) {
        if (name != p.name) continue;
        c->d_model = p.d; c->n_layer = p.L; c->n_head = p.H; c->n_kv_head = p.Hkv; c->head_dim = p.d / p.H;
        c->ffn_dim = p.F;
        return true;
    }
    return false;
}
inline const char* model_preset_names() { return "tiny, small, d512, d768"; }

// ----------------------------------------------------------------------------
// Parameter layout: every parameter lives in one flat buffer, in model order.

enum ParamKind {
    P_EMBED, P_ATTN_NORM, P_WQ, P_WK, P_WV, P_WO, P_FFN_NORM,
    P_GATE, P_UP, P_DOWN,            // dense FFN
    P_ROUTER, P_EGATE, P_EUP, P_EDOWN,  // MoE: router [E,d], expert w1 / w3 / w2
    P_SGATE, P_SUP, P_SDOWN, P_SGATE_W, // shared expert: gate [Fs,d], up [Fs,d], down [d,Fs]; its sigmoid gate [1,d]
    P_AGATE, P_AUP, P_ADOWN,            // Grove adjugate experts: w1 [Fa,d], w3 [Fa,d], w2 [d,Fa]
    P_NEXUS_EMB, P_NEXUS_PROJ,       // Nexus router: domain embeddings Emb [E,d] (fixed), projection P [d,d]
    P_FINAL_NORM, P_LM_HEAD, P_NUM_KINDS
};
inline const char* param_kind_name(ParamKind k) {
    static const char* n[] = {"embed", "attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "gate", "up", "down",
                              "router", "expert_gate", "expert_up", "expert_down", "shared_gate_proj",
                              "shared_up_proj", "shared_down_proj", "shared_expert_gate", "adjugate_gate",
                              "adjugate_up", "adjugate_down", "router_domain_emb",
                              "router_proj", "final_norm", "lm_head"};
    return n[k];
}

struct ParamTensor {
    std::string name;             // Hugging Face tensor name
    std::vector<int64_t> shape;   // [out, in] for matrices
    size_t offset = 0, numel = 0; // position in the flat buffer
    ParamKind kind = P_EMBED;
    int layer = -1, expert = -1;
    // false: kept in the flat buffer and the checkpoint but never trained (the Nexus router's
    // Emb and its derived R = Emb P): the optimizers skip the tensor (no AdamW update, no
    // weight decay); its gradient slot stays 0 (R's is a scratch the backward clears)
    bool trainable = true;
    bool decay() const { return shape.size() == 2; }  // AdamW weight decay on matrices only
};

struct ParamLayout {
    std::vector<ParamTensor> tensors;
    size_t total = 0;
    // index of each layer's tensors: [layer][kind], and experts [layer][expert][0..2]
    std::vector<std::vector<int>> by_layer;
    std::vector<std::vector<std::array<int, 3>>> experts;
    std::vector<std::vector<std::array<int, 3>>> adjugates;  // [layer][group][0..2] (Grove MoE)
    int embed = -1, final_norm = -1, lm_head = -1;  // lm_head == embed when tied

    const ParamTensor& get(int layer, ParamKind kind) const { return tensors[by_layer[layer][kind]]; }
    int find(const std::string& name) const {
        for (size_t i = 0; i < tensors.size(); i++) if (tensors[i].name == name) return (int)i;
        return -1;
    }
};

inline ParamLayout build_layout(const ModelConfig& c) {
    ParamLayout lay;
    auto add = [&](const std::string& name, std::vector<int64_t> shape, ParamKind kind, int layer, int expert) {
        ParamTensor t;
        t.name = name; t.shape = shape; t.kind = kind; t.layer = layer; t.expert = expert;
        t.numel = (size_t)shape_numel(shape);
        t.offset = lay.total;
        lay.total += t.numel;
        lay.tensors.push_back(t);
        return (int)lay.tensors.size() - 1;
    };
    const int64_t d = c.d_model, V = c.vocab_size, F = c.ffn_dim;
    // the router [E, d]; with the Nexus router also Emb [E, d] and P [d, d] (R = Emb P derived)
    auto add_router = [&](const std::string& m, std::vector<int>& L, int l) {
        L[P_ROUTER] = add(m + "gate.weight", {(int64_t)c.n_experts, d}, P_ROUTER, l, -1);
        if (!c.nexus_router) return;
        L[P_NEXUS_EMB] = add(m + "router_domain_emb", {(int64_t)c.n_experts, d}, P_NEXUS_EMB, l, -1);
        L[P_NEXUS_PROJ] = add(m + "router_proj.weight", {d, d}, P_NEXUS_PROJ, l, -1);
        lay.tensors[L[P_ROUTER]].trainable = false;
        lay.tensors[L[P_NEXUS_EMB]].trainable = false;
    };
    lay.embed = add("model.embed_tokens.weight", {V, d}, P_EMBED, -1, -1);
    lay.by_layer.assign(c.n_layer, std::vector<int>(P_NUM_KINDS, -1));
    lay.experts.assign(c.n_layer, {});
    lay.adjugates.assign(c.n_layer, {});
    for (int l = 0; l < c.n_layer; l++) {
        std::string p = "model.layers." + std::to_string(l) + ".";
        auto& L = lay.by_layer[l];
        L[P_ATTN_NORM] = add(p + "input_layernorm.weight", {d}, P_ATTN_NORM, l, -1);
        L[P_WQ] = add(p + "self_attn.q_proj.weight", {(int64_t)c.q_dim(), d}, P_WQ, l, -1);
        L[P_WK] = add(p + "self_attn.k_proj.weight", {(int64_t)c.kv_dim(), d}, P_WK, l, -1);
        L[P_WV] = add(p + "self_attn.v_proj.weight", {(int64_t)c.kv_dim(), d}, P_WV, l, -1);
        L[P_WO] = add(p + "self_attn.o_proj.weight", {d, (int64_t)c.q_dim()}, P_WO, l, -1);
        L[P_FFN_NORM] = add(p + "post_attention_layernorm.weight", {d}, P_FFN_NORM, l, -1);
        if (!c.is_moe()) {
            L[P_GATE] = add(p + "mlp.gate_proj.weight", {F, d}, P_GATE, l, -1);
            L[P_UP] = add(p + "mlp.up_proj.weight", {F, d}, P_UP, l, -1);
            L[P_DOWN] = add(p + "mlp.down_proj.weight", {d, F}, P_DOWN, l, -1);
        } else if (!c.has_shared()) {  // Mixtral's names
            std::string m = p + "block_sparse_moe.";
            add_router(m, L, l);
            for (int e = 0; e < c.n_experts; e++) {
                std::string x = m + "experts." + std::to_string(e) + ".";
                std::array<int, 3> ids;
                ids[0] = add(x + "w1.weight", {F, d}, P_EGATE, l, e);
                ids[1] = add(x + "w3.weight", {F, d}, P_EUP, l, e);
                ids[2] = add(x + "w2.weight", {d, F}, P_EDOWN, l, e);
                lay.experts[l].push_back(ids);
            }
            // Grove MoE's adjugate experts (our names; HF has no such model), after the
            // routed ones, one SwiGLU per group, stored like the experts (w1 w3 w2 adjacent)
            for (int g = 0; g < c.grove_groups; g++) {
                std::string x = m + "adjugate_experts." + std::to_string(g) + ".";
                const int64_t Fa = c.grove_dim;
                std::array<int, 3> ids;
                ids[0] = add(x + "w1.weight", {Fa, d}, P_AGATE, l, -1);
                ids[1] = add(x + "w3.weight", {Fa, d}, P_AUP, l, -1);
                ids[2] = add(x + "w2.weight", {d, Fa}, P_ADOWN, l, -1);
                lay.adjugates[l].push_back(ids);
            }
        } else {  // Qwen2-MoE's names: routed experts, then the shared expert and its gate
            std::string m = p + "mlp.";
            add_router(m, L, l);
            for (int e = 0; e < c.n_experts; e++) {
                std::string x = m + "experts." + std::to_string(e) + ".";
                std::array<int, 3> ids;
                ids[0] = add(x + "gate_proj.weight", {F, d}, P_EGATE, l, e);
                ids[1] = add(x + "up_proj.weight", {F, d}, P_EUP, l, e);
                ids[2] = add(x + "down_proj.weight", {d, F}, P_EDOWN, l, e);
                lay.experts[l].push_back(ids);
            }
            const int64_t Fs = c.shared_dim;  // gate and up adjacent: the GPU trainer runs them as one GEMM
            L[P_SGATE] = add(m + "shared_expert.gate_proj.weight", {Fs, d}, P_SGATE, l, -1);
            L[P_SUP] = add(m + "shared_expert.up_proj.weight", {Fs, d}, P_SUP, l, -1);
            L[P_SDOWN] = add(m + "shared_expert.down_proj.weight", {d, Fs}, P_SDOWN, l, -1);
            if (c.shared_gate) L[P_SGATE_W] = add(m + "shared_expert_gate.weight", {1, d}, P_SGATE_W, l, -1);
        }
    }
    lay.final_norm = add("model.norm.weight", {d}, P_FINAL_NORM, -1, -1);
    lay.lm_head = c.tie_embeddings ? lay.embed : add("lm_head.weight", {V, d}, P_LM_HEAD, -1, -1);
    return lay;
}

inline size_t count_params(const ModelConfig& c) { return build_layout(c).total; }
// Parameters touched per token: what MFU counts (routed experts: only K of E; the shared
// expert and its gate run on every token and count in full). Grove adjugate experts: a
// token runs one per group its K experts fall in, between ceil(K / (E/G)) and min(K, G) of
// them; counted here at the maximum, min(K, G) per layer (docs/METHODS.md 1.10): the count,
// and an MFU computed from it, are upper bounds for a Grove model.
inline size_t count_active_params(const ModelConfig& c) {
    ParamLayout lay = build_layout(c);
    size_t n = 0;
    if (c.has_grove())
        n += (size_t)c.n_layer * std::min(c.top_k, c.grove_groups) * 3 * (size_t)c.grove_dim * c.d_model;
    for (auto& t : lay.tensors) {
        if (t.kind == P_EMBED && !c.tie_embeddings) continue;  // a lookup, not a matmul
        if (t.kind == P_AGATE || t.kind == P_AUP || t.kind == P_ADOWN) continue;  // counted above
        if (t.expert >= 0) { if (t.expert < c.top_k) n += t.numel; continue; }
        n += t.numel;
    }
    return n;
}

// From-scratch init (docs/METHODS.md 2.1): every matrix ~ N(0, std), norms = 1. Each tensor has
// its own RNG stream, so the result does not depend on the order or thread count.
template <typename T>
void nexus_refresh_routers(const ModelConfig& c, const ParamLayout& lay, T* params);
template <typename T>
void init_from_scratch(const ModelConfig& c, const ParamLayout& lay, T* params, uint64_t seed, float std = 0.02f) {
    for (size_t ti = 0; ti < lay.tensors.size(); ti++) {
        const ParamTensor& t = lay.tensors[ti];
        T* p = params + t.offset;
        if (t.shape.size() == 1) {
            for (size_t i = 0; i < t.numel; i++) p[i] = (T)1;
        } else {
            uint64_t stream = stream_id(PURPOSE_INIT, (uint32_t)ti);
#pragma omp parallel for
            for (long i = 0; i < (long)t.numel; i++) p[i] = (T)(std * rng_normal(seed, stream, (uint64_t)i));
        }
    }
    nexus_refresh_routers(c, lay, params);  // a Nexus router's R is Emb P, not a draw of its own
}

// The Nexus router (docs/METHODS.md 1.9): R = Emb P, Emb [E, d_e] fixed, P [d_e, d] learned
// (d_e = d here); accumulated in double. Both trainers' forward and upcycle call this.
template <typename T>
void nexus_router_forward(T* R, const T* emb, const T* P, int E, int de, int d) {
    for (int e = 0; e < E; e++)
        for (int j = 0; j < d; j++) {
            double acc = 0;
            for (int i = 0; i < de; i++) acc += (double)emb[(size_t)e * de + i] * P[(size_t)i * d + j];
            R[(size_t)e * d + j] = (T)acc;
        }
}
// dP [d_e, d] += Emb^T dR: the only path from the loss to P (Emb gets no gradient)
template <typename T>
void nexus_router_backward(T* dP, const T* dR, const T* emb, int E, int de, int d) {
    for (int i = 0; i < de; i++)
        for (int j = 0; j < d; j++) {
            double acc = 0;
            for (int e = 0; e < E; e++) acc += (double)emb[(size_t)e * de + i] * dR[(size_t)e * d + j];
            dP[(size_t)i * d + j] += (T)acc;
        }
}
// Every layer's R = Emb P in a whole flat buffer (after an init or an optimizer step, so that
// a saved checkpoint's gate.weight is the router the model computes)
template <typename T>
void nexus_refresh_routers(const ModelConfig& c, const ParamLayout& lay, T* params) {
    if (!c.nexus_router) return;
    for (int l = 0; l < c.n_layer; l++)
        nexus_router_forward(params + lay.get(l, P_ROUTER).offset, params + lay.get(l, P_NEXUS_EMB).offset,
                             params + lay.get(l, P_NEXUS_PROJ).offset, c.n_experts, c.d_model, c.d_model);
}

// ----------------------------------------------------------------------------
// Checkpoint directories: config.json + model.safetensors (Hugging Face layout).

// Hugging Face's Qwen2-MoE attention always has q, k and v biases; this model has none. A
// model with a shared expert (written as Qwen2MoeForCausalLM) therefore carries these
// tensors as zeros, so that transformers loads it without fresh random biases, and a
// directory read must have them all zero (load_model_dir refuses any other value).
struct ZeroTensor { std::string name; std::vector<int64_t> shape; };
inline std::vector<ZeroTensor> zero_bias_tensors(const ModelConfig& c) {
    std::vector<ZeroTensor> v;
    if (!c.has_shared()) return v;
    for (int l = 0; l < c.n_layer; l++) {
        std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
        v.push_back({p + "q_proj.bias", {(int64_t)c.q_dim()}});
        v.push_back({p + "k_proj.bias", {(int64_t)c.kv_dim()}});
        v.push_back({p + "v_proj.bias", {(int64_t)c.kv_dim()}});
    }
    return v;
}

// Reads config.json and every tensor of the layout, checking names, shapes and that the
// file holds nothing the config does not explain.
template <typename T>
void load_model_dir(const std::string& dir, ModelConfig* cfg, ParamLayout* lay, std::vector<T>* params) {
    std::string cfg_path = path_join(dir, "config.json");
    if (!is_dir(dir)) FAIL("%s: model directory does not exist", dir.c_str());
    if (!path_exists(cfg_path)) FAIL("%s: no config.json in this directory", dir.c_str());
    *cfg = ModelConfig::load(cfg_path);
    *lay = build_layout(*cfg);
    CheckpointTensors ck(dir);
    params->assign(lay->total, (T)0);
    for (auto& t : lay->tensors) {
        if (!ck.has(t.name))
            FAIL("%s: missing tensor \"%s\", which %s/config.json implies", dir.c_str(), t.name.c_str(), dir.c_str());
        const TensorInfo& ti = ck.info(t.name);
        if (ti.shape != t.shape)
            FAIL("%s: tensor \"%s\" has shape %s but config.json implies %s (config.json disagrees with the tensors)",
                 dir.c_str(), t.name.c_str(), shape_str(ti.shape).c_str(), shape_str(t.shape).c_str());
        if (ti.dtype != DType::F32 && ti.dtype != DType::BF16 && ti.dtype != DType::F16)
            FAIL("%s: tensor \"%s\" has dtype %s; expected F32, BF16 or F16", dir.c_str(), t.name.c_str(),
                 dtype_name(ti.dtype));
        ck.read(t.name, t.shape, params->data() + t.offset);
    }
    for (auto& zt : zero_bias_tensors(*cfg)) {  // Qwen2-MoE's attention biases: allowed only as zeros
        if (!ck.has(zt.name)) continue;
        const TensorInfo& ti = ck.info(zt.name);
        if (ti.shape != zt.shape)
            FAIL("%s: tensor \"%s\" has shape %s, expected %s", dir.c_str(), zt.name.c_str(), shape_str(ti.shape).c_str(),
                 shape_str(zt.shape).c_str());
        std::vector<float> b((size_t)shape_numel(zt.shape));
        ck.read(zt.name, zt.shape, b.data());
        for (size_t i = 0; i < b.size(); i++)
            if (b[i] != 0.0f)
                FAIL("%s: tensor \"%s\" has the nonzero entry %g at %zu: attention biases are not supported (this "
                     "model has none; a Qwen2-MoE checkpoint loads only with all q/k/v biases zero)", dir.c_str(),
                     zt.name.c_str(), (double)b[i], i);
    }
    for (auto& name : ck.names()) {
        if (lay->find(name) >= 0) continue;
        bool zero_bias = false;
        for (auto& zt : zero_bias_tensors(*cfg)) zero_bias |= zt.name == name;
        if (zero_bias) continue;
        bool harmless = name.find("rotary_emb.inv_freq") != std::string::npos ||
                        name.find("expert_bias") != std::string::npos ||
                        (cfg->tie_embeddings && name == "lm_head.weight");
        if (!harmless)
            FAIL("%s: tensor \"%s\" is not part of the model that config.json describes (config.json disagrees "
                 "with the tensors)", dir.c_str(), name.c_str());
    }
}

// Writes config.json + model.safetensors into an existing directory (atomically per file).
// `extra_tensors` (name, shape, data) are appended, e.g. aux-free routing biases.
struct ExtraTensor { std::string name; std::vector<int64_t> shape; std::vector<float> data; };
template <typename T>
void save_model_files(const std::string& dir, const ModelConfig& cfg, const ParamLayout& lay, const T* params,
                      DType dtype = DType::F32, const std::vector<ExtraTensor>& extra_tensors = {}) {
    SafeTensorsWriter w;
    w.metadata["format"] = "pt";
    for (auto& t : lay.tensors) w.declare(t.name, dtype, t.shape);
    const std::vector<ZeroTensor> zeros = zero_bias_tensors(cfg);
    for (auto& z : zeros) w.declare(z.name, dtype, z.shape);
    for (auto& e : extra_tensors) w.declare(e.name, DType::F32, e.shape);
    w.begin(path_join(dir, "model.safetensors"));
    for (auto& t : lay.tensors) w.write(t.name, params + t.offset);
    for (auto& z : zeros) {
        std::vector<T> zero((size_t)shape_numel(z.shape), (T)0);
        w.write(z.name, zero.data());
    }
    for (auto& e : extra_tensors) w.write(e.name, e.data.data());
    w.finish();
    Json j = cfg.to_json();
    j["torch_dtype"] = dtype == DType::BF16 ? "bfloat16" : "float32";
    write_text_atomic(path_join(dir, "config.json"), j.dump(2) + "\n");
}
