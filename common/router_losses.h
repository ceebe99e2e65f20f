// router_losses.h: the load-balancing loss settings and the coefficients of its gradient,
// shared by both trainers (and dev/cuda/router.cu) so that they cannot drift apart.
// The losses themselves are in docs/METHODS.md 1.2 and in train_moe.cpp's router section.
#pragma once
#include <string>
#include <vector>
#include "util.h"

enum AuxType { AUX_NONE, AUX_SWITCH, AUX_POOLED, AUX_SEQ };

inline int parse_aux(const std::string& s) {
    if (s == "none") return AUX_NONE;
    if (s == "switch") return AUX_SWITCH;
    if (s == "pooled") return AUX_POOLED;
    if (s == "seq") return AUX_SEQ;
    FAIL("--aux-loss must be switch, pooled, seq or none, found \"%s\"", s.c_str());
}
inline const char* aux_name(int a) {
    static const char* n[] = {"none", "switch", "pooled", "seq"};
    return n[a];
}

// The router-loss settings of a run (both trainers)
struct TrainSettings {
    int aux_type = AUX_SWITCH;
    double aux_coef = 0.01, z_coef = 0.001;
    double aux_free_rate = 0;  // DeepSeek-V3 bias update rate u; 0 = off
};

// The aux loss's gradient with respect to the router probabilities is the same for every
// row t of one sequence b: dL/dp_{t,i} = g[b*E + i]. `seq_counts` [B, E] are this layer's
// assignments per sequence, `pooled_counts` [E] all layers' (pooled only); counts carry no
// gradient. R is the trainer's float type (the CPU trainer's `real`, or float on the GPU).
template <typename R>
void aux_dp_per_seq(std::vector<R>& g, int aux, const int* seq_counts, const long* pooled_counts, int B, int T,
                    int E, int K, int L) {
    int N = B * T;
    g.assign((size_t)B * E, 0);
    for (int b = 0; b < B; b++)
        for (int i = 0; i < E; i++) {
            R c = 0;
            if (aux == AUX_SWITCH) {  // E f_i / N with f_i over the whole batch
                long tot = 0;
                for (int bb = 0; bb < B; bb++) tot += seq_counts[bb * E + i];
                c = (R)E * tot / ((R)N * K) / N;
            } else if (aux == AUX_SEQ) {  // (1/B) E f^b_i / T
                c = (R)E * seq_counts[b * E + i] / ((R)T * K) / T / B;
            } else if (aux == AUX_POOLED) {  // E C_i / (L N)^2
                R LN = (R)L * N;
                c = (R)E * pooled_counts[i] / (LN * LN);
            }
            g[(size_t)b * E + i] = c;
        }
}
