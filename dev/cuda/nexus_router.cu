/*
The Nexus router's weight and its backward (docs/METHODS.md 1.9), kernels/nexus_router.cuh:
  forward:  R [E, d] = Emb [E, d] P [d, d]
  backward: dP [d, d] += Emb^T dR, then dR = 0 (R is not a parameter; its slot is scratch)
CPU reference: nexus_router_forward / nexus_router_backward of common/model.h (what
train_moe.cpp calls). Both sum in double in the same order, so fp32 results are expected bit
for bit; checked with check_equal.

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/nexus_router.cu -o build/nexus_router -lcublas -lcublasLt -lgomp && ./build/nexus_router

Version 1: the production kernels (fp32 masters). Sizes (E, d): (1, 1), (3, 33), (4, 64),
(8, 512) and, on a GPU, (16, 2048) to time.
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/nexus_router.cuh"

const char* NAMES[] = {"", "kernels/nexus_router.cuh (fp32)"};

void check(Suite& S, int E, int d, uint64_t& seed) {
    printf("  E %d d %d\n", E, d);
    auto emb = rand_floats((size_t)E * d, seed++), P = rand_floats((size_t)d * d, seed++);
    auto dR = rand_floats((size_t)E * d, seed++), dP0 = rand_floats((size_t)d * d, seed++);
    std::vector<float> R((size_t)E * d), dP = dP0, zero((size_t)E * d, 0.0f);
    nexus_router_forward(R.data(), emb.data(), P.data(), E, d, d);
    nexus_router_backward(dP.data(), dR.data(), emb.data(), E, d, d);
    Dev<float> dEmb(emb), dPm(P), dRm((size_t)E * d), dDR(dR), dDP(dP0);
    dRm.poison();
    auto fwd = [&] { gpu::nexus_router_forward(dRm.p, dEmb.p, dPm.p, E, d, (cudaStream_t)0); };
    fwd();
    S.check_equal("forward R = Emb P", dRm.host(), R);
    gpu::nexus_router_backward(dDP.p, dDR.p, dEmb.p, E, d, (cudaStream_t)0);
    S.check_equal("backward dP (+=)", dDP.host(), dP);
    S.check_equal("backward dR cleared", dDR.host(), zero);
    if (E == 16) S.bench("forward", fwd, 4.0 * ((double)E * d + (double)d * d + (double)E * d));
}

int main(int argc, char** argv) {
    Suite S("nexus_router", argc, argv);
    const int sizes[][2] = {{1, 1}, {3, 33}, {4, 64}, {8, 512}, {16, 2048}};
    if (S.want(1)) {
        S.begin(1, NAMES[1]);
        uint64_t seed = 1791;
        for (auto& s : sizes) {
            if (EMULATED && s[1] > 512) continue;
            check(S, s[0], s[1], seed);
        }
    }
    return S.finish();
}
