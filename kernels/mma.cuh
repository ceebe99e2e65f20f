// kernels/mma.cuh: the tensor-core and async-copy instructions the project writes as inline
// PTX, each behind a small wrapper, so that every kernel using them runs (and is checked) under
// the CUDA emulation too: there, each wrapper calls its host version in dev/emu/mma_emu.h,
// which implements the instruction from the fragment layout the PTX ISA documents.
//
// Rule for new inline PTX: add a wrapper here with its layout comment, and its host version
// in dev/emu/mma_emu.h (from the PTX ISA text, never from how our kernel uses it), and a check
// in dev/cuda/mma.cu. Test bench: dev/cuda/mma.cu (CPU reference, planted-bug self-check).
//
// Fragment vocabulary (PTX ISA): laneid 0..31; groupID g = laneid >> 2 (0..7);
// threadID_in_group t = laneid % 4 (0..3). A .b32 register holding two bf16 keeps the
// lower-numbered element in its low 16 bits (pack_bf16x2(lo, hi)).
// Section numbers below are those of PTX ISA 9.0/9.1 (they shift between versions; the
// docs.nvidia.com anchors given with them are stable).
#pragma once
#include "common.cuh"

// Under the emulation, each wrapper takes the caller's file and line (evaluated at the call
// site by the compiler), so that the emulator's reports name the kernel's line.
#ifdef CUDA_EMU
#define GPU_MMA_SITE , const char *emu_file = __builtin_FILE(), int emu_line = __builtin_LINE()
#else
#define GPU_MMA_SITE
#endif

namespace gpu {

// two bf16 in one .b32 register: lo in bits 0-15, hi in bits 16-31
__device__ __forceinline__ uint32_t pack_bf16x2(bf16 lo, bf16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

// ----------------------------------------------------------------------------
// D = A B + C, warp-wide (all 32 lanes, converged):
//   mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
// A 16x16 bf16 ("row": A[m][k]), B 16x8 bf16 ("col": B[k][n], i.e. the element pairs of a
// register run along k; B[k][n] = W[n][k] for a weight W [N, K] in the [out, in] layout),
// C, D 16x8 fp32. d may be the same array as c.
// Layout: PTX ISA 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type"
// (https://docs.nvidia.com/cuda/parallel-thread-execution/#warp-level-matrix-fragment-mma-16816-float):
//   a[0] = A[g][2t],      A[g][2t+1]         a[1] = A[g+8][2t],    A[g+8][2t+1]
//   a[2] = A[g][2t+8],    A[g][2t+9]         a[3] = A[g+8][2t+8],  A[g+8][2t+9]
//   b[0] = B[2t][g],      B[2t+1][g]         b[1] = B[2t+8][g],    B[2t+9][g]
//   c[0], c[1] = C[g][2t], C[g][2t+1]        c[2], c[3] = C[g+8][2t], C[g+8][2t+1]   (D alike)
// So lane (g, t) holds rows g and g+8 of A and of D, and column g of B. With A split into four
// 8x8 blocks, a[0..3] are blocks (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
// (rows 8-15, k 8-15), each in ldmatrix's layout: ldmatrix_x4 fills A directly (see below).
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4] GPU_MMA_SITE) {
#ifdef CUDA_EMU
    emu::mma_m16n8k16_bf16(d, a, b, c, emu_file, emu_line);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

// ----------------------------------------------------------------------------
// Load 8x8 b16 matrices from shared memory, warp-wide (all 32 lanes, converged):
//   ldmatrix.sync.aligned.m8n8.x{2,4}{,.trans}.shared.b16
// Layout: PTX ISA 9.7.14.5.15 "Warp-level matrix load instruction: ldmatrix"
// (https://docs.nvidia.com/cuda/parallel-thread-execution/#warp-level-matrix-instructions-ldmatrix):
//   addresses: lane 8j + i passes the shared-memory address of row i of matrix j (j < x2/x4);
//     a row is 8 consecutive b16 (16 bytes, 16-byte aligned); rows may lie anywhere (padding,
//     swizzles). Lanes 8 num .. 31 pass anything (ignored on sm_80+; pass a valid one anyway).
//   result, without .trans: r[j] of lane l = matrix j's row l/4, elements 2(l%4) (low half),
//     2(l%4)+1 (high half): four lanes hold one row; the mma A/C fragment layout per 8x8 block.
//   with .trans: r[j] of lane l = matrix j's elements (row 2(l%4), col l/4) (low) and
//     (row 2(l%4)+1, col l/4) (high): the transpose, e.g. the B fragment from a row-major
//     B[K, N] tile (rows = k): b[0] = x4_trans block (k 0-7, n 0-7), b[1] = block (k 8-15, n 0-7).
// Typical A fragment (16x16 at As[r0][k0], row-major, row stride ld elements):
//   ldmatrix_x4(a, &As[(r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + k0 + (lane >> 4) * 8])
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem_row GPU_MMA_SITE) {
#ifdef CUDA_EMU
    emu::ldmatrix_b16(r, 4, false, smem_row, emu_file, emu_line);
#else
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
#endif
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* smem_row GPU_MMA_SITE) {
#ifdef CUDA_EMU
    emu::ldmatrix_b16(r, 2, false, smem_row, emu_file, emu_line);
#else
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row GPU_MMA_SITE) {
#ifdef CUDA_EMU
    emu::ldmatrix_b16(r, 4, true, smem_row, emu_file, emu_line);
#else
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
#endif
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* smem_row GPU_MMA_SITE) {
#ifdef CUDA_EMU
    emu::ldmatrix_b16(r, 2, true, smem_row, emu_file, emu_line);
#else
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(s));
#endif
}

// ----------------------------------------------------------------------------
// Asynchronous 16-byte copy global -> shared, per thread (not a warp collective):
//   cp.async.cg.shared.global [smem], [gmem], 16;   (.cg: cached in L2 only)
// PTX ISA 9.7.9.25.3.1 "cp.async"
// (https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-cp-async):
// both addresses 16-byte aligned. The data may land any time until the thread waits:
// cp_async_commit() closes a group of this thread's copies; cp_async_wait_all() waits for all
// of them (cp_async_wait_group<N>() for all but the newest N groups). Other threads see the
// data only after a __syncthreads() that follows the wait. The emulation copies at the call,
// so it cannot catch a read before the wait.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem GPU_MMA_SITE) {
#ifdef CUDA_EMU
    emu::cp_async_16(smem, gmem, emu_file, emu_line);
#else
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(__cvta_generic_to_global(gmem))
                 : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef CUDA_EMU
    emu::cp_async_fence("cp.async.commit_group");
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#ifdef CUDA_EMU
    emu::cp_async_fence("cp.async.wait_all");
#else
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
#ifdef CUDA_EMU
    emu::cp_async_fence("cp.async.wait_group");
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace gpu
