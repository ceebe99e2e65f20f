/*
Tensor-core building blocks (kernels/mma.cuh): mma.sync m16n8k16 bf16 -> fp32, ldmatrix,
cp.async. Not a production kernel yet: the pattern the fast GEMM/attention kernels will use,
checked here against a plain loop, under the CUDA emulation (dev/emu/mma_emu.h implements the
instructions from the PTX ISA's documented fragment layouts) and on a GPU alike.

  out [M, N] = A [M, K] @ W [N, K]^T (+ C)     "NT": W in the [out, in] layout of kernels/matmul.cuh
  out [M, N] = A [M, K] @ B [K, N]             "NN": B row-major (the layout of matmul_backward_input's w)
CPU reference: a triple loop in double over the bf16-rounded inputs. The kernels multiply the
same bf16 values exactly and add in fp32; only the order and precision of the additions
differ, so the relative error is ~1e-7 (tolerance below).

  version 1: one warp per 16x8 output tile, fragments loaded straight from global memory by
             the documented layout (no ldmatrix), D = A W^T + C (C read as the accumulator).
             Self-check: the same kernel with a planted fragment bug (registers a[1] and a[2]
             swapped) must FAIL the comparison, recorded as a passing check.
  version 2: tiled NT GEMM: 4 warps per 32x32 block tile, 32-wide k tiles staged in shared
             memory by cp.async (double-buffered), A and W fragments read with ldmatrix_x4.
             Also checked: ldmatrix_x4 / _x4_trans registers against the documented layout, and
             version 2 == version 1 (C = 0) bit for bit (the same mma chain on the same
             fragments). Edges: M, N any, K % 8 == 0 (16-byte cp.async chunks; zero-filled).
  version 3: the same tiling for NN (B row-major [K, N]): B fragments with ldmatrix_x4_trans.
             N % 8 == 0, K % 8 == 0.

Build and run (from the repository root):
  make build/emu/dev_cuda/mma && ./build/emu/dev_cuda/mma        (CPU, CUDA emulation)
  nvcc -O3 -gencode arch=compute_90,code=sm_90 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fopenmp \
       dev/cuda/mma.cu -o build/mma -lcublas -lcublasLt -lgomp && ./build/mma [version]
Under CUDA_EMU only the small sizes run and nothing is timed.
*/
#include "common.h"
#include "../../kernels/mma.cuh"

typedef __nv_bfloat16 bf16;
using gpu::pack_bf16x2;

// fp32 sums of up to K exact bf16 products (|x| < 1): rounding ~1e-7 relative; the tensor
// cores' own (undocumented) addition may truncate, so leave an order of magnitude for it
constexpr Tol TOL_MMA = {1e-5, 1e-5, 1e-4};

// ----------------------------------------------------------------------------
// CPU reference: out[m][n] = sum_k A[m][k] B(k, n) (+ C[m][n]), in double.
// nt: B(k, n) = W[n][k] (W [N, K]); else B(k, n) = B[k][n] (B [K, N]).
static std::vector<float> ref_gemm(const std::vector<float>& A, const std::vector<float>& B, const float* C, int M,
                                   int N, int K, bool nt) {
    std::vector<float> out((size_t)M * N);
#pragma omp parallel for
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = C ? C[(size_t)m * N + n] : 0.0;
            for (int k = 0; k < K; k++)
                s += (double)A[(size_t)m * K + k] * (nt ? B[(size_t)n * K + k] : B[(size_t)k * N + n]);
            out[(size_t)m * N + n] = (float)s;
        }
    return out;
}

// Suite::check_close's criterion without recording a check (for the planted-bug self-check)
static bool close_enough(const std::vector<float>& out, const std::vector<float>& ref, Tol tol, double* rel_out) {
    double num = 0, den = 0, worst = 0;
    bool finite = true;
    for (size_t i = 0; i < out.size(); i++) {
        double o = out[i], r = ref[i];
        if (!std::isfinite(o)) { finite = false; continue; }
        num += (o - r) * (o - r);
        den += r * r;
        worst = std::max(worst, std::fabs(o - r) / (tol.atol + tol.rtol * std::fabs(r)));
    }
    *rel_out = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
    return finite && *rel_out <= tol.rel && worst <= 1.0;
}

// ----------------------------------------------------------------------------
// version 1: one warp = one 16x8 tile of out, fragments straight from global memory.
// M % 16 == 0, N % 8 == 0, K % 16 == 0. BUG = 1 plants a fragment bug (a[1] <-> a[2]).
template <int BUG>
__global__ void mma_tile_v1(float* out, const bf16* A, const bf16* W, const float* C, int M, int N, int K) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.y * 16, n0 = blockIdx.x * 8;
    // accumulator: c[0], c[1] = row g, cols 2t, 2t+1; c[2], c[3] = row g+8
    float acc[4] = {C[(size_t)(m0 + g) * N + n0 + 2 * t], C[(size_t)(m0 + g) * N + n0 + 2 * t + 1],
                    C[(size_t)(m0 + g + 8) * N + n0 + 2 * t], C[(size_t)(m0 + g + 8) * N + n0 + 2 * t + 1]};
    const bf16* a_lo = A + (size_t)(m0 + g) * K;      // row g of the tile
    const bf16* a_hi = A + (size_t)(m0 + g + 8) * K;  // row g + 8
    const bf16* w = W + (size_t)(n0 + g) * K;         // column g of B = row n0 + g of W
    for (int k0 = 0; k0 < K; k0 += 16) {
        const int k = k0 + 2 * t;
        uint32_t a[4], b[2];
        a[0] = pack_bf16x2(a_lo[k], a_lo[k + 1]);          // A[g][2t..2t+1]
        a[1] = pack_bf16x2(a_hi[k], a_hi[k + 1]);          // A[g+8][2t..2t+1]
        a[2] = pack_bf16x2(a_lo[k + 8], a_lo[k + 9]);      // A[g][2t+8..2t+9]
        a[3] = pack_bf16x2(a_hi[k + 8], a_hi[k + 9]);      // A[g+8][2t+8..2t+9]
        if (BUG == 1) { uint32_t x = a[1]; a[1] = a[2]; a[2] = x; }
        b[0] = pack_bf16x2(w[k], w[k + 1]);                // B[2t..2t+1][g]
        b[1] = pack_bf16x2(w[k + 8], w[k + 9]);            // B[2t+8..2t+9][g]
        gpu::mma_m16n8k16_bf16(acc, a, b, acc);
    }
    out[(size_t)(m0 + g) * N + n0 + 2 * t] = acc[0];
    out[(size_t)(m0 + g) * N + n0 + 2 * t + 1] = acc[1];
    out[(size_t)(m0 + g + 8) * N + n0 + 2 * t] = acc[2];
    out[(size_t)(m0 + g + 8) * N + n0 + 2 * t + 1] = acc[3];
}

// ----------------------------------------------------------------------------
// versions 2 and 3: 32x32 block tile, 4 warps (2 x 2), each warp 16x16 = two 16x8 mma tiles;
// k in tiles of 32 (two mma k-steps), double-buffered in shared memory, filled by cp.async in
// 16-byte chunks (one chunk per thread per operand and tile), zeros past the matrix edges.
constexpr int TB = 32;        // block tile: BM = BN = BK = 32
constexpr int LDS = TB + 8;   // padded shared row: 80 bytes (16-byte aligned; shifts banks by 4 words per row)
constexpr int THREADS = 128;

// one 32x32 bf16 tile (rows r0.., cols c0.. of a [rows, cols] row-major matrix) into dst
// (cols % 8 == 0: a 16-byte chunk is entirely inside or entirely outside the matrix)
__device__ __forceinline__ void load_tile_async(bf16 (*dst)[LDS], const bf16* src, int rows, int cols, int r0, int c0) {
    const int r = threadIdx.x / 4, c = (threadIdx.x % 4) * 8;
    if (r0 + r < rows && c0 + c < cols) gpu::cp_async_16(&dst[r][c], src + (size_t)(r0 + r) * cols + c0 + c);
    else
        for (int i = 0; i < 8; i++) dst[r][c + i] = __float2bfloat16(0.0f);  // past the edge (edge tiles only)
}

// NT (B_KN false): out = A [M, K] @ W [N, K]^T;  NN (B_KN true): out = A [M, K] @ B [K, N]
template <bool B_KN>
__global__ void __launch_bounds__(THREADS) mma_gemm_tiled(float* out, const bf16* A, const bf16* B, int M, int N, int K) {
    __shared__ __align__(16) bf16 As[2][TB][LDS];  // [buf][m][k]
    __shared__ __align__(16) bf16 Bs[2][TB][LDS];  // [buf][n][k] (NT) or [buf][k][n] (NN)
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int wm = (warp >> 1) * 16, wn = (warp & 1) * 16;  // the warp's 16x16 in the block tile
    const int m0 = blockIdx.y * TB, n0 = blockIdx.x * TB;
    const int mat = lane >> 3, row = lane & 7;  // ldmatrix: this lane addresses row `row` of matrix `mat`
    auto load = [&](int buf, int k0) {
        load_tile_async(As[buf], A, M, K, m0, k0);
        if (B_KN) load_tile_async(Bs[buf], B, K, N, k0, n0);
        else load_tile_async(Bs[buf], B, N, K, n0, k0);
        gpu::cp_async_commit();
    };
    float acc[2][4] = {};
    const int nk = (K + TB - 1) / TB;
    load(0, 0);
    gpu::cp_async_wait_all();
    __syncthreads();
    for (int kt = 0; kt < nk; kt++) {
        const int cur = kt & 1;
        if (kt + 1 < nk) load(cur ^ 1, (kt + 1) * TB);  // lands while this tile is multiplied
        for (int kk = 0; kk < TB; kk += 16) {
            uint32_t a[4], b[4];
            // A 16x16: matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15) = a[0..3]
            gpu::ldmatrix_x4(a, &As[cur][wm + (mat & 1) * 8 + row][kk + (mat >> 1) * 8]);
            if (!B_KN) {
                // W rows are B's columns: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
                // (n 8-15, k 8-15) = b[0], b[1] of n-tile 0, then of n-tile 1
                gpu::ldmatrix_x4(b, &Bs[cur][wn + (mat >> 1) * 8 + row][kk + (mat & 1) * 8]);
            } else {
                // B rows are k: the same four blocks, transposed on the way
                gpu::ldmatrix_x4_trans(b, &Bs[cur][kk + (mat & 1) * 8 + row][wn + (mat >> 1) * 8]);
            }
            gpu::mma_m16n8k16_bf16(acc[0], a, &b[0], acc[0]);
            gpu::mma_m16n8k16_bf16(acc[1], a, &b[2], acc[1]);
        }
        gpu::cp_async_wait_all();  // the next tile has landed (this thread's copies) ...
        __syncthreads();           // ... everyone's, and nobody still reads the buffer it replaces next
    }
    const int g = lane >> 2, t = lane & 3;
    for (int j = 0; j < 2; j++)
        for (int i = 0; i < 4; i++) {
            const int m = m0 + wm + g + (i >= 2 ? 8 : 0), n = n0 + wn + j * 8 + 2 * t + (i & 1);
            if (m < M && n < N) out[(size_t)m * N + n] = acc[j][i];
        }
}

// ldmatrix alone: one warp loads a 16x16 tile (row stride 24) as four 8x8 matrices, in the
// A-fragment order, and writes its registers: regs[lane * 4 + j]
template <bool TRANS>
__global__ void ldmatrix_probe(uint32_t* regs, const bf16* src) {
    __shared__ __align__(16) bf16 S[16][24];
    const int lane = threadIdx.x;
    for (int i = lane; i < 256; i += 32) S[i / 16][i % 16] = src[i];
    __syncthreads();
    uint32_t r[4];
    const int mat = lane >> 3, row = lane & 7;
    const void* p = &S[(mat & 1) * 8 + row][(mat >> 1) * 8];
    if (TRANS) gpu::ldmatrix_x4_trans(r, p);
    else gpu::ldmatrix_x4(r, p);
    for (int j = 0; j < 4; j++) regs[lane * 4 + j] = r[j];
}

// ----------------------------------------------------------------------------

struct Case {
    int M, N, K;
};

static void launch_v1(int bug, float* out, const bf16* A, const bf16* W, const float* C, int M, int N, int K) {
    dim3 grid(N / 8, M / 16);
    if (bug) mma_tile_v1<1><<<grid, 32>>>(out, A, W, C, M, N, K);
    else mma_tile_v1<0><<<grid, 32>>>(out, A, W, C, M, N, K);
    launchCheck();
}
static void launch_tiled(bool b_kn, float* out, const bf16* A, const bf16* B, int M, int N, int K) {
    dim3 grid(ceil_div(N, TB), ceil_div(M, TB));
    if (b_kn) mma_gemm_tiled<true><<<grid, THREADS>>>(out, A, B, M, N, K);
    else mma_gemm_tiled<false><<<grid, THREADS>>>(out, A, B, M, N, K);
    launchCheck();
}

// the documented ldmatrix result for the probe: matrix j = rows (j & 1) * 8.., cols (j >> 1) * 8..
static void check_ldmatrix(Suite& S) {
    std::vector<float> v(256);
    for (int i = 0; i < 256; i++) v[i] = (float)i;  // distinct, exact in bf16
    std::vector<bf16> vb = to_bf16(v);
    auto bits = [&](int r, int c) { return (uint32_t)__bfloat16_as_ushort(vb[r * 16 + c]); };
    Dev<bf16> dS(vb);
    Dev<uint32_t> dR(128);
    for (int trans = 0; trans < 2; trans++) {
        std::vector<uint32_t> expect(128);
        for (int l = 0; l < 32; l++)
            for (int j = 0; j < 4; j++) {
                const int R0 = (j & 1) * 8, C0 = (j >> 1) * 8, q = l / 4, p = l % 4;
                uint32_t lo = trans ? bits(R0 + 2 * p, C0 + q) : bits(R0 + q, C0 + 2 * p);
                uint32_t hi = trans ? bits(R0 + 2 * p + 1, C0 + q) : bits(R0 + q, C0 + 2 * p + 1);
                expect[l * 4 + j] = lo | (hi << 16);
            }
        dR.poison();
        if (trans) ldmatrix_probe<true><<<1, 32>>>(dR.p, dS.p);
        else ldmatrix_probe<false><<<1, 32>>>(dR.p, dS.p);
        launchCheck();
        S.check_equal(trans ? "ldmatrix_x4_trans registers" : "ldmatrix_x4 registers", dR.host(), expect);
    }
}

int main(int argc, char** argv) {
    Suite S("mma", argc, argv);
#ifdef CUDA_EMU
    const std::vector<Case> cases = {{16, 8, 16}, {64, 64, 64}, {128, 96, 256}, {33, 24, 40}};
#else
    const std::vector<Case> cases = {{16, 8, 16}, {64, 64, 64}, {128, 96, 256}, {33, 24, 40}, {1024, 768, 768},
                                     {4096, 3072, 768}};
#endif
    const char* NAMES[] = {"", "warp per 16x8 tile, direct fragments", "tiled NT: cp.async + ldmatrix_x4",
                           "tiled NN: B via ldmatrix_x4_trans"};
    for (int v = 1; v <= 3; v++) {
        if (!S.want(v)) continue;
        S.begin(v, NAMES[v]);
        if (v == 2) check_ldmatrix(S);
        uint64_t seed = 1000 * v;
        for (const Case& c : cases) {
            const int M = c.M, N = c.N, K = c.K;
            if (v == 1 && (M % 16 || N % 8 || K % 16)) continue;
            printf("  M %d N %d K %d\n", M, N, K);
            auto A = round_bf16(rand_floats((size_t)M * K, seed++));
            auto B = round_bf16(rand_floats((size_t)N * K, seed++));  // W [N, K] (v1, v2) or B [K, N] (v3)
            Dev<bf16> dA(to_bf16(A)), dB(to_bf16(B));
            Dev<float> dOut((size_t)M * N);
            const double flops = 2.0 * M * N * K;
            if (v == 1) {
                auto C = rand_floats((size_t)M * N, seed++);
                Dev<float> dC(C);
                auto ref = ref_gemm(A, B, C.data(), M, N, K, true);
                dOut.poison();
                launch_v1(0, dOut.p, dA.p, dB.p, dC.p, M, N, K);
                S.check_close("out = A W^T + C", dOut.host(), ref, TOL_MMA);
                if (M == 64 && N == 64 && K == 64) {  // the check must be able to fail
                    dOut.poison();
                    launch_v1(1, dOut.p, dA.p, dB.p, dC.p, M, N, K);
                    double rel = 0;
                    bool ok = close_enough(dOut.host(), ref, TOL_MMA, &rel);
                    char detail[96];
                    snprintf(detail, sizeof detail, "(planted bug gives rel %.2e: %s)", rel,
                             ok ? "NOT caught" : "caught");
                    S.check_true("planted a[1]<->a[2] swap fails", !ok, detail);
                }
            } else {
                auto ref = ref_gemm(A, B, nullptr, M, N, K, v == 2);
                auto run = [&] { launch_tiled(v == 3, dOut.p, dA.p, dB.p, M, N, K); };
                dOut.poison();
                run();
                auto out = dOut.host();
                S.check_close(v == 2 ? "out = A W^T" : "out = A B", out, ref, TOL_MMA);
                if (v == 2 && M % 16 == 0 && N % 8 == 0 && K % 32 == 0) {
                    // the same mma chain on the same fragments as version 1 with C = 0: same bits
                    Dev<float> dZero(std::vector<float>((size_t)M * N, 0.0f)), dOut1((size_t)M * N);
                    dOut1.poison();
                    launch_v1(0, dOut1.p, dA.p, dB.p, dZero.p, M, N, K);
                    S.check_equal("== version 1 (C = 0), bits", out, dOut1.host());
                }
#ifndef CUDA_EMU
                if (M == 4096) S.bench(v == 2 ? "NT 4096x3072x768" : "NN 4096x3072x768", run,
                                       2.0 * (M * K + N * K) + 4.0 * M * N, flops);
#endif
            }
            (void)flops;
        }
    }
    return S.finish();
}
