// kernels/encoder.cuh: token embedding lookup and its backward.
//
// The backward is deterministic without atomics: the host sorts the batch's positions by
// token (a stable counting sort, see build_encoder_buckets), and one thread block per
// distinct token adds that token's output gradients in position order.
#pragma once
#include <vector>
#include "common.cuh"

namespace gpu {

// out[n, :] = wte[tokens[n], :]        out [N, d], wte [V, d]
template <typename T>
__global__ void encoder_forward_kernel(T* out, const int* tokens, const T* wte, int N, int d) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * d) return;
    int n = (int)(i / d), c = (int)(i % d);
    out[i] = wte[(size_t)tokens[n] * d + c];
}
template <typename T>
void encoder_forward(T* out, const int* tokens, const T* wte, int N, int d, cudaStream_t s) {
    encoder_forward_kernel<<<cdiv((long)N * d, 256), 256, 0, s>>>(out, tokens, wte, N, d);
    KERNEL_CHECK();
}

// The buckets of one batch: distinct tokens (bucket_token[u]) and, for each, the positions
// holding it, in increasing order: positions[bucket_start[u] .. bucket_start[u+1]).
struct EncoderBuckets {
    std::vector<int> token, start, positions;
};
inline void build_encoder_buckets(EncoderBuckets* b, const int* tokens, int N, int V) {
    std::vector<int> count(V, 0);
    for (int n = 0; n < N; n++) count[tokens[n]]++;
    b->token.clear();
    b->start.assign(1, 0);
    std::vector<int> first(V, -1);  // where each token's positions begin
    for (int v = 0; v < V; v++) {
        if (!count[v]) continue;
        first[v] = b->start.back();
        b->token.push_back(v);
        b->start.push_back(b->start.back() + count[v]);
    }
    b->positions.assign(N, 0);
    for (int n = 0; n < N; n++) b->positions[first[tokens[n]]++] = n;  // stable: positions ascend
}

// dwte[token_u, :] += sum over that token's positions n (in order) of dout[n, :]
// grid (max_buckets, ceil(d / blockDim)): block (u, chunk) owns columns of one vocabulary
// row. The number of buckets U is read on the device (blocks u >= U return at once), so that
// one launch, and a CUDA graph holding it, serves every batch: max_buckets >= U always
// (min(N, V) bounds the distinct tokens of a batch).
template <typename T>
__global__ void encoder_backward_kernel(float* dwte, const T* dout, const int* bucket_token, const int* bucket_start,
                                        const int* positions, const int* n_buckets, int d) {
    int u = blockIdx.x;
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (u >= *n_buckets || c >= d) return;
    float s = 0.0f;
    for (int i = bucket_start[u]; i < bucket_start[u + 1]; i++) s += to_f(dout[(size_t)positions[i] * d + c]);
    dwte[(size_t)bucket_token[u] * d + c] += s;
}
template <typename T>
void encoder_backward(float* dwte, const T* dout, const int* bucket_token, const int* bucket_start,
                      const int* positions, const int* n_buckets, int max_buckets, int d, cudaStream_t s) {
    if (max_buckets == 0) return;
    dim3 grid(max_buckets, cdiv(d, 256));
    encoder_backward_kernel<<<grid, 256, 0, s>>>(dwte, dout, bucket_token, bucket_start, positions, n_buckets, d);
    KERNEL_CHECK();
}

}  // namespace gpu
