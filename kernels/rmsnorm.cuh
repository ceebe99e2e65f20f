// kernels/rmsnorm.cuh: RMSNorm forward (optionally fused with the residual add that
// precedes it) and backward.
//   y = x * r * w,  r = 1 / sqrt(mean(x^2) + eps)        (per row of d values)
//   dx += r (w dy - x r^2 mean(w dy x)),  dw += sum_rows dy x r
// The weight gradient is a column sum over all rows; it is done in two passes (partial
// sums over fixed chunks of rows, then the chunks in order), never with atomics, so it
// is bit-identical from run to run.
#pragma once
#include "common.cuh"

namespace gpu {

constexpr int RMSNORM_DW_ROWS = 64;  // rows per partial sum of the weight gradient
// floats of scratch rmsnorm_backward needs for N rows of width d
inline size_t rmsnorm_scratch_floats(int N, int d) { return (size_t)cdiv(N, RMSNORM_DW_ROWS) * d; }

// One warp per row. With `delta` (fused residual): x_out = x + delta is written first and
// normalized as stored (so the backward, which reads x_out, sees exactly what was used).
template <typename T>
__global__ void rmsnorm_forward_kernel(T* out, float* rstd, T* x_out, const T* x, const T* delta, const T* w, int N,
                                       int d, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const T* xr = x + (size_t)row * d;
    float ss = 0.0f;
    if (delta) {
        const T* dr = delta + (size_t)row * d;
        T* xo = x_out + (size_t)row * d;
        for (int i = lane; i < d; i += 32) {
            T v = from_f<T>(to_f(xr[i]) + to_f(dr[i]));
            xo[i] = v;
            float f = to_f(v);
            ss += f * f;
        }
        xr = xo;
        __syncwarp();  // each lane re-reads only what it wrote itself, but keep the warp together
    } else {
        for (int i = lane; i < d; i += 32) {
            float f = to_f(xr[i]);
            ss += f * f;
        }
    }
    ss = warp_sum(ss);
    float r = rsqrtf(ss / d + eps);
    if (lane == 0) rstd[row] = r;
    T* o = out + (size_t)row * d;
    for (int i = lane; i < d; i += 32) o[i] = from_f<T>(to_f(xr[i]) * r * to_f(w[i]));
}

// out = rmsnorm(x) * w;  out [N, d], rstd [N]
template <typename T>
void rmsnorm_forward(T* out, float* rstd, const T* x, const T* w, int N, int d, float eps, cudaStream_t s) {
    rmsnorm_forward_kernel<<<cdiv(N, 8), 256, 0, s>>>(out, rstd, (T*)nullptr, x, (const T*)nullptr, w, N, d, eps);
    KERNEL_CHECK();
}
// x_out = x + delta;  out = rmsnorm(x_out) * w   (x_out must not alias x or delta)
template <typename T>
void residual_rmsnorm_forward(T* x_out, T* out, float* rstd, const T* x, const T* delta, const T* w, int N, int d,
                              float eps, cudaStream_t s) {
    rmsnorm_forward_kernel<<<cdiv(N, 8), 256, 0, s>>>(out, rstd, x_out, x, delta, w, N, d, eps);
    KERNEL_CHECK();
}

// dx += r (w dy - x s),  s = r^2 mean(w dy x): one warp per row
template <typename T>
__global__ void rmsnorm_backward_dx_kernel(T* dx, const T* dout, const T* x, const T* w, const float* rstd, int N,
                                           int d) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const T* xr = x + (size_t)row * d;
    const T* dy = dout + (size_t)row * d;
    T* dxr = dx + (size_t)row * d;
    float r = rstd[row], s = 0.0f;
    for (int i = lane; i < d; i += 32) s += to_f(w[i]) * to_f(dy[i]) * to_f(xr[i]);
    s = warp_sum(s) * r * r / d;
    for (int i = lane; i < d; i += 32)
        dxr[i] = from_f<T>(to_f(dxr[i]) + r * (to_f(w[i]) * to_f(dy[i]) - to_f(xr[i]) * s));
}
// pass 1: scratch[chunk, c] = sum over the chunk's rows (in order) of dy x r
template <typename T>
__global__ void rmsnorm_backward_dw_partial_kernel(float* scratch, const T* dout, const T* x, const float* rstd, int N,
                                                   int d) {
    int chunk = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= d) return;
    int n0 = chunk * RMSNORM_DW_ROWS, n1 = min(N, n0 + RMSNORM_DW_ROWS);
    float s = 0.0f;
    for (int n = n0; n < n1; n++) s += to_f(dout[(size_t)n * d + c]) * to_f(x[(size_t)n * d + c]) * rstd[n];
    scratch[(size_t)chunk * d + c] = s;
}
// dx [N, d] += d(loss)/dx;  dw [d] (fp32 gradient) += d(loss)/dw.
// scratch: rmsnorm_scratch_floats(N, d) floats.
template <typename T>
void rmsnorm_backward(T* dx, float* dw, float* scratch, const T* dout, const T* x, const T* w, const float* rstd, int N,
                      int d, cudaStream_t s) {
    rmsnorm_backward_dx_kernel<<<cdiv(N, 8), 256, 0, s>>>(dx, dout, x, w, rstd, N, d);
    KERNEL_CHECK();
    int nchunks = cdiv(N, RMSNORM_DW_ROWS);
    rmsnorm_backward_dw_partial_kernel<<<dim3(nchunks, cdiv(d, 256)), 256, 0, s>>>(scratch, dout, x, rstd, N, d);
    KERNEL_CHECK();
    column_chunks_sum_kernel<<<cdiv(d, 256), 256, 0, s>>>(dw, scratch, nchunks, d);
    KERNEL_CHECK();
}

}  // namespace gpu
