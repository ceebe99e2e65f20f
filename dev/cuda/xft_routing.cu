/*
XFT's routing-weight normalization (docs/METHODS.md 1.8), kernels/xft_routing.cuh:
  forward:  w_k = q_1 softmax_k(q),  c = 1 - q_1  (q_k = p_{e_k});  out[n] += c[n] y[n]
  backward: dy = c dout (written), dc = dout . y (written); dq_k = w_k (dw_k - gbar) +
            delta_{k,1} (gbar - dc), then kernels/router.cuh's softmax_topk path to dlogits
CPU reference: train_moe.cpp router_forward / router_backward with ROUTING_XFT and
xft_shared_forward / xft_shared_backward.

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/xft_routing.cu -o build/xft_routing -lcublas -lcublasLt -lgomp && ./build/xft_routing [version]

Version 1 (T = float) and 2 (T = bf16) are the production kernels, called as train_moe.cu does
(y, out, dout, dy in T; probs, weights, c, dc, dlogits in fp32), after the production router
kernels (kernels/router.cuh). Sizes (N, E, K, d): (1, 4, 1, 1), (7, 4, 2, 33), (100, 8, 3, 64),
(2048, 8, 2, 768), and with an aux-free bias (the first chosen expert then need not be the most
probable one).
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/router.cuh"
#include "../../kernels/xft_routing.cuh"

typedef __nv_bfloat16 bf16;
const char* NAMES[] = {"", "kernels/xft_routing.cuh (fp32)", "kernels/xft_routing.cuh (bf16)"};
const int NV = 2;

template <typename T>
void check(Suite& S, int N, int E, int K, int d, bool bias, uint64_t& seed) {
    const bool is_bf16 = sizeof(T) == 2;
    const Tol tol = is_bf16 ? TOL_BF16 : TOL_FP32;
    printf("  N %d E %d K %d d %d%s\n", N, E, K, d, bias ? " bias" : "");
    const size_t nd = (size_t)N * d;
    auto logits = rand_floats((size_t)N * E, seed++, -3, 3), b = rand_floats(E, seed++, -1, 1);
    auto y = rand_floats(nd, seed++), out0 = rand_floats(nd, seed++), dout = rand_floats(nd, seed++);
    auto dtopw = rand_floats((size_t)N * K, seed++);
    if (is_bf16) { y = round_bf16(y); out0 = round_bf16(out0); dout = round_bf16(dout); }
    // CPU reference
    std::vector<float> probs((size_t)N * E), topw((size_t)N * K), c(N), out = out0, dy(nd), dc(N), dl((size_t)N * E, 0.0f);
    std::vector<int> topk((size_t)N * K);
    router_forward(probs.data(), topk.data(), topw.data(), logits.data(), bias ? b.data() : nullptr, N, E, K, ROUTING_XFT);
    xft_shared_forward(out.data(), c.data(), y.data(), probs.data(), topk.data(), N, E, K, d);
    xft_shared_backward(dy.data(), dc.data(), dout.data(), y.data(), c.data(), N, d);
    router_backward(dl.data(), dtopw.data(), probs.data(), topk.data(), topw.data(), N, E, K, ROUTING_XFT, dc.data());
    // GPU: the production router, then the xft kernels, as train_moe.cu calls them
    Dev<float> dZ(logits), dB(b), dP((size_t)N * E), dLse((size_t)N), dW((size_t)N * K), dC((size_t)N), dDc((size_t)N);
    Dev<float> dDw(dtopw), dDl((size_t)N * E);
    Dev<int> dK((size_t)N * K);
    Dev<T> dY(to_t<T>(y)), dOut(to_t<T>(out0)), dDout(to_t<T>(dout)), dDy(nd);
    dP.poison(); dW.poison(); dK.poison(); dC.poison(); dDc.poison(); dDy.poison(); dDl.poison();
    gpu::router_forward(dP.p, dLse.p, dK.p, dW.p, dZ.p, bias ? dB.p : nullptr, N, E, K, false, (cudaStream_t)0);
    gpu::xft_weights(dW.p, dC.p, dP.p, dK.p, N, E, K, (cudaStream_t)0);
    S.check_equal("topk", dK.host(), topk);
    S.check_close("xft weights", dW.host(), topw, TOL_FP32);
    S.check_close("shared weight 1 - q_1", dC.host(), c, TOL_FP32);
    // the rest from the CPU's forward, so that a forward bug is not counted twice
    dP.upload(probs); dK.upload(topk); dW.upload(topw); dC.upload(c);
    gpu::xft_shared_forward(dOut.p, (const float*)dC.p, (const T*)dY.p, N, d, (cudaStream_t)0);
    S.check_close("shared forward out (+=)", host_f(dOut), out, tol);
    gpu::xft_shared_backward(dDy.p, dDc.p, (const T*)dDout.p, (const T*)dY.p, (const float*)dC.p, N, d, (cudaStream_t)0);
    S.check_close("shared backward dy (written)", host_f(dDy), dy, tol);
    S.check_close("shared backward dc (written)", dDc.host(), dc, sum_tol(dc, tol));
    dDc.upload(dc);
    gpu::xft_gate_backward(dDw.p, dW.p, dP.p, dK.p, dDc.p, N, E, K, (cudaStream_t)0);
    gpu::router_backward(dDl.p, dDw.p, dP.p, dLse.p, dK.p, dW.p, nullptr, 0.0f, 0.0f, 1.0f, N, N, N, E, K, true,
                         (cudaStream_t)0);
    S.check_close("dlogits (gate path)", dDl.host(), dl, TOL_FP32);
}

int main(int argc, char** argv) {
    Suite S("xft_routing", argc, argv);
    struct Case { int N, E, K, d; bool bias; };
    const Case cases[] = {{1, 4, 1, 1, false}, {7, 4, 2, 33, false}, {100, 8, 3, 64, false}, {100, 8, 3, 64, true},
                          {2048, 8, 2, 768, false}};
    for (int v = 1; v <= NV; v++) {
        if (!S.want(v)) continue;
        S.begin(v, NAMES[v]);
        uint64_t seed = 53 * v;
        for (auto& c : cases) {
            if (v == 1) check<float>(S, c.N, c.E, c.K, c.d, c.bias, seed);
            else check<bf16>(S, c.N, c.E, c.K, c.d, c.bias, seed);
        }
    }
    return S.finish();
}
