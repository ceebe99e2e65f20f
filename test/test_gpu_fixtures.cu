/*
test_gpu_fixtures.cu: the GPU trainer (train_moe.cu's GPUModel) against the PyTorch float64
reference fixtures, as test/test_cpu.cpp holds the CPU trainer to them. Runs on a GPU, or on
the CPU through the CUDA emulation (docs/emulation.md; `make test` does that).

  test_gpu_fixtures [--dtype fp32|bf16|both] [--plant BUG] FIXTURE_DIR...

Every check prints one line, PASS or FAIL, with its measured error and the ratio of that
error to its tolerance (the ratio must be <= 1); the run ends with "N passed, M failed".

What is checked, and why the bf16 checks look the way they do (docs/perf.md has the table):
1. Step 0, forward and backward at the fixture's weights. The bf16 working copy is rounded
   to nearest here (the trainer rounds it stochastically), so the check sees the smallest
   honest error of bf16 storage. Errors are measured in the unit roundoff of bf16,
   u = 2^-8: every stored activation carries a relative error <= u/2, a few dozen roundings
   stand between the weights and the logits, and independent errors add in quadrature, so
   tensors land within a few u in relative L2 (element maxima are not a useful bf16 measure:
   a sum of many rounded terms can cancel to a small number with a large relative error).
   - logits, gradients (each parameter tensor): fp32: worst element error relative to the
     tensor's largest value, 1e-5; bf16: relative L2 error per tensor.
   - routing: the router logits within an absolute bound eps; the top-K choice is compared
     as a SET per token (the order of the K experts means nothing), and the top-K weights are
     matched by expert. A choice can only flip where the reference's top-K margin (K-th minus
     (K+1)-th logit) is below 2 eps, so the fixture must have every margin above 2 eps: if it
     does not, that is reported as a failure of the fixture (regenerate with a larger
     margin), never silently skipped.
2. Ten AdamW steps on the fixture's batch. fp32: the reference's loss and gradient-norm
   curve, tightly (the fp32 trainer follows the float64 curve to 2e-5). bf16: comparing a
   bf16 trajectory with the float64 one after a few steps measures the chaos of training on
   one batch at a high learning rate (a correct implementation ends 5-20% away), not
   correctness. So every bf16 step is checked locally instead, which no chaos can disturb:
   - the bf16 loss and gradients against the fp32 GPU model (a shadow, checked tightly by
     part 1 and 2 in fp32) run on the SAME master weights;
   - the optimizer update: the new master weights and both moments against AdamW computed
     on the host in double from the GPU's own gradient, moments and weights;
   - the bf16 working copy: every element one of the two bf16 neighbours of its new master
     weight (stochastic rounding may pick either, nothing else);
   - the trajectory as a whole still trains: the final loss has made at least half of the
     reference's decrease.
   Steps where the shadow's routing has a near-tie (margin < 2 eps) skip the loss and
   gradient comparison (the optimizer and copy checks still run); step 0 never does.

--plant BUG runs with a deliberate bug, to show that the checks can fail (test/test_gpu.sh
expects each to be caught): router_swap (two router rows of layer 0 exchanged), no_router_loss_grad
(the aux-, z- and dpsl gradients dropped), lr (the optimizer uses 1.1 x the learning rate),
stale_copy (the bf16 working copy not refreshed after a step).
*/
#define TRAIN_MOE_NO_MAIN
#include "../train_moe.cu"
#include "fixture.h"
#include "testing.h"

// bf16's unit roundoff: 8 significant bits
static constexpr double U_BF16 = 1.0 / 256;

struct Tolerances {
    double logits;         // fp32: max-normalized element error; bf16: relative L2
    double router_logits;  // absolute, as a fraction of max |reference logit|
    double loss_rel;       // loss, ce, aux, z: relative
    double grad;           // fp32: max-normalized element error; bf16: relative L2 per tensor
    double grad_steps;     // bf16 AdamW steps vs the fp32 shadow: relative L2 per tensor
    double adam_loss_rel;  // fp32: the 10-step reference curve
    double grad_norm_rel;  // fp32: the 10-step reference curve
};
// bf16 bounds in units of u (docs/perf.md has the derivation and the measured worst values)
static Tolerances tolerances(bool fp32) {
    // fp32's 10-step curve: the fixtures fit one batch at a high learning rate, which
    // amplifies fp32 rounding about a hundredfold by the last steps (docs/perf.md)
    if (fp32) return {1e-5, 1e-5, 1e-5, 1e-5, 0, 1e-4, 1e-3};
    // gradients: the logits' error (a few u, through exp into p - y) reaches every gradient,
    // the backward adds its own roundings, and an expert's gradient sums over a handful of
    // tokens, which averages nothing: measured up to 16u. Late in the AdamW curve the fitted
    // batch's p - y is a difference of nearly equal numbers: more again (docs/perf.md)
    return {8 * U_BF16, 6 * U_BF16, 2 * U_BF16, 24 * U_BF16, 32 * U_BF16, 0, 0};
}

enum class Plant { NONE, ROUTER_SWAP, NO_ROUTER_LOSS_GRAD, LR, STALE_COPY };
static Plant parse_plant(const std::string& s) {
    if (s.empty() || s == "none") return Plant::NONE;
    if (s == "router_swap") return Plant::ROUTER_SWAP;
    if (s == "no_router_loss_grad") return Plant::NO_ROUTER_LOSS_GRAD;
    if (s == "lr") return Plant::LR;
    if (s == "stale_copy") return Plant::STALE_COPY;
    FAIL("--plant must be none, router_swap, no_router_loss_grad, lr or stale_copy, found \"%s\"", s.c_str());
}

// one PASS/FAIL line; ratio = error / tolerance
static void report_check(const std::string& tag, const std::string& what, double ratio, const std::string& detail) {
    bool ok = ratio <= 1;  // NaN fails
    (ok ? g_pass : g_fail)++;
    printf("%s %s %s: %s, ratio %.3g\n", ok ? "PASS" : "FAIL", tag.c_str(), what.c_str(), detail.c_str(), ratio);
    fflush(stdout);
}


// Routing of one layer against a reference (logits z_ref [N, E], choices idx_ref [N, K],
// weights w_ref [N, K]); returns the number of tokens whose choice differs where the
// reference margin is below 2 eps (near-ties), after checking every other token.
// xft routing (METHODS 1.8) also depends on which expert is chosen FIRST (its probability q_1
// sets the shared weight 1 - q_1 and scales the routed ones): the function is continuous
// where ranks 1 and 2 swap, its gradient is not. So there the first choice is compared too,
// and the margin includes the gap between the two largest logits.
static int check_routing(const std::string& tag, int layer, int N, int E, int K, const std::vector<float>& z,
                         const std::vector<double>& z_ref, const std::vector<int>& idx, const std::vector<int>& idx_ref,
                         const std::vector<float>& w, const std::vector<double>& w_ref, const Tolerances& tol,
                         bool require_margin, bool first_matters) {
    const double eps = tol.router_logits * max_abs(z_ref);
    double err = 0;
    for (size_t i = 0; i < z.size(); i++) err = std::max(err, std::fabs((double)z[i] - z_ref[i]) + (std::isnan(z[i]) ? INFINITY : 0));
    report_check(tag, strfmt("router_logits.%d", layer), err / eps, strfmt("max |err| %.3g (tol %.3g)", err, eps));
    double min_margin = INFINITY;
    int differ = 0, near_tie = 0;
    double werr = 0;
    for (int n = 0; n < N; n++) {
        double m = topk_margin(&z_ref[(size_t)n * E], E, K);
        if (first_matters && K > 1) m = std::min(m, topk_margin(&z_ref[(size_t)n * E], E, 1));
        min_margin = std::min(min_margin, m);
        std::vector<int> a(&idx[(size_t)n * K], &idx[(size_t)n * K] + K), b(&idx_ref[(size_t)n * K], &idx_ref[(size_t)n * K] + K);
        std::sort(a.begin(), a.end());
        std::sort(b.begin(), b.end());
        if (a != b || (first_matters && idx[(size_t)n * K] != idx_ref[(size_t)n * K])) {
            if (m > 2 * eps) differ++;
            else near_tie++;
            continue;
        }
        for (int k = 0; k < K; k++)  // weights matched by expert
            for (int j = 0; j < K; j++)
                if (idx[(size_t)n * K + j] == idx_ref[(size_t)n * K + k])
                    werr = std::max(werr, std::fabs((double)w[(size_t)n * K + j] - w_ref[(size_t)n * K + k]) +
                                              (std::isnan(w[(size_t)n * K + j]) ? INFINITY : 0));
    }
    if (require_margin)
        report_check(tag, strfmt("fixture routing margin.%d", layer), min_margin > 0 ? 2 * eps / min_margin : INFINITY,
                     strfmt("smallest top-K margin %.3g must exceed 2 eps = %.3g (else regenerate the fixture)",
                            min_margin, 2 * eps));
    report_check(tag, strfmt("topk_set.%d", layer), differ + (require_margin ? near_tie : 0) ? INFINITY : 0,
                 strfmt("%d of %d tokens choose other experts (%d at near-ties)", differ + near_tie, N, near_tie));
    // a gate weight is a softmax of logits each within eps: |dw| <= w (1 - w) 2 eps <= eps / 2
    report_check(tag, strfmt("topk_weight.%d", layer), werr / (0.5 * eps),
                 strfmt("max |err| %.3g (tol eps/2 = %.3g), matched by expert", werr, 0.5 * eps));
    return near_tie;
}

// Gradients of every parameter tensor: returns the worst ratio and prints the tensors out of tolerance
static double grad_ratio(const std::string& tag, const ParamLayout& lay, const std::vector<float>& g,
                         const double* ref64, const float* ref32, bool fp32, double tol, int* bad,
                         std::string* worst_name) {
    double worst = 0;
    *bad = 0;
    for (auto& t : lay.tensors) {
        double r;
        std::vector<double> ref(t.numel);
        for (size_t i = 0; i < t.numel; i++) ref[i] = ref64 ? ref64[t.offset + i] : ref32[t.offset + i];
        if (fp32) r = worst_ratio(g.data() + t.offset, ref.data(), t.numel, tol * max_abs(ref) + 1e-12, tol);
        else r = rel_l2(g.data() + t.offset, ref.data(), t.numel) / tol;
        if (!(r <= 1)) {
            (*bad)++;
            printf("    %s grad.%s: ratio %.3g\n", tag.c_str(), t.name.c_str(), r);
        }
        if (!(r <= worst)) { worst = r; *worst_name = t.name; }
    }
    return worst;
}

template <typename T>
static void setup_model(GPUModel<T>& M, const Fixture& fx, bool stochastic_round, const std::vector<float>& params) {
    M.router_loss = fx.router_settings;
    M.stochastic_round = stochastic_round;
    M.seed = 1234;
    M.setup(fx.cfg, params, {});
    M.alloc(fx.B, fx.T);
}

// 1. step 0: logits, loss terms, routing, every gradient
template <typename T>
static void check_step0(const Fixture& fx, Plant plant) {
    const bool fp32 = GPUModel<T>::is_fp32();
    const Tolerances tol = tolerances(fp32);
    const std::string tag = fx.name + (fp32 ? " [fp32]" : " [bf16]");
    const int B = fx.B, T_ = fx.T, N = fx.N, V = fx.cfg.vocab_size;
    std::vector<float> params = fx.params;
    if (plant == Plant::ROUTER_SWAP && fx.cfg.is_moe()) {  // exchange router rows 0 and 1 of layer 0
        const ParamTensor& r = fx.layout.get(0, P_ROUTER);
        for (int i = 0; i < fx.cfg.d_model; i++) std::swap(params[r.offset + i], params[r.offset + fx.cfg.d_model + i]);
    }
    GPUModel<T> M;
    setup_model(M, fx, false, params);  // round to nearest: the smallest honest bf16 error

    Losses l = M.forward(fx.inputs.data(), fx.targets.data(), B, T_, 0.0f);
    std::vector<float> logits = download_floats(M.logits, (size_t)N * V, M.stream);
    std::vector<double> ref_logits = fx.tensor("logits", {B, T_, V});
    double w = fp32 ? worst_ratio(logits.data(), ref_logits.data(), logits.size(), tol.logits * max_abs(ref_logits), tol.logits)
                    : rel_l2(logits.data(), ref_logits.data(), logits.size()) / tol.logits;
    report_check(tag, "logits", w, fp32 ? strfmt("max-normalized error (tol %g)", tol.logits)
                                        : strfmt("relative L2 %.3g (tol %.3g)", w * tol.logits, tol.logits));
    std::vector<std::pair<const char*, double>> terms = {{"loss", l.loss}, {"ce", l.ce}, {"aux", l.aux}, {"z", l.z}};
    if (fx.router_settings.dpsl.on) terms.push_back({"dpsl", l.dpsl});  // kernels/dpsl.cuh
    for (auto kv : terms) {
        double ref = fx.scalar(kv.first), err = std::fabs(kv.second - ref);
        double bound = tol.loss_rel * std::fabs(ref) + 1e-7;
        report_check(tag, kv.first, err / bound, strfmt("got %.9g, reference %.9g", kv.second, ref));
    }
    if (fx.cfg.is_moe()) {
        const int E = fx.cfg.n_experts, K = fx.cfg.top_k;
        for (int layer = 0; layer < fx.cfg.n_layer; layer++) {
            auto& a = M.acts[layer];
            std::vector<int> idx((size_t)N * K);
            download(idx.data(), a.topk, idx.size(), M.stream);
            check_routing(tag, layer, N, E, K, download_floats(a.rlogits, (size_t)N * E, M.stream),
                          fx.tensor(strfmt("router_logits.%d", layer), {N, E}), idx,
                          fx.ints(strfmt("topk_idx.%d", layer), {N, K}), download_floats(a.topw, (size_t)N * K, M.stream),
                          fx.tensor(strfmt("topk_weight.%d", layer), {N, K}), tol, /*require_margin=*/true,
                          fx.cfg.routing == ROUTING_XFT);
            auto cnt = fx.ints(strfmt("expert_counts.%d", layer), {E});
            int cdiff = 0;
            for (int e = 0; e < E; e++) cdiff += cnt[e] != M.expert_counts(layer)[e];
            report_check(tag, strfmt("expert_counts.%d", layer), cdiff ? INFINITY : 0,
                         strfmt("%d of %d experts differ", cdiff, E));
        }
    }
    M.forward(fx.inputs.data(), fx.targets.data(), B, T_, 1.0f);
    if (plant == Plant::NO_ROUTER_LOSS_GRAD)  // the forward counted them; backward forgets
        M.router_loss.aux_coef = M.router_loss.z_coef = M.router_loss.dpsl.coef = 0;
    M.zero_grad();
    M.backward();
    std::vector<float> g(M.layout.total);
    download(g.data(), M.grads, M.layout.total, M.stream);
    std::vector<double> ref((size_t)M.layout.total);
    for (auto& t : M.layout.tensors) {
        auto r = fx.tensor("grad." + t.name, t.shape);
        std::copy(r.begin(), r.end(), ref.begin() + t.offset);
    }
    int bad = 0;
    std::string worst_name;
    double wg = grad_ratio(tag, M.layout, g, ref.data(), nullptr, fp32, tol.grad, &bad, &worst_name);
    report_check(tag, "gradients", wg, strfmt("%d of %zu tensors out of tolerance, worst %s (%s, tol %.3g)", bad,
                                              M.layout.tensors.size(), worst_name.c_str(),
                                              fp32 ? "max-normalized" : "relative L2", tol.grad));
}

// 3. decoding with a KV cache: sequence 0 prefilled to half its length, then one token at a
// time; every position's logits against the reference's (the same tolerance as step 0's
// logits) and against this model's full forward pass
template <typename T>
static void check_kv_cache(const Fixture& fx) {
    const bool fp32 = GPUModel<T>::is_fp32();
    const Tolerances tol = tolerances(fp32);
    const std::string tag = fx.name + (fp32 ? " [fp32]" : " [bf16]");
    const int T_ = fx.T, V = fx.cfg.vocab_size;
    GPUModel<T> M;
    setup_model(M, fx, false, fx.params);
    M.forward(fx.inputs.data(), nullptr, 1, T_);
    std::vector<float> full = download_floats(M.logits, (size_t)T_ * V, M.stream);
    typename GPUModel<T>::Cache cache;
    cache.init(fx.cfg, 1, T_);
    std::vector<float> got((size_t)T_ * V);
    const int half = std::max(1, T_ / 2);
    int zero = 0;
    const float* z = M.forward_cached(cache, fx.inputs.data(), &zero, 0, 1, half);
    std::copy(z, z + (size_t)half * V, got.begin());
    for (int t = half; t < T_; t++) {
        z = M.forward_cached(cache, fx.inputs.data() + t, &t, 0, 1, 1);
        std::copy(z, z + V, got.begin() + (size_t)t * V);
    }
    std::vector<double> ref_all = fx.tensor("logits", {fx.B, T_, V}), ref(ref_all.begin(), ref_all.begin() + (size_t)T_ * V);
    double w = fp32 ? worst_ratio(got.data(), ref.data(), got.size(), tol.logits * max_abs(ref), tol.logits)
                    : rel_l2(got.data(), ref.data(), got.size()) / tol.logits;
    report_check(tag, "KV-cache decoding logits vs reference", w,
                 strfmt("prefill %d, then %d tokens one by one", half, T_ - half));
    std::vector<double> full_d(full.begin(), full.end());
    double wf = fp32 ? worst_ratio(got.data(), full_d.data(), got.size(), tol.logits * max_abs(full_d), tol.logits)
                     : rel_l2(got.data(), full_d.data(), got.size()) / tol.logits;
    report_check(tag, "KV-cache decoding logits vs the full forward", wf, "same model, whole sequence at once");
}

// 4. The training step as run_training runs it: forward_backward per micro-batch (no host
// wait; zeros returned), the losses after step() (step_losses). Against forward() +
// backward(), which wait for each forward's losses: the same losses, norm and weights, bit
// for bit. Then the same steps with CUDA graphs on (train_moe.cu "CUDA graphs"; bf16 and
// dense models: the fp32 MoE path is never graphed): three steps, the learning rate
// different in each (a graph that kept a captured value would replay the first), the same
// bits again. And the host waits of the second step, counted by the emulation (on a GPU the
// count is not available and this part is skipped): bf16, one (the step's end); fp32 MoE,
// one more per MoE layer and micro-batch (the per-expert cuBLAS loop's counts); with graphs,
// the host's stream calls of a step (kernel and cuBLAS launches, copies; a graph launch is one).
template <typename T>
static void check_step_path(const Fixture& fx) {
    const bool fp32 = GPUModel<T>::is_fp32();
    const std::string tag = fx.name + (fp32 ? " [fp32]" : " [bf16]");
    GPUModel<T> A, R, G;  // A: the training loop's path; R: the waiting path; G: A with CUDA graphs
    setup_model(A, fx, !fp32, fx.params);
    setup_model(R, fx, !fp32, fx.params);
    G.cuda_graphs = true;
    setup_model(G, fx, !fp32, fx.params);
    const int n_micro = 2, n_steps = 3;
    const int half = std::max(1, fx.B / 2);  // two micro-batches of the fixture's rows (B 1: the same row twice)
    const size_t step_rows = fx.B >= 2 ? (size_t)half * fx.T : 0;
    [[maybe_unused]] long waits = -1, calls_eager = -1, calls_graphed = -1, graph_launches = -1;
    double diff = 0, diff_g = 0;
    auto d = [](double a, double b) { return a == b ? 0.0 : INFINITY; };
    for (int s = 0; s < n_steps; s++) {
        const double lr = fx.lr * (1.0 + 0.5 * s);
        // the micro-batches' rows change from step to step (odd steps: the halves swapped),
        // so that a graph keeping something of its capture's batch would show
        auto rows = [&](int mb) { return ((mb + s) % n_micro) * step_rows; };
        auto train_step = [&](GPUModel<T>& M) {
            M.zero_grad();
            for (int mb = 0; mb < n_micro; mb++)
                M.forward_backward(fx.inputs.data() + rows(mb), fx.targets.data() + rows(mb), half, fx.T, n_micro);
            return M.step(fx.adamw, lr);
        };
#ifdef CUDA_EMU
        const long w0 = emu::host_waits(), c0 = emu::stream_calls();
#endif
        const double na = train_step(A);
#ifdef CUDA_EMU
        waits = emu::host_waits() - w0;
        calls_eager = emu::stream_calls() - c0;
        const long c1 = emu::stream_calls(), g1 = emu::graph_launches();
#endif
        const double ng = train_step(G);
#ifdef CUDA_EMU
        calls_graphed = emu::stream_calls() - c1;
        graph_launches = emu::graph_launches() - g1;
#endif
        const Losses la = A.step_losses, lg = G.step_losses;
        diff_g = std::max({diff_g, d(la.loss, lg.loss), d(la.ce, lg.ce), d(la.aux, lg.aux), d(la.z, lg.z), d(na, ng)});
        R.zero_grad();
        Losses lr_;
        for (int mb = 0; mb < n_micro; mb++) {
            lr_.add_mean(R.forward(fx.inputs.data() + rows(mb), fx.targets.data() + rows(mb), half, fx.T,
                                   1.0f / n_micro), n_micro);
            R.backward(mb + 1 == n_micro);
        }
        const double nr = R.step(fx.adamw, lr);
        diff = std::max({diff, d(la.loss, lr_.loss), d(la.ce, lr_.ce), d(la.aux, lr_.aux), d(la.z, lr_.z), d(na, nr)});
    }
    const std::vector<float> pa = A.download_params(), pr = R.download_params(), pg = G.download_params();
    report_check(tag, "step path: losses and norm as forward() + backward()", diff,
                 strfmt("%d steps of %d micro-batches, bit for bit", n_steps, n_micro));
    report_check(tag, "step path: weights as forward() + backward()", pa == pr ? 0 : INFINITY, "bit for bit");
    const bool graphed = G.graphs_used();
    report_check(tag, graphed ? "CUDA graphs: losses, norm and weights as without" : "CUDA graphs: not used (fp32 MoE)",
                 std::max(diff_g, pa == pg ? 0.0 : INFINITY),
                 graphed ? strfmt("%d steps, learning rates %g, %g, %g: bit for bit", n_steps, fx.lr, fx.lr * 1.5,
                                  fx.lr * 2.0)
                         : std::string("the same path as without: bit for bit"));
#ifdef CUDA_EMU
    const long want = 1 + (fp32 && fx.cfg.is_moe() ? (long)n_micro * fx.cfg.n_layer : 0);
    report_check(tag, "host waits in a training step", waits == want ? 0 : INFINITY,
                 strfmt("%ld counted, %ld expected (the step's end%s)", waits, want,
                        want > 1 ? "; fp32: each MoE layer's counts" : ""));
    if (graphed)  // the stream calls left: the inputs' copies, the statistics' copies, the step's arguments
        report_check(tag, "CUDA graphs: a step is n_micro + 1 graph launches",
                     graph_launches == n_micro + 1 && calls_graphed < calls_eager ? 0 : INFINITY,
                     strfmt("%ld graph launches; host stream calls per step %ld with graphs, %ld without",
                            graph_launches, calls_graphed, calls_eager));
#endif
}

// bf16 neighbours: is the bf16 value c (bits) one of the two bf16 numbers around x?
static bool is_bf16_neighbour(uint16_t c, float x) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    uint32_t lo = bits & 0xFFFF0000u;  // toward zero
    if (lo == bits) return ((uint32_t)c << 16) == bits;
    uint32_t hi = lo + 0x10000u;       // away from zero (same sign)
    uint32_t cb = (uint32_t)c << 16;
    return cb == lo || cb == hi;
}

// 2. ten AdamW steps on the fixture's batch (see the top of the file). Both precisions: the
// update, the moments and the gradient norm of every step against the host in double. fp32:
// the loss and gradient-norm curve against the reference. bf16: each step's loss, routing and
// gradients against an fp32 shadow on the same weights, the working copy, and the decrease.
template <typename T>
static void check_adamw(const Fixture& fx, Plant plant) {
    const bool fp32 = GPUModel<T>::is_fp32();
    const Tolerances tol = tolerances(fp32);
    const std::string tag = fx.name + (fp32 ? " [fp32]" : " [bf16]");
    const auto ref_losses = fx.tensor("adamw_losses");
    std::vector<double> ref_norms;
    if (fx.has("adamw_grad_norms")) ref_norms = fx.tensor("adamw_grad_norms");
    const int steps = (int)ref_losses.size();
    GPUModel<T> M;  // the trainer as it runs (bf16: stochastic rounding of the working copy)
    setup_model(M, fx, !fp32, fx.params);
    std::unique_ptr<GPUModel<float>> S;  // bf16 only: the fp32 shadow, given the weights M computes with
    if (!fp32) {
        S.reset(new GPUModel<float>());
        setup_model(*S, fx, false, fx.params);
    }
    const size_t P = M.layout.total;
    const AdamWSettings& hp = fx.adamw;
    double w_loss = 0, w_grad = 0, w_norm = 0, w_update = 0, w_moment = 0, w_curve = 0, w_curve_norm = 0;
    long copy_bad = 0;
    int compared = 0;
    double last_loss = NAN;
    for (int s = 0; s < steps; s++) {
        std::vector<float> p0 = M.download_params();
        Losses lm = M.forward(fx.inputs.data(), fx.targets.data(), fx.B, fx.T, 1.0f);
        last_loss = lm.loss;
        if (fp32) {
            double r = std::fabs(lm.loss - ref_losses[s]) / (tol.adam_loss_rel * std::fabs(ref_losses[s]));
            if (!(r <= 1)) printf("    %s AdamW step %d loss %.9g vs reference %.9g\n", tag.c_str(), s, lm.loss, ref_losses[s]);
            w_curve = std::max(w_curve, r + (std::isnan(lm.loss) ? INFINITY : 0));
        }
        M.zero_grad();
        M.backward();
        std::vector<float> gm(P), m0(P), v0(P);
        download(gm.data(), M.grads, P, M.stream);
        download(m0.data(), M.m, P, M.stream);
        download(v0.data(), M.v, P, M.stream);
        if (S) {
            S->upload_params(download_floats(M.wcopy, P, M.stream));  // the same function, in fp32
            Losses ls = S->forward(fx.inputs.data(), fx.targets.data(), fx.B, fx.T, 1.0f);
            int near_ties = 0;
            if (fx.cfg.is_moe()) {  // routing against the shadow; a near-tie excuses this step's loss/grad comparison
                const int N = fx.N, E = fx.cfg.n_experts, K = fx.cfg.top_k;
                for (int layer = 0; layer < fx.cfg.n_layer && near_ties == 0; layer++) {
                    std::vector<int> im((size_t)N * K), is((size_t)N * K);
                    download(im.data(), M.acts[layer].topk, im.size(), M.stream);
                    download(is.data(), S->acts[layer].topk, is.size(), S->stream);
                    std::vector<float> zs = download_floats(S->acts[layer].rlogits, (size_t)N * E, S->stream);
                    std::vector<float> ws = download_floats(S->acts[layer].topw, (size_t)N * K, S->stream);
                    std::vector<double> zs64(zs.begin(), zs.end()), ws64(ws.begin(), ws.end());
                    // a flipped near-tie changes every later layer's input: stop at the first
                    near_ties += check_routing(tag + strfmt(" step %d", s), layer, N, E, K,
                                               download_floats(M.acts[layer].rlogits, (size_t)N * E, M.stream), zs64, im, is,
                                               download_floats(M.acts[layer].topw, (size_t)N * K, M.stream), ws64, tol, false,
                                               fx.cfg.routing == ROUTING_XFT);
                }
            }
            S->zero_grad();
            S->backward();
            if (near_ties == 0) {
                std::vector<float> gs(P);
                download(gs.data(), S->grads, P, S->stream);
                compared++;
                w_loss = std::max(w_loss, std::fabs(lm.loss - ls.loss) / (tol.loss_rel * std::fabs(ls.loss)) +
                                              (std::isnan(lm.loss) ? INFINITY : 0));
                int bad = 0;
                std::string worst_name;
                w_grad = std::max(w_grad, grad_ratio(tag + strfmt(" step %d", s), M.layout, gm, nullptr, gs.data(),
                                                     false, tol.grad_steps, &bad, &worst_name));
            }
        }
        // the optimizer step, and the same step on the host in double
        std::vector<uint16_t> copy_before;
        if (plant == Plant::STALE_COPY && !fp32) {
            copy_before.resize(P);
            download(copy_before.data(), (const uint16_t*)M.wcopy, P, M.stream);
        }
        double norm = M.step(hp, plant == Plant::LR ? 1.1 * fx.lr : fx.lr);
        if (!copy_before.empty()) upload((uint16_t*)M.wcopy, copy_before.data(), P, M.stream);  // not refreshed
        if (fp32 && s < (int)ref_norms.size()) {
            double rn = std::fabs(norm - ref_norms[s]) / (tol.grad_norm_rel * std::fabs(ref_norms[s]));
            if (!(rn <= 1)) printf("    %s AdamW step %d grad norm %.9g vs reference %.9g\n", tag.c_str(), s, norm, ref_norms[s]);
            w_curve_norm = std::max(w_curve_norm, rn + (std::isnan(norm) ? INFINITY : 0));
        }
        double sq = 0;
        for (size_t i = 0; i < P; i++) sq += (double)gm[i] * gm[i];
        const double norm_host = std::sqrt(sq);
        w_norm = std::max(w_norm, std::fabs(norm - norm_host) / (1e-5 * norm_host) + (std::isnan(norm) ? INFINITY : 0));
        const double clip = hp.grad_clip > 0 && norm_host > hp.grad_clip ? hp.grad_clip / norm_host : 1.0;
        const long t = M.adam_t;
        const double bc1 = 1 - std::pow(hp.beta1, (double)t), bc2 = 1 - std::pow(hp.beta2, (double)t);
        std::vector<float> p1(P), m1(P), v1(P);
        download(p1.data(), M.params, P, M.stream);
        download(m1.data(), M.m, P, M.stream);
        download(v1.data(), M.v, P, M.stream);
        for (auto& ten : M.layout.tensors) {
            if (!ten.trainable) {  // the Nexus router's Emb (kept bit for bit) and R (= Emb P of the new P)
                std::vector<float> R;
                if (ten.kind == P_ROUTER) {
                    R.resize(ten.numel);
                    nexus_router_forward(R.data(), p1.data() + M.layout.get(ten.layer, P_NEXUS_EMB).offset,
                                         p1.data() + M.layout.get(ten.layer, P_NEXUS_PROJ).offset, fx.cfg.n_experts,
                                         fx.cfg.d_model, fx.cfg.d_model);
                }
                for (size_t i = 0; i < ten.numel; i++) {
                    const double want = R.empty() ? p0[ten.offset + i] : R[i], got = p1[ten.offset + i];
                    w_update = std::max(w_update, std::fabs(got - want) / (1e-6 * std::fabs(want) + 1e-30) +
                                                      (std::isnan(got) ? INFINITY : 0));
                    w_moment = std::max(w_moment, std::fabs(m1[ten.offset + i]) + std::fabs(v1[ten.offset + i]) > 0
                                                      ? INFINITY : 0.0);
                }
                continue;
            }
            const double wd = ten.decay() ? hp.weight_decay : 0.0;
            for (size_t i = ten.offset; i < ten.offset + ten.numel; i++) {
                const double g = gm[i] * clip;
                const double me = hp.beta1 * m0[i] + (1 - hp.beta1) * g;
                const double ve = hp.beta2 * v0[i] + (1 - hp.beta2) * g * g;
                const double pe = p0[i] - fx.lr * ((me / bc1) / (std::sqrt(ve / bc2) + hp.eps) + wd * p0[i]);
                // fp32 arithmetic on an update of size ~lr, and the rounding of p itself
                w_update = std::max(w_update, std::fabs(p1[i] - pe) / (1e-5 * fx.lr + 2e-7 * std::fabs(pe) + 1e-30) +
                                                  (std::isnan(p1[i]) ? INFINITY : 0));
                w_moment = std::max(w_moment, std::fabs(m1[i] - me) / (1e-5 * std::fabs(me) + 1e-7 * std::fabs(g) + 1e-30) +
                                                  (std::isnan(m1[i]) ? INFINITY : 0));
                w_moment = std::max(w_moment, std::fabs(v1[i] - ve) / (1e-5 * std::fabs(ve) + 1e-30) +
                                                  (std::isnan(v1[i]) ? INFINITY : 0));
            }
        }
        if (!fp32) {
            std::vector<uint16_t> copy(P);
            download(copy.data(), (const uint16_t*)M.wcopy, P, M.stream);
            for (size_t i = 0; i < P; i++) copy_bad += !is_bf16_neighbour(copy[i], p1[i]);
        }
    }
    report_check(tag, "AdamW grad norm vs host", w_norm, "fp32 sum vs double (tol 1e-5 relative)");
    report_check(tag, "AdamW update vs host", w_update, "master weights (tol 1e-5 lr + 2e-7 |p|)");
    report_check(tag, "AdamW moments vs host", w_moment, "m and v (tol 1e-5 relative)");
    if (fp32) {
        report_check(tag, "AdamW step losses", w_curve,
                     strfmt("%d steps against the reference curve (tol %g relative)", steps, tol.adam_loss_rel));
        if (!ref_norms.empty())
            report_check(tag, "AdamW grad norms", w_curve_norm,
                         strfmt("%zu steps against the reference curve (tol %g relative)", ref_norms.size(), tol.grad_norm_rel));
        return;
    }
    report_check(tag, "AdamW loss vs fp32 shadow", w_loss,
                 strfmt("%d of %d steps compared (tol %.3g relative)", compared, steps, tol.loss_rel));
    report_check(tag, "AdamW gradients vs fp32 shadow", w_grad,
                 strfmt("%d of %d steps, relative L2 per tensor (tol %.3g)", compared, steps, tol.grad_steps));
    report_check(tag, "AdamW bf16 working copy", copy_bad ? INFINITY : 0,
                 strfmt("%ld of %zu elements are not a bf16 neighbour of their master weight", copy_bad, P * steps));
    const double ref_drop = ref_losses[0] - ref_losses[steps - 1];
    const double got_drop = ref_losses[0] - last_loss;
    report_check(tag, "AdamW trains", got_drop > 0 ? 0.5 * ref_drop / got_drop : INFINITY,
                 strfmt("loss %.4g -> %.4g (step %d, before its update); the reference reaches %.4g: at least half "
                        "of its decrease required", ref_losses[0], last_loss, steps - 1, ref_losses[steps - 1]));
}

int main(int argc, char** argv) {
    std::string dtype = "both", plant_name;
    std::vector<std::string> dirs;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        if (a == "-h" || a == "--help") {
            printf("usage: test_gpu_fixtures [--dtype fp32|bf16|both] [--plant BUG] FIXTURE_DIR...\n"
                   "The GPU trainer against the PyTorch reference fixtures (test/fixtures/*); see the top of\n"
                   "test/test_gpu_fixtures.cu for what is checked. BUG: router_swap, no_router_loss_grad, lr, stale_copy\n"
                   "(a deliberate bug that some check must catch).\n");
            return 0;
        }
        if ((a == "--dtype" || a == "--plant") && i + 1 < argc) {
            (a == "--dtype" ? dtype : plant_name) = argv[++i];
            continue;
        }
        if (a.rfind("--", 0) == 0) {
            fprintf(stderr, "error: unknown option %s (see --help)\n", a.c_str());
            return 2;
        }
        dirs.push_back(a);
    }
    try {
        if (dtype != "fp32" && dtype != "bf16" && dtype != "both") FAIL("--dtype must be fp32, bf16 or both, found \"%s\"", dtype.c_str());
        if (dirs.empty()) FAIL("no fixture directory given (e.g. test/fixtures/moe_topk_softmax)");
        Plant plant = parse_plant(plant_name);
        int ndev = 0;
        if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) FAIL("no CUDA device");
        for (auto& d : dirs) {
            Fixture fx(d);
            if (dtype != "bf16") {
                run_test(fx.name + " fp32 step 0", [&] { check_step0<float>(fx, plant); });
                run_test(fx.name + " fp32 AdamW", [&] { check_adamw<float>(fx, plant); });
                run_test(fx.name + " fp32 KV cache", [&] { check_kv_cache<float>(fx); });
                run_test(fx.name + " fp32 step path", [&] { check_step_path<float>(fx); });
            }
            if (dtype != "fp32") {
                run_test(fx.name + " bf16 step 0", [&] { check_step0<bf16>(fx, plant); });
                run_test(fx.name + " bf16 AdamW", [&] { check_adamw<bf16>(fx, plant); });
                run_test(fx.name + " bf16 KV cache", [&] { check_kv_cache<bf16>(fx); });
                run_test(fx.name + " bf16 step path", [&] { check_step_path<bf16>(fx); });
            }
        }
    } catch (const Error& e) {
        fprintf(stderr, "error: %s\n", e.what());
        printf("%d passed, %d failed\n", g_pass, g_fail + 1);
        return 1;
    }
    return report();
}
