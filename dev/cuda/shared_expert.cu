/*
The shared expert's sigmoid gate (Qwen2-MoE; docs/METHODS.md 1.7), kernels/shared_expert.cuh:
  forward:  gate[n] = sigmoid(x[n] . w),  out[n] += gate[n] y[n]         (w absent: out[n] += y[n])
  backward: dz[n] = (dout[n] . y[n]) gate (1 - gate);  dy[n] = gate[n] dout[n] (written);
            dx[n] += dz[n] w;  dw += sum_n dz[n] x[n]
CPU reference: shared_gate_forward / shared_gate_backward of train_moe.cpp (the ungated
forward is its residual add). The shared FFN around it is the dense FFN's matmul + swiglu
(their own checks: expert_matmul.cu, swiglu.cu).

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/shared_expert.cu -o build/shared_expert -lcublas -lcublasLt -lgomp && ./build/shared_expert [version]

Version 1 (T = float) and 2 (T = bf16) are the production kernels, called as train_moe.cu does
(x, y, out, dout, dy, dx in T; w, gate, dz, dw in fp32). Sizes (N, d): (1, 1), (7, 33), (100,
64), (2048, 768) and, on a GPU, (16384, 768) to time.
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/shared_expert.cuh"

typedef __nv_bfloat16 bf16;
const char* NAMES[] = {"", "kernels/shared_expert.cuh (fp32)", "kernels/shared_expert.cuh (bf16)"};
const int NV = 2;

template <typename T>
void check(Suite& S, int N, int d, bool gated, uint64_t& seed) {
    const bool is_bf16 = sizeof(T) == 2;
    const Tol tol = is_bf16 ? TOL_BF16 : TOL_FP32;
    printf("  N %d d %d %s\n", N, d, gated ? "gated" : "ungated");
    const size_t nd = (size_t)N * d;
    auto x = rand_floats(nd, seed++), y = rand_floats(nd, seed++), out0 = rand_floats(nd, seed++);
    auto dout = rand_floats(nd, seed++), dx0 = rand_floats(nd, seed++), w = rand_floats(d, seed++, -0.3f, 0.3f);
    auto dw0 = rand_floats(d, seed++);
    if (is_bf16) { x = round_bf16(x); y = round_bf16(y); out0 = round_bf16(out0); dout = round_bf16(dout); dx0 = round_bf16(dx0); }
    // CPU reference
    std::vector<float> out = out0, gate(N, 1.0f), dy(nd), dx = dx0, dw = dw0;
    if (gated) {
        shared_gate_forward(out.data(), gate.data(), x.data(), w.data(), y.data(), N, d);
        shared_gate_backward(dx.data(), dw.data(), dy.data(), dout.data(), x.data(), w.data(), y.data(), gate.data(), N, d);
    } else {
        residual_forward(out.data(), out.data(), y.data(), nd);
    }
    Dev<T> dX(to_t<T>(x)), dY(to_t<T>(y)), dOut(to_t<T>(out0)), dDout(to_t<T>(dout)), dDy(nd), dDx(to_t<T>(dx0));
    Dev<float> dW(w), dGate((size_t)N), dDz((size_t)N), dDw(dw0);
    dGate.poison();
    auto fwd = [&] { gpu::shared_gate_forward(dOut.p, dGate.p, (const T*)dX.p, gated ? (const float*)dW.p : nullptr,
                                              (const T*)dY.p, N, d, (cudaStream_t)0); };
    fwd();
    S.check_close("forward out (+=)", host_f(dOut), out, tol);
    if (!gated) return;
    S.check_close("forward gate", dGate.host(), gate, tol);
    dDy.poison();
    dDz.poison();
    gpu::shared_gate_backward(dDy.p, dDx.p, dDw.p, dDz.p, (const T*)dDout.p, (const T*)dX.p, (const float*)dW.p,
                              (const T*)dY.p, (const float*)dGate.p, N, d, (cudaStream_t)0);
    S.check_close("backward dy (written)", host_f(dDy), dy, tol);
    S.check_close("backward dx (+=)", host_f(dDx), dx, sum_tol(dx, tol));
    S.check_close("backward dw (+=)", dDw.host(), dw, sum_tol(dw, tol));
    if (N == 16384) {
        const double es = sizeof(T);
        S.bench("forward", fwd, 3.0 * nd * es);  // read x, y, out; write out
    }
}

int main(int argc, char** argv) {
    Suite S("shared_expert", argc, argv);
    const int sizes[][2] = {{1, 1}, {7, 33}, {100, 64}, {2048, 768}, {16384, 768}};
    for (int v = 1; v <= NV; v++) {
        if (!S.want(v)) continue;
        S.begin(v, NAMES[v]);
        uint64_t seed = 91 * v;
        for (auto& s : sizes) {
            if (EMULATED && s[0] > 2048) continue;
            for (bool gated : {true, false}) {
                if (v == 1) check<float>(S, s[0], s[1], gated, seed);
                else check<bf16>(S, s[0], s[1], gated, seed);
            }
        }
    }
    return S.finish();
}
