// test_gradcheck.cpp: the CPU trainer's analytic gradients against central finite
// differences, in double precision (this file is built with -DTRAIN_MOE_DOUBLE, so
// `real` is double throughout the trainer's code).
//
// For each test model and each parameter tensor, a few entries chosen at random are moved
// by +-h and the loss difference is compared with the backward pass. The router is checked
// three ways: through the whole loss, through the load-balancing loss alone and through
// the z-loss alone (a gradient that never reaches the router would pass a loss-only test);
// and through the Dirichlet-prior shaping loss alone, in each of its variants.
#define TRAIN_MOE_NO_MAIN
#include "../train_moe.cpp"
#include "../common/xft_merge.h"
#include "fixture.h"
#include "testing.h"

static_assert(sizeof(real) == 8, "build test_gradcheck with -DTRAIN_MOE_DOUBLE");

struct Batch {
    std::vector<int> in, tg;
    int B, T;
};
static Batch fixture_batch(const std::string& dir) {
    SafeTensorsReader fx(dir + "/fixture.safetensors");
    Batch b;
    b.in = fx.read_vec<int>("inputs");
    b.tg = fx.read_vec<int>("targets");
    b.B = (int)fx.info("inputs").shape[0];
    b.T = (int)fx.info("inputs").shape[1];
    return b;
}

// Loss value selected by `which`: 0 = total, 1 = aux, 2 = z, 3 = dpsl (all unweighted)
static double loss_of(Model& M, const Batch& b, int which) {
    Losses l = M.forward(b.in.data(), b.tg.data(), b.B, b.T);
    return which == 0 ? l.loss : which == 1 ? l.aux : which == 2 ? l.z : l.dpsl;
}

// Compares d(loss)/d(theta) for `per_tensor` random entries of every tensor accepted by
// `pick`. Returns the number of entries compared.
static int fd_check(Model& M, const Batch& b, const std::string& label, int per_tensor,
                    const std::function<bool(const ParamTensor&)>& pick, int which = 0,
                    const std::vector<real>* analytic = nullptr) {
    if (!analytic) {
        M.zero_grad();
        M.forward(b.in.data(), b.tg.data(), b.B, b.T);
        M.backward();
    }
    const std::vector<real>& g = analytic ? *analytic : M.grads;
    int compared = 0, bad = 0;
    double worst = 0;
    for (size_t ti = 0; ti < M.layout.tensors.size(); ti++) {
        const ParamTensor& t = M.layout.tensors[ti];
        if (!pick(t)) continue;
        for (int s = 0; s < per_tensor; s++) {
            size_t i = t.offset + rng_u64(2024, ti, s) % t.numel;
            real keep = M.params[i];
            double h = 1e-5 * std::max(1.0, std::fabs((double)keep));
            M.params[i] = keep + h;
            double lp = loss_of(M, b, which);
            M.params[i] = keep - h;
            double lm = loss_of(M, b, which);
            M.params[i] = keep;
            double fd = (lp - lm) / (2 * h), an = g[i];
            double err = std::fabs(fd - an) / (1e-8 + 1e-5 * std::fabs(an) + 1e-5 * std::fabs(fd));
            worst = std::max(worst, err);
            compared++;
            if (!(err <= 1)) {
                bad++;
                if (bad <= 5)
                    printf("    %s: %s[%zu] finite difference %.10g vs analytic %.10g\n", label.c_str(),
                           t.name.c_str(), i - t.offset, fd, an);
            }
        }
    }
    CHECK_MSG(bad == 0, "%s: %d of %d entries disagree (worst ratio %.3g)", label.c_str(), bad, compared, worst);
    return compared;
}

static void setup_losses(Model& M, const std::string& dir) { M.router_loss = Fixture(dir).router_settings; }

// Every parameter kind through the total loss
static void test_all_params(const std::string& name) {
    std::string dir = "test/fixtures/" + name;
    Model M;
    M.load(dir);
    setup_losses(M, dir);
    // large coefficients: the router-loss paths must matter at the precision of the check
    if (M.cfg.is_moe()) { M.router_loss.aux_coef = 0.5; M.router_loss.z_coef = 0.05; M.router_loss.dpsl.coef = 0.5; }
    Batch b = fixture_batch(dir);
    std::vector<int> kinds_seen(P_NUM_KINDS, 0);
    // the Nexus router's Emb and R are not parameters (R = Emb P is recomputed in every forward,
    // Emb is fixed): not perturbed here, and their gradient slots must stay exactly 0
    int n = fd_check(M, b, name, 5, [&](const ParamTensor& t) {
        if (!t.trainable) return false;
        kinds_seen[t.kind] = 1;
        return true;
    });
    CHECK(n > 0);
    for (auto& t : M.layout.tensors)
        if (!t.trainable)
            for (size_t i = t.offset; i < t.offset + t.numel; i++)
                CHECK_MSG(M.grads[i] == 0, "%s: %s is not trained but has the gradient %g", name.c_str(),
                          t.name.c_str(), (double)M.grads[i]);
    int want = M.cfg.is_moe() ? 12 : 11;  // kinds in this model, plus lm_head when untied (Nexus: P for R)
    if (!M.cfg.tie_embeddings) want++;
    if (M.cfg.has_shared()) want += M.cfg.shared_gate ? 4 : 3;  // shared gate, up, down [, its sigmoid gate]
    if (M.cfg.has_grove()) want += 3;  // adjugate gate, up, down
    int seen = 0;
    for (int k : kinds_seen) seen += k;
    CHECK_MSG(seen == want, "%s: %d parameter kinds checked, expected %d", name.c_str(), seen, want);
}

// The router through the load-balancing loss alone and the z-loss alone: the analytic
// gradient of each term is the difference of two backward passes (coefficient 1 and 0).
static void test_router_loss_paths(const std::string& name, AuxLoss aux_type) {
    std::string dir = "test/fixtures/" + name;
    Model M;
    M.load(dir);
    Batch b = fixture_batch(dir);
    M.router_loss.aux_loss = aux_type;
    auto grads_with = [&](double aux_coef, double z_coef) {
        M.router_loss.aux_coef = aux_coef;
        M.router_loss.z_coef = z_coef;
        M.zero_grad();
        M.forward(b.in.data(), b.tg.data(), b.B, b.T);
        M.backward();
        return M.grads;
    };
    std::vector<real> g0 = grads_with(0, 0), ga = grads_with(1, 0), gz = grads_with(0, 1);
    std::vector<real> d_aux(g0.size()), d_z(g0.size());
    for (size_t i = 0; i < g0.size(); i++) { d_aux[i] = ga[i] - g0[i]; d_z[i] = gz[i] - g0[i]; }
    // the router's trained weight: R, or with the Nexus router its projection P (R = Emb P)
    const ParamKind rk = M.cfg.nexus_router ? P_NEXUS_PROJ : P_ROUTER;
    auto router = [rk](const ParamTensor& t) { return t.kind == rk; };
    double norm_aux = 0, norm_z = 0;
    for (auto& t : M.layout.tensors)
        if (t.kind == rk)
            for (size_t i = t.offset; i < t.offset + t.numel; i++) { norm_aux += d_aux[i] * d_aux[i]; norm_z += d_z[i] * d_z[i]; }
    CHECK_MSG(norm_aux > 1e-12, "%s: load-balancing loss (%s) gives the router no gradient", name.c_str(), aux_name(aux_type));
    CHECK_MSG(norm_z > 1e-12, "%s: z-loss gives the router no gradient", name.c_str());
    fd_check(M, b, name + " aux " + aux_name(aux_type) + " -> router", 8, router, 1, &d_aux);
    fd_check(M, b, name + " z -> router", 8, router, 2, &d_z);
    // the aux loss also reaches the layers below the router (through the normalized input)
    fd_check(M, b, name + " aux -> attention", 2, [](const ParamTensor& t) { return t.kind == P_WQ; }, 1, &d_aux);
}

// The router through the dpsl loss alone (coefficient 1 minus coefficient 0, aux and z off),
// in one variant of its options; the fixture's batch and model
static void test_dpsl_path(DpslDistance distance, DpslEcdf ecdf, std::vector<double> alpha) {
    const std::string name = "moe_dpsl", dir = "test/fixtures/" + name;
    Model M;
    M.load(dir);
    Batch b = fixture_batch(dir);
    M.router_loss.aux_loss = AUX_NONE;
    M.router_loss.z_coef = 0;
    M.router_loss.dpsl.on = true;
    M.router_loss.dpsl.distance = distance;
    M.router_loss.dpsl.ecdf = ecdf;
    M.router_loss.dpsl.alpha = alpha;
    auto grads_with = [&](double coef) {
        M.router_loss.dpsl.coef = coef;
        M.zero_grad();
        M.forward(b.in.data(), b.tg.data(), b.B, b.T);
        M.backward();
        return M.grads;
    };
    std::vector<real> g0 = grads_with(0), g1 = grads_with(1), d(g0.size());
    for (size_t i = 0; i < g0.size(); i++) d[i] = g1[i] - g0[i];
    double norm = 0;
    for (auto& t : M.layout.tensors)
        if (t.kind == P_ROUTER)
            for (size_t i = t.offset; i < t.offset + t.numel; i++) norm += d[i] * d[i];
    const std::string label = strfmt("%s dpsl %s %s alpha %zu", name.c_str(), dpsl_distance_name(distance),
                                     dpsl_ecdf_name(ecdf), alpha.size());
    CHECK_MSG(norm > 1e-12, "%s: gives the router no gradient", label.c_str());
    fd_check(M, b, label + " -> router", 8, [](const ParamTensor& t) { return t.kind == P_ROUTER; }, 3, &d);
    fd_check(M, b, label + " -> attention", 2, [](const ParamTensor& t) { return t.kind == P_WQ; }, 3, &d);
}

// XFT's merge (docs/METHODS.md 2.13): dLoss/dalpha of the merged dense model, where alpha are
// the mixing logits of W = lambda S + (1 - lambda) sum_i softmax(alpha)_i X_i, against
// central differences; at an uneven alpha and at alpha = 0, lambda 0.75 and 0.
static void test_xft_merge_alpha() {
    const std::string dir = "test/fixtures/moe_xft";
    Batch b = fixture_batch(dir);
    for (double lambda : {0.75, 0.0}) {
        XftMerger X;
        X.init(dir, lambda);
        for (int uneven : {1, 0}) {
            for (size_t l = 0; l < X.alpha.size(); l++)
                for (size_t e = 0; e < X.alpha[l].size(); e++) X.alpha[l][e] = uneven ? 0.7 * std::sin(1.0 + 3 * l + e) : 0;
            std::vector<std::vector<double>> g;
            X.loss_and_grad(b.in.data(), b.tg.data(), b.B, b.T, &g);
            double worst = 0, gsum = 0, gmax = 0;
            for (size_t l = 0; l < X.alpha.size(); l++)
                for (size_t e = 0; e < X.alpha[l].size(); e++) {
                    const double keep = X.alpha[l][e], h = 1e-5;
                    X.alpha[l][e] = keep + h;
                    const double lp = X.loss_and_grad(b.in.data(), b.tg.data(), b.B, b.T, nullptr);
                    X.alpha[l][e] = keep - h;
                    const double lm = X.loss_and_grad(b.in.data(), b.tg.data(), b.B, b.T, nullptr);
                    X.alpha[l][e] = keep;
                    const double fd = (lp - lm) / (2 * h), an = g[l][e];
                    const double err = std::fabs(fd - an) / (1e-8 + 1e-5 * std::fabs(an) + 1e-5 * std::fabs(fd));
                    worst = std::max(worst, err);
                    gsum += an;
                    gmax = std::max(gmax, std::fabs(an));
                    CHECK_MSG(err <= 1, "lambda %g layer %zu alpha[%zu]: finite difference %.10g vs analytic %.10g",
                              lambda, l, e, fd, an);
                }
            // a softmax's logits get gradients summing to 0, and these are not all 0
            CHECK_MSG(std::fabs(gsum) <= 1e-12 * X.alpha.size() && gmax > 1e-4, "lambda %g: sum %.3g, max |g| %.3g",
                      lambda, gsum, gmax);
            printf("    lambda %g, alpha %s: worst ratio %.3g, max |dLoss/dalpha| %.3g\n", lambda,
                   uneven ? "uneven" : "0", worst, gmax);
        }
    }
}

int main() {
    for (const char* f : {"dense", "dense_tied_gqa", "moe_topk_softmax", "moe_softmax_topk", "moe_pooled",
                          "moe_seq_gqa", "moe_empty_expert", "moe_e8_k1", "moe_dpsl", "moe_shared",
                          "moe_shared_ungated", "moe_grove", "moe_xft", "moe_nexus"})
        run_test(std::string("finite differences, every parameter: ") + f, [&] { test_all_params(f); });
    run_test("Nexus router's P via aux switch only", [] { test_router_loss_paths("moe_nexus", AUX_SWITCH); });
    for (AuxLoss aux : {AUX_SWITCH, AUX_POOLED, AUX_SEQ}) {
        run_test(strfmt("router via aux %s only (topk_softmax)", aux_name(aux)),
                 [&] { test_router_loss_paths("moe_topk_softmax", aux); });
        run_test(strfmt("router via aux %s only (softmax_topk)", aux_name(aux)),
                 [&] { test_router_loss_paths("moe_softmax_topk", aux); });
    }
    run_test("router via dpsl only (sq, mid, asymmetric alpha)",
             [] { test_dpsl_path(DPSL_SQ, DPSL_MID, {0.5, 1.0, 1.5, 2.0}); });
    run_test("router via dpsl only (sq, right, alpha 1)", [] { test_dpsl_path(DPSL_SQ, DPSL_RIGHT, {1.0}); });
    run_test("router via dpsl only (abs, mid, alpha 0.75)", [] { test_dpsl_path(DPSL_ABS, DPSL_MID, {0.75}); });
    run_test("XFT merge: dLoss/dalpha", test_xft_merge_alpha);
    return report();
}
