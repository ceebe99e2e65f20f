// kernels/nexus_router.cuh: the Nexus router's weight R = Emb P and its backward (docs/METHODS.md
// 1.9; the CPU reference is common/model.h nexus_router_forward/_backward, which train_moe.cpp
// calls). Emb [E, d] (fixed domain embeddings), P [d, d] (learned) and R [E, d] live in the fp32
// master buffer: the router reads its fp32 master (router_logits_forward), so R is made there.
// E is small (the number of domains) and d a few hundred: one thread per output entry, the sum
// in a fixed order in double, as the CPU reference does (bit-identical results run to run).
#pragma once
#include "common.cuh"

namespace gpu {

// R[e, j] = sum_i Emb[e, i] P[i, j]
__global__ void nexus_router_forward_kernel(float* R, const float* emb, const float* P, int E, int d) {
    const long o = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= (long)E * d) return;
    const int e = (int)(o / d), j = (int)(o % d);
    double acc = 0;
    for (int i = 0; i < d; i++) acc += (double)emb[(size_t)e * d + i] * P[(size_t)i * d + j];
    R[o] = (float)acc;
}
inline void nexus_router_forward(float* R, const float* emb, const float* P, int E, int d, cudaStream_t s) {
    nexus_router_forward_kernel<<<cdiv((long)E * d, 256), 256, 0, s>>>(R, emb, P, E, d);
    KERNEL_CHECK();
}

// dP[i, j] += sum_e Emb[e, i] dR[e, j] (the only path to P; Emb gets no gradient), then dR = 0:
// R is not a parameter, its gradient slot is this backward's scratch
__global__ void nexus_router_backward_kernel(float* dP, const float* dR, const float* emb, int E, int d) {
    const long o = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= (long)d * d) return;
    const int i = (int)(o / d), j = (int)(o % d);
    double acc = 0;
    for (int e = 0; e < E; e++) acc += (double)emb[(size_t)e * d + i] * dR[(size_t)e * d + j];
    dP[o] += (float)acc;
}
inline void nexus_router_backward(float* dP, float* dR, const float* emb, int E, int d, cudaStream_t s) {
    nexus_router_backward_kernel<<<cdiv((long)d * d, 256), 256, 0, s>>>(dP, dR, emb, E, d);
    KERNEL_CHECK();
    cuda_check(cudaMemsetAsync(dR, 0, (size_t)E * d * sizeof(float), s), "cudaMemsetAsync", __FILE__, __LINE__);
}

}  // namespace gpu
