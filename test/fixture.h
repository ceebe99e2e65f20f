// fixture.h: one reader for the PyTorch float64 reference fixtures (test/fixtures/NAME/,
// written by dev/reference/make_fixtures.py) and the error measures the fixture tests use.
// Shared by test/test_cpu.cpp (the CPU trainer) and test/test_gpu_fixtures.cu (the GPU trainer).
// defines: Fixture, max_abs, rel_l2, topk_margin
#pragma once
#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>
#include "../common/model.h"
#include "../common/router_losses.h"
#include "../common/run.h"
#include "../common/safetensors.h"
#include "../common/util.h"

// What one fixture holds: the model (config.json + model.safetensors), one batch, and the
// reference's outputs for it (fixture.safetensors; see dev/reference/README.md).
struct Fixture {
    std::string dir, name;
    ModelConfig cfg;
    ParamLayout layout;
    std::vector<float> params;  // the model's weights, as the trainers load them
    SafeTensorsReader file;
    int B = 0, T = 0, N = 0;
    std::vector<int> inputs, targets;  // [B, T]
    RouterLossSettings router_settings;  // aux-loss kind and coefficients the reference used
    AdamWSettings adamw;               // the 10-step curve's hyperparameters
    double lr = 0;

    explicit Fixture(const std::string& d) : dir(d), file(path_join(d, "fixture.safetensors")) {
        std::string base = d;
        while (!base.empty() && base.back() == '/') base.pop_back();
        name = base.substr(base.find_last_of('/') == std::string::npos ? 0 : base.find_last_of('/') + 1);
        load_model_dir(dir, &cfg, &layout, &params);
        const TensorInfo& ii = file.info("inputs");
        B = (int)ii.shape[0];
        T = (int)ii.shape[1];
        N = B * T;
        inputs = file.read_vec<int>("inputs");
        targets = file.read_vec<int>("targets");
        router_settings.aux_loss = parse_aux(meta("aux_type", "none"));
        router_settings.aux_coef = meta_double("aux_coef");
        router_settings.z_coef = meta_double("z_coef");
        if (!meta("dpsl_coef").empty()) {  // the Dirichlet-prior shaping loss is on
            router_settings.dpsl.on = true;
            router_settings.dpsl.coef = meta_double("dpsl_coef");
            router_settings.dpsl.alpha = parse_dpsl_alpha(meta("dpsl_alpha"));
            router_settings.dpsl.distance = parse_dpsl_distance(meta("dpsl_distance"));
            router_settings.dpsl.ecdf = parse_dpsl_ecdf(meta("dpsl_ecdf"));
        }
        adamw.beta1 = meta_double("beta1");
        adamw.beta2 = meta_double("beta2");
        adamw.eps = meta_double("eps");
        adamw.weight_decay = meta_double("weight_decay");
        adamw.grad_clip = meta_double("grad_clip");
        lr = meta_double("lr");
    }
    std::string meta(const std::string& k, const std::string& dflt = "") const {
        auto it = file.metadata.find(k);
        return it == file.metadata.end() ? dflt : it->second;
    }
    double meta_double(const std::string& k) const {
        std::string v = meta(k);
        if (v.empty()) FAIL("%s: fixture metadata has no \"%s\"", dir.c_str(), k.c_str());
        return atof(v.c_str());
    }
    double scalar(const std::string& k) const { return file.read_vec<double>(k)[0]; }
    std::vector<double> tensor(const std::string& k, const std::vector<int64_t>& shape = {}) const {
        return file.read_vec<double>(k, shape);
    }
    std::vector<int> ints(const std::string& k, const std::vector<int64_t>& shape = {}) const {
        return file.read_vec<int>(k, shape);
    }
    bool has(const std::string& k) const { return file.has(k); }
};

template <typename V>
double max_abs(const V& v) {
    double m = 0;
    for (auto x : v) m = std::max(m, std::fabs((double)x));
    return m;
}

// ||a - b|| / ||b|| over n elements (0 when both are 0; NaN anywhere gives NaN)
template <typename A, typename B>
double rel_l2(const A* a, const B* b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double e = (double)a[i] - (double)b[i];
        num += e * e;
        den += (double)b[i] * (double)b[i];
    }
    if (den == 0) return num == 0 ? 0 : INFINITY;
    return std::sqrt(num / den);
}

// The top-K choice of a row of router logits z[0..E) is decided by a margin: the gap between
// the K-th and the (K+1)-th largest value (for K = E there is nothing to decide: infinity).
// If every logit is computed within eps of the exact value, a selection can only change
// where this margin is below 2 eps.
template <typename V>
double topk_margin(const V* z, int E, int K) {
    if (K >= E) return INFINITY;
    std::vector<double> s(z, z + E);
    std::sort(s.begin(), s.end(), [](double a, double b) { return a > b; });
    return s[K - 1] - s[K];
}
