// router_losses.h: every router loss, value and gradient, in one place, for both trainers,
// dev/cuda/router.cu and the tests: the load-balancing losses switch, seq and pooled, the
// router z-loss, the Dirichlet-prior shaping loss (dpsl) and the aux-loss-free bias update.
// The formulas and their papers are in docs/METHODS.md 1.2 (balancing), 1.3 (z-loss),
// 1.4 (aux-loss-free bias) and 1.6 (dpsl).
//
// defines: AuxLoss (AUX_NONE, AUX_SWITCH, AUX_POOLED, AUX_SEQ), parse_aux, aux_name,
//          DpslSettings, parse_aux_loss (the --aux-loss list), RouterLossSettings,
//          RoutingStats (the per-sequence statistics every loss reads),
//          Losses, router_loss_values, total_loss, add_router_losses (values)
//          aux_dp_coef, aux_dp_per_seq, z_loss_dlogit, dpsl_dp_rows (gradients)
//          dpsl_row (one sample's term and gradient, host and device),
//          beta_pdf, beta_cdf                                       (dpsl's target)
//          aux_free_bias_update                                     (bias balancing)
//
// Every loss is a function of these statistics of one forward pass, per MoE layer:
//   counts [B, E]  (token, slot) assignments of sequence b to expert i   (no gradient)
//   psum   [S, E]  sum of the router probabilities p_{t,i} over the rows of segment s
//   zsum   [S]     sum of lse_t^2 over the rows of segment s, lse_t = logsumexp_i z_{t,i}
//   probs  [B T, E] each row's p_{t,i}, for a loss that is not a function of sums (dpsl
//                  sorts each expert's probabilities); null where a trainer does not
//                  provide it (the GPU trainer)
//   dpsl_sum [E]   instead of probs, for dpsl's value: the trainer's sum over each expert's
//                  sorted rows, sum_r D(F_i(p_(r),i) - u_r) (the GPU trainer sorts on the
//                  device, kernels/dpsl.cuh, with this file's dpsl_row)
// A segment is `seg` consecutive rows of one sequence (S = B T / seg segments, in row
// order). The GPU trainer sums each sequence on the device (seg = T) and downloads [B, E]
// and [B]; the CPU model passes one row per segment (seg = 1), so that its sums are taken
// here, row by row. Segments are always added in order, with the arithmetic written below,
// so each trainer's losses are the same to the last bit whichever way it hands them in.
//
// Adding a loss: a value function and a gradient function below (the gradient as
// dL/dp_{t,i}: constant over each sequence like the balancing losses, one value per row and
// expert like dpsl, or, like the z-loss, as a per-row factor), its settings and dispatch,
// the same loss in dev/reference/model.py, and one fixture from
// dev/reference/make_fixtures.py.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>
#include "util.h"          // defines: FAIL

// Device-callable where nvcc compiles this header, so kernels can use the same formula.
#ifdef __CUDACC__
#define ROUTER_LOSS_HD __host__ __device__
#else
#define ROUTER_LOSS_HD
#endif

// ----------------------------------------------------------------------------
// Settings

enum AuxLoss { AUX_NONE, AUX_SWITCH, AUX_POOLED, AUX_SEQ };

inline AuxLoss parse_aux(const std::string& s) {
    if (s == "none") return AUX_NONE;
    if (s == "switch") return AUX_SWITCH;
    if (s == "pooled") return AUX_POOLED;
    if (s == "seq") return AUX_SEQ;
    FAIL("--aux-loss must be switch, pooled, seq or none, found \"%s\"", s.c_str());
}
inline const char* aux_name(AuxLoss a) {
    static const char* n[] = {"none", "switch", "pooled", "seq"};
    return n[a];
}

// The Dirichlet-prior shaping loss (docs/METHODS.md 1.6): each expert's probabilities over
// the micro-batch against the Beta(alpha_i, A - alpha_i) marginal of a Dirichlet(alpha) prior
enum DpslDistance { DPSL_SQ, DPSL_ABS };  // (F - u)^2 or |F - u| at each sorted sample
enum DpslEcdf { DPSL_MID, DPSL_RIGHT };   // u_r = (r - 1/2) / N or r / N, r = 1 .. N
struct DpslSettings {
    bool on = false;
    double coef = 0.01;
    std::vector<double> alpha = {1.0};  // one value (symmetric prior) or one per expert
    DpslDistance distance = DPSL_SQ;
    DpslEcdf ecdf = DPSL_MID;
    // alpha_i of expert i of E (a single value stands for all E)
    double alpha_of(int i) const { return alpha.size() == 1 ? alpha[0] : alpha[i]; }
    double alpha_sum(int E) const {
        double A = 0;
        for (int i = 0; i < E; i++) A += alpha_of(i);
        return A;
    }
    // the prior must be a Dirichlet over this model's E experts
    void check(int E) const {
        if (!on) return;
        if (alpha.size() != 1 && (int)alpha.size() != E)
            FAIL("--dpsl-alpha: give one value or one per expert (%d), found %zu values", E, alpha.size());
        if (E < 2) FAIL("--aux-loss dpsl needs at least 2 experts, the model has %d", E);
    }
};
inline DpslDistance parse_dpsl_distance(const std::string& s) {
    if (s == "sq") return DPSL_SQ;
    if (s == "abs") return DPSL_ABS;
    FAIL("--dpsl-distance must be sq or abs, found \"%s\"", s.c_str());
}
inline DpslEcdf parse_dpsl_ecdf(const std::string& s) {
    if (s == "mid") return DPSL_MID;
    if (s == "right") return DPSL_RIGHT;
    FAIL("--dpsl-ecdf must be mid or right, found \"%s\"", s.c_str());
}
inline const char* dpsl_distance_name(DpslDistance d) { return d == DPSL_SQ ? "sq" : "abs"; }
inline const char* dpsl_ecdf_name(DpslEcdf e) { return e == DPSL_MID ? "mid" : "right"; }
// --dpsl-alpha: "1" or "0.5,1,1,2" (positive numbers)
inline std::vector<double> parse_dpsl_alpha(const std::string& s) {
    std::vector<double> a;
    size_t at = 0;
    while (true) {
        size_t end = s.find(',', at);
        std::string item = s.substr(at, end == std::string::npos ? std::string::npos : end - at);
        char* stop = nullptr;
        double v = std::strtod(item.c_str(), &stop);
        if (item.empty() || *stop != 0 || !(v > 0) || !std::isfinite(v))
            FAIL("--dpsl-alpha must be positive numbers separated by commas, found \"%s\"", s.c_str());
        a.push_back(v);
        if (end == std::string::npos) break;
        at = end + 1;
    }
    return a;
}
// --aux-loss: one balancing kind, "dpsl", or a balancing kind and dpsl joined by '+'
// (e.g. "switch+dpsl"); dpsl alone leaves the balancing loss off
inline void parse_aux_loss(const std::string& s, AuxLoss* kind, bool* dpsl) {
    *kind = AUX_NONE;
    *dpsl = false;
    bool have_kind = false;
    size_t at = 0;
    while (true) {
        size_t end = s.find('+', at);
        std::string item = s.substr(at, end == std::string::npos ? std::string::npos : end - at);
        if (item == "dpsl") {
            if (*dpsl) FAIL("--aux-loss names dpsl twice: \"%s\"", s.c_str());
            *dpsl = true;
        } else {
            if (item != "switch" && item != "pooled" && item != "seq" && item != "none")
                FAIL("--aux-loss must be switch, pooled, seq, none or dpsl, or one of the first four and dpsl joined "
                     "by '+' (e.g. switch+dpsl), found \"%s\"", s.c_str());
            if (have_kind) FAIL("--aux-loss: at most one of switch, pooled, seq, none (plus dpsl), found \"%s\"", s.c_str());
            *kind = parse_aux(item);
            have_kind = true;
        }
        if (end == std::string::npos) break;
        at = end + 1;
    }
}

// The router-loss settings of a run: loss = CE + aux_coef * aux + dpsl.coef * dpsl + z_coef * z
struct RouterLossSettings {
    AuxLoss aux_loss = AUX_SWITCH;  // which load-balancing loss (docs/METHODS.md 1.2)
    double aux_coef = 0.01, z_coef = 0.001;
    double aux_free_rate = 0;       // DeepSeek-V3 bias update rate u (1.4); 0 = off
    DpslSettings dpsl;              // the Dirichlet-prior shaping loss (1.6); off by default
};

// ----------------------------------------------------------------------------
// The statistics of one forward pass (see the top of this file)

struct RoutingStats {
    int B = 0, T = 0, E = 0, K = 0;
    int seg = 1;  // rows per partial sum in psum and zsum; divides T
    struct Layer {
        const int* counts;   // [B, E]
        const double* psum;  // [B T / seg, E]
        const double* zsum;  // [B T / seg]
        const double* probs = nullptr;  // [B T, E] each row's p, or null (see the top of this file)
        const double* dpsl_sum = nullptr;  // [E] dpsl's per-expert sums, made by the trainer, or null
    };
    std::vector<Layer> layers;  // one per MoE layer, in model order

    int n_layers() const { return (int)layers.size(); }
    int rows() const { return B * T; }
    // (token, slot) assignments to expert i over layer l (or every layer: pooled_count)
    long count(int l, int i) const {
        long c = 0;
        for (int b = 0; b < B; b++) c += layers[l].counts[(size_t)b * E + i];
        return c;
    }
    long pooled_count(int i) const {
        long c = 0;
        for (int l = 0; l < n_layers(); l++) c += count(l, i);
        return c;
    }
};

// ----------------------------------------------------------------------------
// Values (unweighted, summed over layers as docs/METHODS.md defines them). Each adds its
// terms into one running double in a fixed order.

// switch and seq: E sum_i (c_i / (rows K)) P_i computed over groups of `per_group`
// sequences (switch: one group of all B; seq: every sequence alone), averaged over the
// groups, summed over layers. rows = the group's rows, P_i their mean probability.
inline double balance_over_groups(const RoutingStats& s, int per_group) {
    const int E = s.E, K = s.K, n_groups = s.B / per_group, rows = per_group * s.T, seg_rows = rows / s.seg;
    double aux = 0;
    for (int l = 0; l < s.n_layers(); l++) {
        const RoutingStats::Layer& ly = s.layers[l];
        for (int g = 0; g < n_groups; g++) {
            double val = 0;
            for (int i = 0; i < E; i++) {
                long c = 0;
                double Pi = 0;
                for (int b = g * per_group; b < (g + 1) * per_group; b++) c += ly.counts[(size_t)b * E + i];
                for (int sg = g * seg_rows; sg < (g + 1) * seg_rows; sg++) Pi += ly.psum[(size_t)sg * E + i];
                val += (double)c / ((double)rows * K) * (Pi / rows);
            }
            aux += E * val / n_groups;
        }
    }
    return aux;
}
// switch (1.2): per layer E sum_i f_i P_i, f_i = c_i / (N K), P_i = mean_t p_{t,i}
inline double switch_loss(const RoutingStats& s) { return balance_over_groups(s, s.B); }
// seq (1.2): the switch value of each sequence, averaged over the B sequences
inline double seq_loss(const RoutingStats& s) { return balance_over_groups(s, 1); }
// pooled (1.2, Hugging Face Mixtral): all layers' rows pooled into L N rows,
// E sum_i (C_i / (L N)) Pbar_i, C_i = assignments over all layers
inline double pooled_loss(const RoutingStats& s) {
    const int E = s.E, L = s.n_layers(), S = s.rows() / s.seg;
    std::vector<double> P(E, 0);
    std::vector<long> C(E, 0);
    for (int l = 0; l < L; l++)
        for (int i = 0; i < E; i++) {
            C[i] += s.count(l, i);
            for (int sg = 0; sg < S; sg++) P[i] += s.layers[l].psum[(size_t)sg * E + i];
        }
    double LN = (double)L * s.rows(), aux = 0;
    for (int i = 0; i < E; i++) aux += E * (C[i] / LN) * (P[i] / LN);
    return aux;
}
// z-loss (1.3): per layer (1/N) sum_t lse_t^2, summed over layers
inline double z_loss(const RoutingStats& s) {
    const int N = s.rows(), S = N / s.seg;
    double z = 0;
    for (int l = 0; l < s.n_layers(); l++)
        for (int sg = 0; sg < S; sg++) z += s.layers[l].zsum[sg] / N;
    return z;
}

// ----------------------------------------------------------------------------
// The Dirichlet-prior shaping loss (1.6). Its target for expert i is the marginal of the
// Dirichlet(alpha) prior, Beta(alpha_i, A - alpha_i) with A = sum_j alpha_j.

// Beta(a, b) density at x in (0, 1). Device-callable (kernels/dpsl.cuh), like beta_cdf and
// dpsl_row below: the GPU trainer evaluates dpsl with these same lines.
ROUTER_LOSS_HD inline double beta_pdf(double x, double a, double b) {
    if (!(x > 0 && x < 1)) return 0;
    return exp((a - 1) * log(x) + (b - 1) * log1p(-x) + lgamma(a + b) - lgamma(a) - lgamma(b));
}
// the continued fraction's guard against a zero denominator (modified Lentz method)
ROUTER_LOSS_HD inline double beta_cf_guard(double v) { return fabs(v) < 1e-300 ? 1e-300 : v; }
// Beta(a, b) CDF at x: the regularized incomplete beta function I_x(a, b), by its continued
// fraction (evaluated with the modified Lentz method), which converges quickly for
// x < (a + 1) / (a + b + 2); above that point I_x(a, b) = 1 - I_{1-x}(b, a).
ROUTER_LOSS_HD inline double beta_cdf(double x, double a, double b) {
    if (!(x > 0)) return 0;
    if (!(x < 1)) return 1;
    const bool flip = x > (a + 1) / (a + b + 2);
    if (flip) {  // I_x(a, b) = 1 - I_{1-x}(b, a)
        const double t = a;
        a = b;
        b = t;
        x = 1 - x;
        if (!(x < 1)) return 0;  // 1 - x rounded to 1: I = 1 - 1
    }
    // I_x(a, b) = x^a (1 - x)^b / (a B(a, b)) * 1 / (1 + d_1 / (1 + d_2 / (1 + ...))), with
    // d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)),
    // d_{2m}   = m (b - m) x / ((a + 2m - 1)(a + 2m))
    double c = 1, d = 1 / beta_cf_guard(1 - (a + b) * x / (a + 1)), f = d;
    for (int m = 1; m <= 1000; m++) {
        double e = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m));  // d_{2m}
        d = 1 / beta_cf_guard(1 + e * d);
        c = beta_cf_guard(1 + e / c);
        f *= c * d;
        e = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1));  // d_{2m+1}
        d = 1 / beta_cf_guard(1 + e * d);
        c = beta_cf_guard(1 + e / c);
        const double step = c * d;
        f *= step;
        if (fabs(step - 1) < 1e-16) {
            const double front = exp(a * log(x) + b * log1p(-x) + lgamma(a + b) - lgamma(a) - lgamma(b));
            const double I = front * f / a;
            return flip ? 1 - I : I;
        }
    }
#ifdef __CUDA_ARCH__
    return NAN;  // a kernel cannot stop the run: the loss turns non-finite, the step is skipped
#else
    FAIL("beta_cdf(%g, %g, %g): the continued fraction did not converge", flip ? 1 - x : x, flip ? b : a, flip ? a : b);
#endif
}

// Each expert's rows of layer l in ascending order of p (ties: the lower row first): the
// sample order statistics p_(1) <= ... <= p_(N); order [E][N] row indices
inline void dpsl_order(std::vector<std::vector<int>>& order, const RoutingStats& s, int l) {
    const double* p = s.layers[l].probs;
    if (!p) FAIL("--aux-loss dpsl needs each row's router probabilities, which this trainer does not provide");
    const int N = s.rows(), E = s.E;
    order.assign(E, std::vector<int>(N));
    for (int i = 0; i < E; i++) {
        for (int n = 0; n < N; n++) order[i][n] = n;
        std::stable_sort(order[i].begin(), order[i].end(),
                         [&](int x, int y) { return p[(size_t)x * E + i] < p[(size_t)y * E + i]; });
    }
}
// u_r, the empirical CDF's value at the r-th smallest of N samples (r = 1 .. N)
ROUTER_LOSS_HD inline double dpsl_ecdf(DpslEcdf ecdf, int r, int N) { return ecdf == DPSL_MID ? (r - 0.5) / N : (double)r / N; }
inline double dpsl_ecdf(const DpslSettings& st, int r, int N) { return dpsl_ecdf(st.ecdf, r, N); }
// One sample of expert i: x = p_t,i, the r-th smallest of the N, target Beta(a, b)
// (a = alpha_i, b = A - alpha_i). *term = D(F(x) - u_r), its part of the sum below;
// *dp = dL/dp_t,i = (1/(N E)) D'(F(x) - u_r) f(x), D' = 2x (sq) or sign(x) (abs), f the
// Beta density (dp null: not wanted). Both trainers call this: the CPU per expert in
// dpsl_loss and dpsl_dp_rows, the GPU in kernels/dpsl.cuh.
ROUTER_LOSS_HD inline void dpsl_row(double* term, double* dp, double x, int r, int N, int E, double a, double b,
                                    DpslDistance distance, DpslEcdf ecdf) {
    const double diff = beta_cdf(x, a, b) - dpsl_ecdf(ecdf, r, N);
    *term = distance == DPSL_SQ ? diff * diff : fabs(diff);
    if (dp) {
        const double dD = distance == DPSL_SQ ? 2 * diff : (double)((diff > 0) - (diff < 0));
        *dp = dD * beta_pdf(x, a, b) / N / E;
    }
}
// sum_r D(F_i(p_(r),i) - u_r) of expert i of layer l: the trainer's sum (dpsl_sum, the GPU
// trainer's, made on the device) or, from the probabilities, in rank order here
inline double dpsl_expert_sum(const RoutingStats& s, const DpslSettings& st, int l, int i,
                              const std::vector<std::vector<int>>& order) {
    const RoutingStats::Layer& ly = s.layers[l];
    if (ly.dpsl_sum) return ly.dpsl_sum[i];
    const int N = s.rows(), E = s.E;
    const double a = st.alpha_of(i), b = st.alpha_sum(E) - a;
    double sum = 0;
    for (int r = 1; r <= N; r++) {
        double term;
        dpsl_row(&term, nullptr, ly.probs[(size_t)order[i][r - 1] * E + i], r, N, E, a, b, st.distance, st.ecdf);
        sum += term;
    }
    return sum;
}
// dpsl (1.6): per layer (1/E) sum_i (1/N) sum_r D(F_i(p_(r),i) - u_r), summed over layers;
// D(x) = x^2 (sq) or |x| (abs), F_i the CDF of Beta(alpha_i, A - alpha_i)
inline double dpsl_loss(const RoutingStats& s, const DpslSettings& st) {
    const int N = s.rows(), E = s.E;
    double total = 0;
    std::vector<std::vector<int>> order;
    for (int l = 0; l < s.n_layers(); l++) {
        if (!s.layers[l].dpsl_sum) dpsl_order(order, s, l);
        for (int i = 0; i < E; i++) total += dpsl_expert_sum(s, st, l, i, order) / N / E;
    }
    return total;
}

// Both router losses of a forward pass, unweighted (0 for a dense model: no layers)
inline void router_loss_values(AuxLoss kind, const RoutingStats& s, double* aux, double* z) {
    *aux = 0;
    *z = 0;
    if (s.layers.empty()) return;
    *z = z_loss(s);
    if (kind == AUX_SWITCH) *aux = switch_loss(s);
    else if (kind == AUX_SEQ) *aux = seq_loss(s);
    else if (kind == AUX_POOLED) *aux = pooled_loss(s);
}
inline double total_loss(const RouterLossSettings& rl, double ce, double aux, double z, double dpsl = 0) {
    double t = ce + (rl.aux_loss == AUX_NONE ? 0 : rl.aux_coef * aux);
    if (rl.dpsl.on) t += rl.dpsl.coef * dpsl;
    return t + rl.z_coef * z;
}

// The loss terms of one forward pass (or one optimizer step's means over its micro-batches)
struct Losses {
    double loss = 0, ce = 0, aux = 0, z = 0;
    double dpsl = 0;  // unweighted; 0 unless --aux-loss has dpsl
    void add_mean(const Losses& l, int n) {  // += l / n: one of n micro-batches
        loss += l.loss / n;
        ce += l.ce / n;
        aux += l.aux / n;
        z += l.z / n;
        dpsl += l.dpsl / n;
    }
};
// A forward pass's router terms and total, once its cross-entropy is in `out`
inline void add_router_losses(Losses& out, const RouterLossSettings& rl, const RoutingStats& s) {
    router_loss_values(rl.aux_loss, s, &out.aux, &out.z);
    out.dpsl = rl.dpsl.on && !s.layers.empty() ? dpsl_loss(s, rl.dpsl) : 0;
    out.loss = total_loss(rl, out.ce, out.aux, out.z, out.dpsl);
}

// ----------------------------------------------------------------------------
// Gradients. Every balancing loss is linear in the probabilities once the counts are fixed,
// so dL/dp_{t,i} is one number per (sequence b, expert i): G[b, i]. The trainers then pass
// it through the softmax, dL/dz_{t,j} = p_{t,j} (G[b, j] - sum_i p_{t,i} G[b, i]).
// R is the trainer's float type; C the integer type of the pooled counts.

// switch: E f_i / N = E c_i / (N K) / N, f over the whole batch of layer l
template <typename R, typename C>
ROUTER_LOSS_HD inline R switch_loss_dp(C count_i, int N, int E, int K) {
    return (R)E * count_i / ((R)N * K) / N;
}
// seq: (1/B) E c^b_i / (T K) / T
template <typename R>
ROUTER_LOSS_HD inline R seq_loss_dp(int count_bi, int B, int T, int E, int K) {
    return (R)E * count_bi / ((R)T * K) / T / B;
}
// pooled: E C_i / (L N)^2
template <typename R, typename C>
ROUTER_LOSS_HD inline R pooled_loss_dp(C pooled_count_i, int L, int N, int E) {
    R LN = (R)L * N;
    return (R)E * pooled_count_i / (LN * LN);
}

// G[b, i] for the balancing loss `kind`, from the counts it can depend on: count_bi =
// sequence b's assignments to expert i in layer l, layer_count_i = layer l's over the
// batch, pooled_count_i = every MoE layer's over the batch (B sequences of T rows, L MoE
// layers). Device-callable: the GPU trainer computes G on the device with this function
// (kernels/router.cuh router_aux_coef), the host with aux_dp_per_seq below.
template <typename R>
ROUTER_LOSS_HD inline R aux_dp_coef(AuxLoss kind, long count_bi, long layer_count_i, long pooled_count_i, int B, int T,
                                    int E, int K, int L) {
    const int N = B * T;
    if (kind == AUX_SWITCH) return switch_loss_dp<R>(layer_count_i, N, E, K);
    if (kind == AUX_SEQ) return seq_loss_dp<R>((int)count_bi, B, T, E, K);
    if (kind == AUX_POOLED) return pooled_loss_dp<R>(pooled_count_i, L, N, E);
    return 0;
}

// G [B, E] of layer l for the balancing loss `kind` (docs/METHODS.md 1.2)
template <typename R>
void aux_dp_per_seq(std::vector<R>& G, AuxLoss kind, const RoutingStats& s, int l) {
    const int B = s.B, T = s.T, E = s.E, K = s.K;
    G.assign((size_t)B * E, 0);
    for (int i = 0; i < E; i++) {
        long layer_count = kind == AUX_SWITCH ? s.count(l, i) : 0;
        long pooled_count = kind == AUX_POOLED ? s.pooled_count(i) : 0;
        for (int b = 0; b < B; b++)
            G[(size_t)b * E + i] = aux_dp_coef<R>(kind, s.layers[l].counts[(size_t)b * E + i], layer_count, pooled_count,
                                                  B, T, E, K, s.n_layers());
    }
}

// dpsl: dL/dp_{t,i} [N, E] of layer l, one value per row (the loss is not linear in p):
// the row t that is the r-th smallest of expert i gets (1/(N E)) D'(F_i(p_t,i) - u_r) f_i(p_t,i),
// D' = 2x (sq) or sign(x) (abs), f_i the Beta density. The sort order is piecewise constant,
// so this is the gradient wherever no two of an expert's probabilities are equal.
template <typename R>
void dpsl_dp_rows(std::vector<R>& G, const RoutingStats& s, const DpslSettings& st, int l) {
    const int N = s.rows(), E = s.E;
    const double A = st.alpha_sum(E);
    const double* p = s.layers[l].probs;
    std::vector<std::vector<int>> order;
    dpsl_order(order, s, l);
    G.assign((size_t)N * E, 0);
    for (int i = 0; i < E; i++) {
        const double a = st.alpha_of(i);
        for (int r = 1; r <= N; r++) {
            const int n = order[i][r - 1];
            double term, dp;
            dpsl_row(&term, &dp, p[(size_t)n * E + i], r, N, E, a, A - a, st.distance, st.ecdf);
            G[(size_t)n * E + i] = (R)dp;
        }
    }
}

// z-loss: d(lse_t^2 / N)/dz_{t,j} = 2 lse_t p_{t,j} / N; `coef` = the loss's weight times the
// backward's scale, multiplied first (the trainers' rounding order)
template <typename R>
ROUTER_LOSS_HD inline R z_loss_dlogit(R coef, R lse, R p, int N) {
    return coef * 2 * lse * p / N;
}

// ----------------------------------------------------------------------------
// Aux-loss-free balancing (docs/METHODS.md 1.4), after every optimizer step:
// b_i += u * sign(mean_j load_j - load_i) per layer; load = assignments of the step's
// micro-batches. Clears the loads.
inline void aux_free_bias_update(std::vector<std::vector<float>>& bias, std::vector<std::vector<long>>& load,
                                 double rate) {
    if (rate > 0)
        for (size_t l = 0; l < bias.size(); l++) {
            const int E = (int)bias[l].size();
            if (E == 0) continue;  // a dense model
            double mean = 0;
            for (int e = 0; e < E; e++) mean += load[l][e];
            mean /= E;
            for (int e = 0; e < E; e++) {
                double diff = mean - load[l][e];
                bias[l][e] += (float)(rate * ((diff > 0) - (diff < 0)));
            }
        }
    for (auto& row : load) std::fill(row.begin(), row.end(), 0);
}
