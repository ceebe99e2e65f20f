/*
Causal self-attention with grouped-query heads, fp32 (query head h reads kv head h / (H/Hkv)).
  q [N, H*hd], k and v [N, Hkv*hd], N = B*T; scale = 1/sqrt(hd)
  forward:  att[b,h,t,j] = softmax_j<=t(q_t . k_j * scale)   (the probabilities are kept)
            out[t] = sum_j att[t,j] v_j
  backward: dp_j = dout_t . v_j;  ds_j = att_j (dp_j - sum_i att_i dp_i)
            dq_t += scale sum_j ds_j k_j;  dk_j += scale sum_t ds_tj q_t;  dv_j += sum_t att_tj dout_t
            (all three accumulate; dk/dv sum over the heads of a group)
CPU reference: attention_forward / attention_backward of train_moe.cpp. The references at
the realistic size are computed once per case, outside the version loop (seconds of CPU).
Every version here reduces dk and dv by gathering (each output element owned by one
thread, summing in a fixed order), never with atomics: deterministic.

Build and run (from the repository root):
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/attention.cu -o build/attention -lcublas -lcublasLt -lgomp && ./build/attention [version]

Versions 3 (T = float) and 4 (T = bf16) are the production kernels, kernels/attention.cuh
(gpu::attention_forward / gpu::attention_backward), called as train_moe.cu does. Version 4
runs the tensor-core kernels (mma.sync, FlashAttention-2 style) for every case with hd a
multiple of 16 and the CUDA-core kernels for hd 8; version 5 forces the CUDA-core kernels
in bf16 (the production kernels before the tensor-core ones), to compare their speed. They are
flash-style: no att is stored, the forward writes lse [B, H, T] instead (checked against
log sum_{j<=t} exp(s_tj) computed on the host in double), and the backward recomputes the
probabilities from (q, k, lse) and takes the forward's out for D = rowsum(dout * out) (D:
a [B, H, T] scratch). dq, dk, dv are WRITTEN, not accumulated: their reference starts from
0 and they are poisoned. The backward runs from the reference out and lse, so that a
forward bug is not counted twice. bf16: the reference runs on the bf16-rounded q, k, v,
dout; outputs at TOL_BF16, lse (fp32) at TOL_FP32.
*/
#define TRAIN_MOE_NO_MAIN
#include "../../train_moe.cpp"
#include "common.h"
#include "../../kernels/attention.cuh"

// ----------------------------------------------------------------------------
// version 1: one thread per (b, h, t) query row: scores into the att row, softmax, then the
// weighted sum of v. Backward in three gathers: ds rows (thread per query row, into a
// [B,H,T,T] scratch), dq (thread per dq element), dk and dv (thread per kv element, summing
// over the group's heads and t >= j in order).
__global__ void attn_fwd_v1(float* out, float* att, const float* q, const float* k, const float* v, int B, int T,
                            int H, int Hkv, int hd) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * H * T) return;
    int t = idx % T, h = (idx / T) % H, b = idx / (T * H);
    int kh = h / (H / Hkv), qd = H * hd, kvd = Hkv * hd;
    float scale = rsqrtf((float)hd);
    const float* qt = q + (size_t)(b * T + t) * qd + h * hd;
    float* p = att + (((size_t)b * H + h) * T + t) * T;
    float mx = -INFINITY;
    for (int j = 0; j <= t; j++) {
        const float* kj = k + (size_t)(b * T + j) * kvd + kh * hd;
        float s = 0;
        for (int i = 0; i < hd; i++) s += qt[i] * kj[i];
        p[j] = s * scale;
        mx = fmaxf(mx, p[j]);
    }
    float sum = 0;
    for (int j = 0; j <= t; j++) { p[j] = expf(p[j] - mx); sum += p[j]; }
    for (int j = 0; j <= t; j++) p[j] /= sum;
    float* o = out + (size_t)(b * T + t) * qd + h * hd;
    for (int i = 0; i < hd; i++) {
        float acc = 0;
        for (int j = 0; j <= t; j++) acc += p[j] * v[(size_t)(b * T + j) * kvd + kh * hd + i];
        o[i] = acc;
    }
}
// ds[b,h,t,j] = att (dp - sum att dp) * scale, j <= t
__global__ void attn_bwd_ds_v1(float* ds, const float* dout, const float* att, const float* v, int B, int T, int H,
                               int Hkv, int hd) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * H * T) return;
    int t = idx % T, h = (idx / T) % H, b = idx / (T * H);
    int kh = h / (H / Hkv), qd = H * hd, kvd = Hkv * hd;
    float scale = rsqrtf((float)hd);
    const float* p = att + (((size_t)b * H + h) * T + t) * T;
    float* d = ds + (((size_t)b * H + h) * T + t) * T;
    const float* dy = dout + (size_t)(b * T + t) * qd + h * hd;
    float pdp = 0;
    for (int j = 0; j <= t; j++) {
        const float* vj = v + (size_t)(b * T + j) * kvd + kh * hd;
        float dp = 0;
        for (int i = 0; i < hd; i++) dp += dy[i] * vj[i];
        d[j] = dp;
        pdp += p[j] * dp;
    }
    for (int j = 0; j <= t; j++) d[j] = p[j] * (d[j] - pdp) * scale;
}
__global__ void attn_bwd_dq_v1(float* dq, const float* ds, const float* k, int B, int T, int H, int Hkv, int hd) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)B * T * H * hd) return;
    int i = idx % hd, h = (idx / hd) % H, t = (idx / ((long)hd * H)) % T, b = idx / ((long)hd * H * T);
    int kh = h / (H / Hkv), kvd = Hkv * hd;
    const float* d = ds + (((size_t)b * H + h) * T + t) * T;
    float acc = 0;
    for (int j = 0; j <= t; j++) acc += d[j] * k[(size_t)(b * T + j) * kvd + kh * hd + i];
    dq[idx] += acc;
}
__global__ void attn_bwd_dkdv_v1(float* dk, float* dv, const float* ds, const float* att, const float* q,
                                 const float* dout, int B, int T, int H, int Hkv, int hd) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)B * T * Hkv * hd) return;
    int i = idx % hd, kh = (idx / hd) % Hkv, j = (idx / ((long)hd * Hkv)) % T, b = idx / ((long)hd * Hkv * T);
    int group = H / Hkv, qd = H * hd;
    float ak = 0, av = 0;
    for (int h = kh * group; h < (kh + 1) * group; h++)
        for (int t = j; t < T; t++) {
            size_t a = (((size_t)b * H + h) * T + t) * T + j;
            ak += ds[a] * q[(size_t)(b * T + t) * qd + h * hd + i];
            av += att[a] * dout[(size_t)(b * T + t) * qd + h * hd + i];
        }
    dk[idx] += ak;
    dv[idx] += av;
}

// ----------------------------------------------------------------------------
// version 2: one WARP per query row. Scores: lanes take keys j = lane, lane+32, ... (each
// lane a full hd dot product; the k rows stay in L1/L2 across the rows of a block), the
// max and sum by warp shuffles; the output: lanes take dimensions i (coalesced v rows).
// Backward ds the same way; dq: a warp per (row, head) with lanes over i; dk/dv as v1 but
// a warp per (b, j, kh) with lanes over i, so the q / dout reads are coalesced.
__device__ inline float wsum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}
__device__ inline float wmax(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
    return x;
}
__global__ void attn_fwd_v2(float* out, float* att, const float* q, const float* k, const float* v, int B, int T,
                            int H, int Hkv, int hd) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= B * H * T) return;
    int t = row % T, h = (row / T) % H, b = row / (T * H);
    int kh = h / (H / Hkv), qd = H * hd, kvd = Hkv * hd;
    float scale = rsqrtf((float)hd);
    const float* qt = q + (size_t)(b * T + t) * qd + h * hd;
    float* p = att + (((size_t)b * H + h) * T + t) * T;
    float mx = -INFINITY;
    for (int j = lane; j <= t; j += 32) {
        const float* kj = k + (size_t)(b * T + j) * kvd + kh * hd;
        float s = 0;
        for (int i = 0; i < hd; i++) s += qt[i] * kj[i];
        p[j] = s * scale;
        mx = fmaxf(mx, s * scale);
    }
    mx = wmax(mx);
    float sum = 0;
    for (int j = lane; j <= t; j += 32) { float e = expf(p[j] - mx); p[j] = e; sum += e; }
    sum = wsum(sum);
    float inv = 1.0f / sum;
    for (int j = lane; j <= t; j += 32) p[j] *= inv;
    __syncwarp();  // the lanes read each other's p[j] below
    float* o = out + (size_t)(b * T + t) * qd + h * hd;
    for (int i = lane; i < hd; i += 32) {
        float acc = 0;
        for (int j = 0; j <= t; j++) acc += p[j] * v[(size_t)(b * T + j) * kvd + kh * hd + i];
        o[i] = acc;
    }
}
__global__ void attn_bwd_ds_v2(float* ds, const float* dout, const float* att, const float* v, int B, int T, int H,
                               int Hkv, int hd) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= B * H * T) return;
    int t = row % T, h = (row / T) % H, b = row / (T * H);
    int kh = h / (H / Hkv), qd = H * hd, kvd = Hkv * hd;
    float scale = rsqrtf((float)hd);
    const float* p = att + (((size_t)b * H + h) * T + t) * T;
    float* d = ds + (((size_t)b * H + h) * T + t) * T;
    const float* dy = dout + (size_t)(b * T + t) * qd + h * hd;
    float pdp = 0;
    for (int j = lane; j <= t; j += 32) {
        const float* vj = v + (size_t)(b * T + j) * kvd + kh * hd;
        float dp = 0;
        for (int i = 0; i < hd; i++) dp += dy[i] * vj[i];
        d[j] = dp;
        pdp += p[j] * dp;
    }
    pdp = wsum(pdp);
    for (int j = lane; j <= t; j += 32) d[j] = p[j] * (d[j] - pdp) * scale;
}
__global__ void attn_bwd_dq_v2(float* dq, const float* ds, const float* k, int B, int T, int H, int Hkv, int hd) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= B * H * T) return;
    int t = row % T, h = (row / T) % H, b = row / (T * H);
    int kh = h / (H / Hkv), kvd = Hkv * hd, qd = H * hd;
    const float* d = ds + (((size_t)b * H + h) * T + t) * T;
    for (int i = lane; i < hd; i += 32) {
        float acc = 0;
        for (int j = 0; j <= t; j++) acc += d[j] * k[(size_t)(b * T + j) * kvd + kh * hd + i];
        dq[(size_t)(b * T + t) * qd + h * hd + i] += acc;
    }
}
__global__ void attn_bwd_dkdv_v2(float* dk, float* dv, const float* ds, const float* att, const float* q,
                                 const float* dout, int B, int T, int H, int Hkv, int hd) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= B * T * Hkv) return;
    int kh = row % Hkv, j = (row / Hkv) % T, b = row / (Hkv * T);
    int group = H / Hkv, qd = H * hd, kvd = Hkv * hd;
    for (int i = lane; i < hd; i += 32) {
        float ak = 0, av = 0;
        for (int h = kh * group; h < (kh + 1) * group; h++)
            for (int t = j; t < T; t++) {
                size_t a = (((size_t)b * H + h) * T + t) * T + j;
                ak += ds[a] * q[(size_t)(b * T + t) * qd + h * hd + i];
                av += att[a] * dout[(size_t)(b * T + t) * qd + h * hd + i];
            }
        dk[(size_t)(b * T + j) * kvd + kh * hd + i] += ak;
        dv[(size_t)(b * T + j) * kvd + kh * hd + i] += av;
    }
}

const char* NAMES[] = {"", "thread per row", "warp per row", "kernels/attention.cuh (fp32, flash-style)",
                       "kernels/attention.cuh (bf16, flash-style)",
                       "kernels/attention.cuh (bf16, CUDA cores forced: the kernels before tensor cores)"};
const int NV = 5;

// versions 3 and 4: the production kernels (their own references: dq, dk, dv from 0, and
// for bf16 the rounded inputs)
template <typename T>
void check_production(Suite& S, std::vector<float> q, std::vector<float> k, std::vector<float> v,
                      std::vector<float> dout, int B, int T_, int H, int Hkv, int hd, bool tensor_cores = true) {
    const bool is_bf16 = sizeof(T) == 2;
    const int N = B * T_, qd = H * hd, kvd = Hkv * hd, group = H / Hkv;
    if (is_bf16) { q = round_bf16(q); k = round_bf16(k); v = round_bf16(v); dout = round_bf16(dout); }
    size_t na = (size_t)B * H * T_ * T_;
    std::vector<float> out((size_t)N * qd), att(na, 0.0f), dq((size_t)N * qd, 0.0f), dk((size_t)N * kvd, 0.0f),
        dv((size_t)N * kvd, 0.0f), lse((size_t)B * H * T_);
    attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T_, H, Hkv, hd);
    attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), att.data(), q.data(), k.data(), v.data(), B, T_, H,
                       Hkv, hd);
    std::vector<float>().swap(att);
    const double sc = 1.0 / std::sqrt((double)hd);
#pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            std::vector<double> s(T_);
            for (int t = 0; t < T_; t++) {
                const float* qt = &q[(size_t)(b * T_ + t) * qd + h * hd];
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j <= t; j++) {
                    const float* kj = &k[(size_t)(b * T_ + j) * kvd + (h / group) * hd];
                    double a = 0;
                    for (int i = 0; i < hd; i++) a += (double)qt[i] * kj[i];
                    s[j] = a * sc;
                    mx = std::max(mx, s[j]);
                }
                for (int j = 0; j <= t; j++) sum += std::exp(s[j] - mx);
                lse[((size_t)b * H + h) * T_ + t] = (float)(mx + std::log(sum));
            }
        }
    const Tol tol = is_bf16 ? TOL_BF16 : Tol{1e-5, 1e-4, 1e-4};  // fp32: long sums, as versions 1-2
    Dev<T> dQ(to_t<T>(q)), dK(to_t<T>(k)), dV(to_t<T>(v)), dDout(to_t<T>(dout)), dOut((size_t)N * qd),
        dDq((size_t)N * qd), dDk((size_t)N * kvd), dDv((size_t)N * kvd);
    Dev<float> dLse((size_t)B * H * T_), dD((size_t)B * H * T_);
    cudaStream_t st = 0;
    auto fwd = [&] { gpu::attention_forward(dOut.p, dLse.p, (const T*)dQ.p, (const T*)dK.p, (const T*)dV.p, B, T_, H, Hkv, hd, st, tensor_cores); };
    auto bwd = [&] {
        gpu::attention_backward(dDq.p, dDk.p, dDv.p, dD.p, (const T*)dDout.p, (const T*)dOut.p, dLse.p, (const T*)dQ.p,
                                (const T*)dK.p, (const T*)dV.p, B, T_, H, Hkv, hd, st, tensor_cores);
    };
    dOut.poison();
    dLse.poison();
    fwd();
    S.check_close("forward out", host_f(dOut), out, tol);
    S.check_close("forward lse", dLse.host(), lse, TOL_FP32);
    dOut.upload(to_t<T>(out));  // backward from the reference forward
    dLse.upload(lse);
    dD.poison();
    dDq.poison();
    dDk.poison();
    dDv.poison();
    bwd();
    S.check_close("backward dq (written)", host_f(dDq), dq, tol);
    S.check_close("backward dk (written)", host_f(dDk), dk, tol);
    S.check_close("backward dv (written)", host_f(dDv), dv, tol);
    auto dq1 = host_f(dDq), dk1 = host_f(dDk);
    bwd();
    S.check_equal("dq bit-identical on rerun", host_f(dDq), dq1);
    S.check_equal("dk bit-identical on rerun", host_f(dDk), dk1);
    if (B == 4 && T_ == 1024) {
        double fl = 4.0 * B * H * ((double)T_ * (T_ + 1) / 2) * hd;
        double es = sizeof(T);
        S.bench("forward", fwd, es * (2 * N * qd + 2 * N * kvd) + 4.0 * B * H * T_, fl);
        S.bench("backward", bwd, es * (3 * N * qd + 4 * N * kvd + N * qd) + 4.0 * B * H * T_, 2.5 * fl);
    }
}

int main(int argc, char** argv) {
    Suite S("attention", argc, argv);
    struct Case { int B, T, H, Hkv, hd; };
    // every head dim the production kernels dispatch (8 16 32 64 96 128; 128 needs more than
    // 48 KB of shared memory: the opt-in path), T across several tiles and partial tiles.
    // Emulated: the T 1024 case at B 1 T 300 (5 query tiles, the last one partial), and the
    // B 4 T 1024 case (there to be timed) skipped.
    const Case cases[] = {{1, 5, 2, 1, 8},
                          {2, 37, 4, 2, 16},
                          {1, 70, 4, 2, 32},
                          {1, 70, 2, 1, 96},
                          {1, 100, 2, 2, 128},
                          {2, 128, 12, 12, 64},
                          EMULATED ? Case{1, 300, 12, 4, 64} : Case{2, 1024, 12, 4, 64},
                          {4, 1024, 12, 12, 64}};
    uint64_t seed = 21;
    for (auto c : cases) {
        if (EMULATED && c.B == 4 && c.T == 1024) continue;  // there to be timed
        int B = c.B, T = c.T, H = c.H, Hkv = c.Hkv, hd = c.hd, N = B * T, qd = H * hd, kvd = Hkv * hd;
        printf("== case B %d T %d H %d Hkv %d hd %d\n", B, T, H, Hkv, hd);
        auto q = rand_floats((size_t)N * qd, seed++), k = rand_floats((size_t)N * kvd, seed++);
        auto v = rand_floats((size_t)N * kvd, seed++), dout = rand_floats((size_t)N * qd, seed++);
        auto dq0 = rand_floats((size_t)N * qd, seed++), dk0 = rand_floats((size_t)N * kvd, seed++);
        auto dv0 = rand_floats((size_t)N * kvd, seed++);
        for (int ver = 3; ver <= NV; ver++) {  // the production versions compute their own references
            if (!S.want(ver)) continue;
            S.begin(ver, NAMES[ver]);
            if (ver == 3) check_production<float>(S, q, k, v, dout, B, T, H, Hkv, hd);
            else check_production<gpu::bf16>(S, q, k, v, dout, B, T, H, Hkv, hd, ver == 4);
        }
        if (!S.want(1) && !S.want(2)) continue;
        size_t na = (size_t)B * H * T * T;
        std::vector<float> out((size_t)N * qd), att(na, 0.0f), dq = dq0, dk = dk0, dv = dv0;
        attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, Hkv, hd);
        attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), att.data(), q.data(), k.data(), v.data(), B, T,
                           H, Hkv, hd);
        // only the causal part of att is defined: compare rows' j <= t
        auto causal = [&](const std::vector<float>& a) {
            std::vector<float> r;
            r.reserve(na / 2 + N);
            for (int bh = 0; bh < B * H; bh++)
                for (int t = 0; t < T; t++)
                    for (int j = 0; j <= t; j++) r.push_back(a[((size_t)bh * T + t) * T + j]);
            return r;
        };
        auto att_c = causal(att);
        for (int ver = 1; ver <= 2; ver++) {
            if (!S.want(ver)) continue;
            S.begin(ver, NAMES[ver]);
            Dev<float> dQ(q), dK(k), dV(v), dDout(dout), dOut((size_t)N * qd), dAtt(na), dS(na), dDq(dq0), dDk(dk0),
                dDv(dv0);
            int rows = B * H * T;
            auto fwd = [&] {
                if (ver == 1) attn_fwd_v1<<<ceil_div(rows, 128), 128>>>(dOut.p, dAtt.p, dQ.p, dK.p, dV.p, B, T, H, Hkv, hd);
                else attn_fwd_v2<<<ceil_div(rows, 8), 256>>>(dOut.p, dAtt.p, dQ.p, dK.p, dV.p, B, T, H, Hkv, hd);
                launchCheck();
            };
            auto bwd = [&] {
                if (ver == 1) {
                    attn_bwd_ds_v1<<<ceil_div(rows, 128), 128>>>(dS.p, dDout.p, dAtt.p, dV.p, B, T, H, Hkv, hd);
                    launchCheck();
                    attn_bwd_dq_v1<<<ceil_div((long)N * qd, 256), 256>>>(dDq.p, dS.p, dK.p, B, T, H, Hkv, hd);
                    launchCheck();
                    attn_bwd_dkdv_v1<<<ceil_div((long)N * kvd, 256), 256>>>(dDk.p, dDv.p, dS.p, dAtt.p, dQ.p, dDout.p, B,
                                                                          T, H, Hkv, hd);
                } else {
                    attn_bwd_ds_v2<<<ceil_div(rows, 8), 256>>>(dS.p, dDout.p, dAtt.p, dV.p, B, T, H, Hkv, hd);
                    launchCheck();
                    attn_bwd_dq_v2<<<ceil_div(rows, 8), 256>>>(dDq.p, dS.p, dK.p, B, T, H, Hkv, hd);
                    launchCheck();
                    attn_bwd_dkdv_v2<<<ceil_div(N * Hkv, 8), 256>>>(dDk.p, dDv.p, dS.p, dAtt.p, dQ.p, dDout.p, B, T, H,
                                                                   Hkv, hd);
                }
                launchCheck();
            };
            dOut.poison();
            dAtt.poison();
            fwd();
            S.check_close("forward out", dOut.host(), out, TOL_FP32);
            S.check_close("forward att (j <= t)", causal(dAtt.host()), att_c, TOL_FP32);
            dAtt.upload(att);  // backward from the reference probabilities (the masked part zero)
            // ds is written only for j <= t, and the dk/dv gather reads only j <= t: poison it
            // to prove that
            dS.poison();
            bwd();
            Tol tol = TOL_FP32;
            tol.atol = 1e-4;  // sums of up to T*group products of O(1) values
            S.check_close("backward dq (+=)", dDq.host(), dq, tol);
            S.check_close("backward dk (+=)", dDk.host(), dk, tol);
            S.check_close("backward dv (+=)", dDv.host(), dv, tol);
            if (B == 4 && T == 1024) {
                double fl = 4.0 * B * H * ((double)T * (T + 1) / 2) * hd;  // QK^T and PV over the causal half
                S.bench("forward", fwd, 4.0 * (2 * N * qd + 2 * N * kvd) + 4.0 * na / 2, fl);
                S.bench("backward", bwd, 4.0 * (3 * N * qd + 4 * N * kvd) + 4.0 * na, 2 * fl);
            }
        }
    }
    return S.finish();
}
