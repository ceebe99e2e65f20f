/*
Grove MoE's adjugate experts (arXiv 2508.07785; docs/METHODS.md 1.10), kernels/grove.cuh:
  weights:  gw[n, j] = sum of topw[n, k] over the slots k with topk[n, k] / S == j (0: inactive)
  forward:  out[n] += lambda gw[n, j] ya[j, n] over the active groups j     (ya [G, N, d])
  backward: dya[j, n] = lambda gw[n, j] dout[n] (written, 0 when inactive);
            dtopw[n, k] += lambda dout[n] . ya[j, n] for the group j of slot k
CPU reference: train_moe.cpp's sparse form, grove_permute + grove_combine_forward/_backward +
grove_weights_backward over the (token, active group) rows; the GPU's dense [G, N, d] arrays
are compared with it row by row, and the inactive entries of dya must be exactly 0. The
adjugate FFNs around these are the dense FFN's matmul + swiglu (their own checks).

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/grove.cu -o build/grove -lcublas -lcublasLt -lgomp && ./build/grove [version]

Version 1 (T = float) and 2 (T = bf16) are the production kernels, called as train_moe.cu does
(ya, out, dout, dya in T; topw, gw, dtopw in fp32). Sizes (N, d, E, K, G): (1, 1, 2, 1, 1),
(7, 33, 8, 3, 4), (100, 64, 8, 2, 2), (256, 96, 16, 4, 4) and, on a GPU, (8192, 768, 64, 8, 16)
to time.
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/grove.cuh"

typedef __nv_bfloat16 bf16;
const char* NAMES[] = {"", "kernels/grove.cuh (fp32)", "kernels/grove.cuh (bf16)"};
const int NV = 2;

template <typename T>
void check(Suite& S, int N, int d, int E, int K, int G, uint64_t& seed) {
    const bool is_bf16 = sizeof(T) == 2;
    const Tol tol = is_bf16 ? TOL_BF16 : TOL_FP32;
    const int Sg = E / G;
    const float lambda = 0.3f;
    printf("  N %d d %d E %d K %d G %d\n", N, d, E, K, G);
    const size_t nd = (size_t)N * d, gnd = (size_t)G * nd;
    // routing: K distinct experts per token, positive weights
    std::vector<int> topk((size_t)N * K);
    {
        Rng r(seed++);
        for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++) {
                int e;
                bool dup;
                do {
                    e = (int)(r.next() % (uint64_t)E);
                    dup = false;
                    for (int k2 = 0; k2 < k; k2++) dup |= topk[(size_t)n * K + k2] == e;
                } while (dup);
                topk[(size_t)n * K + k] = e;
            }
    }
    auto topw = rand_floats((size_t)N * K, seed++, 0.05f, 1.0f);
    auto ya = rand_floats(gnd, seed++), out0 = rand_floats(nd, seed++), dout = rand_floats(nd, seed++);
    auto dtopw0 = rand_floats((size_t)N * K, seed++);
    if (is_bf16) { ya = round_bf16(ya); out0 = round_bf16(out0); dout = round_bf16(dout); }
    // CPU reference: the sparse rows
    const int Kg = std::min(K, G);
    std::vector<int> gcounts(G), goffsets(G + 1), grow_token((size_t)N * Kg), grow_of((size_t)N * K);
    std::vector<float> grow_w((size_t)N * Kg);
    grove_permute(gcounts.data(), goffsets.data(), grow_token.data(), grow_w.data(), grow_of.data(), topk.data(),
                  topw.data(), N, K, G, Sg);
    const int R = goffsets[G];
    std::vector<int> grow_group(R);
    for (int j = 0; j < G; j++)
        for (int r = goffsets[j]; r < goffsets[j + 1]; r++) grow_group[r] = j;
    std::vector<float> ya_rows((size_t)R * d), gw(nd / d * G, 0.0f);
    for (int r = 0; r < R; r++) {
        for (int i = 0; i < d; i++) ya_rows[(size_t)r * d + i] = ya[(size_t)grow_group[r] * nd + (size_t)grow_token[r] * d + i];
        gw[(size_t)grow_token[r] * G + grow_group[r]] = grow_w[r];
    }
    std::vector<float> out = out0, dya_rows((size_t)R * d), dgw_rows(R), dtopw = dtopw0;
    grove_combine_forward(out.data(), ya_rows.data(), grow_w.data(), grow_of.data(), lambda, N, K, d);
    grove_combine_backward(dya_rows.data(), dgw_rows.data(), dout.data(), ya_rows.data(), grow_w.data(),
                           grow_token.data(), lambda, R, d);
    grove_weights_backward(dtopw.data(), dgw_rows.data(), grow_of.data(), N * K);
    std::vector<float> dya(gnd, 0.0f);  // the dense form: zeros where a group is inactive
    for (int r = 0; r < R; r++)
        for (int i = 0; i < d; i++)
            dya[(size_t)grow_group[r] * nd + (size_t)grow_token[r] * d + i] = dya_rows[(size_t)r * d + i];

    Dev<int> dTopk(topk);
    Dev<float> dTopw(topw), dGw((size_t)N * G), dDtopw(dtopw0), dDgw((size_t)N * G);
    Dev<T> dYa(to_t<T>(ya)), dOut(to_t<T>(out0)), dDout(to_t<T>(dout)), dDya(gnd);
    dGw.poison();
    gpu::grove_weights_forward(dGw.p, dTopk.p, dTopw.p, N, K, G, Sg, (cudaStream_t)0);
    S.check_close("weights gw (written)", dGw.host(), gw, TOL_FP32);
    auto fwd = [&] { gpu::grove_combine_forward(dOut.p, (const T*)dYa.p, dGw.p, lambda, N, d, G, (cudaStream_t)0); };
    fwd();
    S.check_close("forward out (+=)", host_f(dOut), out, tol);
    dDya.poison();
    dDgw.poison();
    gpu::grove_combine_backward(dDya.p, dDtopw.p, dDgw.p, (const T*)dDout.p, (const T*)dYa.p, dGw.p, dTopk.p, lambda,
                                N, d, G, K, Sg, (cudaStream_t)0);
    std::vector<float> got = host_f(dDya);
    S.check_close("backward dya (written)", got, dya, tol);
    size_t nonzero_inactive = 0;
    for (size_t i = 0; i < gnd; i++) nonzero_inactive += gw[(i % nd) / d * G + i / nd] == 0.0f && got[i] != 0.0f;
    S.check_true("dya of inactive groups = 0", nonzero_inactive == 0, strfmt("%zu nonzero", nonzero_inactive).c_str());
    S.check_close("backward dtopw (+=)", dDtopw.host(), dtopw, sum_tol(dtopw, tol));
    if (N == 8192) {
        const double es = sizeof(T);
        S.bench("forward", fwd, (2.0 + G) * nd * es);  // read out, ya; write out
    }
}

int main(int argc, char** argv) {
    Suite S("grove", argc, argv);
    const int sizes[][5] = {{1, 1, 2, 1, 1}, {7, 33, 8, 3, 4}, {100, 64, 8, 2, 2}, {256, 96, 16, 4, 4},
                            {8192, 768, 64, 8, 16}};
    for (int v = 1; v <= NV; v++) {
        if (!S.want(v)) continue;
        S.begin(v, NAMES[v]);
        uint64_t seed = 97 * v;
        for (auto& s : sizes) {
            if (EMULATED && s[0] > 256) continue;
            if (v == 1) check<float>(S, s[0], s[1], s[2], s[3], s[4], seed);
            else check<bf16>(S, s[0], s[1], s[2], s[3], s[4], seed);
        }
    }
    return S.finish();
}
