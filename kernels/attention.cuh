// kernels/attention.cuh: causal grouped-query self-attention, forward and backward,
// written by hand (nothing but CUDA), flash-attention style: the T x T probabilities are
// never stored; the forward keeps only the log-sum-exp of each query row and the backward
// recomputes the probabilities from it.
//
// Layouts (N = B*T tokens, row n = b*T + t; head h owns columns h*hd .. h*hd+hd-1):
//   q, out, dq, dout  [N, H*hd]      k, v, dk, dv  [N, Hkv*hd]
//   lse, D            [B, H, T] fp32 (index (b*H + h)*T + t)
// Query head h reads kv head h / (H / Hkv). Scores s = (q . k) / sqrt(hd), keys j <= t.
//
// Design (simple and checkable, not the fastest): one thread per query row (forward, dq)
// or per key row (dk, dv). A thread's own row lives in shared memory padded by one float
// (conflict-free); the other operand is a tile in shared memory that every thread reads
// at the same address (a broadcast, read 4 floats at a time). Accumulators are register
// arrays indexed only by
// compile-time constants (HD is a template parameter, a multiple of 8; loops over it are
// unrolled).
// Every sum has a fixed order and each output element has exactly one writer: no atomics,
// bit-identical results run to run.
#pragma once
#include <cmath>
#include "common.cuh"

namespace gpu {

// a 16-byte view of a shared-memory tile row (tiles start at multiples of 4 floats)
__device__ __forceinline__ float4 ld4(const float* p, int c4) { return reinterpret_cast<const float4*>(p)[c4]; }

constexpr int ATT_FWD_BQ = 64;  // query rows per block (= threads) in the forward and dq kernels
constexpr int ATT_FWD_BK = 32;  // keys per shared-memory tile there
constexpr int ATT_BWD_BK = 64;  // key rows per block (= threads) in the dk/dv kernel
constexpr int ATT_BWD_BQ = 32;  // query rows per shared-memory tile there
// Every tile starts at a multiple of 4 floats (16 bytes), so ld4 is aligned: the own-row
// tiles hold (multiple of 4) x (HD + 1) floats and the broadcast tiles rows of HD floats.
static_assert(ATT_FWD_BQ % 4 == 0 && ATT_BWD_BK % 4 == 0, "tile sizes must keep 16-byte alignment");

// ----------------------------------------------------------------------------
// Forward: online softmax over key tiles; out = softmax(s) v, lse = log sum exp(s).
// grid (cdiv(T, BQ), B*H), block BQ threads, dynamic shared memory:
//   Qs [BQ][HD+1], Ks [BK][HD], Vs [BK][HD] floats.
template <typename T, int HD>
__global__ void __launch_bounds__(ATT_FWD_BQ) attention_forward_kernel(T* out, float* lse, const T* q, const T* k,
                                                                      const T* v, int B, int T_, int H, int Hkv) {
    extern __shared__ float4 smem4[];           // float4: 16-byte aligned
    float* Qs = (float*)smem4;                  // [BQ][HD+1]
    float* Ks = Qs + ATT_FWD_BQ * (HD + 1);     // [BK][HD]
    float* Vs = Ks + ATT_FWD_BK * HD;           // [BK][HD]
    const int bh = blockIdx.y, b = bh / H, h = bh % H, kh = h / (H / Hkv);
    const int qd = H * HD, kvd = Hkv * HD;
    const int q0 = blockIdx.x * ATT_FWD_BQ, tl = threadIdx.x, t = q0 + tl;
    const bool valid = t < T_;
    const float scale = 1.0f / sqrtf((float)HD);

    for (int i = threadIdx.x; i < ATT_FWD_BQ * HD; i += blockDim.x) {
        int r = i / HD, c = i % HD;
        Qs[r * (HD + 1) + c] = q0 + r < T_ ? to_f(q[(size_t)(b * T_ + q0 + r) * qd + h * HD + c]) : 0.0f;
    }
    float acc[HD];
#pragma unroll
    for (int c = 0; c < HD; c++) acc[c] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    const float* qrow = Qs + tl * (HD + 1);

    const int j_end = min(q0 + ATT_FWD_BQ, T_);  // keys this block's queries can see: [0, j_end)
    for (int j0 = 0; j0 < j_end; j0 += ATT_FWD_BK) {
        __syncthreads();  // the previous tile is no longer being read
        for (int i = threadIdx.x; i < ATT_FWD_BK * HD; i += blockDim.x) {
            int r = i / HD, c = i % HD, j = j0 + r;
            size_t src = (size_t)(b * T_ + j) * kvd + kh * HD + c;
            Ks[i] = j < T_ ? to_f(k[src]) : 0.0f;
            Vs[i] = j < T_ ? to_f(v[src]) : 0.0f;
        }
        __syncthreads();
        if (!valid || j0 > t) continue;  // no visible key in this tile (no barrier follows before the loop top)
        float s[ATT_FWD_BK];
#pragma unroll
        for (int jj = 0; jj < ATT_FWD_BK; jj++) s[jj] = 0.0f;
        for (int c4 = 0; c4 < HD / 4; c4++) {
            float q0 = qrow[4 * c4], q1 = qrow[4 * c4 + 1], q2 = qrow[4 * c4 + 2], q3 = qrow[4 * c4 + 3];
#pragma unroll
            for (int jj = 0; jj < ATT_FWD_BK; jj++) {
                float4 k4 = ld4(Ks + jj * HD, c4);
                s[jj] += q0 * k4.x + q1 * k4.y + q2 * k4.z + q3 * k4.w;
            }
        }
        float mt = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < ATT_FWD_BK; jj++) {
            s[jj] = (j0 + jj <= t) ? s[jj] * scale : -INFINITY;  // causal mask (also masks j >= T)
            mt = fmaxf(mt, s[jj]);
        }
        float m_new = fmaxf(m, mt);  // finite: key j0 <= t is visible
        float alpha = expf(m - m_new);  // 0 on the first tile (m = -inf)
        l *= alpha;
#pragma unroll
        for (int c = 0; c < HD; c++) acc[c] *= alpha;
#pragma unroll
        for (int jj = 0; jj < ATT_FWD_BK; jj++) {
            float p = expf(s[jj] - m_new);  // 0 where masked
            l += p;
#pragma unroll
            for (int c4 = 0; c4 < HD / 4; c4++) {
                float4 v4 = ld4(Vs + jj * HD, c4);
                acc[4 * c4] += p * v4.x;
                acc[4 * c4 + 1] += p * v4.y;
                acc[4 * c4 + 2] += p * v4.z;
                acc[4 * c4 + 3] += p * v4.w;
            }
        }
        m = m_new;
    }
    if (!valid) return;
    T* o = out + (size_t)(b * T_ + t) * qd + h * HD;
    float inv = 1.0f / l;
#pragma unroll
    for (int c = 0; c < HD; c++) o[c] = from_f<T>(acc[c] * inv);
    lse[(size_t)bh * T_ + t] = m + logf(l);
}

// ----------------------------------------------------------------------------
// Backward. With p_tj = exp(s_tj - lse_t), dp_tj = dout_t . v_j, D_t = dout_t . out_t
// (= sum_j p_tj dp_tj), ds_tj = p_tj (dp_tj - D_t):
//   dq_t = scale sum_j ds_tj k_j,   dk_j = scale sum_{h in group, t >= j} ds_tj q_t,
//   dv_j = sum_{h in group, t >= j} p_tj dout_t

// D [B, H, T]: one thread per (token, head)
template <typename T>
__global__ void attention_backward_D_kernel(float* D, const T* dout, const T* out, int B, int T_, int H, int hd) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)B * T_ * H) return;
    int h = (int)(i % H);
    size_t n = i / H;
    int b = (int)(n / T_), t = (int)(n % T_);
    const T* dr = dout + n * H * hd + h * hd;
    const T* orow = out + n * H * hd + h * hd;
    float s = 0.0f;
    for (int c = 0; c < hd; c++) s += to_f(dr[c]) * to_f(orow[c]);
    D[((size_t)b * H + h) * T_ + t] = s;
}

// dq: grid (cdiv(T, BQ), B*H), block BQ threads (one per query row), shared memory:
//   Qs, dOs [BQ][HD+1] (own rows), Ks, Vs [BK][HD] (broadcast tiles).
template <typename T, int HD>
__global__ void __launch_bounds__(ATT_FWD_BQ) attention_backward_dq_kernel(T* dq, const T* dout, const T* q,
                                                                          const T* k, const T* v, const float* lse,
                                                                          const float* D, int B, int T_, int H,
                                                                          int Hkv) {
    extern __shared__ float4 smem4[];
    float* Qs = (float*)smem4;
    float* dOs = Qs + ATT_FWD_BQ * (HD + 1);
    float* Ks = dOs + ATT_FWD_BQ * (HD + 1);
    float* Vs = Ks + ATT_FWD_BK * HD;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, kh = h / (H / Hkv);
    const int qd = H * HD, kvd = Hkv * HD;
    const int q0 = blockIdx.x * ATT_FWD_BQ, tl = threadIdx.x, t = q0 + tl;
    const bool valid = t < T_;
    const float scale = 1.0f / sqrtf((float)HD);

    for (int i = threadIdx.x; i < ATT_FWD_BQ * HD; i += blockDim.x) {
        int r = i / HD, c = i % HD;
        size_t src = (size_t)(b * T_ + q0 + r) * qd + h * HD + c;
        bool in = q0 + r < T_;
        Qs[r * (HD + 1) + c] = in ? to_f(q[src]) : 0.0f;
        dOs[r * (HD + 1) + c] = in ? to_f(dout[src]) : 0.0f;
    }
    const float lse_t = valid ? lse[(size_t)bh * T_ + t] : 0.0f;
    const float D_t = valid ? D[(size_t)bh * T_ + t] : 0.0f;
    const float* qrow = Qs + tl * (HD + 1);
    const float* dorow = dOs + tl * (HD + 1);
    float acc[HD];
#pragma unroll
    for (int c = 0; c < HD; c++) acc[c] = 0.0f;

    const int j_end = min(q0 + ATT_FWD_BQ, T_);
    for (int j0 = 0; j0 < j_end; j0 += ATT_FWD_BK) {
        __syncthreads();
        for (int i = threadIdx.x; i < ATT_FWD_BK * HD; i += blockDim.x) {
            int r = i / HD, c = i % HD, j = j0 + r;
            size_t src = (size_t)(b * T_ + j) * kvd + kh * HD + c;
            Ks[i] = j < T_ ? to_f(k[src]) : 0.0f;
            Vs[i] = j < T_ ? to_f(v[src]) : 0.0f;
        }
        __syncthreads();
        if (!valid) continue;
        const int jn = min(ATT_FWD_BK, t - j0 + 1);  // visible keys of this tile: j0 .. j0+jn-1
        for (int jj = 0; jj < jn; jj++) {
            const float* kr = Ks + jj * HD;
            const float* vr = Vs + jj * HD;
            float s = 0.0f, dp = 0.0f;
            for (int c4 = 0; c4 < HD / 4; c4++) {
                float4 k4 = ld4(kr, c4), v4 = ld4(vr, c4);
                const float* q = qrow + 4 * c4;
                const float* o = dorow + 4 * c4;
                s += q[0] * k4.x + q[1] * k4.y + q[2] * k4.z + q[3] * k4.w;
                dp += o[0] * v4.x + o[1] * v4.y + o[2] * v4.z + o[3] * v4.w;
            }
            float p = expf(s * scale - lse_t);
            float ds = p * (dp - D_t);
#pragma unroll
            for (int c4 = 0; c4 < HD / 4; c4++) {
                float4 k4 = ld4(kr, c4);
                acc[4 * c4] += ds * k4.x;
                acc[4 * c4 + 1] += ds * k4.y;
                acc[4 * c4 + 2] += ds * k4.z;
                acc[4 * c4 + 3] += ds * k4.w;
            }
        }
    }
    if (!valid) return;
    T* o = dq + (size_t)(b * T_ + t) * qd + h * HD;
#pragma unroll
    for (int c = 0; c < HD; c++) o[c] = from_f<T>(acc[c] * scale);
}

// dk, dv: grid (cdiv(T, BK), B*Hkv), block BK threads (one per key row), shared memory:
//   Ks, Vs [BK][HD+1] (own rows), Qs, dOs [BQ][HD], lse_s, D_s [BQ] (broadcast tiles).
// Each thread walks every query head of its group and every query t >= j, in order.
template <typename T, int HD>
__global__ void __launch_bounds__(ATT_BWD_BK) attention_backward_dkdv_kernel(T* dk, T* dv, const T* dout, const T* q,
                                                                            const T* k, const T* v, const float* lse,
                                                                            const float* D, int B, int T_, int H,
                                                                            int Hkv) {
    extern __shared__ float4 smem4[];
    float* Ks = (float*)smem4;
    float* Vs = Ks + ATT_BWD_BK * (HD + 1);
    float* Qs = Vs + ATT_BWD_BK * (HD + 1);
    float* dOs = Qs + ATT_BWD_BQ * HD;
    float* lse_s = dOs + ATT_BWD_BQ * HD;
    float* D_s = lse_s + ATT_BWD_BQ;
    const int bkh = blockIdx.y, b = bkh / Hkv, kh = bkh % Hkv, group = H / Hkv;
    const int qd = H * HD, kvd = Hkv * HD;
    const int k0 = blockIdx.x * ATT_BWD_BK, jl = threadIdx.x, j = k0 + jl;
    const bool valid = j < T_;
    const float scale = 1.0f / sqrtf((float)HD);

    for (int i = threadIdx.x; i < ATT_BWD_BK * HD; i += blockDim.x) {
        int r = i / HD, c = i % HD;
        size_t src = (size_t)(b * T_ + k0 + r) * kvd + kh * HD + c;
        bool in = k0 + r < T_;
        Ks[r * (HD + 1) + c] = in ? to_f(k[src]) : 0.0f;
        Vs[r * (HD + 1) + c] = in ? to_f(v[src]) : 0.0f;
    }
    const float* krow = Ks + jl * (HD + 1);
    const float* vrow = Vs + jl * (HD + 1);
    float dk_acc[HD], dv_acc[HD];
#pragma unroll
    for (int c = 0; c < HD; c++) { dk_acc[c] = 0.0f; dv_acc[c] = 0.0f; }

    for (int h = kh * group; h < (kh + 1) * group; h++) {
        const size_t bh = (size_t)b * H + h;
        for (int t0 = k0; t0 < T_; t0 += ATT_BWD_BQ) {  // queries before k0 see none of these keys
            __syncthreads();
            for (int i = threadIdx.x; i < ATT_BWD_BQ * HD; i += blockDim.x) {
                int r = i / HD, c = i % HD, t = t0 + r;
                size_t src = (size_t)(b * T_ + t) * qd + h * HD + c;
                Qs[i] = t < T_ ? to_f(q[src]) : 0.0f;
                dOs[i] = t < T_ ? to_f(dout[src]) : 0.0f;
            }
            for (int r = threadIdx.x; r < ATT_BWD_BQ; r += blockDim.x) {
                int t = t0 + r;
                lse_s[r] = t < T_ ? lse[bh * T_ + t] : 0.0f;
                D_s[r] = t < T_ ? D[bh * T_ + t] : 0.0f;
            }
            __syncthreads();
            if (!valid) continue;
            for (int tq = 0; tq < ATT_BWD_BQ; tq++) {
                int t = t0 + tq;
                if (t < j || t >= T_) continue;  // causal: query t sees key j only if t >= j
                const float* qr = Qs + tq * HD;
                const float* dor = dOs + tq * HD;
                float s = 0.0f, dp = 0.0f;
                for (int c4 = 0; c4 < HD / 4; c4++) {
                    float4 q4 = ld4(qr, c4), o4 = ld4(dor, c4);
                    const float* k = krow + 4 * c4;
                    const float* vv = vrow + 4 * c4;
                    s += q4.x * k[0] + q4.y * k[1] + q4.z * k[2] + q4.w * k[3];
                    dp += o4.x * vv[0] + o4.y * vv[1] + o4.z * vv[2] + o4.w * vv[3];
                }
                float p = expf(s * scale - lse_s[tq]);
                float ds = p * (dp - D_s[tq]);
#pragma unroll
                for (int c4 = 0; c4 < HD / 4; c4++) {
                    float4 q4 = ld4(qr, c4), o4 = ld4(dor, c4);
                    dv_acc[4 * c4] += p * o4.x;
                    dv_acc[4 * c4 + 1] += p * o4.y;
                    dv_acc[4 * c4 + 2] += p * o4.z;
                    dv_acc[4 * c4 + 3] += p * o4.w;
                    dk_acc[4 * c4] += ds * q4.x;
                    dk_acc[4 * c4 + 1] += ds * q4.y;
                    dk_acc[4 * c4 + 2] += ds * q4.z;
                    dk_acc[4 * c4 + 3] += ds * q4.w;
                }
            }
        }
    }
    if (!valid) return;
    T* dkr = dk + (size_t)(b * T_ + j) * kvd + kh * HD;
    T* dvr = dv + (size_t)(b * T_ + j) * kvd + kh * HD;
#pragma unroll
    for (int c = 0; c < HD; c++) {
        dkr[c] = from_f<T>(dk_acc[c] * scale);
        dvr[c] = from_f<T>(dv_acc[c]);
    }
}

// ----------------------------------------------------------------------------
// Launchers. Dynamic shared memory can exceed the 48 KB default for HD = 128, so each
// kernel instance raises its limit once.

template <typename K>
inline void att_set_smem(K kernel, size_t bytes) {
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

template <typename T, int HD>
void attention_forward_hd(T* out, float* lse, const T* q, const T* k, const T* v, int B, int T_, int H, int Hkv,
                          cudaStream_t s) {
    size_t bytes = sizeof(float) * (ATT_FWD_BQ * (HD + 1) + 2 * ATT_FWD_BK * HD);
    static bool ready = false;
    if (!ready) { att_set_smem(attention_forward_kernel<T, HD>, bytes); ready = true; }
    dim3 grid(cdiv(T_, ATT_FWD_BQ), B * H);
    attention_forward_kernel<T, HD><<<grid, ATT_FWD_BQ, bytes, s>>>(out, lse, q, k, v, B, T_, H, Hkv);
    KERNEL_CHECK();
}

template <typename T, int HD>
void attention_backward_hd(T* dq, T* dk, T* dv, float* D, const T* dout, const T* out, const float* lse, const T* q,
                           const T* k, const T* v, int B, int T_, int H, int Hkv, cudaStream_t s) {
    attention_backward_D_kernel<<<cdiv((long)B * T_ * H, 256), 256, 0, s>>>(D, dout, out, B, T_, H, HD);
    KERNEL_CHECK();
    size_t bytes_q = sizeof(float) * (2 * ATT_FWD_BQ * (HD + 1) + 2 * ATT_FWD_BK * HD);
    size_t bytes_kv = sizeof(float) * (2 * ATT_BWD_BK * (HD + 1) + 2 * ATT_BWD_BQ * HD + 2 * ATT_BWD_BQ);
    static bool ready = false;
    if (!ready) {
        att_set_smem(attention_backward_dq_kernel<T, HD>, bytes_q);
        att_set_smem(attention_backward_dkdv_kernel<T, HD>, bytes_kv);
        ready = true;
    }
    attention_backward_dq_kernel<T, HD><<<dim3(cdiv(T_, ATT_FWD_BQ), B * H), ATT_FWD_BQ, bytes_q, s>>>(
        dq, dout, q, k, v, lse, D, B, T_, H, Hkv);
    KERNEL_CHECK();
    attention_backward_dkdv_kernel<T, HD><<<dim3(cdiv(T_, ATT_BWD_BK), B * Hkv), ATT_BWD_BK, bytes_kv, s>>>(
        dk, dv, dout, q, k, v, lse, D, B, T_, H, Hkv);
    KERNEL_CHECK();
}

inline bool attention_supports_head_dim(int hd) {
    return hd == 8 || hd == 16 || hd == 32 || hd == 64 || hd == 96 || hd == 128;  // multiples of 8: float4 tiles
}

#define ATT_DISPATCH(hd, CALL)                                                                 \
    switch (hd) {                                                                              \
        case 8: { constexpr int HD_ = 8; CALL; break; }                                        \
        case 16: { constexpr int HD_ = 16; CALL; break; }                                      \
        case 32: { constexpr int HD_ = 32; CALL; break; }                                      \
        case 64: { constexpr int HD_ = 64; CALL; break; }                                      \
        case 96: { constexpr int HD_ = 96; CALL; break; }                                      \
        case 128: { constexpr int HD_ = 128; CALL; break; }                                    \
        default: fprintf(stderr, "attention: head_dim %d is not supported\n", hd); exit(1);    \
    }

// out [N, H*hd], lse [B, H, T] from q [N, H*hd], k, v [N, Hkv*hd] (q and k after RoPE)
template <typename T>
void attention_forward(T* out, float* lse, const T* q, const T* k, const T* v, int B, int T_, int H, int Hkv, int hd,
                       cudaStream_t s) {
    ATT_DISPATCH(hd, (attention_forward_hd<T, HD_>(out, lse, q, k, v, B, T_, H, Hkv, s)));
}
// dq, dk, dv are written (not accumulated). D: scratch [B, H, T] floats.
template <typename T>
void attention_backward(T* dq, T* dk, T* dv, float* D, const T* dout, const T* out, const float* lse, const T* q,
                        const T* k, const T* v, int B, int T_, int H, int Hkv, int hd, cudaStream_t s) {
    ATT_DISPATCH(hd, (attention_backward_hd<T, HD_>(dq, dk, dv, D, dout, out, lse, q, k, v, B, T_, H, Hkv, s)));
}

}  // namespace gpu
