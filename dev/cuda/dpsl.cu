/*
The Dirichlet-prior shaping loss on the device (docs/METHODS.md 1.6), kernels/dpsl.cuh:
  per expert i: sort p_{., i} over the N rows (ties: lower row first), then
  sum[i] = sum_r D(F_i(p_(r),i) - u_r)         (the value: the host's dpsl_loss adds sum / N E)
  G[n, i] = (1/(N E)) D'(F_i(p_n,i) - u_r) f_i(p_n,i)   (dL/dp of row n, the r-th smallest)
CPU reference: common/router_losses.h dpsl_loss and dpsl_dp_rows on the same float
probabilities (the CPU trainer's code: std::stable_sort for the order). Both evaluate the
same dpsl_row, so under emulation G agrees bit for bit; on a GPU, lgamma, exp and log differ
from the host's by a few ulps, hence the tolerances below (value 1e-12 relative; G: elementwise
1e-5 relative + 1e-6 of max |G|, which a one-ulp difference of a float meets).

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/dpsl.cu -o build/dpsl -lcublas -lcublasLt -lgomp && ./build/dpsl [version]

Version 1 is the production kernel, called as train_moe.cu's moe_forward does
(gpu::dpsl_prepare once, gpu::dpsl_forward per layer). Cases (rows N, experts E): both
distances and both empirical CDFs, symmetric and asymmetric priors; exact ties (rows copied
from the row before), probabilities exactly 0 (a logit of -200) and near 1 (E = 2 with large
logit gaps); N not a power of two; and the largest N the device's shared memory holds (16384
on an H100/H200; 2048 under emulation). Then: N one power of two above that is refused with
an error naming the options. The checks are tested each run (check_catches): the kernel's
gradient with one tied pair's values exchanged (ties broken the wrong way) and with the last
row's gradient missing must both fail the comparison.
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/dpsl.cuh"

const char* NAMES[] = {"", "kernels/dpsl.cuh"};
const int NV = 1;

struct Case {
    int N, E;
    std::vector<double> alpha;
    DpslDistance distance;
    DpslEcdf ecdf;
    bool ties, extremes;
};

static double max_abs(const std::vector<float>& v) {
    double m = 0;
    for (float x : v) m = std::max(m, (double)std::fabs(x));
    return m;
}

static void check(Suite& S, const Case& c, uint64_t& seed) {
    const int N = c.N, E = c.E;
    DpslSettings st;
    st.on = true;
    st.alpha = c.alpha;
    st.distance = c.distance;
    st.ecdf = c.ecdf;
    st.check(E);
    printf("  N %d E %d alpha %s%s distance %s ecdf %s%s%s\n", N, E, c.alpha.size() == 1 ? "" : "(per expert) ",
           strfmt("%g", c.alpha[0]).c_str(), dpsl_distance_name(c.distance), dpsl_ecdf_name(c.ecdf),
           c.ties ? " ties" : "", c.extremes ? " p=0 and p~1" : "");
    // probabilities: a softmax of random logits per row
    auto logits = rand_floats((size_t)N * E, seed++, -3, 3);
    if (c.extremes)
        for (int n = 0; n < N; n++) {
            if (n % 5 == 0) logits[(size_t)n * E] = -200;  // p exactly 0
            if (n % 7 == 0) logits[(size_t)n * E + 1] = 25;  // p of expert 1 within float rounding of 1
        }
    std::vector<float> p((size_t)N * E);
    for (int n = 0; n < N; n++) {
        float mx = logits[(size_t)n * E], s = 0;
        for (int i = 1; i < E; i++) mx = std::max(mx, logits[(size_t)n * E + i]);
        for (int i = 0; i < E; i++) s += p[(size_t)n * E + i] = std::exp(logits[(size_t)n * E + i] - mx);
        for (int i = 0; i < E; i++) p[(size_t)n * E + i] /= s;
    }
    if (c.ties)  // every third row a copy of the one before: exact ties in every expert
        for (int n = 2; n < N; n += 3) std::copy(&p[(size_t)(n - 1) * E], &p[(size_t)n * E], &p[(size_t)n * E]);
    // CPU reference: the RoutingStats form the CPU trainer hands in (one layer, B = 1)
    std::vector<double> pd(p.begin(), p.end()), zsum(N, 0);
    std::vector<int> counts(E, 0);
    RoutingStats rs;
    rs.B = 1; rs.T = N; rs.E = E; rs.K = 1; rs.seg = 1;
    rs.layers.push_back({counts.data(), pd.data(), zsum.data(), pd.data()});
    const double ref_value = dpsl_loss(rs, st);
    std::vector<float> ref_G;
    dpsl_dp_rows(ref_G, rs, st, 0);
    // the kernel
    std::vector<double> ab;
    for (int i = 0; i < E; i++) { ab.push_back(st.alpha_of(i)); ab.push_back(st.alpha_sum(E) - st.alpha_of(i)); }
    Dev<float> dP(p), dG((size_t)N * E);
    Dev<double> dAb(ab), dSum((size_t)E);
    dG.poison();
    gpu::dpsl_prepare(N);
    gpu::dpsl_forward(dSum.p, dG.p, dP.p, dAb.p, N, E, c.distance, c.ecdf, (cudaStream_t)0);
    // the value as the GPU trainer's host computes it: dpsl_loss from the device's sums
    std::vector<double> sums = dSum.host();
    RoutingStats rg = rs;
    rg.layers[0].probs = nullptr;
    rg.layers[0].dpsl_sum = sums.data();
    const double got = dpsl_loss(rg, st), err = std::fabs(got - ref_value), bound = 1e-12 * std::fabs(ref_value) + 1e-300;
    S.check_true("value (sum / N E)", err <= bound,
                 strfmt("got %.17g reference %.17g, |err| %.3g (tol %.3g)", got, ref_value, err, bound).c_str());
    const Tol tol = {1e-5, 1e-6 * max_abs(ref_G), 1e-5};
    std::vector<float> G = dG.host();
    S.check_close("dL/dp [N, E]", G, ref_G, tol);
    // the check itself: ties broken the wrong way (one tied pair's gradients exchanged), and
    // the last row's gradient missing, must both be caught
    const Suite::Cmp real = Suite::compare_close(G, ref_G, tol);
    if (c.ties) {
        std::vector<float> bad = G;  // the tied pair whose gradients differ most
        size_t x = E;  // rows 1 and 2: the first tied pair
        for (int n = 2; n < N; n += 3)
            for (int i = 0; i < E; i++) {
                const size_t y = (size_t)n * E + i;
                if (std::fabs(bad[y] - bad[y - E]) > std::fabs(bad[x + E] - bad[x])) x = y - E;
            }
        std::swap(bad[x], bad[x + E]);
        S.check_catches("a tie broken the other way", real, Suite::compare_close(bad, ref_G, tol));
    }
    std::vector<float> bad = G;
    for (int i = 0; i < E; i++) bad[(size_t)(N - 1) * E + i] = 0;
    S.check_catches("the last row's gradient missing", real, Suite::compare_close(bad, ref_G, tol));
}

int main(int argc, char** argv) {
    Suite S("dpsl", argc, argv);
    const int max_rows = gpu::dpsl_max_rows();
    const int big = EMULATED ? 2048 : max_rows;
    const Case cases[] = {
        {1, 2, {1.0}, DPSL_SQ, DPSL_MID, false, false},
        {7, 4, {0.5, 1.0, 1.5, 2.0}, DPSL_SQ, DPSL_MID, true, false},
        {16, 4, {0.5, 1.0, 1.5, 2.0}, DPSL_ABS, DPSL_RIGHT, true, true},
        {100, 2, {0.7}, DPSL_SQ, DPSL_RIGHT, false, true},
        {333, 8, {1.0}, DPSL_ABS, DPSL_MID, true, true},
        {1000, 8, {2.0}, DPSL_SQ, DPSL_MID, true, false},
        {big, 8, {0.5}, DPSL_SQ, DPSL_MID, true, true},
    };
    for (int v = 1; v <= NV; v++) {
        if (!S.want(v)) continue;
        S.begin(v, NAMES[v]);
        uint64_t seed = 17 * v;
        for (const Case& c : cases) check(S, c, seed);
        // above the shared-memory limit: refused, with the options to change
        std::string msg;
        try {
            gpu::dpsl_prepare(max_rows + 1);
        } catch (const Error& e) {
            msg = e.what();
        }
        S.check_true(strfmt("N %d (over %d) refused", max_rows + 1, max_rows).c_str(),
                     msg.find("--batch") != std::string::npos && msg.find("at most") != std::string::npos,
                     msg.empty() ? "(no error)" : msg.c_str());
        if (!EMULATED) {  // the cost of one layer at the largest size
            const int N = max_rows, E = 8;
            Dev<float> dP(rand_floats((size_t)N * E, seed++, 0.0f, 1.0f)), dG((size_t)N * E);
            Dev<double> dAb(std::vector<double>(2 * E, 1.0)), dSum((size_t)E);
            gpu::dpsl_prepare(N);
            S.bench("forward N max E 8", [&] {
                gpu::dpsl_forward(dSum.p, dG.p, dP.p, dAb.p, N, E, DPSL_SQ, DPSL_MID, (cudaStream_t)0);
            }, 8.0 * N * E);
        }
    }
    return S.finish();
}
