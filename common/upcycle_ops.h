// upcycle_ops.h: the math of every upcycling init (docs/METHODS.md section 2), as plain
// functions on float arrays. upcycle.cu streams tensors through them one at a time; the
// tests call them directly.
//
// Conventions (HF [out, in] layout): a dense SwiGLU FFN has gate [F, d], up [F, d],
// down [d, F]. "Neuron" j is row j of gate and up and column j of down; the functions
// below take `matrix` (MAT_GATE, MAT_UP, MAT_DOWN) to know which way a neuron lies.
//
// Every random number is a pure function of (seed, stream, index) (common/rng.h), with
// the stream keyed by (purpose, layer, expert, matrix) and the index the entry's position
// in its matrix. So the output never depends on the thread count or the order in which
// tensors are visited; reductions (means, standard deviations) run sequentially in double.
//
// defines: the upcycling methods' tensor operations (drop_neurons, add_noise_to_neurons,
//          partition_neurons, granular_*, router_init, utility_score, select_utility, ...)
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>
#include "model.h"         // defines: ModelConfig, ParamLayout
#include "rng.h"           // defines: stream_id, rng_normal, RngStream
#include "util.h"          // defines: Error, FAIL, strfmt, file helpers

enum FfnMatrix { MAT_GATE = 0, MAT_UP = 1, MAT_DOWN = 2 };
inline const char* ffn_matrix_name(int m) { return m == MAT_GATE ? "gate" : m == MAT_UP ? "up" : "down"; }

// Position of entry i (0 <= i < d) of neuron j in a [F, d] (gate, up) or [d, F] (down) matrix.
inline size_t neuron_entry(int matrix, int F, int d, int j, int i) {
    return matrix == MAT_DOWN ? (size_t)i * F + j : (size_t)j * d + i;
}

// n = floor(F r), the number of neurons a ratio r selects (docs/METHODS.md 2.4, 2.5). The 1e-9
// keeps decimal ratios exact (F = 10, r = 0.3 must give 3 even if 10 * 0.3 rounds down).
inline int neurons_of_ratio(int F, double r) { return (int)std::floor((double)F * r + 1e-9); }

// n distinct neurons of [0, F), uniformly without replacement: the first n steps of a
// Fisher-Yates shuffle driven by one RNG stream. Returned sorted.
inline std::vector<int> sample_neurons(int F, int n, uint64_t seed, uint64_t stream) {
    std::vector<int> perm(F);
    for (int j = 0; j < F; j++) perm[j] = j;
    RngStream r(seed, stream);
    for (int i = 0; i < n; i++) std::swap(perm[i], perm[i + (int)r.below((uint64_t)(F - i))]);
    std::vector<int> s(perm.begin(), perm.begin() + n);
    std::sort(s.begin(), s.end());
    return s;
}

// ---- router (docs/METHODS.md 2.2) ----

enum RouterInit { ROUTER_UNIFORM = 0, ROUTER_NORMAL = 1 };

// Router init of upcycled models, per layer, for a [rows, d] matrix:
//   uniform (Drop-Upcycling's torch_rand_002): U ~ Uniform[0,1); W = (U - mean(U)) * 0.02 sqrt(12),
//     i.e. zero-mean uniform with std 0.02 (the empirical mean over the whole matrix is removed);
//   normal: W ~ N(0, 0.02^2).
inline void router_init(float* W, int rows, int d, RouterInit kind, uint64_t seed, int layer) {
    size_t n = (size_t)rows * d;
    if (kind == ROUTER_NORMAL) {
        uint64_t st = stream_id(PURPOSE_ROUTER, (uint32_t)layer, 0, 1);
#pragma omp parallel for
        for (long i = 0; i < (long)n; i++) W[i] = (float)(0.02 * rng_normal(seed, st, (uint64_t)i));
        return;
    }
    uint64_t st = stream_id(PURPOSE_ROUTER, (uint32_t)layer, 0, 0);
#pragma omp parallel for
    for (long i = 0; i < (long)n; i++) W[i] = rng_uniform(seed, st, (uint64_t)i);
    double mean = 0;
    for (size_t i = 0; i < n; i++) mean += W[i];  // sequential: the same sum on any thread count
    mean /= (double)n;
    const double scale = 0.02 * std::sqrt(12.0);
    for (size_t i = 0; i < n; i++) W[i] = (float)((W[i] - mean) * scale);
}

// ---- random-noise upcycling (docs/METHODS.md 2.4) ----

// Adds i.i.d. N(0, std^2) to every entry of the neurons in S (std = 0.02 for RNU, fixed,
// whatever the weights' scale). The noise of entry k is normal number k of `stream`.
inline void add_noise_to_neurons(float* W, int matrix, int F, int d, const std::vector<int>& S, float std,
                                 uint64_t seed, uint64_t stream) {
#pragma omp parallel for
    for (long s = 0; s < (long)S.size(); s++)
        for (int i = 0; i < d; i++) {
            size_t k = neuron_entry(matrix, F, d, S[s], i);
            W[k] += (float)(std * rng_normal(seed, stream, k));
        }
}

// ---- Drop-Upcycling (docs/METHODS.md 2.5) ----

// Re-initializes the neurons in S: sub = their entries; mu = mean(sub), sigma = std(sub)
// (unbiased); each entry of sub is replaced by mu + sigma z, z = normal number k of
// `stream` (k = the entry's position). Empty S is a no-op (no statistics of an empty set).
// Returns {mu, sigma} for reporting.
inline std::pair<double, double> drop_neurons(float* W, int matrix, int F, int d, const std::vector<int>& S,
                                              uint64_t seed, uint64_t stream) {
    if (S.empty()) return {0.0, 0.0};
    double sum = 0, sq = 0;
    size_t n = S.size() * (size_t)d;
    for (int j : S)
        for (int i = 0; i < d; i++) sum += W[neuron_entry(matrix, F, d, j, i)];
    double mu = sum / (double)n;
    for (int j : S)
        for (int i = 0; i < d; i++) {
            double x = W[neuron_entry(matrix, F, d, j, i)] - mu;
            sq += x * x;
        }
    double sigma = n > 1 ? std::sqrt(sq / (double)(n - 1)) : 0.0;
#pragma omp parallel for
    for (long s = 0; s < (long)S.size(); s++)
        for (int i = 0; i < d; i++) {
            size_t k = neuron_entry(matrix, F, d, S[s], i);
            W[k] = (float)(mu + sigma * rng_normal(seed, stream, k));
        }
    return {mu, sigma};
}

// ---- neuron selection: granular shards (2.7), partitions (2.9) ----

// dst = scale * (the neurons `idx` of src, in that order): a [n, d] (gate, up) or [d, n]
// (down) matrix with n = idx.size(). Keeping a neuron's gate row, up row and down column
// together keeps its contribution to the FFN output intact.
inline void gather_neurons(float* dst, const float* src, int matrix, int F, int d, const std::vector<int>& idx,
                           float scale) {
    int n = (int)idx.size();
    for (int s = 0; s < n; s++)
        for (int i = 0; i < d; i++) dst[neuron_entry(matrix, n, d, s, i)] = src[neuron_entry(matrix, F, d, idx[s], i)] * scale;
}

// Granular upcycling (docs/METHODS.md 2.7): expert j = shard (j mod G) of the dense FFN, the
// contiguous neurons [g F/G, (g+1) F/G).
inline std::vector<int> granular_shard(int F, int G, int expert) {
    int Fe = F / G, g = expert % G;
    std::vector<int> idx(Fe);
    for (int i = 0; i < Fe; i++) idx[i] = g * Fe + i;
    return idx;
}
// Its weight scale: with K of E experts active out of groups of G, s = E G / K for
// softmax_topk (at a uniform router each active shard gets weight 1/E) and s = G for
// topk_softmax (weights of one group sum to 1, so each shard gets 1/G). gate, up and down
// are each multiplied by c = s^(1/3): SwiGLU output is degree 3 in (gate, up, down) jointly
// for homogeneous activations, so the expert output scales by s.
inline double granular_scale(int E, int G, int K, Routing routing) {
    return routing == ROUTING_SOFTMAX_TOPK ? (double)E * G / K : (double)G;
}
inline float granular_weight_mult(int E, int G, int K, Routing routing) {
    return (float)std::cbrt(granular_scale(E, G, K, routing));
}
// Its router: R = E / G random base rows (router_init of a [R, d] matrix), row j = base
// row j div G, so the G shards of one copy have bit-identical logits and top-K (ties to
// the lower index) picks whole groups when K is a multiple of G.
inline void granular_router(float* W, int E, int G, int d, RouterInit kind, uint64_t seed, int layer) {
    int R = E / G;
    std::vector<float> base((size_t)R * d);
    router_init(base.data(), R, d, kind, seed, layer);
    for (int j = 0; j < E; j++) std::copy(base.begin() + (size_t)(j / G) * d, base.begin() + (size_t)(j / G + 1) * d,
                                          W + (size_t)j * d);
}

// Neuron partition (LLaMA-MoE, docs/METHODS.md 2.9): a random permutation of the F neurons
// (Fisher-Yates on stream (MISC, layer, replica, 0x9a)), cut into E consecutive sets of F/E;
// expert i = set i, its neurons in ascending order. The sets are disjoint and cover F.
// `replica` picks an independent permutation (Qwen2's recipe shuffles each copy of the FFN
// on its own, 2.11); replica 0 is LLaMA-MoE's one partition.
inline std::vector<std::vector<int>> partition_neurons(int F, int E, uint64_t seed, int layer, int replica = 0) {
    std::vector<int> perm(F);
    for (int j = 0; j < F; j++) perm[j] = j;
    RngStream r(seed, stream_id(PURPOSE_MISC, (uint32_t)layer, (uint32_t)replica, 0x9a));
    for (int i = F - 1; i > 0; i--) std::swap(perm[i], perm[(int)r.below((uint64_t)i + 1)]);
    int Fe = F / E;
    std::vector<std::vector<int>> sets(E);
    for (int e = 0; e < E; e++) {
        sets[e].assign(perm.begin() + (size_t)e * Fe, perm.begin() + (size_t)(e + 1) * Fe);
        std::sort(sets[e].begin(), sets[e].end());
    }
    return sets;
}

// ---- shared experts from a dense FFN (docs/METHODS.md 2.11) ----

// The dense FFN becomes the shared expert, beside routed experts that at init also give the
// dense FFN's output for a token (copies, with topk_softmax weights summing to 1), or an
// estimate of it (Qwen2's fine-grained shards). The FFN output is then split evenly:
//   gated (Qwen2-MoE): shared expert = the FFN unchanged, its gate vector g = 0, so
//                      sigmoid(x . g) = 1/2 for every token;
//   ungated:           shared expert = the FFN with down_proj x 1/2;
// and the routed experts' down_proj x 1/2 (times any method scale). With naive copies and
// topk_softmax the MoE layer's output is then exactly FFN(x)/2 + FFN(x)/2: the dense
// model's function (test_upcycle checks the logits).
inline float shared_down_mult(bool gated) { return gated ? 1.0f : 0.5f; }
inline float routed_down_mult() { return 0.5f; }

// Qwen2's fine-grained routed experts: expert e of width F/G is set (e mod G) of replica
// (e div G)'s own random partition of the F neurons into G sets; ceil(E / G) replicas.
inline std::vector<int> qwen2_expert_neurons(int F, int G, int e, uint64_t seed, int layer) {
    return partition_neurons(F, G, seed, layer, e / G)[e % G];
}

// ---- Branch-Train-MiX (docs/METHODS.md 2.6) ----

// Expert e comes from source floor(e / (E/S)): each source fills E/S consecutive experts.
inline int btx_source(int e, int E, int S) { return e / (E / S); }
// out = element-wise mean of the S sources (summed in double, in source order).
inline void mean_of_sources(float* out, const std::vector<std::vector<float>>& src, size_t n) {
    double inv = 1.0 / (double)src.size();
#pragma omp parallel for
    for (long i = 0; i < (long)n; i++) {
        double s = 0;
        for (auto& v : src) s += v[i];
        out[i] = (float)(s * inv);
    }
}

// ---- expert upcycling E -> mE (docs/METHODS.md 2.8) ----

enum UtilityScore { SCORE_WEIGHT_NORM, SCORE_GRAD_NORM, SCORE_SALIENCY, SCORE_FISHER };
inline UtilityScore parse_score(const std::string& s) {
    if (s == "weight_norm") return SCORE_WEIGHT_NORM;
    if (s == "grad_norm") return SCORE_GRAD_NORM;
    if (s == "saliency") return SCORE_SALIENCY;
    if (s == "fisher") return SCORE_FISHER;
    FAIL("--score must be weight_norm, grad_norm, saliency or fisher, found \"%s\"", s.c_str());
}
inline bool score_needs_grads(UtilityScore s) { return s != SCORE_WEIGHT_NORM; }

// One expert's utility from the squared norms over its gate, up and down together:
//   weight_norm ||W||;  grad_norm ||g||^2;  saliency ||W|| ||g||;  fisher ||g||^2 / (||v|| + 1e-8)
// (g = the loss gradient averaged over the utility batches, v = Adam's second moment).
inline double utility_score(UtilityScore kind, double w_sq, double g_sq, double v_sq) {
    switch (kind) {
        case SCORE_WEIGHT_NORM: return std::sqrt(w_sq);
        case SCORE_GRAD_NORM: return g_sq;
        case SCORE_SALIENCY: return std::sqrt(w_sq) * std::sqrt(g_sq);
        default: return g_sq / (std::sqrt(v_sq) + 1e-8);
    }
}

// Which source expert fills each of the m E slots of one layer. Slots 0..E-1 keep the
// originals (so m = 1 is the identity); the (m-1) E new slots follow.
//   uniform: new slot E + r E + i <- expert i (every expert duplicated m-1 times);
//   utility: experts in order of decreasing score (ties: lower index first), each taking
//            up to max_dup new slots before the next one gets any (greedy by score).
inline std::vector<int> select_uniform(int E, int m) {
    std::vector<int> src((size_t)E * m);
    for (int j = 0; j < E * m; j++) src[j] = j % E;
    return src;
}
inline std::vector<int> select_utility(const std::vector<double>& score, int m, int max_dup) {
    int E = (int)score.size();
    if ((long)max_dup * E < (long)(m - 1) * E)
        FAIL("--max-dup %d: %d experts can fill at most %d new slots, but %d are needed (raise --max-dup to >= %d)",
             max_dup, E, max_dup * E, (m - 1) * E, m - 1);
    std::vector<int> order(E);
    for (int e = 0; e < E; e++) order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[a] > score[b]; });
    std::vector<int> src(E);
    for (int e = 0; e < E; e++) src[e] = e;
    for (int e : order)
        for (int c = 0; c < max_dup && (int)src.size() < m * E; c++) src.push_back(e);
    return src;
}

// ---- UpIT: experts from a dense run's checkpoints, more by merging (docs/METHODS.md 2.12) ----

// Every UpIT expert is a convex combination of the S checkpoints' FFNs, held as its
// coefficient vector c (S entries >= 0, summing to 1): expert j = sum_s c[j][s] FFN_s.
// Experts 0..S-1 are the checkpoints themselves (c = unit vectors); expert S + k is merge k:
// c_new = w c_a + (1 - w) c_b of two earlier experts a < b (the pool grows as it merges).
enum UpitPair { UPIT_PAIR_FARTHEST = 0, UPIT_PAIR_RANDOM = 1 };
inline UpitPair parse_upit_pair(const std::string& s) {
    if (s == "farthest") return UPIT_PAIR_FARTHEST;
    if (s == "random") return UPIT_PAIR_RANDOM;
    FAIL("--upit-pair must be farthest or random, found \"%s\"", s.c_str());
}

struct UpitPlan {
    std::vector<std::vector<double>> coef;  // [E][S]
    std::vector<int> parent_a, parent_b;    // [E]; -1 for the checkpoints' own experts
    std::vector<double> weight;             // [E]: w of parent_a (1 for the checkpoints)
    std::vector<double> dist2;              // [E]: squared distance of the two parents (0 for the checkpoints)
};

// Squared distance between two combinations a and b of the sources from the sources' pairwise
// squared distances D2 (S x S): with delta = a - b, which sums to 0,
//   ||sum_s delta_s x_s||^2 = -1/2 sum_{s,t} delta_s delta_t D2[s][t]
// (expand ||x_s - x_t||^2 and use sum delta = 0). Exact algebra on the accurate D2, where a
// Gram matrix <x_s, x_t> would subtract large, nearly equal numbers.
inline double upit_dist2(const std::vector<double>& a, const std::vector<double>& b,
                         const std::vector<std::vector<double>>& D2) {
    const size_t S = a.size();
    double s = 0;
    for (size_t i = 0; i < S; i++)
        for (size_t j = 0; j < S; j++) s += (a[i] - b[i]) * (a[j] - b[j]) * D2[i][j];
    return std::max(0.0, -0.5 * s);
}

// The merge plan for E experts from S checkpoints (E >= S >= 2). Merge k (expert S + k):
//   pair:   farthest = the pair (a, b), a < b, of experts 0..S+k-1 not merged before whose
//           FFNs (all layers, gate, up and down together) are farthest apart in L2, ties to the
//           lowest (a, b); random = a pair drawn uniformly from the pairs not merged before;
//   weight: w ~ Uniform[w_lo, w_hi] (float number k of stream (MISC, 0, 0, 0x0b17)).
// The plan is one for every layer: expert j mixes the same checkpoints in every layer.
inline UpitPlan upit_plan(int S, int E, const std::vector<std::vector<double>>& D2, UpitPair rule, double w_lo,
                          double w_hi, uint64_t seed) {
    if (S < 2) FAIL("--method upit needs at least 2 checkpoints, found %d", S);
    if (E < S) FAIL("--experts %d: upit makes one expert per checkpoint and more by merging, so it needs at least the "
                    "%d checkpoints given (or give fewer --from checkpoints)", E, S);
    if (!(w_lo >= 0 && w_hi <= 1 && w_lo <= w_hi))
        FAIL("the merge weight range [%g, %g] must lie in [0, 1] with low <= high", w_lo, w_hi);
    UpitPlan p;
    for (int s = 0; s < S; s++) {
        std::vector<double> c(S, 0.0);
        c[s] = 1.0;
        p.coef.push_back(c);
        p.parent_a.push_back(-1);
        p.parent_b.push_back(-1);
        p.weight.push_back(1.0);
        p.dist2.push_back(0.0);
    }
    std::vector<std::vector<char>> used((size_t)E, std::vector<char>((size_t)E, 0));
    const uint64_t wstream = stream_id(PURPOSE_MISC, 0, 0, 0x0b17), pstream = stream_id(PURPOSE_MISC, 0, 0, 0x0b18);
    for (int k = 0; S + k < E; k++) {
        const int n = S + k;  // experts so far
        int ba = -1, bb = -1;
        double best = -1;
        if (rule == UPIT_PAIR_FARTHEST) {
            for (int a = 0; a < n; a++)
                for (int b = a + 1; b < n; b++) {
                    if (used[a][b]) continue;
                    double d = upit_dist2(p.coef[a], p.coef[b], D2);
                    if (d > best) { best = d; ba = a; bb = b; }
                }
        } else {
            std::vector<std::pair<int, int>> free_pairs;
            for (int a = 0; a < n; a++)
                for (int b = a + 1; b < n; b++)
                    if (!used[a][b]) free_pairs.push_back({a, b});
            auto pr = free_pairs[rng_u64(seed, pstream, (uint64_t)k) % free_pairs.size()];
            ba = pr.first; bb = pr.second;
            best = upit_dist2(p.coef[ba], p.coef[bb], D2);
        }
        used[ba][bb] = 1;
        const double w = w_lo + (w_hi - w_lo) * (double)rng_uniform(seed, wstream, (uint64_t)k);
        std::vector<double> c(S);
        for (int s = 0; s < S; s++) c[s] = w * p.coef[ba][s] + (1.0 - w) * p.coef[bb][s];
        p.coef.push_back(c);
        p.parent_a.push_back(ba);
        p.parent_b.push_back(bb);
        p.weight.push_back(w);
        p.dist2.push_back(best);
    }
    return p;
}

// out = sum_s c[s] src[s] (n floats each), summed in double in source order; zero
// coefficients are skipped, so a unit vector copies its source bit for bit.
inline void combine_sources(float* out, const std::vector<const float*>& src, const std::vector<double>& c, size_t n) {
#pragma omp parallel for
    for (long i = 0; i < (long)n; i++) {
        double s = 0;
        for (size_t k = 0; k < src.size(); k++)
            if (c[k] != 0.0) s += c[k] * (double)src[k][i];
        out[i] = (float)s;
    }
}

// Squared L2 distance of two arrays, summed in double (sequential: the same on any thread count).
inline double sq_distance(const float* a, const float* b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        s += d * d;
    }
    return s;
}

// ---- XFT's learnable merge back to a dense model (docs/METHODS.md 2.13) ----
// Per layer, E mixing logits alpha; m = softmax(alpha) (in double, max-shifted), and each
// FFN matrix (gate, up, down alike) of the dense model is
//   W = lambda S + (1 - lambda) sum_i m_i X_i        S the shared expert's, X_i routed expert i's
// summed in double in expert order and rounded once. So with every X_i = S the result is S
// bit for bit, whatever alpha (the sum is within a few double ulps of the float S).
inline std::vector<double> softmax_of(const std::vector<double>& a) {
    double mx = a.empty() ? 0.0 : *std::max_element(a.begin(), a.end()), s = 0;
    std::vector<double> m(a.size());
    for (size_t i = 0; i < a.size(); i++) s += (m[i] = std::exp(a[i] - mx));
    for (double& x : m) x /= s;
    return m;
}
template <typename T>
inline void xft_merge_matrix(T* out, const T* shared, const std::vector<const T*>& experts,
                             const std::vector<double>& m, double lambda, size_t n) {
#pragma omp parallel for
    for (long i = 0; i < (long)n; i++) {
        double s = 0;
        for (size_t k = 0; k < experts.size(); k++) s += m[k] * (double)experts[k][i];
        out[i] = (T)(lambda * (double)shared[i] + (1 - lambda) * s);
    }
}
// The gradient of the loss over alpha, given G = dLoss/dW for the layer's three matrices
// (gate, up, down, concatenated; the same for X_i): with g_i = (1 - lambda) <G, X_i>,
//   dLoss/dalpha_j = m_j (g_j - sum_i m_i g_i)            (softmax's Jacobian)
// g_i summed in double, sequentially (the same on any thread count).
template <typename T>
inline std::vector<double> xft_merge_alpha_grad(const std::vector<const T*>& G, const std::vector<std::vector<const T*>>& X,
                                                const std::vector<size_t>& n, const std::vector<double>& m, double lambda) {
    const size_t E = m.size();
    std::vector<double> g(E, 0.0), out(E);
    for (size_t k = 0; k < E; k++)
        for (size_t mat = 0; mat < G.size(); mat++)
            for (size_t i = 0; i < n[mat]; i++) g[k] += (double)G[mat][i] * (double)X[mat][k][i];
    double gbar = 0;
    for (size_t k = 0; k < E; k++) gbar += m[k] * (1 - lambda) * g[k];
    for (size_t k = 0; k < E; k++) out[k] = m[k] * ((1 - lambda) * g[k] - gbar);
    return out;
}
