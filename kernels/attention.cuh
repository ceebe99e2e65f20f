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
// Two implementations behind one launcher:
// - bf16 with head_dim a multiple of 16 (16, 32, 64, 96, 128): tensor cores, FlashAttention-2
//   style (attention_*_tc_kernel below; mma.sync m16n8k16 through kernels/mma.cuh).
// - fp32, and head_dim 8: the CUDA-core kernels described next, kept as the readable
//   reference and for --dtype fp32 runs.
// CUDA-core design (simple and checkable, not the fastest): one thread per query row (forward, dq)
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
#include <type_traits>
#include "common.cuh"
#include "mma.cuh"         // mma_m16n8k16_bf16, ldmatrix_x2(_trans), ldmatrix_x4, pack_bf16x2

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
// Shared-tile helpers of the tensor-core kernels (forward and backward): bf16 tiles of
// [rows][HD+8] in shared memory and the mma fragments read from them (kernels/mma.cuh).

// stage rows r0 .. r0+rows-1 (zero past T) of columns c0 .. c0+HD-1 of a [B*T, ld_g] bf16
// matrix into a [rows][LD] shared tile, 16 bytes per thread and step
template <int HD>
__device__ __forceinline__ void att_stage_rows(bf16* dst, const bf16* src, int b, int T_, int r0, int rows, int ld_g,
                                               int c0) {
    constexpr int LD = HD + 8;
    for (int i = threadIdx.x; i < rows * (HD / 8); i += blockDim.x) {
        int r = i / (HD / 8), c8 = i % (HD / 8);
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r0 + r < T_) val = *reinterpret_cast<const uint4*>(src + (size_t)(b * T_ + r0 + r) * ld_g + c0 + 8 * c8);
        *reinterpret_cast<uint4*>(dst + r * LD + 8 * c8) = val;
    }
}
// A fragment (16 rows from r0, 16 columns from c0) of a [rows][HD+8] bf16 shared tile
template <int HD>
__device__ __forceinline__ void att_frag_a(uint32_t a[4], const bf16* tile, int r0, int c0, int lane) {
    ldmatrix_x4(a, &tile[(r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * (HD + 8) + c0 + (lane >> 4) * 8]);
}
// B fragment with B[k][n] = tile[n0 + n][c0 + k] (rows of the tile are the n index)
template <int HD>
__device__ __forceinline__ void att_frag_b_rows(uint32_t b[2], const bf16* tile, int n0, int c0, int lane) {
    ldmatrix_x2(b, &tile[(n0 + (lane & 7)) * (HD + 8) + c0 + ((lane >> 3) & 1) * 8]);
}
// B fragment with B[k][n] = tile[k0 + k][n0 + n] (rows of the tile are the k index)
template <int HD>
__device__ __forceinline__ void att_frag_b_cols(uint32_t b[2], const bf16* tile, int k0, int n0, int lane) {
    ldmatrix_x2_trans(b, &tile[(k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * (HD + 8) + n0]);
}
// the C fragments of two neighbouring 8-column tiles as one 16-wide A fragment, in bf16
__device__ __forceinline__ void att_c_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = pack_bf16x2(__float2bfloat16(c0[0]), __float2bfloat16(c0[1]));
    a[1] = pack_bf16x2(__float2bfloat16(c0[2]), __float2bfloat16(c0[3]));
    a[2] = pack_bf16x2(__float2bfloat16(c1[0]), __float2bfloat16(c1[1]));
    a[3] = pack_bf16x2(__float2bfloat16(c1[2]), __float2bfloat16(c1[3]));
}
// c1 = A1 B1 and c2 = A2 B2 for one warp, over the whole head dimension: A1, A2 are the 16
// rows from a0 of two [.][HD+8] tiles; B1, B2 two tiles whose rows n (NT x 8 of them) are
// the columns of the products (B[k][n] = tile[n][k]). Both backward kernels compute their S
// and dP this way (K Q^T and V dO^T, or Q K^T and dO V^T).
template <int HD, int NT>
__device__ __forceinline__ void att_two_products(float c1[NT][4], float c2[NT][4], const bf16* A1, const bf16* A2,
                                                 int a0, const bf16* B1, const bf16* B2, int lane) {
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) c1[nt][e] = c2[nt][e] = 0.0f;
#pragma unroll
    for (int kc = 0; kc < HD / 16; kc++) {
        uint32_t a1[4], a2[4];
        att_frag_a<HD>(a1, A1, a0, kc * 16, lane);
        att_frag_a<HD>(a2, A2, a0, kc * 16, lane);
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            uint32_t b1[2], b2[2];
            att_frag_b_rows<HD>(b1, B1, nt * 8, kc * 16, lane);
            att_frag_b_rows<HD>(b2, B2, nt * 8, kc * 16, lane);
            mma_m16n8k16_bf16(c1[nt], a1, b1, c1[nt]);
            mma_m16n8k16_bf16(c2[nt], a2, b2, c2[nt]);
        }
    }
}

// ----------------------------------------------------------------------------
// Forward on tensor cores (bf16, HD a multiple of 16): the FlashAttention-2 schedule with
// mma.sync m16n8k16 (kernels/mma.cuh; fragment layouts there). A block of 4 warps takes 64
// query rows, each warp 16 of them; key/value tiles of 64 rows are staged in shared memory,
// and per tile each warp computes its 16 x 64 scores S = Q K^T in registers, updates the
// online softmax (row max and sum), and adds P V to its 16 x HD output accumulator. P goes
// from the score accumulator straight into the A operand of the P V product: the C/D
// fragment of two neighbouring 8-key tiles is exactly the A fragment of one 16-key chunk.
// P is rounded to bf16 for that product (as FlashAttention does); the row sums l use the
// fp32 p, so out = (P_bf16 V) / l differs from the fp32 kernel by about 2^-9 relative.
// Shared memory, bf16 rows padded by 8 elements (16 bytes: ldmatrix rows stay 16-byte
// aligned and successive rows fall in different banks): Qs, Ks, Vs [64][HD+8].
constexpr int ATT_TC_BQ = 64;  // query rows per block: 4 warps x 16
constexpr int ATT_TC_BK = 64;  // keys per shared-memory tile

template <int HD>
__global__ void __launch_bounds__(128) attention_forward_tc_kernel(bf16* out, float* lse, const bf16* q, const bf16* k,
                                                                  const bf16* v, int B, int T_, int H, int Hkv) {
    static_assert(HD % 16 == 0, "HD must be a multiple of 16 (the mma k step)");
    constexpr int LD = HD + 8;       // padded row length in shared memory
    constexpr int KC = HD / 16;      // 16-wide chunks of the head dimension (S = Q K^T's k steps)
    constexpr int NT = ATT_TC_BK / 8;  // 8-key column tiles of S
    constexpr int OT = HD / 8;       // 8-wide column tiles of the output
    extern __shared__ float4 smem4[];
    bf16* Qs = (bf16*)smem4;         // [BQ][LD]
    bf16* Ks = Qs + ATT_TC_BQ * LD;  // [BK][LD]
    bf16* Vs = Ks + ATT_TC_BK * LD;  // [BK][LD]
    const int bh = blockIdx.y, b = bh / H, h = bh % H, kh = h / (H / Hkv);
    const int qd = H * HD, kvd = Hkv * HD;
    const int q0 = blockIdx.x * ATT_TC_BQ;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, tq = lane & 3;
    const float scale = 1.0f / sqrtf((float)HD);

    att_stage_rows<HD>(Qs, q, b, T_, q0, ATT_TC_BQ, qd, h * HD);
    __syncthreads();
    // this warp's Q rows as A fragments, one per 16-wide chunk of HD (kept for every key tile)
    uint32_t qa[KC][4];
    const int wr = warp * 16;  // the warp's first row within the block
#pragma unroll
    for (int kc = 0; kc < KC; kc++) att_frag_a<HD>(qa[kc], Qs, wr, kc * 16, lane);

    float o[OT][4];  // rows g and g+8 of the warp's 16, columns 8 ot + 2 tq, +1
#pragma unroll
    for (int ot = 0; ot < OT; ot++) o[ot][0] = o[ot][1] = o[ot][2] = o[ot][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // rows g, g+8 (l: this lane's part)
    const int row[2] = {q0 + wr + g, q0 + wr + g + 8};

    const int j_end = min(q0 + ATT_TC_BQ, T_);  // keys the block's queries can see: [0, j_end)
    for (int j0 = 0; j0 < j_end; j0 += ATT_TC_BK) {
        __syncthreads();  // the previous tile is no longer read
        att_stage_rows<HD>(Ks, k, b, T_, j0, ATT_TC_BK, kvd, kh * HD);
        att_stage_rows<HD>(Vs, v, b, T_, j0, ATT_TC_BK, kvd, kh * HD);
        __syncthreads();
        // S = Q K^T: B[k][n] = K[n][k], i.e. K's rows in ldmatrix's non-transposed layout
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
            for (int kc = 0; kc < KC; kc++) {
                uint32_t kb[2];  // keys 8 nt .. +7, dims 16 kc .. +15
                att_frag_b_rows<HD>(kb, Ks, nt * 8, kc * 16, lane);
                mma_m16n8k16_bf16(s[nt], qa[kc], kb, s[nt]);
            }
        }
        // scale, causal mask (key j visible to row t iff j <= t; also hides keys >= T), tile max
        float mt[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = j0 + nt * 8 + 2 * tq + (e & 1), r = e >> 1;
                s[nt][e] = (j <= row[r] && j < T_) ? s[nt][e] * scale : -INFINITY;
                mt[r] = fmaxf(mt[r], s[nt][e]);
            }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {  // the 4 lanes of a quad hold one row: max over them
            mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffff, mt[r], 1));
            mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffff, mt[r], 2));
            const float m_new = fmaxf(m[r], mt[r]);  // finite: key j0 <= row is visible
            alpha[r] = expf(m[r] - m_new);           // 0 on the first tile
            m[r] = m_new;
            l[r] *= alpha[r];
        }
#pragma unroll
        for (int ot = 0; ot < OT; ot++) {
            o[ot][0] *= alpha[0]; o[ot][1] *= alpha[0];
            o[ot][2] *= alpha[1]; o[ot][3] *= alpha[1];
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[nt][e] = expf(s[nt][e] - m[e >> 1]);  // p; 0 where masked
                l[e >> 1] += s[nt][e];
            }
        // O += P V, 16 keys at a time: A = P (from s), B[k][n] = V[key k][dim n] (transposed load)
#pragma unroll
        for (int kc = 0; kc < ATT_TC_BK / 16; kc++) {
            uint32_t pa[4];
            att_c_to_a(pa, s[2 * kc], s[2 * kc + 1]);
#pragma unroll
            for (int ot = 0; ot < OT; ot++) {
                uint32_t vb[2];  // keys 16 kc .. +15, dims 8 ot .. +7
                att_frag_b_cols<HD>(vb, Vs, kc * 16, ot * 8, lane);
                mma_m16n8k16_bf16(o[ot], pa, vb, o[ot]);
            }
        }
    }
    // the row sums over the quad, then out = o / l and lse = m + log l
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (row[r] >= T_) continue;
        const float inv = 1.0f / l[r];
        bf16* orow = out + (size_t)(b * T_ + row[r]) * qd + h * HD;
#pragma unroll
        for (int ot = 0; ot < OT; ot++) {
            __nv_bfloat162 pair;
            pair.x = __float2bfloat16(o[ot][2 * r] * inv);
            pair.y = __float2bfloat16(o[ot][2 * r + 1] * inv);
            *reinterpret_cast<__nv_bfloat162*>(orow + ot * 8 + 2 * tq) = pair;
        }
        if (tq == 0) lse[(size_t)bh * T_ + row[r]] = m[r] + logf(l[r]);
    }
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
// Backward on tensor cores (bf16, HD a multiple of 16). Two kernels, so that every output
// element has one writer (no atomics; bit-identical reruns), at the price of recomputing
// S and dP in both (7 matrix products instead of FlashAttention-2's 5):
//   dk/dv: a block owns 64 keys (a warp 16), walks the group's heads and the query tiles
//          t >= its first key; per tile S^T = K Q^T and dP^T = V dO^T (16 keys x 32 queries
//          per warp), P^T, dS^T = P^T (dP^T - D), then dV += P^T dO and dK += dS^T Q;
//   dq:    a block owns 64 queries (a warp 16), walks the key tiles up to the diagonal;
//          S = Q K^T, dP = dO V^T, dS, then dQ += dS K.
// The probabilities come from the forward's lse; P and dS are rounded to bf16 as the A
// operand of the next product (as FlashAttention does), accumulation is fp32.
constexpr int ATT_TC_BWD_QT = 32;  // query rows per tile in the dk/dv kernel

// grid (cdiv(T, 64), B*Hkv), 128 threads; shared: Ks, Vs [64][HD+8], Qs, dOs [32][HD+8] bf16,
// lse_s, D_s [32] fp32
template <int HD>
__global__ void __launch_bounds__(128) attention_backward_dkdv_tc_kernel(bf16* dk, bf16* dv, const bf16* dout,
                                                                        const bf16* q, const bf16* k, const bf16* v,
                                                                        const float* lse, const float* D, int B,
                                                                        int T_, int H, int Hkv) {
    constexpr int LD = HD + 8, OT = HD / 8, QT = ATT_TC_BWD_QT, NQ = QT / 8;
    extern __shared__ float4 smem4[];
    bf16* Ks = (bf16*)smem4;
    bf16* Vs = Ks + 64 * LD;
    bf16* Qs = Vs + 64 * LD;
    bf16* dOs = Qs + QT * LD;
    float* lse_s = (float*)(dOs + QT * LD);
    float* D_s = lse_s + QT;
    const int bkh = blockIdx.y, b = bkh / Hkv, kh = bkh % Hkv, group = H / Hkv;
    const int qd = H * HD, kvd = Hkv * HD;
    const int k0 = blockIdx.x * 64;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, tq = lane & 3;
    const float scale = 1.0f / sqrtf((float)HD);
    const int key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};  // this lane's key rows

    att_stage_rows<HD>(Ks, k, b, T_, k0, 64, kvd, kh * HD);
    att_stage_rows<HD>(Vs, v, b, T_, k0, 64, kvd, kh * HD);
    float dka[OT][4], dva[OT][4];
#pragma unroll
    for (int ot = 0; ot < OT; ot++)
#pragma unroll
        for (int e = 0; e < 4; e++) dka[ot][e] = dva[ot][e] = 0.0f;

    for (int h = kh * group; h < (kh + 1) * group; h++) {
        const size_t bh = (size_t)b * H + h;
        for (int t0 = k0; t0 < T_; t0 += QT) {  // queries before k0 see none of these keys
            __syncthreads();  // the previous query tile is no longer read
            att_stage_rows<HD>(Qs, q, b, T_, t0, QT, qd, h * HD);
            att_stage_rows<HD>(dOs, dout, b, T_, t0, QT, qd, h * HD);
            for (int r = threadIdx.x; r < QT; r += blockDim.x) {
                lse_s[r] = t0 + r < T_ ? lse[bh * T_ + t0 + r] : 0.0f;
                D_s[r] = t0 + r < T_ ? D[bh * T_ + t0 + r] : 0.0f;
            }
            __syncthreads();
            // S^T = K Q^T and dP^T = V dO^T: 16 keys x QT queries per warp
            float st[NQ][4], dpt[NQ][4];
            att_two_products<HD, NQ>(st, dpt, Ks, Vs, warp * 16, Qs, dOs, lane);
            // P^T and dS^T (kept in st and dpt); query t sees key j iff j <= t (and t < T)
#pragma unroll
            for (int nt = 0; nt < NQ; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int tl = nt * 8 + 2 * tq + (e & 1), t = t0 + tl, j = key[e >> 1];
                    const float p = (j <= t && t < T_) ? expf(st[nt][e] * scale - lse_s[tl]) : 0.0f;
                    st[nt][e] = p;
                    dpt[nt][e] = p * (dpt[nt][e] - D_s[tl]);
                }
            // dV += P^T dO and dK += dS^T Q, 16 queries at a time
#pragma unroll
            for (int kc = 0; kc < QT / 16; kc++) {
                uint32_t pa[4], da[4];
                att_c_to_a(pa, st[2 * kc], st[2 * kc + 1]);
                att_c_to_a(da, dpt[2 * kc], dpt[2 * kc + 1]);
#pragma unroll
                for (int ot = 0; ot < OT; ot++) {
                    uint32_t ob[2], qb[2];
                    att_frag_b_cols<HD>(ob, dOs, kc * 16, ot * 8, lane);
                    att_frag_b_cols<HD>(qb, Qs, kc * 16, ot * 8, lane);
                    mma_m16n8k16_bf16(dva[ot], pa, ob, dva[ot]);
                    mma_m16n8k16_bf16(dka[ot], da, qb, dka[ot]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (key[r] >= T_) continue;
        bf16* dkr = dk + (size_t)(b * T_ + key[r]) * kvd + kh * HD;
        bf16* dvr = dv + (size_t)(b * T_ + key[r]) * kvd + kh * HD;
#pragma unroll
        for (int ot = 0; ot < OT; ot++) {
            __nv_bfloat162 pk, pv;
            pk.x = __float2bfloat16(dka[ot][2 * r] * scale);
            pk.y = __float2bfloat16(dka[ot][2 * r + 1] * scale);
            pv.x = __float2bfloat16(dva[ot][2 * r]);
            pv.y = __float2bfloat16(dva[ot][2 * r + 1]);
            *reinterpret_cast<__nv_bfloat162*>(dkr + ot * 8 + 2 * tq) = pk;
            *reinterpret_cast<__nv_bfloat162*>(dvr + ot * 8 + 2 * tq) = pv;
        }
    }
}

// grid (cdiv(T, 64), B*H), 128 threads; shared: Qs, dOs, Ks, Vs [64][HD+8] bf16
template <int HD>
__global__ void __launch_bounds__(128) attention_backward_dq_tc_kernel(bf16* dq, const bf16* dout, const bf16* q,
                                                                      const bf16* k, const bf16* v, const float* lse,
                                                                      const float* D, int B, int T_, int H,
                                                                      int Hkv) {
    constexpr int LD = HD + 8, OT = HD / 8, NT = 8;  // 64 keys per tile: 8 column tiles
    extern __shared__ float4 smem4[];
    bf16* Qs = (bf16*)smem4;
    bf16* dOs = Qs + 64 * LD;
    bf16* Ks = dOs + 64 * LD;
    bf16* Vs = Ks + 64 * LD;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, kh = h / (H / Hkv);
    const int qd = H * HD, kvd = Hkv * HD;
    const int q0 = blockIdx.x * 64;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, tq = lane & 3;
    const float scale = 1.0f / sqrtf((float)HD);
    const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    float lse_r[2], D_r[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        lse_r[r] = row[r] < T_ ? lse[(size_t)bh * T_ + row[r]] : 0.0f;
        D_r[r] = row[r] < T_ ? D[(size_t)bh * T_ + row[r]] : 0.0f;
    }
    att_stage_rows<HD>(Qs, q, b, T_, q0, 64, qd, h * HD);
    att_stage_rows<HD>(dOs, dout, b, T_, q0, 64, qd, h * HD);
    float dqa[OT][4];
#pragma unroll
    for (int ot = 0; ot < OT; ot++) dqa[ot][0] = dqa[ot][1] = dqa[ot][2] = dqa[ot][3] = 0.0f;

    const int j_end = min(q0 + 64, T_);
    for (int j0 = 0; j0 < j_end; j0 += 64) {
        __syncthreads();
        att_stage_rows<HD>(Ks, k, b, T_, j0, 64, kvd, kh * HD);
        att_stage_rows<HD>(Vs, v, b, T_, j0, 64, kvd, kh * HD);
        __syncthreads();
        // S = Q K^T and dP = dO V^T: 16 queries x 64 keys per warp
        float s[NT][4], dp[NT][4];
        att_two_products<HD, NT>(s, dp, Qs, dOs, warp * 16, Ks, Vs, lane);
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = j0 + nt * 8 + 2 * tq + (e & 1), r = e >> 1;
                const float p = (j <= row[r] && j < T_ && row[r] < T_) ? expf(s[nt][e] * scale - lse_r[r]) : 0.0f;
                dp[nt][e] = p * (dp[nt][e] - D_r[r]);  // dS
            }
        // dQ += dS K, 16 keys at a time: B[k][n] = K[key k][dim n]
#pragma unroll
        for (int kc = 0; kc < NT / 2; kc++) {
            uint32_t da[4];
            att_c_to_a(da, dp[2 * kc], dp[2 * kc + 1]);
#pragma unroll
            for (int ot = 0; ot < OT; ot++) {
                uint32_t kb[2];
                att_frag_b_cols<HD>(kb, Ks, kc * 16, ot * 8, lane);
                mma_m16n8k16_bf16(dqa[ot], da, kb, dqa[ot]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (row[r] >= T_) continue;
        bf16* dqr = dq + (size_t)(b * T_ + row[r]) * qd + h * HD;
#pragma unroll
        for (int ot = 0; ot < OT; ot++) {
            __nv_bfloat162 pair;
            pair.x = __float2bfloat16(dqa[ot][2 * r] * scale);
            pair.y = __float2bfloat16(dqa[ot][2 * r + 1] * scale);
            *reinterpret_cast<__nv_bfloat162*>(dqr + ot * 8 + 2 * tq) = pair;
        }
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
                          cudaStream_t s, bool tensor_cores) {
    if constexpr (std::is_same<T, bf16>::value && HD % 16 == 0) if (tensor_cores) {
        size_t bytes = sizeof(bf16) * 3 * ATT_TC_BQ * (HD + 8);
        static bool ready_tc = false;
        if (!ready_tc) { att_set_smem(attention_forward_tc_kernel<HD>, bytes); ready_tc = true; }
        dim3 grid(cdiv(T_, ATT_TC_BQ), B * H);
        attention_forward_tc_kernel<HD><<<grid, 128, bytes, s>>>(out, lse, q, k, v, B, T_, H, Hkv);
        KERNEL_CHECK();
        return;
    }
    size_t bytes = sizeof(float) * (ATT_FWD_BQ * (HD + 1) + 2 * ATT_FWD_BK * HD);
    static bool ready = false;
    if (!ready) { att_set_smem(attention_forward_kernel<T, HD>, bytes); ready = true; }
    dim3 grid(cdiv(T_, ATT_FWD_BQ), B * H);
    attention_forward_kernel<T, HD><<<grid, ATT_FWD_BQ, bytes, s>>>(out, lse, q, k, v, B, T_, H, Hkv);
    KERNEL_CHECK();
}

template <typename T, int HD>
void attention_backward_hd(T* dq, T* dk, T* dv, float* D, const T* dout, const T* out, const float* lse, const T* q,
                           const T* k, const T* v, int B, int T_, int H, int Hkv, cudaStream_t s, bool tensor_cores) {
    attention_backward_D_kernel<<<cdiv((long)B * T_ * H, 256), 256, 0, s>>>(D, dout, out, B, T_, H, HD);
    KERNEL_CHECK();
    if constexpr (std::is_same<T, bf16>::value && HD % 16 == 0) if (tensor_cores) {
        constexpr int LD = HD + 8;
        size_t bytes_kv = sizeof(bf16) * (2 * 64 + 2 * ATT_TC_BWD_QT) * LD + sizeof(float) * 2 * ATT_TC_BWD_QT;
        size_t bytes_q = sizeof(bf16) * 4 * 64 * LD;
        static bool ready_tc = false;
        if (!ready_tc) {
            att_set_smem(attention_backward_dkdv_tc_kernel<HD>, bytes_kv);
            att_set_smem(attention_backward_dq_tc_kernel<HD>, bytes_q);
            ready_tc = true;
        }
        attention_backward_dkdv_tc_kernel<HD><<<dim3(cdiv(T_, 64), B * Hkv), 128, bytes_kv, s>>>(
            dk, dv, dout, q, k, v, lse, D, B, T_, H, Hkv);
        KERNEL_CHECK();
        attention_backward_dq_tc_kernel<HD><<<dim3(cdiv(T_, 64), B * H), 128, bytes_q, s>>>(dq, dout, q, k, v, lse, D,
                                                                                          B, T_, H, Hkv);
        KERNEL_CHECK();
        return;
    }
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

// out [N, H*hd], lse [B, H, T] from q [N, H*hd], k, v [N, Hkv*hd] (q and k after RoPE).
// bf16 with hd a multiple of 16 runs on tensor cores; tensor_cores = false forces the
// CUDA-core kernels (dev/cuda/attention.cu compares the two).
template <typename T>
void attention_forward(T* out, float* lse, const T* q, const T* k, const T* v, int B, int T_, int H, int Hkv, int hd,
                       cudaStream_t s, bool tensor_cores = true) {
    ATT_DISPATCH(hd, (attention_forward_hd<T, HD_>(out, lse, q, k, v, B, T_, H, Hkv, s, tensor_cores)));
}
// ---- decoding with a KV cache (train_moe.cpp attention_forward_cached is the reference) ----
// The new rows' keys and values into the cache: row i (sequence i / n) at position pos_of[i];
// k, v [B*n, kvd] -> kc, vc [rows, T_max, kvd] at cache row row0 + i / n.
template <typename T>
__global__ void kv_cache_write_kernel(T* kc, T* vc, const T* k, const T* v, const int* pos_of, int row0, int N, int n,
                                      int T_max, int kvd) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * kvd) return;
    int r = (int)(i / kvd), c = (int)(i % kvd);
    size_t at = ((size_t)(row0 + r / n) * T_max + pos_of[r]) * kvd + c;
    kc[at] = k[i];
    vc[at] = v[i];
}
template <typename T>
void kv_cache_write(T* kc, T* vc, const T* k, const T* v, const int* pos_of, int row0, int N, int n, int T_max, int kvd,
                    cudaStream_t s) {
    kv_cache_write_kernel<T><<<cdiv((long)N * kvd, 256), 256, 0, s>>>(kc, vc, k, v, pos_of, row0, N, n, T_max, kvd);
    KERNEL_CHECK();
}
// One block of 128 threads per (new row, head): query row r = b n + t at position
// P = pos_of[r] attends to the keys 0..P of its cache row. Three fixed-order passes over
// the keys: the max score (block reduction), then chunks of 128 keys whose probabilities go
// through shared memory while thread i accumulates output dimension i (hd <= 128), and the
// sum of the probabilities. A simple kernel: decoding reads the cache once per token.
constexpr int ATT_DEC_THREADS = 128;
template <typename T>
__global__ void __launch_bounds__(ATT_DEC_THREADS) attention_decode_kernel(T* out, const T* q, const T* kc, const T* vc,
                                                                           const int* pos_of, int row0, int n, int T_max,
                                                                           int H, int Hkv, int hd) {
    __shared__ float qs[128], ps[ATT_DEC_THREADS], red[32];
    const int r = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, kh = h / (H / Hkv);
    const int qd = H * hd, kvd = Hkv * hd, P = pos_of[r];
    const T* K = kc + (size_t)(row0 + r / n) * T_max * kvd + kh * hd;
    const T* V = vc + (size_t)(row0 + r / n) * T_max * kvd + kh * hd;
    const float scale = rsqrtf((float)hd);
    for (int i = tid; i < hd; i += blockDim.x) qs[i] = to_f(q[(size_t)r * qd + h * hd + i]);
    __syncthreads();
    auto score = [&](int j) {
        float s = 0.0f;
        for (int i = 0; i < hd; i++) s += qs[i] * to_f(K[(size_t)j * kvd + i]);
        return s * scale;
    };
    float mx = -INFINITY;
    for (int j = tid; j <= P; j += blockDim.x) mx = fmaxf(mx, score(j));
    mx = block_max(mx, red);
    float acc = 0.0f, l = 0.0f;
    for (int c = 0; c <= P; c += blockDim.x) {
        const int j = c + tid;
        const float p = j <= P ? expf(score(j) - mx) : 0.0f;
        l += p;
        ps[tid] = p;
        __syncthreads();
        const int m = min((int)blockDim.x, P + 1 - c);
        if (tid < hd)
            for (int jj = 0; jj < m; jj++) acc += ps[jj] * to_f(V[(size_t)(c + jj) * kvd + tid]);
        __syncthreads();
    }
    l = block_sum(l, red);
    if (tid < hd) out[(size_t)r * qd + h * hd + tid] = from_f<T>(acc / l);
}
// out [B*n, H*hd] from q [B*n, H*hd] and the cache (written first with kv_cache_write);
// hd <= 128 (attention_supports_head_dim)
template <typename T>
void attention_decode(T* out, const T* q, const T* kc, const T* vc, const int* pos_of, int row0, int N, int n, int T_max,
                      int H, int Hkv, int hd, cudaStream_t s) {
    attention_decode_kernel<T><<<dim3(N, H), ATT_DEC_THREADS, 0, s>>>(out, q, kc, vc, pos_of, row0, n, T_max, H, Hkv, hd);
    KERNEL_CHECK();
}

// dq, dk, dv are written (not accumulated). D: scratch [B, H, T] floats.
template <typename T>
void attention_backward(T* dq, T* dk, T* dv, float* D, const T* dout, const T* out, const float* lse, const T* q,
                        const T* k, const T* v, int B, int T_, int H, int Hkv, int hd, cudaStream_t s,
                        bool tensor_cores = true) {
    ATT_DISPATCH(hd, (attention_backward_hd<T, HD_>(dq, dk, dv, D, dout, out, lse, q, k, v, B, T_, H, Hkv, s,
                                                    tensor_cores)));
}

}  // namespace gpu
