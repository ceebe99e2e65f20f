// dev/emu/mma_emu.h: host versions of the tensor-core instruction wrappers (kernels/mma.cuh).
//
// Each function here is what one lane's call of a kernels/mma.cuh wrapper does under the CUDA
// emulation (cuda_emu.h includes this file at its end). They implement the instructions from
// the fragment layouts the PTX ISA documents, NOT from how this project's kernels use them, so
// a kernel that indexes a fragment wrongly computes garbage here exactly as on a GPU:
//
//   mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
//     PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"
//     https://docs.nvidia.com/cuda/parallel-thread-execution/#warp-level-matrix-fragment-mma-16816-float
//   ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16
//     PTX ISA, "Warp-level matrix load instruction: ldmatrix"
//     https://docs.nvidia.com/cuda/parallel-thread-execution/#warp-level-matrix-instructions-ldmatrix
//   cp.async.cg.shared.global [dst], [src], 16; cp.async.commit_group; cp.async.wait_{all,group}
//     PTX ISA, "Data Movement and Conversion Instructions: cp.async" (and cp.async.wait_group)
//     https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-cp-async
//
// The warp-wide instructions (mma.sync, ldmatrix.sync) are rendezvous of all 32 lanes
// (emu::warp_rendezvous, full mask, every lane required): each lane contributes its registers
// (64 bits per rendezvous, so several rendezvous per instruction), then computes its own
// result registers from the gathered operands. A lane that is missing (exited, diverged into
// another warp operation, a block whose last warp has fewer than 32 threads) is reported.
//
// Numerics of mma: bf16 x bf16 products are exact in fp32 (8-bit significands); each D element
// is the fp32 sum of its 16 products in k order 0..15, then + C. The tensor cores add in an
// undocumented order and precision, so results agree with a GPU to fp32 rounding of a
// 16-term sum, not bit for bit.
//
// cp.async is emulated as a synchronous 16-byte copy at the call (commit/wait are no-ops):
// a kernel that reads the destination before cp.async.wait is NOT caught here.
//
// Call sites: the wrappers of kernels/mma.cuh take two defaulted parameters under CUDA_EMU,
// __builtin_FILE() and __builtin_LINE(), which the compiler evaluates at the caller, so every
// report names the kernel's line, not the wrapper's.
#pragma once
#include <string>

namespace emu {

// "file:line" with a stable address (a warp's pending operation keeps a pointer to its site)
inline const char* site_name(const char* file, int line) {
    static thread_local const char* last_file = nullptr;
    static thread_local int last_line = -1;
    static thread_local const char* last_name = nullptr;
    if (file == last_file && line == last_line) return last_name;
    static std::mutex m;
    static std::map<std::pair<std::string, int>, std::string> names;
    std::lock_guard<std::mutex> g(m);
    std::string& s = names[{std::string(file), line}];
    if (s.empty()) s = std::string(file) + ":" + std::to_string(line);
    last_file = file;
    last_line = line;
    last_name = s.c_str();
    return last_name;
}

inline float bf16_bits_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// All 32 lanes, every one required: the .sync.aligned warp instructions need the whole warp
inline const uint64_t* warp_all(uint64_t payload, const char* op, const char* site) {
    return warp_rendezvous(0xffffffffu, payload, false, op, site, true, nullptr, nullptr);
}
inline uint64_t pack2(uint32_t lo, uint32_t hi) { return (uint64_t)lo | ((uint64_t)hi << 32); }

// ---------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32  d, a, b, c:  D (16x8) = A (16x16) B (16x8) + C
// Documented fragments (groupID g = laneid >> 2, threadID_in_group t = laneid % 4; a .b32
// register holds two bf16, the lower-numbered element in the low 16 bits):
//   A: a0..a7 in 4 regs; row = g for a0,a1,a4,a5, g+8 for a2,a3,a6,a7;
//      col = 2t + (i & 1) for i < 4, 2t + (i & 1) + 8 for i >= 4
//      -> reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..], reg3 = A[g+8][2t+8..]
//   B: b0..b3 in 2 regs; row (k) = 2t + (i & 1) for i < 2, 2t + (i & 1) + 8 for i >= 2; col (n) = g
//      -> reg0 = B[2t..2t+1][g], reg1 = B[2t+8..2t+9][g]
//   C, D: c0..c3 (fp32); row = g for i < 2, g+8 for i >= 2; col = 2t + (i & 1)
inline void mma_m16n8k16_bf16(float* d, const uint32_t* a, const uint32_t* b, const float* c, const char* file,
                              int line) {
    require_device_code("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32");
    const char* site = site_name(file, line);
    const int lane = tl_fiber->lane;
    float A[16][16], B[16][8];
    // registers 0, 1 of A: rows g and g+8, columns 2t, 2t+1
    const uint64_t* r = warp_all(pack2(a[0], a[1]), "mma.sync.m16n8k16.bf16 (A regs 0-1)", site);
    for (int L = 0; L < 32; L++) {
        const int g = L >> 2, t = L & 3;
        const uint32_t r0 = (uint32_t)r[L], r1 = (uint32_t)(r[L] >> 32);
        A[g][2 * t] = bf16_bits_to_float(r0 & 0xffff);
        A[g][2 * t + 1] = bf16_bits_to_float(r0 >> 16);
        A[g + 8][2 * t] = bf16_bits_to_float(r1 & 0xffff);
        A[g + 8][2 * t + 1] = bf16_bits_to_float(r1 >> 16);
    }
    // registers 2, 3 of A: the same rows, columns 2t + 8, 2t + 9
    r = warp_all(pack2(a[2], a[3]), "mma.sync.m16n8k16.bf16 (A regs 2-3)", site);
    for (int L = 0; L < 32; L++) {
        const int g = L >> 2, t = L & 3;
        const uint32_t r2 = (uint32_t)r[L], r3 = (uint32_t)(r[L] >> 32);
        A[g][2 * t + 8] = bf16_bits_to_float(r2 & 0xffff);
        A[g][2 * t + 9] = bf16_bits_to_float(r2 >> 16);
        A[g + 8][2 * t + 8] = bf16_bits_to_float(r3 & 0xffff);
        A[g + 8][2 * t + 9] = bf16_bits_to_float(r3 >> 16);
    }
    // B: column g, rows 2t, 2t+1 (reg 0) and 2t+8, 2t+9 (reg 1)
    r = warp_all(pack2(b[0], b[1]), "mma.sync.m16n8k16.bf16 (B regs 0-1)", site);
    for (int L = 0; L < 32; L++) {
        const int g = L >> 2, t = L & 3;
        const uint32_t r0 = (uint32_t)r[L], r1 = (uint32_t)(r[L] >> 32);
        B[2 * t][g] = bf16_bits_to_float(r0 & 0xffff);
        B[2 * t + 1][g] = bf16_bits_to_float(r0 >> 16);
        B[2 * t + 8][g] = bf16_bits_to_float(r1 & 0xffff);
        B[2 * t + 9][g] = bf16_bits_to_float(r1 >> 16);
    }
    // this lane's D elements (C holds the same positions, so C needs no exchange)
    const int g = lane >> 2, t = lane & 3;
    float out[4];
    for (int i = 0; i < 4; i++) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        float s = 0.0f;
        for (int k = 0; k < 16; k++) s += A[row][k] * B[k][col];  // exact products, fp32 sum in k order
        out[i] = s + c[i];
    }
    for (int i = 0; i < 4; i++) d[i] = out[i];  // after reading c: d may alias c
}

// ---------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.x{num}{.trans}.shared.b16  r, [p]
// Documented: the 8 row addresses of matrix j (j < num) come from threads 8j .. 8j+7 (thread
// 8j + i gives the start of row i); each row is 8 b16 elements = 16 bytes, "naturally aligned"
// (16-byte aligned); the rows need not be contiguous. Register j of every lane holds a piece of
// matrix j: without .trans, "a group of four threads loads an entire row": lane l gets row
// l / 4, elements 2 (l % 4) (low half) and 2 (l % 4) + 1 (high half) — the same layout as
// the A fragment's rows above. .trans: "the matrix is loaded in column-major format", i.e.
// lane l gets the elements at (row 2 (l % 4), col l / 4) (low) and (row 2 (l % 4) + 1, col l / 4)
// (high) of the matrix as addressed. Addresses of lanes >= 8 num are not used (sm_80+).
inline void ldmatrix_b16(uint32_t* regs, int num, bool trans, const void* row_addr, const char* file, int line) {
    static const char* const names[2][5] = {
        {"", "ldmatrix.m8n8.x1.b16", "ldmatrix.m8n8.x2.b16", "", "ldmatrix.m8n8.x4.b16"},
        {"", "ldmatrix.m8n8.x1.trans.b16", "ldmatrix.m8n8.x2.trans.b16", "", "ldmatrix.m8n8.x4.trans.b16"}};
    const char* op = names[trans][num];
    require_device_code(op);
    const char* site = site_name(file, line);
    const int lane = tl_fiber->lane;
    if (lane < 8 * num) {  // this lane supplies row lane % 8 of matrix lane / 8: check it
        if ((uintptr_t)row_addr % 16 != 0)
            fail("%s at %s: lane %d gives row address %p, not 16-byte aligned (each row of an 8x8 b16 matrix is "
                 "16 bytes and must be naturally aligned)", op, site, lane, row_addr);
        if (in_device_memory(row_addr, 16))
            fail("%s at %s: lane %d gives row address %p, which is global memory (a cudaMalloc allocation); "
                 "ldmatrix reads shared memory", op, site, lane, row_addr);
    }
    const uint64_t* r = warp_all((uint64_t)(uintptr_t)row_addr, op, site);
    const uint16_t* rows[32];
    for (int L = 0; L < 8 * num; L++) rows[L] = (const uint16_t*)(uintptr_t)r[L];
    const int q = lane >> 2, p = lane & 3;
    for (int j = 0; j < num; j++) {
        const uint16_t* const* m = rows + 8 * j;  // the 8 rows of matrix j
        uint32_t lo, hi;
        if (!trans) {
            lo = m[q][2 * p];
            hi = m[q][2 * p + 1];
        } else {
            lo = m[2 * p][q];
            hi = m[2 * p + 1][q];
        }
        regs[j] = lo | (hi << 16);
    }
}

// ---------------------------------------------------------------------------------------
// cp.async.cg.shared.global [dst], [src], 16: dst in shared memory, src in global memory,
// both aligned to the 16-byte copy size (PTX "Addresses as Operands": naturally aligned).
// Emulated synchronously; per thread, no warp exchange (cp.async is not a warp collective).
inline void cp_async_16(void* dst, const void* src, const char* file, int line) {
    const char* op = "cp.async.cg.shared.global (16 bytes)";
    require_device_code(op);
    if ((uintptr_t)dst % 16 != 0 || (uintptr_t)src % 16 != 0)
        fail("%s at %s: dst %p / src %p not 16-byte aligned (both must be aligned to the copy size)", op,
             site_name(file, line), dst, src);
    if (!in_device_memory(src, 16))
        fail("%s at %s: source %p..+16 is not inside one device allocation (cp.async reads global memory)", op,
             site_name(file, line), src);
    if (in_device_memory(dst, 1))
        fail("%s at %s: destination %p is global memory (a cudaMalloc allocation); cp.async writes shared memory",
             op, site_name(file, line), dst);
    memcpy(dst, src, 16);
}
inline void cp_async_fence(const char* what) { require_device_code(what); }

}  // namespace emu
