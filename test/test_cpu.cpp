// test_cpu.cpp: the CPU trainer against the PyTorch reference fixtures, the MoE = dense
// invariant, the common/ readers on bad inputs, and the trainer binary end to end
// (bad inputs refused, save + resume bit-identical).
//
// Run: ./test/bin/test_cpu [path/to/train_moe]   (make test does this)
#define TRAIN_MOE_NO_MAIN
#include "../train_moe.cpp"
#include <random>
#include "../common/world.h"
#include "fixture.h"
#include "testing.h"

static std::string g_bin = "./train_moe";
static std::string g_tmp;

static std::string fixture_dir(const std::string& name) { return "test/fixtures/" + name; }

// ---------------------------------------------------------------------------
// 1. Fixtures: logits, loss terms, routing, every gradient, 10 AdamW steps

static void test_fixture(const std::string& name) {
    std::string dir = fixture_dir(name);
    Model M;
    M.load(dir);
    const Fixture fixture(dir);  // the settings the reference used
    M.router_loss = fixture.router_settings;
    const SafeTensorsReader& fx = fixture.file;
    const TensorInfo& ii = fx.info("inputs");
    int B = (int)ii.shape[0], T = (int)ii.shape[1], N = B * T, V = M.cfg.vocab_size;
    std::vector<int> inputs = fx.read_vec<int>("inputs"), targets = fx.read_vec<int>("targets");

    Losses l = M.forward(inputs.data(), targets.data(), B, T);
    std::vector<double> ref_logits = fx.read_vec<double>("logits", {B, T, V});
    double mx = 0;
    for (double x : ref_logits) mx = std::max(mx, std::fabs(x));
    double w = worst_ratio(M.logits.data(), ref_logits.data(), (size_t)N * V, 1e-5 * mx, 1e-5);
    CHECK_MSG(w <= 1, "%s logits: worst |err| / (1e-5 max|ref| + 1e-5 |ref|) = %.3g", name.c_str(), w);
    auto scalar = [&](const char* k) { return fx.read_vec<double>(k)[0]; };
    std::vector<std::pair<const char*, double>> terms{{"loss", l.loss}, {"ce", l.ce}, {"aux", l.aux}, {"z", l.z}};
    if (fixture.router_settings.dpsl.on) terms.push_back({"dpsl", l.dpsl});
    for (auto kv : terms) {
        double ref = scalar(kv.first);
        CHECK_MSG(std::fabs(kv.second - ref) <= 1e-5 * std::fabs(ref) + 1e-7, "%s %s: got %.9g, reference %.9g",
                  name.c_str(), kv.first, kv.second, ref);
    }
    if (M.cfg.is_moe()) {
        int E = M.cfg.n_experts, K = M.cfg.top_k;
        for (int layer = 0; layer < M.cfg.n_layer; layer++) {
            auto rl = fx.read_vec<double>(strfmt("router_logits.%d", layer), {N, E});
            double rmx = 0;
            for (double x : rl) rmx = std::max(rmx, std::fabs(x));
            double wr = worst_ratio(M.acts[layer].rlogits.data(), rl.data(), rl.size(), 1e-5 * rmx, 1e-5);
            CHECK_MSG(wr <= 1, "%s router_logits.%d worst ratio %.3g", name.c_str(), layer, wr);
            auto idx = fx.read_vec<int>(strfmt("topk_idx.%d", layer), {N, K});
            bool same = true;
            for (int i = 0; i < N * K; i++) same &= idx[i] == M.acts[layer].topk[i];
            CHECK_MSG(same, "%s topk_idx.%d differs", name.c_str(), layer);
            auto tw = fx.read_vec<double>(strfmt("topk_weight.%d", layer), {N, K});
            double wt = worst_ratio(M.acts[layer].topw.data(), tw.data(), tw.size(), 1e-6, 1e-5);
            CHECK_MSG(wt <= 1, "%s topk_weight.%d worst ratio %.3g", name.c_str(), layer, wt);
            auto cnt = fx.read_vec<int>(strfmt("expert_counts.%d", layer), {E});
            bool same_c = true;
            for (int e = 0; e < E; e++) same_c &= cnt[e] == M.acts[layer].counts[e];
            CHECK_MSG(same_c, "%s expert_counts.%d differ", name.c_str(), layer);
        }
    }
    // every parameter's gradient: per tensor, errors relative to the tensor's largest entry
    M.zero_grad();
    M.backward();
    int bad = 0;
    for (auto& t : M.layout.tensors) {
        auto g = fx.read_vec<double>("grad." + t.name, t.shape);
        double gmx = 0;
        for (double x : g) gmx = std::max(gmx, std::fabs(x));
        size_t at = 0;
        double wg = worst_ratio(M.grads.data() + t.offset, g.data(), t.numel, 1e-5 * gmx + 1e-9, 1e-5, &at);
        if (!(wg <= 1)) {
            bad++;
            printf("    %s grad.%s: worst ratio %.3g at %zu (got %.9g, ref %.9g)\n", name.c_str(), t.name.c_str(), wg,
                   at, (double)M.grads[t.offset + at], g[at]);
        }
    }
    CHECK_MSG(bad == 0, "%s: %d parameter gradients differ from the reference", name.c_str(), bad);
    // 10 AdamW steps on the same batch. Adam divides each gradient by its own running RMS, so
    // an entry whose gradient is near zero (e.g. the router row of an expert no token chose)
    // moves by about +-lr whatever its size, and fp32 rounding can flip its sign: the fp32
    // trajectory leaves the float64 one faster than in SGD. Measured worst: 2.5e-5 relative
    // (moe_empty_expert, step 7, AMD EPYC with -march=native); a wrong lr, beta or decay moves
    // the loss by 1e-3 or more.
    const AdamWSettings& hp = fixture.adamw;
    const double lr = fixture.lr;
    auto ref_losses = fx.read_vec<double>("adamw_losses");
    Model M2;
    M2.load(dir);
    M2.router_loss = M.router_loss;
    for (size_t s = 0; s < ref_losses.size(); s++) {
        Losses ls = M2.forward(inputs.data(), targets.data(), B, T);
        CHECK_MSG(std::fabs(ls.loss - ref_losses[s]) <= 1e-4 * std::fabs(ref_losses[s]),
                  "%s AdamW step %zu loss %.9g vs reference %.9g", name.c_str(), s, ls.loss, ref_losses[s]);
        M2.zero_grad();
        M2.backward();
        M2.step(hp, lr);
    }
}

// 1b. The Nexus router (docs/METHODS.md 1.9): an optimizer step with weight decay leaves Emb
//     bit-identical, moves P, and leaves R = Emb P of the new P (what a checkpoint stores);
//     Emb's and R's gradient slots stay 0; a save + load keeps the model and its moe_router key.
static void test_nexus_router() {
    Model M;
    M.load(fixture_dir("moe_nexus"));
    const Fixture fixture(fixture_dir("moe_nexus"));
    M.router_loss = fixture.router_settings;
    CHECK(M.cfg.nexus_router);
    std::vector<int> in = fixture.file.read_vec<int>("inputs"), tg = fixture.file.read_vec<int>("targets");
    const int B = (int)fixture.file.info("inputs").shape[0], T = (int)fixture.file.info("inputs").shape[1];
    const std::vector<real> before = M.params;
    M.zero_grad();
    M.forward(in.data(), tg.data(), B, T);
    M.backward();
    AdamWSettings hp = fixture.adamw;
    hp.weight_decay = 0.5;
    M.step(hp, 0.01);
    const int E = M.cfg.n_experts, d = M.cfg.d_model;
    for (int l = 0; l < M.cfg.n_layer; l++) {
        const ParamTensor &te = M.layout.get(l, P_NEXUS_EMB), &tp = M.layout.get(l, P_NEXUS_PROJ),
                          &tr = M.layout.get(l, P_ROUTER);
        CHECK(!te.trainable && !tr.trainable && tp.trainable);
        bool emb_same = true, p_moved = false, zero_grads = true;
        for (size_t i = te.offset; i < te.offset + te.numel; i++) emb_same &= M.params[i] == before[i];
        for (size_t i = tp.offset; i < tp.offset + tp.numel; i++) p_moved |= M.params[i] != before[i];
        for (size_t i = te.offset; i < te.offset + te.numel; i++) zero_grads &= M.grads[i] == 0;
        for (size_t i = tr.offset; i < tr.offset + tr.numel; i++) zero_grads &= M.grads[i] == 0;
        CHECK_MSG(emb_same, "layer %d: a step changed the fixed domain embeddings", l);
        CHECK_MSG(p_moved, "layer %d: a step did not move the projection P", l);
        CHECK_MSG(zero_grads, "layer %d: Emb or R has a nonzero gradient", l);
        std::vector<real> R((size_t)E * d);
        nexus_router_forward(R.data(), M.params.data() + te.offset, M.params.data() + tp.offset, E, d, d);
        CHECK_MSG(std::equal(R.begin(), R.end(), M.params.begin() + tr.offset), "layer %d: R != Emb P after a step", l);
    }
    std::string dir = g_tmp + "/nexus_rt";
    mkdir_p(dir);
    save_model_files(dir, M.cfg, M.layout, M.params.data());
    Model M2;
    M2.load(dir);
    CHECK(M2.cfg.nexus_router && M2.params == M.params);
    CHECK(Json::parse_file(dir + "/config.json").get_str("moe_router", "", "c") == "nexus");
    Json j = Json::parse_file(fixture_dir("moe_nexus") + "/config.json");
    j["moe_router"] = "mlp";
    expect_error([&] { ModelConfig::from_json(j, "cfg"); }, "moe_router must be linear or nexus, found \"mlp\"",
                 "unknown router kind");
}

// ---------------------------------------------------------------------------
// 0. exp_real, the trainer's float exp (train_moe.cpp): against expl (long double, rounded to
//    float) at every 97th float between -104 and 89 (23M values, both signs, the subnormal
//    results included), where it must be the correctly rounded value but for a few floats
//    whose e^x lies next to a rounding boundary (at most 1 in a million, and those within
//    one ulp); and the edges: 0 below -104, +inf above 89, NaN for NaN, e^0 = 1 exactly.

static void test_exp_real() {
    long n = 0, inexact = 0, far = 0;
    for (uint32_t sign : {0u, 0x80000000u})
        for (uint32_t b = 0; b < 0x7f800000u; b += 97) {
            const uint32_t bits = b | sign;
            float x;
            memcpy(&x, &bits, 4);
            if (!(x >= -104.f && x <= 89.f)) continue;
            const float ref = (float)expl((long double)x), got = exp_real(x);
            n++;
            if (got != ref) {
                inexact++;
                if (!(std::fabs((double)got - ref) <= std::fabs((double)std::nextafter(ref, INFINITY) - ref))) far++;
                if (far == 1 && inexact < 4) printf("  exp_real(%a) = %a, expl: %a\n", x, got, ref);
            }
        }
    CHECK_MSG(n > 20000000, "exp_real: %ld floats tested", n);
    CHECK_MSG(inexact * 1000000 <= n, "exp_real: %ld of %ld floats not correctly rounded", inexact, n);
    CHECK_MSG(far == 0, "exp_real: %ld floats off by more than one ulp", far);
    CHECK(exp_real(0.f) == 1.f);
    CHECK(exp_real(-104.5f) == 0.f && exp_real(-1e30f) == 0.f && exp_real(-INFINITY) == 0.f);
    CHECK(exp_real(89.5f) == INFINITY && exp_real(1e30f) == INFINITY && exp_real(INFINITY) == INFINITY);
    CHECK(std::isnan(exp_real(NAN)));
    CHECK(exp_real(-103.5f) > 0.f && exp_real(-103.5f) < 1e-44f);  // a subnormal, not flushed
    CHECK(exp_real(88.5f) < INFINITY);
}

// ---------------------------------------------------------------------------
// 1b. Results do not depend on the thread count: a forward, backward and AdamW step of an
//     MoE (odd token counts per expert, shapes not multiples of the matmul tiles) at 1, 2
//     and 3 threads give bit-identical losses, gradients and weights.

static void test_thread_count_bit_identical() {
#ifdef _OPENMP
    ModelConfig c;
    model_preset("tiny", &c);
    c.vocab_size = 300;
    c.d_model = 72; c.head_dim = 18; c.ffn_dim = 100;  // 72 = 4 x 18; 100: C % 16 != 0 tails
    c.n_experts = 5;
    c.top_k = 2;
    const int B = 3, T = 13;
    std::vector<int> in(B * T), tg(B * T);
    for (int i = 0; i < B * T; i++) { in[i] = (i * 37 + 11) % c.vocab_size; tg[i] = (i * 53 + 5) % c.vocab_size; }
    AdamWSettings hp;
    std::vector<real> ref_grads, ref_params;
    double ref_loss = 0;
    const int saved = omp_get_max_threads();
    for (int threads : {1, 2, 3}) {
        omp_set_num_threads(threads);
        Model M;
        M.init_scratch(c, 5);
        Losses l = M.forward(in.data(), tg.data(), B, T);
        M.zero_grad();
        M.backward();
        std::vector<real> grads = M.grads;
        M.step(hp, 1e-2);
        if (threads == 1) { ref_loss = l.loss; ref_grads = grads; ref_params = M.params; continue; }
        CHECK_MSG(l.loss == ref_loss, "%d threads: loss %.9g vs %.9g at 1 thread", threads, l.loss, ref_loss);
        CHECK_MSG(grads == ref_grads, "%d threads: gradients differ from 1 thread", threads);
        CHECK_MSG(M.params == ref_params, "%d threads: weights after a step differ from 1 thread", threads);
    }
    omp_set_num_threads(saved);
#endif
}

// ---------------------------------------------------------------------------
// 2. An MoE whose experts are all copies of the dense FFN computes the dense function
//    (topk_softmax: the gate weights sum to 1), whatever the router.

static void test_moe_copies_equal_dense() {
    Model D;
    D.load(fixture_dir("dense"));
    ModelConfig c = D.cfg;
    c.n_experts = 4;
    c.top_k = 2;
    c.routing = ROUTING_TOPK_SOFTMAX;
    Model M;
    M.init_scratch(c, 7);
    for (auto& t : M.layout.tensors) {
        real* dst = M.params.data() + t.offset;
        std::string src_name = t.name;
        if (t.kind == P_ROUTER) {  // a random router, scaled so routing varies
            for (size_t i = 0; i < t.numel; i++) dst[i] = (real)rng_normal(99, 1, i);
            continue;
        }
        if (t.expert >= 0) {
            const char* k = t.kind == P_EGATE ? "gate_proj" : t.kind == P_EUP ? "up_proj" : "down_proj";
            src_name = strfmt("model.layers.%d.mlp.%s.weight", t.layer, k);
        }
        int si = D.layout.find(src_name);
        CHECK_MSG(si >= 0, "dense tensor for %s", t.name.c_str());
        if (si < 0) return;
        std::copy(D.params.begin() + D.layout.tensors[si].offset,
                  D.params.begin() + D.layout.tensors[si].offset + t.numel, dst);
    }
    std::vector<int> in(16);
    for (int i = 0; i < 16; i++) in[i] = (i * 7 + 3) % c.vocab_size;
    D.forward(in.data(), nullptr, 2, 8);
    M.forward(in.data(), nullptr, 2, 8);
    double mx = 0, err = 0;
    for (size_t i = 0; i < (size_t)16 * c.vocab_size; i++) {
        mx = std::max(mx, (double)std::fabs(D.logits[i]));
        err = std::max(err, (double)std::fabs(D.logits[i] - M.logits[i]));
    }
    CHECK_MSG(err <= 1e-6 * mx, "MoE of copies vs dense: max |logit diff| %.3g (max |logit| %.3g)", err, mx);
    // and the routing really was spread over several experts
    int used = 0;
    for (int e = 0; e < 4; e++) used += M.acts[0].counts[e] > 0;
    CHECK_MSG(used >= 3, "routing used only %d experts", used);
}

// 2b. Directories written by Hugging Face transformers itself (bf16, sharded with an index,
//     HF's own config.json keys) load as they are and give transformers' logits.
static void test_hf_directory(const std::string& name) {
    std::string dir = fixture_dir(name);
    Model M;
    M.load(dir);
    SafeTensorsReader fx(dir + "/hf_logits.safetensors");
    const TensorInfo& ti = fx.info("tokens");
    int B = (int)ti.shape[0], T = (int)ti.shape[1], V = M.cfg.vocab_size;
    std::vector<int> tokens = fx.read_vec<int>("tokens");
    std::vector<float> ref = fx.read_vec<float>("logits", {B, T, V});
    M.forward(tokens.data(), nullptr, B, T);
    double mx = 0, err = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        mx = std::max(mx, (double)std::fabs(ref[i]));
        err = std::max(err, (double)std::fabs(M.logits[i] - ref[i]));
    }
    CHECK_MSG(err <= 1e-5 * mx, "%s: max |logit - transformers' logit| %.3g (max |logit| %.3g)", name.c_str(), err, mx);
    CHECK(M.cfg.rms_eps == 1e-6f && M.cfg.rope_theta == 500000.0f);
}

// 2d. Grove MoE directories (adjugate experts; our keys and tensor names on a Mixtral
//     config): a save + load keeps the model, the note says HF does not compute it, the
//     active-parameter count takes min(K, G) adjugates, bad keys are refused by name.
static void test_grove_round_trip() {
    Model A;
    A.load(fixture_dir("moe_grove"));
    CHECK(A.cfg.has_grove() && A.cfg.grove_groups == 2 && A.cfg.grove_dim == 8 && A.cfg.grove_scale == 0.5f);
    std::string d = g_tmp + "/grove_rt";
    mkdir_p(d);
    save_model_files(d, A.cfg, A.layout, A.params.data());
    Model Bm;
    Bm.load(d);
    CHECK_MSG(Bm.cfg.grove_groups == A.cfg.grove_groups && Bm.cfg.grove_dim == A.cfg.grove_dim &&
                  Bm.cfg.grove_scale == A.cfg.grove_scale && Bm.cfg.routing == A.cfg.routing && Bm.params == A.params,
              "save + load changed the Grove model");
    CHECK(CheckpointTensors(d).has("model.layers.1.block_sparse_moe.adjugate_experts.1.w2.weight"));
    Json j = Json::parse_file(d + "/config.json");
    CHECK(j.get_str("model_type", "", "c") == "mixtral" && j.get_int("grove_groups", 0, 99, "c") == 2);
    CHECK(j.get_str("moe_note", "", "c").find("no Grove MoE class") != std::string::npos);
    {  // active: the K of E routed experts and min(K, G) adjugates per layer (the maximum)
        const ModelConfig& c = A.cfg;
        ModelConfig m = c;
        m.grove_groups = 0;
        size_t adj = (size_t)c.n_layer * std::min(c.top_k, c.grove_groups) * 3 * c.grove_dim * c.d_model;
        CHECK_MSG(count_active_params(c) == count_active_params(m) + adj, "active %zu vs %zu + %zu",
                  count_active_params(c), count_active_params(m), adj);
        CHECK(count_params(c) - count_params(m) == (size_t)c.n_layer * c.grove_groups * 3 * c.grove_dim * c.d_model);
    }
    Json b = Json::parse_file(fixture_dir("moe_grove") + "/config.json");
    b["grove_groups"] = 3;
    expect_error([&] { ModelConfig::from_json(b, "cfg"); }, "grove_groups 3 must divide the number of experts",
                 "groups not dividing E");
    b["grove_groups"] = 2;
    b.obj.erase(std::remove_if(b.obj.begin(), b.obj.end(), [](const std::pair<std::string, Json>& kv) {
                    return kv.first == "grove_scale"; }), b.obj.end());
    expect_error([&] { ModelConfig::from_json(b, "cfg"); }, "grove_scale", "missing grove_scale");
    Json q = Json::parse_file(fixture_dir("moe_shared") + "/config.json");
    q["grove_groups"] = 2;
    expect_error([&] { ModelConfig::from_json(q, "cfg"); }, "with qwen2_moe (a shared expert) is not supported",
                 "grove + shared");
}

// 2c. Qwen2-MoE directories (a shared expert): a save + load keeps the model (config keys,
//     the zero attention biases HF needs), and nonzero attention biases or dense-MLP layers
//     are refused with the tensor's / key's name.
static void test_qwen2_moe_round_trip() {
    for (const char* name : {"moe_shared", "moe_shared_ungated", "moe_xft"}) {
        Model A;
        A.load(fixture_dir(name));
        std::string d = g_tmp + "/qwen_rt_" + name;
        mkdir_p(d);
        save_model_files(d, A.cfg, A.layout, A.params.data());
        Model Bm;
        Bm.load(d);
        CHECK_MSG(Bm.cfg.shared_dim == A.cfg.shared_dim && Bm.cfg.shared_gate == A.cfg.shared_gate &&
                      Bm.cfg.routing == A.cfg.routing && Bm.cfg.n_experts == A.cfg.n_experts &&
                      Bm.cfg.ffn_dim == A.cfg.ffn_dim && Bm.params == A.params,
                  "%s: save + load changed the model", name);
        CHECK(CheckpointTensors(d).has("model.layers.1.self_attn.k_proj.bias"));
        Json j = Json::parse_file(d + "/config.json");
        CHECK(j.get_str("model_type", "", "c") == "qwen2_moe" && j.get_int("num_experts", 0, 99, "c") == 4);
        CHECK(j.get_bool("norm_topk_prob", true, "c") == (A.cfg.routing == ROUTING_TOPK_SOFTMAX));
    }
    {  // active parameters: all but the E - K routed experts a token skips (the shared expert counts)
        ModelConfig c = ModelConfig::load(fixture_dir("moe_shared") + "/config.json");
        size_t skipped = (size_t)c.n_layer * (c.n_experts - c.top_k) * 3 * c.ffn_dim * c.d_model;
        size_t embed = c.tie_embeddings ? 0 : (size_t)c.vocab_size * c.d_model;
        CHECK_MSG(count_active_params(c) == count_params(c) - skipped - embed, "active %zu, total %zu",
                  count_active_params(c), count_params(c));
        CHECK(count_params(c) - count_params([&] { ModelConfig m = c; m.shared_dim = 0; return m; }()) ==
              (size_t)c.n_layer * (3 * c.shared_dim + 1) * c.d_model);
    }
    // a nonzero bias: refused, naming the tensor
    Model A;
    A.load(fixture_dir("moe_shared"));
    std::string d = g_tmp + "/qwen_bias";
    mkdir_p(d);
    save_model_files(d, A.cfg, A.layout, A.params.data());
    SafeTensorsWriter w;
    std::vector<float> bias((size_t)A.cfg.kv_dim(), 0.0f);
    bias[3] = 0.5f;
    for (auto& t : A.layout.tensors) w.declare(t.name, DType::F32, t.shape);
    for (auto& z : zero_bias_tensors(A.cfg)) w.declare(z.name, DType::F32, z.shape);
    w.begin(d + "/model.safetensors");
    for (auto& t : A.layout.tensors) w.write(t.name, A.params.data() + t.offset);
    for (auto& z : zero_bias_tensors(A.cfg)) {
        std::vector<float> zero((size_t)shape_numel(z.shape), 0.0f);
        w.write(z.name, z.name == "model.layers.1.self_attn.v_proj.bias" ? bias.data() : zero.data());
    }
    w.finish();
    expect_error([&] { Model M; M.load(d); }, "model.layers.1.self_attn.v_proj.bias\" has the nonzero entry 0.5 at 3",
                 "nonzero Qwen2-MoE attention bias");
    Json j = Json::parse_file(fixture_dir("moe_shared") + "/config.json");
    j["decoder_sparse_step"] = 2;
    expect_error([&] { ModelConfig::from_json(j, "cfg"); }, "decoder_sparse_step must be 1", "dense-MLP layers");
    j["decoder_sparse_step"] = 1;
    j["moe_routing"] = "softmax_topk";
    expect_error([&] { ModelConfig::from_json(j, "cfg"); }, "contradicts norm_topk_prob true", "routing mismatch");
    {  // XFT routing sets the shared expert's weight: a sigmoid gate beside it is refused
        Json x = Json::parse_file(fixture_dir("moe_xft") + "/config.json");
        CHECK(ModelConfig::from_json(x, "cfg").routing == ROUTING_XFT);
        x["shared_expert_gating"] = "sigmoid";
        expect_error([&] { ModelConfig::from_json(x, "cfg"); }, "routing xft needs an ungated shared expert",
                     "xft with a sigmoid gate");
    }
}

// ---------------------------------------------------------------------------
// 3. Pieces: aux-free bias, schedules, JSON, safetensors round trips, data loader

static void test_aux_free_bias() {
    Model M;
    M.load(fixture_dir("moe_topk_softmax"));
    M.router_loss.aux_free_rate = 1e-3;
    std::vector<int> in(16), tg(16);
    for (int i = 0; i < 16; i++) { in[i] = (i * 5) % 64; tg[i] = (i * 3) % 64; }
    M.forward(in.data(), tg.data(), 2, 8);
    std::vector<long> load = M.step_load[0];
    M.zero_grad();
    M.backward();
    AdamWSettings hp;
    M.step(hp, 0.0);
    double mean = 0;
    for (long c : load) mean += c / 4.0;
    for (int e = 0; e < 4; e++) {
        float want = load[e] < mean ? 1e-3f : load[e] > mean ? -1e-3f : 0.0f;
        CHECK_MSG(M.expert_bias[0][e] == want, "bias of expert %d is %g, expected %g (load %ld, mean %g)", e,
                  M.expert_bias[0][e], want, load[e], mean);
    }
    // a large bias on one expert makes it selected by every token, while the gate weights
    // still come from the unbiased probabilities
    M.expert_bias[0] = {0, 0, 100, 0};
    M.forward(in.data(), tg.data(), 2, 8);
    CHECK(M.acts[0].counts[2] == 16);
}

// The Dirichlet-prior shaping loss (docs/METHODS.md 1.6) as common/router_losses.h computes it,
// apart from the trainer (the fixture moe_dpsl and test_gradcheck hold the trainer to it)

// the Beta CDF against closed forms, and the density against the CDF's slope
static void test_beta_cdf() {
    double worst = 0, worst_pdf = 0;
    for (int k = 1; k < 200; k++) {
        const double x = k / 200.0;
        worst = std::max(worst, std::fabs(beta_cdf(x, 1, 3.5) - (1 - std::pow(1 - x, 3.5))));
        worst = std::max(worst, std::fabs(beta_cdf(x, 0.5, 1) - std::sqrt(x)));
        worst = std::max(worst, std::fabs(beta_cdf(x, 2, 2) - (3 * x * x - 2 * x * x * x)));
        worst = std::max(worst, std::fabs(beta_cdf(x, 0.75, 5.25) + beta_cdf(1 - x, 5.25, 0.75) - 1));
        for (double a : {0.5, 1.0, 1.5, 7.0}) {
            const double b = 8 - a, h = 1e-6;
            const double slope = (beta_cdf(x + h, a, b) - beta_cdf(x - h, a, b)) / (2 * h), pdf = beta_pdf(x, a, b);
            // absolute below density 1e-3: the slope's rounding error is about 1e-16 / h
            worst_pdf = std::max(worst_pdf, std::fabs(slope - pdf) / (1e-3 + std::fabs(pdf)));
        }
    }
    CHECK_MSG(worst < 1e-13, "beta_cdf vs closed forms: max error %.3g", worst);
    CHECK_MSG(worst_pdf < 1e-6, "beta_pdf vs the CDF's slope: max relative error %.3g", worst_pdf);
    CHECK(beta_cdf(0, 2, 3) == 0 && beta_cdf(1, 2, 3) == 1);
}

// One MoE layer's statistics holding given probabilities [N, E] (B = 1 sequence of N rows)
struct DpslBatch {
    std::vector<double> p;
    std::vector<int> counts;
    std::vector<double> zsum;
    RoutingStats s;
    DpslBatch(int N, int E) : p((size_t)N * E), counts(E), zsum(N) {
        s.B = 1; s.T = N; s.E = E; s.K = 1; s.seg = 1;
        s.layers.push_back({counts.data(), p.data(), zsum.data(), p.data()});
    }
};

// The invariant: samples sitting exactly at the target's quantiles F_i^-1(u_r) give loss 0
// and gradient 0 (sq, mid); moving one sample off its quantile gives both a positive value and
// a gradient of the right sign. The loss reads each expert's column alone, so the columns need
// not add up to 1 here.
static void test_dpsl_invariant() {
    const int N = 40, E = 3;
    DpslSettings st;
    st.on = true;
    st.alpha = {0.5, 1.0, 2.5};
    const double A = st.alpha_sum(E);
    DpslBatch b(N, E);
    for (int i = 0; i < E; i++)
        for (int r = 1; r <= N; r++) {
            double lo = 0, hi = 1, u = (r - 0.5) / N, a = st.alpha_of(i);
            for (int it = 0; it < 200; it++) {  // bisection for F^-1(u)
                double mid = 0.5 * (lo + hi);
                (beta_cdf(mid, a, A - a) < u ? lo : hi) = mid;
            }
            b.p[(size_t)((r * 7) % N) * E + i] = 0.5 * (lo + hi);  // rows in a scrambled order
        }
    double v = dpsl_loss(b.s, st);
    std::vector<double> G;
    dpsl_dp_rows(G, b.s, st, 0);
    CHECK_MSG(v < 1e-28, "dpsl at the exact quantiles = %.3g, expected 0", v);
    CHECK_MSG(max_abs(G) < 1e-12, "dpsl gradient at the exact quantiles: max %.3g, expected 0", max_abs(G));
    b.p[(size_t)7 * E + 1] *= 1.1;  // row 7 holds expert 1's quantile r = 1: now above it
    double v1 = dpsl_loss(b.s, st);
    dpsl_dp_rows(G, b.s, st, 0);
    CHECK_MSG(v1 > 1e-8 && G[(size_t)7 * E + 1] > 0, "dpsl off the quantiles: value %.3g, dL/dp %.3g", v1,
              G[(size_t)7 * E + 1]);
}

// The statistics: rows drawn from the prior Dirichlet(alpha) itself give each expert the
// Beta(alpha_i, A - alpha_i) marginal, and then N times the loss (sq, mid) is the Cramer-von
// Mises statistic less 1/(12 N), whose mean is 1/6 - 1/(12 N) (variance 1/45 for large N).
// Rows drawn from another Dirichlet give a clearly larger mean.
static void test_dpsl_statistics() {
    const int N = 64, E = 4, trials = 1500;
    DpslSettings st;
    st.on = true;
    st.alpha = {0.5, 1.0, 1.5, 2.0};
    std::mt19937_64 gen(42);
    auto mean_of = [&](double scale) {
        DpslBatch b(N, E);
        std::vector<std::gamma_distribution<double>> gam;
        for (int i = 0; i < E; i++) gam.emplace_back(scale * st.alpha_of(i), 1.0);
        double sum = 0;
        for (int t = 0; t < trials; t++) {
            for (int n = 0; n < N; n++) {  // a Dirichlet row: independent Gamma(alpha_i) draws, normalized
                double tot = 0;
                for (int i = 0; i < E; i++) tot += b.p[(size_t)n * E + i] = gam[i](gen);
                for (int i = 0; i < E; i++) b.p[(size_t)n * E + i] /= tot;
            }
            sum += N * E * dpsl_loss(b.s, st);  // the sum over experts of N L_i
        }
        return sum / ((double)trials * E);
    };
    const double want = 1.0 / 6 - 1.0 / (12.0 * N), se = std::sqrt(1.0 / 45 / (trials * E));
    const double at_prior = mean_of(1.0), at_other = mean_of(4.0);
    CHECK_MSG(std::fabs(at_prior - want) < 5 * se, "rows from the prior: mean N L %.5f, expected %.5f +- %.5f",
              at_prior, want, 5 * se);
    CHECK_MSG(at_other > 3 * want, "rows from Dirichlet(4 alpha): mean N L %.5f, expected well above %.5f", at_other,
              want);
}

static void test_schedules() {
    LRSchedule s;
    s.lr = 1.0; s.lr_min = 0.1; s.warmup = 10; s.total = 110;
    CHECK(std::fabs(s.at(0) - 0.1) < 1e-12);
    CHECK(std::fabs(s.at(9) - 1.0) < 1e-12);
    CHECK(std::fabs(s.at(10) - 1.0) < 1e-12);
    CHECK(std::fabs(s.at(109) - 0.1) < 1e-12);
    CHECK(std::fabs(s.at(60) - 0.55) < 0.01);
    s.kind = "wsd"; s.decay_frac = 0.1;
    CHECK(s.at(50) == 1.0 && s.at(98) == 1.0);
    CHECK(std::fabs(s.at(109) - 0.1) < 1e-12);
    s.kind = "constant";
    CHECK(s.at(109) == 1.0 && s.at(0) == 0.1);
}

static void test_json_and_safetensors() {
    Json j = Json::parse("{\"a\": [1, 2.5, -3e-7], \"b\": {\"c\": \"x\\ny\\u00e9\"}, \"d\": true, \"e\": null}", "t");
    CHECK(j.find("a")->arr[1].num == 2.5);
    CHECK(j.find("b")->find("c")->str == "x\ny\xc3\xa9");
    Json back = Json::parse(j.dump(), "t2");
    CHECK(back.dump() == j.dump());
    CHECK(Json::number_string(0.1) == "0.1");
    CHECK(Json::parse(Json::number_string(1.0 / 3), "n").num == 1.0 / 3);
    expect_error([] { Json::parse("{\"a\": [1, 2}", "bad.json"); }, "bad.json: invalid JSON", "bad json");
    // safetensors: F32 and BF16 round trip; bf16 rounds to nearest even
    std::string p = g_tmp + "/rt.safetensors";
    std::vector<float> a = {1.0f, -2.5f, 3.14159f, 1e-3f, 65504.f, 0.0f};
    SafeTensorsWriter w;
    w.declare("a", DType::F32, {2, 3});
    w.declare("b", DType::BF16, {6});
    w.begin(p);
    w.write("a", a.data());
    w.write("b", a.data());
    w.finish();
    SafeTensorsReader r(p);
    auto ra = r.read_vec<float>("a", {2, 3});
    auto rb = r.read_vec<float>("b", {6});
    bool same = true, close = true;
    for (int i = 0; i < 6; i++) {
        same &= ra[i] == a[i];
        close &= std::fabs(rb[i] - a[i]) <= std::fabs(a[i]) / 256;
        close &= rb[i] == bf16_to_f32(f32_to_bf16(a[i]));
    }
    CHECK(same);
    CHECK(close);
    CHECK(f32_to_bf16(1.0f + 1.0f / 256) == f32_to_bf16(1.0f));  // tie -> even
}

static void write_synthetic_shards(const std::string& dir, int vocab, const std::vector<std::string>& domains,
                                   size_t n_train, size_t n_val) {
    mkdir_p(dir);
    for (size_t d = 0; d < domains.size(); d++) {
        for (int split = 0; split < 2; split++) {
            size_t n = split ? n_val : n_train;
            std::vector<uint16_t> t(n);
            // a learnable sequence: mostly "next = (prev * a + b) mod vocab", some noise
            uint16_t prev = 0;
            for (size_t i = 0; i < n; i++) {
                uint64_t r = rng_u64(42 + d, split, i);
                prev = (r % 8 == 0) ? (uint16_t)(r % vocab) : (uint16_t)((prev * (3 + d) + 1) % vocab);
                t[i] = prev;
            }
            write_shard(path_join(dir, strfmt("%s_%s_000.bin", domains[d].c_str(), split ? "val" : "train")), t);
        }
    }
}

static void test_dataloader() {
    std::string dir = g_tmp + "/data_dl";
    write_synthetic_shards(dir, 64, {"aa", "bb"}, 5000, 500);
    DataLoader a(dir, "aa=1,bb=3", 4, 16, 64, 5);
    CHECK(a.domains.size() == 2);
    CHECK(std::fabs(a.domains[1].weight - 0.75) < 1e-12);
    std::vector<int> in(64), tg(64), dom(4), in2(64), tg2(64);
    int count_b = 0;
    for (int i = 0; i < 200; i++) {  // well past one epoch of domain bb
        a.next_batch(in.data(), tg.data(), dom.data());
        for (int b = 0; b < 4; b++) count_b += dom[b];
        bool shifted = true;
        for (int b = 0; b < 4; b++)
            for (int t = 0; t + 1 < 16; t++) shifted &= in[b * 16 + t + 1] == tg[b * 16 + t];
        if (!shifted) { CHECK_MSG(false, "targets are not inputs shifted by one"); break; }
    }
    CHECK_MSG(std::fabs(count_b / 800.0 - 0.75) < 0.06, "domain bb got %.3f of the rows, expected 0.75", count_b / 800.0);
    // a loader restored from a saved state continues identically
    DataLoader b(dir, "aa=1,bb=3", 4, 16, 64, 5);
    b.state = DataState::from_json(Json::parse(a.state.to_json().dump(), "s"), 2, "s");
    a.next_batch(in.data(), tg.data());
    b.next_batch(in2.data(), tg2.data());
    CHECK(in == in2 && tg == tg2);
    CHECK(a.val_batches(0) == 500 / 16 / 4);
    expect_error([&] { DataLoader(dir, "cc=1", 4, 16, 64, 5); }, "no domain \"cc\"", "unknown domain in --mix");
}

// ---------------------------------------------------------------------------
// 4. Bad inputs: each gives one clear error and writes nothing

// copy of a fixture model directory that a test may damage
static std::string copy_model(const std::string& from, const std::string& to) {
    remove_tree(to);
    mkdir_p(to);
    for (const char* f : {"config.json", "model.safetensors"}) {
        std::vector<uint8_t> b = read_file(path_join(from, f));
        AtomicFile o(path_join(to, f));
        o.write(b.data(), b.size());
        o.commit();
    }
    return to;
}
static void overwrite(const std::string& path, const std::vector<uint8_t>& bytes) {
    AtomicFile o(path);
    o.write(bytes.data(), bytes.size());
    o.commit();
}
// rewrite the JSON header of a safetensors file through `edit`, keeping the data block
static void edit_header(const std::string& path, const std::function<void(Json&)>& edit) {
    std::vector<uint8_t> b = read_file(path);
    uint64_t n;
    memcpy(&n, b.data(), 8);
    Json h = Json::parse(std::string(b.begin() + 8, b.begin() + 8 + n), path);
    edit(h);
    std::string hs = h.dump();
    uint64_t m = hs.size();
    std::vector<uint8_t> out(8);
    memcpy(out.data(), &m, 8);
    out.insert(out.end(), hs.begin(), hs.end());
    out.insert(out.end(), b.begin() + 8 + n, b.end());
    overwrite(path, out);
}

static void test_bad_model_files() {
    const std::string src = fixture_dir("moe_topk_softmax");
    auto load = [](const std::string& dir) { Model M; M.load(dir); };
    std::string d = g_tmp + "/bad_model";
    // truncated file
    copy_model(src, d);
    {
        std::vector<uint8_t> b = read_file(d + "/model.safetensors");
        b.resize(b.size() / 2);
        overwrite(d + "/model.safetensors", b);
    }
    expect_error([&] { load(d); }, "run past the end", "truncated safetensors");
    // a file too short for its header
    overwrite(d + "/model.safetensors", {1, 2, 3});
    expect_error([&] { load(d); }, "too short", "3-byte safetensors");
    // header length past the end
    overwrite(d + "/model.safetensors", {0xff, 0xff, 0, 0, 0, 0, 0, 0, '{', '}'});
    expect_error([&] { load(d); }, "runs past the end of the file", "header length past end");
    // corrupt header JSON
    copy_model(src, d);
    {
        std::vector<uint8_t> b = read_file(d + "/model.safetensors");
        b[8] = 'X';
        overwrite(d + "/model.safetensors", b);
    }
    expect_error([&] { load(d); }, "invalid JSON", "corrupt header");
    // overlapping offsets
    copy_model(src, d);
    edit_header(d + "/model.safetensors", [](Json& h) {
        Json& t = h["model.norm.weight"];
        const Json& other = h["model.embed_tokens.weight"];
        double b0 = other.find("data_offsets")->arr[0].num;
        t["data_offsets"].arr[0].num = b0;
        t["data_offsets"].arr[1].num = b0 + 32 * 4;
    });
    expect_error([&] { load(d); }, "overlapping", "overlapping offsets");
    // offsets past the end of the data
    copy_model(src, d);
    edit_header(d + "/model.safetensors", [](Json& h) {
        Json& t = h["model.norm.weight"];
        t["data_offsets"].arr[0].num = 1e9;
        t["data_offsets"].arr[1].num = 1e9 + 128;
    });
    expect_error([&] { load(d); }, "run past the end of the data", "offsets past end");
    // wrong dtype
    copy_model(src, d);
    edit_header(d + "/model.safetensors", [](Json& h) { h["model.norm.weight"]["dtype"] = "I32"; });
    expect_error([&] { load(d); }, "dtype I32", "wrong dtype");
    // wrong shape (same byte count, other shape)
    copy_model(src, d);
    edit_header(d + "/model.safetensors", [](Json& h) {
        Json sh = Json::array();
        sh.push(4);
        sh.push(8);
        h["model.norm.weight"]["shape"] = sh;
    });
    expect_error([&] { load(d); }, "has shape [4, 8] but config.json implies [32]", "wrong shape");
    // missing tensor
    copy_model(src, d);
    edit_header(d + "/model.safetensors", [](Json& h) { h.erase("model.layers.1.self_attn.k_proj.weight"); });
    expect_error([&] { load(d); }, "missing tensor \"model.layers.1.self_attn.k_proj.weight\"", "missing tensor");
    // config.json disagreeing with the tensors: fewer layers, other hidden size
    copy_model(src, d);
    {
        Json c = Json::parse_file(d + "/config.json");
        c["num_hidden_layers"] = 1;
        write_text_atomic(d + "/config.json", c.dump(2));
    }
    expect_error([&] { load(d); }, "not part of the model that config.json describes", "config fewer layers");
    copy_model(src, d);
    {
        Json c = Json::parse_file(d + "/config.json");
        c["intermediate_size"] = 48;
        write_text_atomic(d + "/config.json", c.dump(2));
    }
    expect_error([&] { load(d); }, "config.json disagrees with the tensors", "config other width");
    copy_model(src, d);
    write_text_atomic(d + "/config.json", "{\"hidden_size\": 32,");
    expect_error([&] { load(d); }, "invalid JSON", "broken config.json");
    expect_error([&] { load(g_tmp + "/no_such_dir"); }, "does not exist", "missing model dir");
}

static void test_bad_shards() {
    std::string d = g_tmp + "/bad_shards";
    remove_tree(d);
    write_synthetic_shards(d, 64, {"aa"}, 3000, 300);
    std::string shard = d + "/aa_train_000.bin";
    std::vector<uint8_t> good = read_file(shard);
    std::vector<uint8_t> b = good;
    b[0] ^= 0x55;
    overwrite(shard, b);
    expect_error([&] { load_shard(shard, 64); }, "bad magic", "shard magic");
    b = good;
    b.resize(b.size() - 100);
    overwrite(shard, b);
    expect_error([&] { load_shard(shard, 64); }, "truncated shard", "short shard");
    overwrite(shard, good);
    expect_error([&] { load_shard(shard, 32); }, ">= vocab size 32", "token id >= vocab");
    expect_error([&] { DataLoader(g_tmp + "/nowhere", "", 2, 8, 64, 1); }, "does not exist", "missing data path");
}

// Sizes and numbers from a file are checked before they are used (the fuzzers of dev/fuzz
// found or guard each of these; docs/reliability.md)
static void test_untrusted_sizes() {
    // a shard header announcing 2^31-1 tokens over a 400-byte body: refused, nothing allocated
    std::vector<uint8_t> shard(1024 + 400, 0);
    int32_t h[3] = {SHARD_MAGIC, SHARD_VERSION, 2147483647};
    memcpy(shard.data(), h, sizeof(h));
    expect_error([&] { parse_shard(shard.data(), shard.size(), 64, "s.bin"); }, "truncated shard", "shard count");
    // tokenizer.bin: a vocabulary count beyond the file, an end-of-text id outside the vocabulary
    std::vector<uint8_t> tb(1024 + 6, 0);
    uint32_t th[4] = {20240328, 2, 4000000000u, 0};
    memcpy(tb.data(), th, sizeof(th));
    Tokenizer tok;
    expect_error([&] { tok.load_bytes(tb, "t.bin"); }, "header says 4000000000 tokens", "tokenizer count");
    th[2] = 3; th[3] = 3;
    memcpy(tb.data(), th, sizeof(th));
    for (int i = 0; i < 3; i++) { tb[1024 + 2 * i] = 1; tb[1025 + 2 * i] = 'a' + i; }
    expect_error([&] { tok.load_bytes(tb, "t.bin"); }, "end-of-text id 3", "tokenizer eot");
    th[3] = 2;
    memcpy(tb.data(), th, sizeof(th));
    tok.load_bytes(tb, "t.bin");
    CHECK(tok.tokens.size() == 3 && tok.eot == 2 && tok.decode(1) == "b");
    // safetensors: a shape whose element count overflows, a name given twice, an overlap that
    // an empty tensor sits between
    auto st = [](const std::string& header, size_t data_bytes) {
        std::vector<uint8_t> b(8 + header.size() + data_bytes, 0);
        uint64_t n = header.size();
        memcpy(b.data(), &n, 8);
        memcpy(b.data() + 8, header.data(), header.size());
        return b;
    };
    expect_error([&] { SafeTensorsReader r("x", st(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0)); },
                 "needs more than the 0 bytes", "safetensors shape overflow");
    expect_error([&] { SafeTensorsReader r("x", st(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})", 2)); },
                 "appears twice", "safetensors duplicate name");
    expect_error([&] { SafeTensorsReader r("x", st(R"({"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"e":{"dtype":"U8","shape":[0],"data_offsets":[2,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}})", 8)); },
                 "overlapping", "safetensors overlap behind an empty tensor");
    SafeTensorsReader ok("x", st(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"e":{"dtype":"F32","shape":[9007199254740992,0],"data_offsets":[2,2]}})", 2));
    CHECK(ok.tensors.size() == 2 && ok.info("e").numel() == 0);
    // JSON: numbers outside JSON's grammar, integers beyond 2^53
    expect_error([&] { Json::parse("[01]", "j"); }, "invalid JSON", "leading zero");
    expect_error([&] { Json::parse("0x10", "j"); }, "invalid JSON", "hex number");
    expect_error([&] { Json::parse("-inf", "j"); }, "invalid JSON", "-inf");
    expect_error([&] { Json::parse("\"\\ud800\\u0041\"", "j"); }, "surrogate", "lone surrogate");
    expect_error([&] { Json::parse("{\"n\": 1e300}", "j").get_int("n", "j"); }, "magnitude <= 2^53", "huge int");
    CHECK(Json::parse("-Infinity", "j").num == -INFINITY);
    // config.json: an integer that does not fit an int, MoE keys on a dense model
    Json c = ModelConfig().to_json();
    for (const char* k : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"}) c[k] = 64;
    c["num_attention_heads"] = 4; c["num_key_value_heads"] = 4; c["head_dim"] = 16;
    ModelConfig::from_json(c, "config.json");
    Json bad = c;
    bad["vocab_size"] = 4294967297.0;
    expect_error([&] { ModelConfig::from_json(bad, "config.json"); }, "is 4294967297, outside the allowed range",
                 "config int range");
    bad = c;
    bad["num_experts_per_tok"] = 2;
    expect_error([&] { ModelConfig::from_json(bad, "config.json"); }, "dense model", "config top-k without experts");
    bad = c;
    bad["num_hidden_layers"] = 4096; bad["hidden_size"] = 65536; bad["intermediate_size"] = 1 << 20;
    expect_error([&] { ModelConfig::from_json(bad, "config.json"); }, "implausibly large", "config huge");
    // trainer_state.json: a malformed counter is an Error (std::stoull threw something no main catches)
    TrainerState ts;
    long adam_t = 0;
    Json settings;
    auto state = [&](const char* text) { parse_trainer_state(Json::parse(text, "s"), 1, "trainer_state.json", ts, &adam_t, &settings); };
    state(R"({"step": 3, "tokens": 96, "adam_t": 3, "sample_rng_counter": "7", "data": {"rows_drawn": 6, "epoch": [0], "pos": [6]}})");
    CHECK(ts.step == 3 && ts.sample_counter == 7 && ts.data.pos[0] == 6);
    expect_error([&] { state(R"({"step": 3, "tokens": 96, "adam_t": 3, "sample_rng_counter": "7x", "data": {"rows_drawn": 6, "epoch": [0], "pos": [6]}})"); },
                 "sample_rng_counter: expected an unsigned decimal integer", "trainer_state counter");
    expect_error([&] { state(R"({"step": 3, "tokens": 96, "adam_t": 3, "data": {"rows_drawn": 6, "epoch": [-1], "pos": [6]}})"); },
                 "should hold non-negative integers", "trainer_state negative epoch");
}

// ---------------------------------------------------------------------------
// 5. The trainer binary: bad inputs refused without output; save + resume bit-identical

static void test_cli_errors() {
    std::string data = g_tmp + "/cli_data";
    write_synthetic_shards(data, 64, {"aa", "bb"}, 4000, 400);
    std::string out;
    int rc = run_cmd(g_bin + " --help", &out);
    CHECK_MSG(rc == 0 && out.find("--resume") != std::string::npos && out.find("--aux-loss") != std::string::npos &&
                  out.find("--shared-experts") != std::string::npos && out.find("--shared-gate") != std::string::npos,
              "--help: rc %d", rc);
    struct Case { std::string args, needle; };
    std::string bad_model = copy_model(fixture_dir("moe_topk_softmax"), g_tmp + "/cli_bad_model");
    {
        std::vector<uint8_t> b = read_file(bad_model + "/model.safetensors");
        b.resize(b.size() - 10);
        overwrite(bad_model + "/model.safetensors", b);
    }
    std::string bad_data = g_tmp + "/cli_bad_data";
    write_synthetic_shards(bad_data, 100, {"aa"}, 4000, 400);  // ids up to 99 with a 64-token model
    std::vector<Case> cases = {
        {"--data " + g_tmp + "/missing --model tiny --vocab 64", "data directory does not exist"},
        {"--data " + data + " --init " + bad_model, "run past the end"},
        {"--data " + data + " --init " + g_tmp + "/no_model", "does not exist"},
        {"--data " + bad_data + " --model tiny --vocab 64", ">= vocab size 64"},
        {"--data " + data + " --model huge --vocab 64", "neither a preset"},
        {"--data " + data + " --model tiny --vocab 64 --aux-loss foo", "--aux-loss must be"},
        {"--data " + data + " --model tiny --vocab 64 --aux-loss switch+foo", "--aux-loss must be"},
        {"--data " + data + " --model tiny --vocab 64 --aux-loss switch+seq", "at most one of switch"},
        {"--data " + data + " --model tiny --vocab 64 --aux-loss dpsl+dpsl", "names dpsl twice"},
        {"--data " + data + " --model tiny --vocab 64 --aux-loss dpsl --dpsl-alpha 1,x", "--dpsl-alpha must be positive"},
        {"--data " + data + " --model tiny --vocab 64 --aux-loss dpsl --dpsl-alpha 0", "--dpsl-alpha must be positive"},
        {"--data " + data + " --model tiny --vocab 64 --experts 4 --aux-loss dpsl --dpsl-alpha 1,2",
         "one value or one per expert (4), found 2"},
        {"--data " + data + " --model tiny --vocab 64 --aux-loss dpsl --dpsl-distance l3", "--dpsl-distance must be"},
        {"--data " + data + " --model tiny --vocab 64 --aux-loss dpsl --dpsl-ecdf left", "--dpsl-ecdf must be"},
        {"--data " + data + " --model tiny --vocab 64 --experts 4 --topk 5", "num_experts_per_tok"},
        {"--data " + data + " --model tiny --vocab 64 --shared-experts 1", "--shared-experts 1 needs routed experts"},
        {"--data " + data + " --model tiny --vocab 64 --experts 4 --shared-experts 1 --shared-gate tanh",
         "--shared-gate must be sigmoid or none, found \"tanh\""},
        {"--data " + data + " --model tiny --vocab 64 --experts 4 --shared-gate none", "applies only with --shared-experts"},
        {"--data " + data + " --model tiny --vocab 64 --batch x", "expects an integer"},
        {"--data " + data + " --model tiny --vocab 64 --bogus 1", "unknown option --bogus"},
        {"--data " + data + " --model tiny --vocab 64 --mix zz=1", "no domain \"zz\""},
        {"--data " + data + " --resume " + g_tmp + "/no_run", "does not exist"},
        // strict numbers: NaN/Inf, overflow of the option's type, out of the allowed range
        {"--data " + data + " --model tiny --vocab 64 --lr nan", "--lr nan is not a finite number"},
        {"--data " + data + " --model tiny --vocab 64 --lr 1e999", "not a finite number"},
        {"--data " + data + " --model tiny --vocab 64 --batch 4294967297", "--batch 4294967297 is out of range"},
        {"--data " + data + " --model tiny --vocab 64 --beta1 1.5", "allowed 0 <= x < 1"},
        {"--data " + data + " --model tiny --vocab 64 --grad-clip -1", "allowed x >= 0"},
        {"--data " + data + " --model tiny --vocab 64 --threads -3", "out of range"},
        {"--data " + data + " --model tiny --vocab 64 --mix aa=nan", "not a finite number"},
        {"--data " + data + " --model tiny --vocab 64 --lr 5x", "expects a number"},
        // memory: refused before anything is allocated, with the numbers
        {"--data " + data + " --model tiny --vocab 64 --batch 1048576 --seq 1048576", "needs more memory than"},
    };
    for (auto& c : cases) {
        std::string outdir = g_tmp + "/cli_out_should_not_exist";
        remove_tree(outdir);
        rc = run_cmd(g_bin + " " + c.args + " --steps 2 --out " + outdir, &out);
        CHECK_MSG(rc != 0 && is_one_error_line(out, c.needle),
                  "args '%s': rc %d, expected one 'error:' line containing '%s', got: %s", c.args.c_str(), rc,
                  c.needle.c_str(), out.c_str());
        CHECK_MSG(!path_exists(outdir), "args '%s' left an output directory behind", c.args.c_str());
    }
    // an output directory that cannot be written: below a regular file
    std::string blocker = g_tmp + "/a_file";
    write_text_atomic(blocker, "x");
    rc = run_cmd(g_bin + " --data " + data + " --model tiny --vocab 64 --steps 1 --out " + blocker + "/run", &out);
    CHECK_MSG(rc != 0 && out.find("cannot be created") != std::string::npos, "unwritable --out: rc %d, %s", rc,
              out.c_str());
}

// Inputs a user can get wrong that must neither destroy data nor train garbage: non-empty or
// overlapping --out, NaN weights and absurd sizes in a checkpoint, a run that diverges.
static void test_refusals() {
    std::string data = g_tmp + "/ref_data", out;
    write_synthetic_shards(data, 64, {"aa", "bb"}, 4000, 400);
    const std::string base = g_bin + " --data " + data + " --model tiny --vocab 64 --steps 1 --batch 2 --seq 16 "
                             "--eval-batches 1 --sample-tokens 0";
    auto one_error = [&](const std::string& args, const std::string& needle) {
        int rc = run_cmd(base + " " + args, &out);
        CHECK_MSG(rc != 0 && is_one_error_line(out, needle),
                  "args '%s': rc %d, expected one 'error:' line containing '%s', got: %s", args.c_str(), rc,
                  needle.c_str(), out.c_str());
    };
    // a non-empty --out is kept as it is, unless --overwrite
    std::string keep = g_tmp + "/ref_keep";
    mkdir_p(keep);
    write_text_atomic(keep + "/notes.txt", "mine");
    one_error("--out " + keep, "already exists and is not empty");
    CHECK_MSG(read_text(keep + "/notes.txt") == "mine" && !path_exists(keep + "/metrics.jsonl"),
              "a refused --out was changed");
    int rc = run_cmd(base + " --out " + keep + " --overwrite", &out);
    CHECK_MSG(rc == 0 && read_text(keep + "/notes.txt") == "mine" && path_exists(keep + "/latest"),
              "--overwrite run: rc %d, %s", rc, out.c_str());
    // a finished run is continued with --resume, not started again over it
    one_error("--out " + keep, "holds an earlier run");
    // an existing file, the data folder, a folder inside it, a folder containing it
    write_text_atomic(g_tmp + "/ref_file", "x");
    one_error("--out " + g_tmp + "/ref_file", "exists and is not a directory");
    one_error("--out " + data, "is the input");
    one_error("--out " + data + "/run", "lies inside the input");
    one_error("--out " + g_tmp + " --overwrite", "contains the input");
    CHECK_MSG(read_text(g_tmp + "/ref_file") == "x" && path_exists(data + "/aa_train_000.bin"), "an input was changed");

    // a checkpoint with one NaN weight (the last float of the file) is refused by name
    std::string nan_model = copy_model(fixture_dir("moe_topk_softmax"), g_tmp + "/ref_nan_model");
    {
        std::vector<uint8_t> b = read_file(nan_model + "/model.safetensors");
        const float nan = NAN;
        memcpy(b.data() + b.size() - 4, &nan, 4);
        overwrite(nan_model + "/model.safetensors", b);
    }
    one_error("--init " + nan_model + " --out " + g_tmp + "/ref_o1", "non-finite value");
    // config.json sizes that do not fit their type are errors, not wrapped numbers
    std::string big_model = copy_model(fixture_dir("moe_topk_softmax"), g_tmp + "/ref_big_model");
    {
        std::string cfg = read_text(big_model + "/config.json");
        size_t at = cfg.find("\"hidden_size\": 32");
        CHECK(at != std::string::npos);
        if (at != std::string::npos) cfg.replace(at, strlen("\"hidden_size\": 32"), "\"hidden_size\": 4294967328");
        write_text_atomic(big_model + "/config.json", cfg);
    }
    one_error("--init " + big_model + " --out " + g_tmp + "/ref_o2", "hidden_size\" is 4294967328, outside");
    CHECK_MSG(!path_exists(g_tmp + "/ref_o1") && !path_exists(g_tmp + "/ref_o2"), "a refused run left an output behind");

    // divergence: stopped before the bad update, the last good checkpoint named and intact
    std::string div = g_tmp + "/ref_div";
    rc = run_cmd(base + " --steps 6 --save-every 1 --lr 1e30 --warmup 0 --lr-schedule constant --out " + div, &out);
    size_t e = out.find("error: ");
    CHECK_MSG(rc != 0 && e != std::string::npos && out.find("non-finite", e) != std::string::npos &&
                  out.find("Last good checkpoint: " + div + "/step_", e) != std::string::npos,
              "divergence: rc %d, %s", rc, out.c_str());
    if (rc != 0 && path_exists(div + "/latest")) {
        std::string last = read_text(div + "/latest");
        last.erase(last.find_last_not_of("\n") + 1);
        CHECK_MSG(out.find(div + "/" + last, e) != std::string::npos, "the error does not name %s", last.c_str());
        Model M;  // every tensor of the last checkpoint loads, and so is finite
        bool ok = true;
        try { M.load(div + "/" + last); } catch (const Error& err) { ok = false; printf("    %s\n", err.what()); }
        CHECK_MSG(ok, "the last checkpoint before the divergence does not load");
    }
}

// --keep-checkpoints: which step_* directories survive, the manifest, and a resumed run
// that goes on pruning only what the manifest lists
static void test_keep_checkpoints() {
    std::string data = g_tmp + "/keep_data", out;
    write_synthetic_shards(data, 64, {"aa"}, 4000, 400);
    const std::string base = g_bin + " --data " + data + " --model tiny --vocab 64 --experts 4 --topk 2 --batch 2 "
                             "--seq 16 --save-every 3 --eval-batches 1 --sample-tokens 0";
    auto dirs = [&](const std::string& d) {
        std::string s;
        for (auto& n : list_dir(d)) if (n.rfind("step_", 0) == 0) s += n.substr(5) + " ";
        return s;
    };
    struct Case { const char* keep; const char* expect; };
    for (Case c : {Case{"all", "000003 000006 000009 000012 "}, Case{"last", "000012 "},
                   Case{"log", "000001 000002 000004 000008 000012 "}}) {
        std::string d = g_tmp + "/keep_" + c.keep;
        int rc = run_cmd(base + " --steps 12 --keep-checkpoints " + c.keep + " --out " + d, &out);
        CHECK_MSG(rc == 0 && dirs(d) == c.expect, "--keep-checkpoints %s: rc %d, kept %s, expected %s", c.keep, rc,
                  dirs(d).c_str(), c.expect);
        CheckpointManifest m;
        m.load(d);
        std::string listed;
        for (auto& e : m.entries) listed += e.name.substr(5) + " ";
        CHECK_MSG(listed == c.expect, "--keep-checkpoints %s: manifest lists %s", c.keep, listed.c_str());
    }
    // log, interrupted at step 6 and resumed to 12: the same directories as one run, and a
    // checkpoint the manifest does not list (a user's copy) is never deleted
    std::string d = g_tmp + "/keep_resume";
    int rc = run_cmd(base + " --steps 12 --keep-checkpoints log --out " + d + " --steps 6", &out);
    mkdir_p(d + "/step_000005");
    write_text_atomic(d + "/step_000005/mine.txt", "x");
    rc |= run_cmd(base + " --steps 12 --keep-checkpoints log --resume " + d, &out);
    CHECK_MSG(rc == 0 && dirs(d) == "000001 000002 000004 000005 000008 000012 ",
              "log resumed: rc %d, kept %s", rc, dirs(d).c_str());
    CHECK_MSG(path_exists(d + "/step_000005/mine.txt"), "a directory the run did not write was deleted");
}

static std::vector<std::string> train_records(const std::string& metrics_path) {
    std::vector<std::string> lines;
    std::string text = read_text(metrics_path);
    size_t s = 0;
    while (s < text.size()) {
        size_t nl = text.find('\n', s);
        Json j = Json::parse(text.substr(s, nl - s), metrics_path);
        j.erase("tok_per_s");  // wall-clock, differs between runs
        lines.push_back(j.dump());
        s = nl + 1;
    }
    return lines;
}

static void test_save_resume() {
    std::string data = g_tmp + "/resume_data";
    write_synthetic_shards(data, 64, {"aa", "bb"}, 6000, 600);
    std::string a = g_tmp + "/run_a", b = g_tmp + "/run_b", out;
    remove_tree(a);
    remove_tree(b);
    std::string common = " --data " + data + " --model tiny --vocab 64 --experts 4 --topk 2 --aux-free-bias 1e-3" +
                         " --batch 2 --seq 16 --grad-accum 2 --steps 6 --eval-every 3 --eval-batches 2 " +
                         " --sample-tokens 8 --sample-every 3 --lr 3e-3 --warmup 2";
    int rc = run_cmd(g_bin + common + " --save-every 3 --out " + a, &out);
    CHECK_MSG(rc == 0, "run A failed: %s", out.c_str());
    if (rc) return;
    CHECK(path_exists(a + "/step_000003/optimizer.safetensors") && path_exists(a + "/step_000006/model.safetensors"));
    // run B: a copy of A's first half, resumed from its step-3 checkpoint
    mkdir_p(b);
    std::string cmd = "cp -r " + a + "/step_000003 " + b + "/ && head -n 4 " + a + "/metrics.jsonl > " + b + "/metrics.jsonl";
    CHECK(system(cmd.c_str()) == 0);
    rc = run_cmd(g_bin + common + " --resume " + b + "/step_000003", &out);
    CHECK_MSG(rc == 0, "resumed run failed: %s", out.c_str());
    if (rc) return;
    CHECK_MSG(train_records(a + "/metrics.jsonl") == train_records(b + "/metrics.jsonl"),
              "metrics of the resumed run differ from the uninterrupted run");
    CHECK_MSG(read_file(a + "/step_000006/model.safetensors") == read_file(b + "/step_000006/model.safetensors"),
              "final weights differ after resume");
    CHECK_MSG(read_file(a + "/step_000006/optimizer.safetensors") == read_file(b + "/step_000006/optimizer.safetensors"),
              "final optimizer state differs after resume");
    // the loss went down on this learnable data
    auto recs = train_records(a + "/metrics.jsonl");
    CHECK(recs.size() >= 8);
}


// common/world.h: the launchers' variables, and the NCCL id hand-out over a file and TCP
static void test_world() {
    auto from = [](std::vector<std::pair<std::string, std::string>> vars) {
        return world_from_env([&](const char* name) -> const char* {
            for (auto& kv : vars) if (kv.first == name) return kv.second.c_str();
            return nullptr;
        });
    };
    World w = from({});
    CHECK(w.rank == 0 && w.size == 1 && !w.multi() && w.launcher == "none");
    w = from({{"RANK", "5"}, {"WORLD_SIZE", "16"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "4"}});
    CHECK(w.rank == 5 && w.size == 16 && w.local_rank == 1 && w.local_size == 4 && w.launcher == "torchrun" && !w.one_node());
    // mpirun inside a Slurm allocation: Open MPI's variables win
    w = from({{"OMPI_COMM_WORLD_RANK", "3"}, {"OMPI_COMM_WORLD_SIZE", "8"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "3"},
              {"OMPI_COMM_WORLD_LOCAL_SIZE", "8"}, {"SLURM_PROCID", "0"}, {"SLURM_STEP_NUM_TASKS", "1"}});
    CHECK(w.rank == 3 && w.size == 8 && w.launcher == "openmpi" && w.one_node());
    w = from({{"SLURM_PROCID", "6"}, {"SLURM_STEP_NUM_TASKS", "8"}, {"SLURM_LOCALID", "2"}, {"SLURM_STEP_TASKS_PER_NODE", "4(x2)"}});
    CHECK(w.rank == 6 && w.size == 8 && w.local_rank == 2 && w.local_size == 4 && w.launcher == "slurm");
    // a batch script is not a step: SLURM_NTASKS alone means one process
    w = from({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "8"}});
    CHECK(!w.multi());
    expect_error([&] { from({{"RANK", "x1"}, {"WORLD_SIZE", "2"}}); }, "environment variable RANK (set by torchrun)",
                 "RANK not a number");
    expect_error([&] { from({{"RANK", "2"}, {"WORLD_SIZE", "2"}}); }, "RANK", "RANK >= WORLD_SIZE");
    expect_error([&] { from({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "3"}, {"LOCAL_WORLD_SIZE", "2"}}); },
                 "LOCAL_RANK", "LOCAL_RANK >= LOCAL_WORLD_SIZE");
    expect_error([] { parse_nccl_init("udp"); }, "--nccl-init must be tcp, file or mpi", "--nccl-init udp");

    // the id over a file, then over TCP (rank 1 in a child process)
    World r0, r1;
    r0.size = r1.size = 2;
    r1.rank = r1.local_rank = 1;
    r0.local_size = r1.local_size = 2;
    uint8_t id[128], got[128];
    for (int i = 0; i < 128; i++) id[i] = (uint8_t)(i * 7 + 3);
    const std::string file = g_tmp + "/nccl_id";
    share_unique_id(r0, NCCL_INIT_FILE, file, id, sizeof(id), 5, now_seconds());
    memset(got, 0, sizeof(got));
    share_unique_id(r1, NCCL_INIT_FILE, file, got, sizeof(got), 5, now_seconds());
    CHECK(memcmp(id, got, sizeof(id)) == 0);
    remove_unique_id_file(r0, NCCL_INIT_FILE, file);
    CHECK(!path_exists(unique_id_file(file)));
    expect_error([&] { share_unique_id(r1, NCCL_INIT_FILE, file, got, sizeof(got), 0.3, now_seconds()); },
                 "waited 0 s (--nccl-timeout) for the NCCL id file", "id file never written");
    setenv("MASTER_PORT", std::to_string(20000 + getpid() % 20000).c_str(), 1);
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {  // rank 1: fetch the id, exit 0 iff it is right
        uint8_t mine[128] = {0};
        try {
            share_unique_id(r1, NCCL_INIT_TCP, "", mine, sizeof(mine), 10, now_seconds());
        } catch (...) { _exit(2); }
        _exit(memcmp(mine, id, sizeof(id)) == 0 ? 0 : 1);
    }
    share_unique_id(r0, NCCL_INIT_TCP, "", id, sizeof(id), 10, now_seconds());
    int status = 0;
    waitpid(child, &status, 0);
    CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 0, "TCP hand-out: rank 1 exit status %d", WEXITSTATUS(status));
    expect_error([&] { share_unique_id(r0, NCCL_INIT_TCP, "", id, sizeof(id), 0.3, now_seconds()); },
                 "missing rank(s) 1", "TCP: rank 1 never connects");
    unsetenv("MASTER_PORT");

    // resuming on another number of ranks: the global batch must stay
    TrainArgs saved_args;
    saved_args.batch = 1;
    saved_args.world = 4;
    Json saved = saved_args.settings();
    TrainArgs now_args;
    now_args.batch = 2;
    now_args.world = 2;
    now_args.check_resume_settings(saved, "ck");  // 2 x 2 = 4 x 1
    now_args.batch = 1;
    expect_error([&] { now_args.check_resume_settings(saved, "ck"); }, "use --batch 2 with 2 rank(s)", "global batch changed");
}


// Decoding with a KV cache gives the logits of a full forward pass over the whole context:
// three sequences of different lengths, each prefilled alone into its cache row, then
// decoded together token by token (dense, MoE, MoE with a gated shared expert, MoE with Grove
// adjugate experts; GQA)
static void test_kv_cache() {
    for (int moe = 0; moe < 4; moe++) {
        ModelConfig c;
        model_preset("tiny", &c);
        c.vocab_size = 97;
        c.n_kv_head = 2;
        if (moe) { c.n_experts = 4; c.top_k = 2; }
        if (moe == 2) c.shared_dim = 2 * c.ffn_dim;
        if (moe == 3) { c.grove_groups = 2; c.grove_dim = 32; c.grove_scale = 0.5f; }  // Grove adjugates
        Model M;
        M.init_scratch(c, 11);
        const int nb = 3, prompt[nb] = {5, 9, 1}, gen = 4;
        std::vector<std::vector<int>> seq(nb);
        RngStream r(3, 9);
        for (int b = 0; b < nb; b++)
            for (int i = 0; i < prompt[b] + gen; i++) seq[b].push_back((int)r.below(c.vocab_size));
        auto full_row = [&](int b, int len) {  // logits of the last position of seq[b][0..len)
            M.forward(seq[b].data(), nullptr, 1, len);
            const real* z = M.logits_row(len - 1);
            return std::vector<real>(z, z + c.vocab_size);
        };
        KVCache kv;
        kv.init(c, nb, 16);
        double worst = 0;
        auto cmp = [&](const real* z, const std::vector<real>& want) {
            for (int v = 0; v < c.vocab_size; v++) worst = std::max(worst, (double)std::fabs(z[v] - want[v]));
        };
        for (int b = 0; b < nb; b++) {  // prefill: every prompt position
            int zero = 0;
            const real* z = M.forward_cached(kv, seq[b].data(), &zero, b, 1, prompt[b]);
            std::vector<real> got(z, z + (size_t)prompt[b] * c.vocab_size);
            for (int t = 1; t <= prompt[b]; t++) cmp(got.data() + (size_t)(t - 1) * c.vocab_size, full_row(b, t));
        }
        for (int s = 0; s < gen; s++) {  // decode: one token of every sequence per call
            std::vector<int> tok(nb), pos(nb);
            for (int b = 0; b < nb; b++) { pos[b] = prompt[b] + s; tok[b] = seq[b][pos[b]]; }
            const real* z = M.forward_cached(kv, tok.data(), pos.data(), 0, nb, 1);
            std::vector<real> got(z, z + (size_t)nb * c.vocab_size);
            for (int b = 0; b < nb; b++) cmp(got.data() + (size_t)b * c.vocab_size, full_row(b, pos[b] + 1));
        }
        CHECK_MSG(worst == 0, "%s: cached decoding vs full forward: largest logit difference %g (want bit-identical)",
                  moe == 3 ? "MoE + Grove adjugates" : moe == 2 ? "MoE + shared expert" : moe ? "MoE" : "dense", worst);
        int bad_pos = 14;
        expect_error([&] { M.forward_cached(kv, seq[0].data(), &bad_pos, 0, 1, 3); }, "beyond the KV cache's 16",
                     "decoding past the cache");
    }
}

int main(int argc, char** argv) {
    if (argc > 1) g_bin = argv[1];
    g_tmp = strfmt("/tmp/moe_test_cpu.%d", (int)getpid());
    mkdir_p(g_tmp);
    run_test("exp_real = the correctly rounded e^x", test_exp_real);
    for (const char* f : {"dense", "dense_tied_gqa", "moe_topk_softmax", "moe_softmax_topk", "moe_pooled",
                          "moe_seq_gqa", "moe_empty_expert", "moe_e8_k1", "moe_dpsl", "moe_shared",
                          "moe_shared_ungated", "moe_grove", "moe_xft", "moe_nexus"})
        run_test(std::string("fixture ") + f, [&] { test_fixture(f); });
    run_test("Nexus router: Emb and R not trained, R = Emb P, round trip", test_nexus_router);
    run_test("thread count: bit-identical", test_thread_count_bit_identical);
    run_test("MoE of copies = dense", test_moe_copies_equal_dense);
    run_test("HF transformers Llama directory", [] { test_hf_directory("hf_llama"); });
    run_test("HF transformers Mixtral directory", [] { test_hf_directory("hf_mixtral"); });
    run_test("HF transformers Qwen2-MoE directory", [] { test_hf_directory("hf_qwen2_moe"); });
    run_test("Qwen2-MoE directories: round trip, biases, keys", test_qwen2_moe_round_trip);
    run_test("Grove MoE directories: round trip, keys, active parameters", test_grove_round_trip);
    run_test("aux-free bias", test_aux_free_bias);
    run_test("dpsl: Beta CDF and density", test_beta_cdf);
    run_test("dpsl: zero at the prior's quantiles", test_dpsl_invariant);
    run_test("dpsl: statistics of rows drawn from the prior", test_dpsl_statistics);
    run_test("LR schedules", test_schedules);
    run_test("JSON and safetensors round trips", test_json_and_safetensors);
    run_test("data loader", test_dataloader);
    run_test("bad model files", test_bad_model_files);
    run_test("bad token shards", test_bad_shards);
    run_test("untrusted sizes refused", test_untrusted_sizes);
    run_test("trainer CLI errors", test_cli_errors);
    run_test("refusals: outputs, NaN weights, sizes, divergence", test_refusals);
    run_test("--keep-checkpoints all, last, log", test_keep_checkpoints);
    run_test("save + resume bit-identical", test_save_resume);
    run_test("data parallel: launchers' variables, NCCL id hand-out", test_world);
    run_test("KV cache: cached decoding = full forward", test_kv_cache);
    remove_tree(g_tmp);
    return report();
}
