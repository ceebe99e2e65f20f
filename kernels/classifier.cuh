// kernels/classifier.cuh: cross-entropy over the vocabulary fused with its backward.
// One block per token row: pass 1 reads the row's V logits once (each thread keeps an
// online max and sum of exponentials over its strided share of the vocabulary; the block
// then combines them in a fixed order) to get lse; pass 2, only when a gradient is
// wanted, overwrites the logits IN PLACE with dlogits = scale (softmax - onehot(target)).
// No probabilities are ever stored: the [N, V] logits buffer is the only large one.
#pragma once
#include "common.cuh"

namespace gpu {

template <typename T>
__global__ void crossentropy_kernel(T* logits, float* losses, const int* targets, int V, float dscale) {
    __shared__ float red[32];
    int n = blockIdx.x;
    T* z = logits + (size_t)n * V;
    float m = -INFINITY, s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float x = to_f(z[i]);
        if (x > m) { s = s * expf(m - x) + 1.0f; m = x; }  // expf(-inf) = 0 on the first element
        else s += expf(x - m);
    }
    float M = block_max(m, red);
    s = (m == -INFINITY) ? 0.0f : s * expf(m - M);  // a thread with no columns adds nothing
    float S = block_sum(s, red);
    float lse = M + logf(S);
    int tgt = targets[n];
    if (threadIdx.x == 0) losses[n] = lse - to_f(z[tgt]);
    if (dscale == 0.0f) return;
    __syncthreads();  // thread 0 has read z[tgt] before anyone overwrites it
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float p = expf(to_f(z[i]) - lse);
        z[i] = from_f<T>(dscale * (p - (i == tgt ? 1.0f : 0.0f)));
    }
}

// losses [N] = lse_n - z[n, target_n]. With dscale != 0 (the backward is wanted):
// logits [N, V] are replaced by dscale * (softmax - onehot), dscale = 1 / (N * grad_accum).
template <typename T>
void crossentropy_forward_backward(T* logits, float* losses, const int* targets, int N, int V, float dscale,
                                   cudaStream_t s) {
    crossentropy_kernel<<<N, 512, 0, s>>>(logits, losses, targets, V, dscale);
    KERNEL_CHECK();
}

// *sum (device double) = losses[0] + ... + losses[N-1], one block in a fixed order: the
// forward's CE sum stays on the device (train_moe.cu's statistics), no host read per step
__global__ void loss_sum_kernel(double* sum, const float* losses, int N) {
    __shared__ double red[32];
    double s = 0.0;
    for (int n = threadIdx.x; n < N; n += blockDim.x) s += losses[n];
    s = block_sum(s, red);
    if (threadIdx.x == 0) *sum = s;
}
inline void loss_sum(double* sum, const float* losses, int N, cudaStream_t s) {
    loss_sum_kernel<<<1, 1024, 0, s>>>(sum, losses, N);
    KERNEL_CHECK();
}

}  // namespace gpu
