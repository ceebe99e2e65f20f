// dev/emu/cuda_emu.h: run the project's CUDA C++ on the CPU, for tests (docs/emulation.md).
//
// Build (the Makefile's emu targets do this): dev/emu/cu2cpp.py rewrites the two pieces of
// CUDA syntax that g++ cannot parse (`k<<<g, b, smem, s>>>(args)` launches and
// `extern __shared__ T x[];`) into a mirror tree, then
//     g++ -std=c++17 -fopenmp -x c++ -include dev/emu/cuda_emu.h -I$CUDA_HOME/include FILE.cu
//
// The model:
//   - every CUDA thread of a block is a fiber (its own stack; a hand-written x86-64 context
//     switch of a few instructions, ~40x faster than glibc's swapcontext). One OS thread runs
//     one block at a time; its fibers run one after another and switch only at sync points:
//     __syncthreads (block barrier) and the warp collectives (__syncwarp, __shfl*_sync,
//     __ballot/any/all_sync), which are rendezvous among the lanes of their mask.
//   - blocks run in parallel on OpenMP threads (so atomics are real atomics).
//   - __shared__ is per-OS-thread storage, poisoned (0xFF bytes) when a block first declares
//     it; dynamic shared memory likewise; fresh cudaMalloc memory is poisoned too, so a read
//     of anything never written shows up as NaN (or -1 for integers).
//   - types (dim3, cudaError_t, __nv_bfloat16 and its rounding) come from the REAL toolkit
//     headers; this file defines the runtime and cuBLAS entry points the project calls
//     (cublas_emu.h) and the host versions of the tensor-core wrappers (mma_emu.h).
//
// What it reports, with file:line, where a GPU would silently compute garbage or hang:
// a barrier reached by only part of a block (deadlock), threads of one block meeting in
// different __syncthreads (divergent barrier), warp operations whose masks or kinds disagree,
// a mask naming lanes that have exited, a shuffle reading an exited lane (NaN bits), launch
// configurations out of range, shared memory over the (per-kernel opt-in) limit, device
// copies outside any allocation. EMU_SCHED=reverse runs lanes, warps and blocks in the
// opposite order (races that one order hides may show in the other).
//
// What it cannot see: timing, the memory model (lanes run one at a time, so some races never
// happen here), real cuBLAS numerics (its GEMMs sum in a fixed order), registers and
// occupancy, cooperative groups, cross-stream races (every stream is one in-order queue and
// every call completes before it returns; work on a stream being captured into a CUDA graph
// runs when the graph is launched: "Stream capture" below).
#pragma once
#define CUDA_EMU 1
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <sys/mman.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#include <sanitizer/common_interface_defs.h>
#include <sanitizer/lsan_interface.h>
#endif
#if !defined(__x86_64__)
#error "cuda_emu.h: the fiber context switch is written for x86-64"
#endif

// ---------------------------------------------------------------------------------------
// CUDA keywords as plain C++ (after the real headers, which define them for their own use)
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __managed__
#undef __launch_bounds__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline
// __noinline__: left as the toolkit defines it (libstdc++ uses __attribute__((__noinline__)))
#define __launch_bounds__(...)
// per-block storage: one OS thread runs one block at a time and all its fibers share it
// (cu2cpp.py adds an emu::static_smem() call after each declaration: poison + accounting)
#define __shared__ static thread_local

#define EMU_STR2(x) #x
#define EMU_STR(x) EMU_STR2(x)
#define EMU_SITE __FILE__ ":" EMU_STR(__LINE__)

namespace emu {

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// ---------------------------------------------------------------------------------------
// Context switch (x86-64 System V): push the callee-saved registers on the old stack, save
// rsp, load the new rsp, pop. A new fiber's stack is laid out so that the first switch to it
// "returns" into emu_fiber_trampoline with its entry point in r13 and argument in r12.
extern "C" void emu_ctx_switch(void** save_sp, void* new_sp);
extern "C" void emu_fiber_trampoline();
asm(R"(
    .text
    .weak emu_ctx_switch
    .type emu_ctx_switch,@function
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_switch, .-emu_ctx_switch
    .weak emu_fiber_trampoline
    .type emu_fiber_trampoline,@function
emu_fiber_trampoline:
    movq %r12, %rdi
    call *%r13
    ud2
    .size emu_fiber_trampoline, .-emu_fiber_trampoline
)");

// ---------------------------------------------------------------------------------------
// Threads, warps, blocks

struct Fiber {
    void* sp = nullptr;
    uint3 tid{0, 0, 0};
    int lin = 0, lane = 0, warp = 0;
    enum State : uint8_t { READY, WAIT_WARP, WAIT_BLOCK, DONE } st = READY;
    bool bar_pred = false;      // predicate of __syncthreads_count/and/or
    const char* site = nullptr; // where it waits (file:line)
};
// One warp's collective in progress: the lanes of `expect` must all arrive (lanes that exit
// meanwhile are dropped, unless the op requires them: __syncwarp). Double-buffered by
// generation parity: a lane cannot get two ops ahead, because the next op cannot complete
// before every lane of this one has resumed and read its result.
struct WarpState {
    unsigned arrived = 0, expect = 0, live = 0, mask = 0;
    unsigned gen = 0;
    const char* op = nullptr;
    const char* site = nullptr;
    bool all_required = false;
    unsigned expect_g[2] = {0, 0}, pred[2] = {0, 0};
    uint64_t buf[2][32];
};
struct Block {
    uint3 bidx{0, 0, 0};
    dim3 bdim, gdim;
    int n = 0, nwarps = 0, done = 0, bar_waiting = 0;
    unsigned bar_gen = 0;
    int bar_result[2] = {0, 0};  // __syncthreads_count of the last two barriers
    std::vector<Fiber> fib;
    std::vector<WarpState> warps;
    std::vector<char*> stacks;
    size_t stack_bytes = 0;
    void* sched_sp = nullptr;
    void (*body)(void*) = nullptr;
    void* body_ctx = nullptr;
    std::vector<char> dyn_smem;
    size_t dyn_bytes = 0, smem_limit = 0, static_bytes = 0;
    std::vector<const void*> static_seen;  // __shared__ variables declared in this block so far
    const char* kernel = "";               // the launch site, for messages
#ifdef EMU_ASAN
    const void* sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
#endif
};
inline thread_local Block* tl_block = nullptr;
inline thread_local Fiber* tl_fiber = nullptr;

inline int env_int(const char* name, int dflt) {
    const char* v = getenv(name);
    return v && *v ? atoi(v) : dflt;
}
inline bool sched_reverse() {
    static const bool r = [] {
        const char* v = getenv("EMU_SCHED");
        if (v && *v && strcmp(v, "reverse") && strcmp(v, "forward")) {
            fprintf(stderr, "[cuda-emu] EMU_SCHED must be forward or reverse, found \"%s\"\n", v);
            exit(2);
        }
        return v && !strcmp(v, "reverse");
    }();
    return r;
}

inline void fail(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "[cuda-emu] ERROR ");
    if (tl_block && tl_fiber)
        fprintf(stderr, "in kernel launched at %s, block (%u,%u,%u) thread (%u,%u,%u): ", tl_block->kernel,
                tl_block->bidx.x, tl_block->bidx.y, tl_block->bidx.z, tl_fiber->tid.x, tl_fiber->tid.y,
                tl_fiber->tid.z);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    fflush(stderr);
    abort();
}
inline void require_device_code(const char* what) {
    if (!tl_block || !tl_fiber) fail("%s called outside a kernel", what);
}

// ---- switching between the block's scheduler and its fibers (ASan is told about it) ----
inline void switch_to_fiber(Block* b, Fiber* f) {
    tl_fiber = f;
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, b->stacks[f->lin], b->stack_bytes);
    emu_ctx_switch(&b->sched_sp, f->sp);
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#else
    emu_ctx_switch(&b->sched_sp, f->sp);
#endif
}
inline void switch_to_scheduler(Block* b, Fiber* f, bool exiting = false) {
#ifdef EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(exiting ? nullptr : &fake, b->sched_stack_bottom, b->sched_stack_size);
    emu_ctx_switch(&f->sp, b->sched_sp);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    (void)exiting;
    emu_ctx_switch(&f->sp, b->sched_sp);
#endif
}
inline void yield_to_scheduler() { switch_to_scheduler(tl_block, tl_fiber); }

inline void wake_warp(Block* b, int w) {
    int base = w * 32;
    for (int l = 0; l < 32 && base + l < b->n; l++)
        if (b->fib[base + l].st == Fiber::WAIT_WARP) b->fib[base + l].st = Fiber::READY;
}
inline void complete_warp_op(Block* b, WarpState& W, int w) {
    W.gen++;
    W.arrived = 0;
    W.op = nullptr;
    W.site = nullptr;
    W.pred[W.gen & 1] = 0;
    wake_warp(b, w);
}

// A fiber finished the kernel
inline void on_exit(Block* b, Fiber* f) {
    f->st = Fiber::DONE;
    b->done++;
    WarpState& W = b->warps[f->warp];
    unsigned me = 1u << f->lane;
    W.live &= ~me;
    if (W.arrived && (W.expect & me)) {
        if (W.all_required)
            fail("lane %d exited while lanes 0x%08x wait for it in %s (%s) with mask 0x%08x", f->lane, W.arrived, W.op,
                 W.site, W.mask);
        W.expect &= ~me;
        W.expect_g[W.gen & 1] = W.expect;
        if ((W.arrived & W.expect) == W.expect) complete_warp_op(b, W, f->warp);
    }
}

extern "C" inline void emu_fiber_main(Fiber* f) {
    Block* b = tl_block;
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &b->sched_stack_bottom, &b->sched_stack_size);
#endif
    b->body(b->body_ctx);
    on_exit(b, f);
    switch_to_scheduler(b, f, /*exiting=*/true);
    fail("a finished CUDA thread was resumed");
}

// ---------------------------------------------------------------------------------------
// Warp rendezvous: every lane of `mask` (that has not exited) arrives with a payload; the
// last one to arrive completes the op and wakes the others. Returns the payloads of all lanes.
inline const uint64_t* warp_rendezvous(unsigned mask, uint64_t payload, bool pred, const char* op, const char* site,
                                       bool all_required, unsigned* pred_bits, unsigned* expect_out) {
    require_device_code(op);
    Block* b = tl_block;
    Fiber* f = tl_fiber;
    WarpState& W = b->warps[f->warp];
    const unsigned me = 1u << f->lane;
    if (!(mask & me)) fail("%s at %s: the calling lane %d is not in its mask 0x%08x", op, site, f->lane, mask);
    if (W.arrived == 0) {
        W.mask = mask;
        W.op = op;
        W.site = site;
        W.all_required = all_required;
        const int lanes = std::min(32, b->n - f->warp * 32);
        const unsigned exists = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
        if (mask & ~exists)
            fail("%s at %s: mask 0x%08x names lanes that do not exist (the warp has %d threads)", op, site, mask, lanes);
        if (all_required && (mask & ~W.live))
            fail("%s at %s: mask 0x%08x names lanes that have exited (live 0x%08x)", op, site, mask, W.live);
        W.expect = mask & W.live;
        W.expect_g[W.gen & 1] = W.expect;
    } else if (W.mask != mask || W.op != op) {
        fail("%s at %s with mask 0x%08x while lanes 0x%08x of this warp wait in %s at %s with mask 0x%08x "
             "(divergent warp operations)",
             op, site, mask, W.arrived, W.op, W.site, W.mask);
    }
    const unsigned g = W.gen & 1;
    W.buf[g][f->lane] = payload;
    if (pred) W.pred[g] |= me;
    W.arrived |= me;
    if ((W.arrived & W.expect) == W.expect) {
        complete_warp_op(b, W, f->warp);
    } else {
        f->st = Fiber::WAIT_WARP;
        f->site = site;
        yield_to_scheduler();
    }
    if (pred_bits) *pred_bits = W.pred[g];
    if (expect_out) *expect_out = W.expect_g[g];
    return W.buf[g];
}

// Block barrier: the scheduler releases it once every thread that has not exited waits in
// one (the same) __syncthreads.
inline int syncthreads_at(const char* site, bool pred = false) {
    require_device_code("__syncthreads");
    Block* b = tl_block;
    Fiber* f = tl_fiber;
    WarpState& W = b->warps[f->warp];
    if (W.arrived)
        fail("__syncthreads at %s while lanes 0x%08x of this warp wait in %s at %s", site, W.arrived, W.op, W.site);
    f->site = site;
    f->bar_pred = pred;
    b->bar_waiting++;
    f->st = Fiber::WAIT_BLOCK;
    const unsigned g = b->bar_gen & 1;
    yield_to_scheduler();
    return b->bar_result[g];
}

// ---------------------------------------------------------------------------------------
// Fiber stacks (mmap, guard page below) and the per-OS-thread block runner
inline char* alloc_stack(size_t bytes) {
    const size_t page = 4096;
    char* p = (char*)mmap(nullptr, bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                          -1, 0);
    if (p == MAP_FAILED) fail("mmap of a %zu-byte fiber stack failed", bytes);
    mprotect(p, page, PROT_NONE);  // an overflow faults instead of corrupting a neighbour
    return p + page;
}
inline void* init_stack(char* stack, size_t bytes, Fiber* f) {
    // stagger the tops: stacks are page-aligned and equal-sized, so without this every
    // fiber's top frame falls in the same L1 sets (4K aliasing) and each switch misses
    uintptr_t top = ((uintptr_t)(stack + bytes - (size_t)(f->lin % 61) * 64)) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)(top - 72);  // sp % 16 == 8: after 6 pops + ret, rsp is 16-aligned
    sp[0] = 0;                                 // r15
    sp[1] = 0;                                 // r14
    sp[2] = (uint64_t)(void*)&emu_fiber_main;  // r13: entry
    sp[3] = (uint64_t)f;                       // r12: its argument
    sp[4] = 0;                                 // rbx
    sp[5] = 0;                                 // rbp
    sp[6] = (uint64_t)(void*)&emu_fiber_trampoline;
    return sp;
}

inline Block& this_runner() {
    static thread_local Block b;
    return b;
}

[[noreturn]] inline void deadlock(Block* b) {
    fprintf(stderr, "[cuda-emu] ERROR DEADLOCK in kernel launched at %s, block (%u,%u,%u) of %d threads:\n", b->kernel,
            b->bidx.x, b->bidx.y, b->bidx.z, b->n);
    int shown = 0;
    for (auto& f : b->fib) {
        if (f.st == Fiber::DONE) continue;
        if (shown++ < 16)
            fprintf(stderr, "  thread %d (warp %d lane %d) waits in %s at %s\n", f.lin, f.warp, f.lane,
                    f.st == Fiber::WAIT_BLOCK ? "__syncthreads"
                    : f.st == Fiber::WAIT_WARP ? b->warps[f.warp].op : "?",
                    f.site ? f.site : "?");
    }
    fprintf(stderr, "  %d threads have exited, %d wait in __syncthreads: a barrier or warp operation that some "
            "threads never reach\n", b->done, b->bar_waiting);
    fflush(stderr);
    abort();
}

inline void run_block(Block& b, uint3 bidx) {
    b.bidx = bidx;
    b.done = 0;
    b.bar_waiting = 0;
    b.bar_gen = 0;
    b.static_bytes = 0;
    b.static_seen.clear();
    memset(b.dyn_smem.data(), 0xFF, b.dyn_smem.size());  // garbage, as on a GPU
    for (int i = 0; i < b.n; i++) {
        Fiber& f = b.fib[i];
        f.lin = i;
        f.tid = uint3{(unsigned)(i % b.bdim.x), (unsigned)((i / b.bdim.x) % b.bdim.y),
                      (unsigned)(i / (b.bdim.x * b.bdim.y))};
        f.lane = i % 32;
        f.warp = i / 32;
        f.st = Fiber::READY;
        f.site = nullptr;
        f.sp = init_stack(b.stacks[i], b.stack_bytes, &f);
    }
    for (int w = 0; w < b.nwarps; w++) {
        WarpState& W = b.warps[w];
        int lanes = std::min(32, b.n - w * 32);
        W = WarpState();
        W.live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    }
    const bool rev = sched_reverse();
    while (b.done < b.n) {
        // run every ready fiber until it blocks, warp by warp
        for (int wi = 0; wi < b.nwarps; wi++) {
            int w = rev ? b.nwarps - 1 - wi : wi;
            int lanes = std::min(32, b.n - w * 32);
            bool any;
            do {
                any = false;
                for (int li = 0; li < lanes; li++) {
                    Fiber& f = b.fib[w * 32 + (rev ? lanes - 1 - li : li)];
                    if (f.st != Fiber::READY) continue;
                    switch_to_fiber(&b, &f);
                    any = true;
                }
            } while (any);
        }
        tl_fiber = nullptr;
        if (b.done == b.n) break;
        if (b.bar_waiting > 0 && b.bar_waiting + b.done == b.n) {  // exited threads count as arrived
            const char* site = nullptr;
            int count = 0;
            for (auto& f : b.fib) {
                if (f.st != Fiber::WAIT_BLOCK) continue;
                if (!site) site = f.site;
                else if (site != f.site && strcmp(site, f.site)) {
                    fprintf(stderr, "[cuda-emu] ERROR in kernel launched at %s, block (%u,%u,%u): its threads meet in "
                            "different __syncthreads, at %s and at %s (thread %d): a barrier in divergent code\n",
                            b.kernel, b.bidx.x, b.bidx.y, b.bidx.z, site, f.site, f.lin);
                    fflush(stderr);
                    abort();
                }
                count += f.bar_pred;
            }
            b.bar_result[b.bar_gen & 1] = count;
            b.bar_gen++;
            for (auto& f : b.fib)
                if (f.st == Fiber::WAIT_BLOCK) f.st = Fiber::READY;
            b.bar_waiting = 0;
            continue;
        }
        deadlock(&b);  // stuck: warp ops waiting on lanes that wait elsewhere, or a barrier not all reach
    }
}

// ---------------------------------------------------------------------------------------
// Launch

inline thread_local cudaError_t last_error = cudaSuccess;
constexpr size_t SMEM_DEFAULT = 48 * 1024, SMEM_OPTIN_MAX = 227 * 1024;  // H100 / H200

// per-kernel cudaFuncAttributeMaxDynamicSharedMemorySize, keyed by the kernel's address
inline std::mutex& attr_mutex() {
    static std::mutex m;
    return m;
}
inline std::map<const void*, size_t>& smem_optin() {
    static std::map<const void*, size_t> m;
    return m;
}
inline size_t dyn_smem_limit(const void* kernel) {
    std::lock_guard<std::mutex> g(attr_mutex());
    auto it = kernel ? smem_optin().find(kernel) : smem_optin().end();
    return it == smem_optin().end() ? SMEM_DEFAULT : it->second;
}

// ---- Stream capture (CUDA graphs) ----
// A stream being captured records its work instead of running it; cudaGraphLaunch runs the
// recorded work in order. What a GPU fixes at capture is fixed here at recording: kernel
// arguments (copied by value), cuBLAS alpha/beta (host pointer mode), copy addresses and
// sizes. So a graph replays the values of its capture, and a host value that changes between
// launches (a learning rate, a step counter) reaches the kernels only through device memory;
// what device memory (or pinned host memory) holds is read when the work runs, as on a GPU.
// Stricter than a GPU: while any stream is capturing, work on any other stream (the legacy
// default stream, which a GPU refuses too, and the others, which it would run outside the
// graph) and every call that waits for the device or allocates (cudaMemcpy, cudaMemset,
// cudaStreamSynchronize, cudaMalloc, ...; a GPU refuses those and invalidates the capture)
// stop the program with the call named.
using Work = std::function<void()>;
struct StreamRec {
    int id;
    std::vector<Work>* capture = nullptr;  // non-null while the stream is being captured
};
inline int& captures_open() { static int n = 0; return n; }
// counters for the tests: work items run or recorded from the host (kernel launches, cuBLAS
// calls, copies and memsets on a stream; a graph launch is one) and graph launches
inline long& stream_calls() { static long n = 0; return n; }
inline long& graph_launches() { static long n = 0; return n; }
inline void refuse_in_capture(const char* what) {
    if (captures_open())
        fail("%s while a stream is being captured into a CUDA graph: a GPU refuses it "
             "(cudaErrorStreamCaptureUnsupported) and invalidates the capture", what);
}
// run stream work now, or record it when its stream is being captured
inline void stream_work(cudaStream_t s, const char* what, Work w) {
    stream_calls()++;
    StreamRec* r = (StreamRec*)s;
    if (r && r->capture) {
        r->capture->push_back(std::move(w));
        return;
    }
    if (captures_open())
        fail("%s on %s while another stream is being captured into a CUDA graph (it would not be part of the graph; on "
             "the legacy default stream a GPU refuses it: cudaErrorStreamCaptureImplicit)", what,
             s ? "a stream that is not capturing" : "the legacy default stream (0)");
    w();
}

struct LaunchCfg {
    dim3 g, b;
    size_t smem;
    const void* kernel;  // address of the kernel (null where cu2cpp could not take it)
    const char* site;    // file:line of the launch
    cudaStream_t stream;
};

[[noreturn]] inline void launch_error(const LaunchCfg& c, const char* why) {
    // a GPU returns an error code that only a later check notices; here: stop at the launch
    fprintf(stderr, "[cuda-emu] ERROR launch at %s: %s (grid (%u,%u,%u), block (%u,%u,%u), %zu bytes dynamic shared "
            "memory)\n", c.site, why, c.g.x, c.g.y, c.g.z, c.b.x, c.b.y, c.b.z, c.smem);
    fflush(stderr);
    abort();
}

// a GPU checks a launch's configuration when it is made (or captured): so does this
inline void check_launch(const LaunchCfg& c) {
    const long nthreads = (long)c.b.x * c.b.y * c.b.z;
    if (c.b.x == 0 || c.b.y == 0 || c.b.z == 0 || c.g.x == 0 || c.g.y == 0 || c.g.z == 0)
        launch_error(c, "a grid or block dimension is 0");
    if (nthreads > 1024) launch_error(c, "more than 1024 threads per block");
    if (c.b.x > 1024 || c.b.y > 1024 || c.b.z > 64) launch_error(c, "block dimensions over (1024, 1024, 64)");
    if (c.g.x > 0x7fffffffu || c.g.y > 65535 || c.g.z > 65535)
        launch_error(c, "grid dimensions over (2^31-1, 65535, 65535)");
    const size_t limit = dyn_smem_limit(c.kernel);
    if (c.smem > limit) {
        char why[256];
        snprintf(why, sizeof why, "%zu bytes of dynamic shared memory exceed this kernel's limit of %zu (%s)", c.smem,
                 limit, limit == SMEM_DEFAULT ? "the 48 KB default: raise it with cudaFuncSetAttribute("
                 "kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)" : "set by cudaFuncSetAttribute");
        launch_error(c, why);
    }
}

template <class Body>
void launch_grid(const LaunchCfg& c, Body& body) {
    check_launch(c);  // again: a graph may run after the limits changed
    const long nthreads = (long)c.b.x * c.b.y * c.b.z;
    const long nblocks = (long)c.g.x * c.g.y * c.g.z;
    const size_t limit = dyn_smem_limit(c.kernel);
    struct Ctx {
        Body* body;
        static void run(void* p) { (*static_cast<Ctx*>(p)->body)(); }
    } ctx{&body};
    const size_t stack_bytes = (size_t)env_int("EMU_STACK_KB", 128) * 1024;
    auto prepare = [&](Block& b) {
        if (b.stack_bytes != stack_bytes) {
            for (char* s : b.stacks) munmap(s - 4096, b.stack_bytes + 4096);
            b.stacks.clear();
            b.stack_bytes = stack_bytes;
        }
        while ((long)b.stacks.size() < nthreads) b.stacks.push_back(alloc_stack(stack_bytes));
        b.n = (int)nthreads;
        b.nwarps = (int)((nthreads + 31) / 32);
        b.fib.assign(nthreads, Fiber());
        b.warps.resize(b.nwarps);
        b.bdim = c.b;
        b.gdim = c.g;
        b.body = &Ctx::run;
        b.body_ctx = &ctx;
        b.dyn_bytes = c.smem;
        b.smem_limit = limit == SMEM_DEFAULT ? SMEM_DEFAULT : SMEM_OPTIN_MAX;
        b.dyn_smem.resize(c.smem + 16);
        b.kernel = c.site;
    };
    auto block_of = [&](long i) {
        return uint3{(unsigned)(i % c.g.x), (unsigned)((i / c.g.x) % c.g.y), (unsigned)(i / ((long)c.g.x * c.g.y))};
    };
    const bool rev = sched_reverse();
#ifdef _OPENMP
    if (nblocks > 1 && !omp_in_parallel()) {
#pragma omp parallel
        {
            Block& b = this_runner();
            prepare(b);
            tl_block = &b;
#pragma omp for schedule(dynamic, 4)
            for (long i = 0; i < nblocks; i++) run_block(b, block_of(rev ? nblocks - 1 - i : i));
            tl_block = nullptr;
        }
        return;
    }
#endif
    Block& b = this_runner();
    prepare(b);
    tl_block = &b;
    for (long i = 0; i < nblocks; i++) run_block(b, block_of(rev ? nblocks - 1 - i : i));
    tl_block = nullptr;
}

template <class F>
struct Launcher {
    F f;
    LaunchCfg c;
    template <class... A>
    void operator()(A&&... a) {
        if (tl_block) fail("kernel launch from device code (dynamic parallelism) is not emulated");
        check_launch(c);
        auto args = std::make_tuple(std::decay_t<A>(std::forward<A>(a))...);  // by value, as CUDA copies them
        stream_work(c.stream, c.site, [f = f, c = c, args]() mutable {
            auto body = [&] { std::apply(f, args); };
            launch_grid(c, body);
        });
    }
};
// what cu2cpp.py writes for `kernel<<<g, b, smem, stream>>>(args)`
template <class F>
Launcher<F> launch(const char* site, const void* kernel, F f, dim3 g, dim3 b, size_t smem = 0, cudaStream_t s = 0) {
    return Launcher<F>{f, LaunchCfg{g, b, smem, kernel, site, s}};
}
// what cu2cpp.py writes for `extern __shared__ T name[];`
inline void* dynamic_smem() {
    require_device_code("extern __shared__");
    return (void*)(((uintptr_t)tl_block->dyn_smem.data() + 15) & ~(uintptr_t)15);
}
// what cu2cpp.py adds after `__shared__ T name[...];`: the first thread of a block to pass a
// declaration poisons the variable (the previous block's values must not leak into this
// one) and counts its bytes against the block's shared-memory limit
inline void static_smem(void* p, size_t bytes, const char* site) {
    require_device_code("__shared__");
    Block* b = tl_block;
    for (const void* q : b->static_seen)
        if (q == p) return;
    b->static_seen.push_back(p);
    memset(p, 0xFF, bytes);
    b->static_bytes += bytes;
    if (b->static_bytes > SMEM_DEFAULT)
        fail("__shared__ at %s: %zu bytes of static shared memory in this kernel exceed 48 KB", site, b->static_bytes);
    if (b->static_bytes + b->dyn_bytes > b->smem_limit)
        fail("__shared__ at %s: %zu bytes static + %zu dynamic exceed the block's %zu bytes of shared memory", site,
             b->static_bytes, b->dyn_bytes, b->smem_limit);
}

}  // namespace emu

// ---------------------------------------------------------------------------------------
// Built-in variables
#define threadIdx (::emu::tl_fiber->tid)
#define blockIdx (::emu::tl_block->bidx)
#define blockDim (::emu::tl_block->bdim)
#define gridDim (::emu::tl_block->gdim)
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------
// Barriers and warp collectives (macros, so that every report names the caller's line)
#define __syncthreads() ::emu::syncthreads_at(EMU_SITE)
#define __syncthreads_count(p) ::emu::syncthreads_at(EMU_SITE, (p) != 0)
#define __syncthreads_and(p) (::emu::syncthreads_at(EMU_SITE, (p) != 0) == ::emu::block_threads_live())
#define __syncthreads_or(p) (::emu::syncthreads_at(EMU_SITE, (p) != 0) != 0)
#define __syncwarp(...) ::emu::syncwarp_at(EMU_SITE __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::emu::shfl_at(EMU_SITE, __VA_ARGS__)
#define __shfl_xor_sync(...) ::emu::shfl_xor_at(EMU_SITE, __VA_ARGS__)
#define __shfl_down_sync(...) ::emu::shfl_down_at(EMU_SITE, __VA_ARGS__)
#define __shfl_up_sync(...) ::emu::shfl_up_at(EMU_SITE, __VA_ARGS__)
#define __ballot_sync(m, p) ::emu::ballot_at(EMU_SITE, m, p)
#define __all_sync(m, p) ::emu::all_at(EMU_SITE, m, p)
#define __any_sync(m, p) ::emu::any_at(EMU_SITE, m, p)

namespace emu {
inline int block_threads_live() { return tl_block->n - tl_block->done; }
inline void syncwarp_at(const char* site, unsigned mask = 0xffffffffu) {
    warp_rendezvous(mask, 0, false, "__syncwarp", site, true, nullptr, nullptr);
}
template <class T>
inline uint64_t pack(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type over 8 bytes");
    uint64_t p = 0;
    memcpy(&p, &v, sizeof(T));
    return p;
}
template <class T>
inline T shfl_from(const char* site, unsigned mask, T v, int src, const char* op) {
    unsigned expect = 0;
    const uint64_t* buf = warp_rendezvous(mask, pack(v), false, op, site, false, nullptr, &expect);
    T r;
    if (!(expect & (1u << src))) {  // reading a lane outside the mask or exited: undefined on a GPU, NaN here
        memset(&r, 0xFF, sizeof(T));
        return r;
    }
    memcpy(&r, &buf[src], sizeof(T));
    return r;
}
inline void check_width(int width, const char* op, const char* site) {
    if (width < 1 || width > 32 || (width & (width - 1)))
        fail("%s at %s: width %d is not a power of two in [1, 32]", op, site, width);
}
template <class T>
inline T shfl_at(const char* site, unsigned mask, T v, int srcLane, int width = 32) {
    check_width(width, "__shfl_sync", site);
    int lane = tl_fiber ? tl_fiber->lane : 0;
    int src = (lane & ~(width - 1)) + (srcLane & (width - 1));
    return shfl_from(site, mask, v, src, "__shfl_sync");
}
template <class T>
inline T shfl_xor_at(const char* site, unsigned mask, T v, int laneMask, int width = 32) {
    check_width(width, "__shfl_xor_sync", site);
    int lane = tl_fiber ? tl_fiber->lane : 0;
    int src = lane ^ laneMask;
    if ((src & ~(width - 1)) > (lane & ~(width - 1))) src = lane;  // beyond the lane's group: its own value
    return shfl_from(site, mask, v, src, "__shfl_xor_sync");
}
template <class T>
inline T shfl_down_at(const char* site, unsigned mask, T v, unsigned delta, int width = 32) {
    check_width(width, "__shfl_down_sync", site);
    int lane = tl_fiber ? tl_fiber->lane : 0;
    int src = lane + (int)delta;
    if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
    return shfl_from(site, mask, v, src, "__shfl_down_sync");
}
template <class T>
inline T shfl_up_at(const char* site, unsigned mask, T v, unsigned delta, int width = 32) {
    check_width(width, "__shfl_up_sync", site);
    int lane = tl_fiber ? tl_fiber->lane : 0;
    int src = lane - (int)delta;
    if (src < (lane & ~(width - 1))) src = lane;
    return shfl_from(site, mask, v, src, "__shfl_up_sync");
}
inline unsigned ballot_at(const char* site, unsigned mask, int pred) {
    unsigned bits = 0;
    warp_rendezvous(mask, 0, pred != 0, "__ballot_sync", site, false, &bits, nullptr);
    return bits & mask;
}
inline int all_at(const char* site, unsigned mask, int pred) {
    unsigned bits = 0, expect = 0;
    warp_rendezvous(mask, 0, pred != 0, "__all_sync", site, false, &bits, &expect);
    return (bits & expect) == expect;
}
inline int any_at(const char* site, unsigned mask, int pred) {
    unsigned bits = 0;
    warp_rendezvous(mask, 0, pred != 0, "__any_sync", site, false, &bits, nullptr);
    return bits != 0;
}
}  // namespace emu

inline unsigned __activemask() {
    emu::require_device_code("__activemask");
    return emu::tl_block->warps[emu::tl_fiber->warp].live;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline long long clock64() { return std::chrono::steady_clock::now().time_since_epoch().count(); }
inline void __trap() { emu::fail("__trap()"); }

// ---------------------------------------------------------------------------------------
// Device intrinsics and math (host libm: results can differ from the GPU's by a few ulps)
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline long long __double_as_longlong(double d) { long long u; memcpy(&u, &d, 8); return u; }
inline double __longlong_as_double(long long u) { double d; memcpy(&d, &u, 8); return d; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
template <class T>
T __ldg(const T* p) { return *p; }
template <class T>
T __ldcs(const T* p) { return *p; }
template <class T>
void __stcs(T* p, T v) { *p = v; }

// ---------------------------------------------------------------------------------------
// Atomics: blocks run concurrently on OS threads, so these are real atomics
inline float atomicAdd(float* p, float v) {
    unsigned* u = (unsigned*)p;
    unsigned old = __atomic_load_n(u, __ATOMIC_RELAXED), nw;
    do nw = __float_as_uint(__uint_as_float(old) + v);
    while (!__atomic_compare_exchange_n(u, &old, nw, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    return __uint_as_float(old);
}
inline double atomicAdd(double* p, double v) {
    unsigned long long* u = (unsigned long long*)p;
    unsigned long long old = __atomic_load_n(u, __ATOMIC_RELAXED), nw;
    do nw = (unsigned long long)__double_as_longlong(__longlong_as_double((long long)old) + v);
    while (!__atomic_compare_exchange_n(u, &old, nw, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    return __longlong_as_double((long long)old);
}
// the value's type is not deduced (as with CUDA's overloads, atomicAdd(&unsigned_counter, 1) works)
template <class T> struct nodeduce { using type = T; };
template <class I, class = std::enable_if_t<std::is_integral<I>::value>>
inline I atomicAdd(I* p, typename nodeduce<I>::type v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class I, class = std::enable_if_t<std::is_integral<I>::value>>
inline I atomicSub(I* p, typename nodeduce<I>::type v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
template <class I, class = std::enable_if_t<std::is_integral<I>::value>>
inline I atomicAnd(I* p, typename nodeduce<I>::type v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
template <class I, class = std::enable_if_t<std::is_integral<I>::value>>
inline I atomicOr(I* p, typename nodeduce<I>::type v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
template <class I, class = std::enable_if_t<std::is_integral<I>::value>>
inline I atomicXor(I* p, typename nodeduce<I>::type v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }
template <class I, class = std::enable_if_t<std::is_integral<I>::value>>
inline I atomicExch(I* p, typename nodeduce<I>::type v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline float atomicExch(float* p, float v) {
    return __uint_as_float(__atomic_exchange_n((unsigned*)p, __float_as_uint(v), __ATOMIC_SEQ_CST));
}
template <class I, class = std::enable_if_t<std::is_integral<I>::value>>
inline I atomicMax(I* p, typename nodeduce<I>::type v) {
    I old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <class I, class = std::enable_if_t<std::is_integral<I>::value>>
inline I atomicMin(I* p, typename nodeduce<I>::type v) {
    I old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <class I, class = std::enable_if_t<std::is_integral<I>::value>>
inline I atomicCAS(I* p, typename nodeduce<I>::type cmp, typename nodeduce<I>::type v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}

// ---------------------------------------------------------------------------------------
// Runtime API. Device memory is host memory, tracked so that copies and cuBLAS operands
// outside any allocation are reported. Every stream is one in-order host queue and every
// call completes before it returns, so *Async calls are synchronous.
namespace emu {
inline int malloc_fill() {
    static const int v = env_int("EMU_MALLOC_FILL", 0xFF);  // NaN / -1: reads of unwritten memory show up
    return v;
}
struct Allocations {
    std::mutex m;
    std::map<uintptr_t, size_t> live;  // base -> bytes
};
inline Allocations& allocations() {
    static Allocations a;
    return a;
}
// Is [p, p + bytes) inside one live device allocation? (bytes 0: is p inside or one past one)
inline bool in_device_memory(const void* p, size_t bytes) {
    Allocations& A = allocations();
    std::lock_guard<std::mutex> g(A.m);
    auto it = A.live.upper_bound((uintptr_t)p);
    if (it == A.live.begin()) return false;
    --it;
    uintptr_t lo = it->first, hi = lo + it->second, q = (uintptr_t)p;
    return q >= lo && q + bytes <= hi && (bytes > 0 || q <= hi);
}
inline void check_device_range(const void* p, size_t bytes, const char* what) {
    if (bytes && !in_device_memory(p, bytes))
        fail("%s: %zu bytes at %p are not inside one device allocation (a host pointer, freed memory, or past the "
             "end)", what, bytes, p);
}
struct EventRec {
    std::chrono::steady_clock::time_point t;
};
inline cudaError_t set_error(cudaError_t e) {
    last_error = e;
    return e;
}
// The host's waits for the device, counted, so that tests can hold a training step to the
// waits it is meant to have (test_gpu_fixtures "host waits"): stream, device and event
// synchronizations, stream queries (a polling loop's one call here), synchronous copies
// between host and device (cudaMemcpy; cudaMemcpyAsync with pageable host memory), and the
// calls that synchronize the device implicitly (cudaFree, cudaMallocHost, cudaFreeHost).
// Not counted: cudaEventQuery (it never blocks).
inline long& host_waits() { static long n = 0; return n; }
inline void note_wait() {
    std::lock_guard<std::mutex> g(allocations().m);
    host_waits()++;
}
}  // namespace emu

extern "C" {
inline cudaError_t cudaMalloc(void** p, size_t n) {
    emu::refuse_in_capture("cudaMalloc");
    // exact size: under -fsanitize=address a read one past the end is caught
    if (posix_memalign(p, 256, std::max<size_t>(n, 1))) return emu::set_error(cudaErrorMemoryAllocation);
    if (emu::malloc_fill() >= 0) memset(*p, emu::malloc_fill(), n);
#ifdef EMU_ASAN
    __lsan_ignore_object(*p);  // device memory left allocated at exit is normal CUDA practice, not a leak
#endif
    std::lock_guard<std::mutex> g(emu::allocations().m);
    emu::allocations().live[(uintptr_t)*p] = n;
    return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t) { return cudaMalloc(p, n); }
inline cudaError_t cudaFree(void* p) {
    if (!p) return cudaSuccess;
    emu::refuse_in_capture("cudaFree");
    emu::note_wait();
    {
        std::lock_guard<std::mutex> g(emu::allocations().m);
        auto it = emu::allocations().live.find((uintptr_t)p);
        if (it == emu::allocations().live.end())
            emu::fail("cudaFree(%p): not the start of a live device allocation (double free?)", p);
        emu::allocations().live.erase(it);
    }
    free(p);
    return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
// pinned host memory is ordinary host memory here, but recorded: a cudaMemcpyAsync to or
// from pageable memory is a host wait on a GPU (counted in emu::host_waits)
}  // extern "C"
namespace emu {
inline std::map<uintptr_t, size_t>& pinned_ranges() { static std::map<uintptr_t, size_t> m; return m; }
inline bool is_pinned(const void* p, size_t n) {
    std::lock_guard<std::mutex> g(allocations().m);
    auto& m = pinned_ranges();
    auto it = m.upper_bound((uintptr_t)p);
    if (it == m.begin()) return false;
    --it;
    return (uintptr_t)p >= it->first && (uintptr_t)p + n <= it->first + it->second;
}
}  // namespace emu
extern "C" {
inline cudaError_t cudaMallocHost(void** p, size_t n) {
    emu::refuse_in_capture("cudaMallocHost");
    if (posix_memalign(p, 256, std::max<size_t>(n, 1))) return emu::set_error(cudaErrorMemoryAllocation);
    emu::note_wait();
    std::lock_guard<std::mutex> g(emu::allocations().m);
    emu::pinned_ranges()[(uintptr_t)*p] = std::max<size_t>(n, 1);
    return cudaSuccess;
}
inline cudaError_t cudaHostAlloc(void** p, size_t n, unsigned) { return cudaMallocHost(p, n); }
inline cudaError_t cudaFreeHost(void* p) {
    emu::refuse_in_capture("cudaFreeHost");
    emu::note_wait();
    {
        std::lock_guard<std::mutex> g(emu::allocations().m);
        emu::pinned_ranges().erase((uintptr_t)p);
    }
    free(p);
    return cudaSuccess;
}
}  // extern "C"
namespace emu {
inline void check_copy(void* d, const void* s, size_t n, cudaMemcpyKind kind) {
    if (kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice) emu::check_device_range(d, n, "cudaMemcpy destination");
    if (kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice) emu::check_device_range(s, n, "cudaMemcpy source");
    if (kind == cudaMemcpyHostToDevice && n && emu::in_device_memory(s, n)) emu::fail("cudaMemcpy HostToDevice: the source %p is device memory", s);
    if (kind == cudaMemcpyDeviceToHost && n && emu::in_device_memory(d, n)) emu::fail("cudaMemcpy DeviceToHost: the destination %p is device memory", d);
}
inline cudaError_t copy(void* d, const void* s, size_t n, cudaMemcpyKind kind) {
    check_copy(d, s, n, kind);
    if (n) memmove(d, s, n);
    return cudaSuccess;
}
}  // namespace emu
extern "C" {
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind kind) {
    emu::refuse_in_capture("cudaMemcpy (synchronous)");
    if (kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToHost) emu::note_wait();
    return emu::copy(d, s, n, kind);
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind kind, cudaStream_t st) {
    if ((kind == cudaMemcpyHostToDevice && !emu::is_pinned(s, n)) || (kind == cudaMemcpyDeviceToHost && !emu::is_pinned(d, n))) {
        emu::refuse_in_capture("cudaMemcpyAsync with pageable host memory");
        emu::note_wait();
    }
    // the ranges are checked when the copy is made (or captured); the bytes move when it runs
    emu::check_copy(d, s, n, kind);
    emu::stream_work(st, "cudaMemcpyAsync", [=] { if (n) memmove(d, s, n); });
    return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int v, size_t n) {
    emu::refuse_in_capture("cudaMemset (synchronous)");
    emu::check_device_range(p, n, "cudaMemset");
    if (n) memset(p, v, n);
    return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t s) {
    emu::check_device_range(p, n, "cudaMemsetAsync");
    emu::stream_work(s, "cudaMemsetAsync", [=] { if (n) memset(p, v, n); });
    return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize(void) { emu::refuse_in_capture("cudaDeviceSynchronize"); emu::note_wait(); return cudaSuccess; }
inline cudaError_t cudaDeviceReset(void) { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { emu::refuse_in_capture("cudaStreamSynchronize"); emu::note_wait(); return cudaSuccess; }
inline cudaError_t cudaStreamCreate(cudaStream_t* s) { *s = (cudaStream_t) new emu::StreamRec{1}; return cudaSuccess; }
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { return cudaStreamCreate(s); }
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
    emu::StreamRec* r = (emu::StreamRec*)s;
    if (r && r->capture) emu::fail("cudaStreamDestroy: the stream is still being captured (no cudaStreamEndCapture)");
    delete r;
    return cudaSuccess;
}
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return cudaSuccess; }
inline cudaError_t cudaStreamQuery(cudaStream_t) { emu::refuse_in_capture("cudaStreamQuery"); emu::note_wait(); return cudaSuccess; }  // every call has completed
// EMU_DEVICE_COUNT (default 1) emulated devices, all the same CPU: the data-parallel tests
// run one process per emulated device
namespace emu {
inline int device_count() {
    const char* n = getenv("EMU_DEVICE_COUNT");
    return n && atoi(n) > 0 ? atoi(n) : 1;
}
inline int& current_device() { static int d = 0; return d; }
}  // namespace emu
inline cudaError_t cudaSetDevice(int d) {
    if (d < 0 || d >= emu::device_count()) return emu::set_error(cudaErrorInvalidDevice);
    emu::current_device() = d;
    return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) { *d = emu::current_device(); return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = emu::device_count(); return cudaSuccess; }
inline cudaError_t cudaGetLastError(void) { cudaError_t e = emu::last_error; emu::last_error = cudaSuccess; return e; }
inline cudaError_t cudaPeekAtLastError(void) { return emu::last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error (cuda-emu)";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument (cuda-emu)";
        case cudaErrorInvalidValue: return "invalid argument (cuda-emu)";
        case cudaErrorMemoryAllocation: return "out of memory (cuda-emu)";
        case cudaErrorInvalidDevice: return "invalid device ordinal (cuda-emu)";
        default: return "error (cuda-emu)";
    }
}
inline const char* cudaGetErrorName(cudaError_t e) { return cudaGetErrorString(e); }
inline cudaError_t cudaDriverGetVersion(int* v) { *v = CUDART_VERSION; return cudaSuccess; }
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = CUDART_VERSION; return cudaSuccess; }
// An H100/H200-like device (the limits the checks above enforce), named so nobody mistakes it
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "cuda-emu (CPU, %d threads)",
#ifdef _OPENMP
             omp_get_max_threads()
#else
             1
#endif
    );
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = 132;
    p->l2CacheSize = 1 << 20;  // small: dev/cuda flushes 2x L2 between timed repeats
    p->totalGlobalMem = (size_t)16 << 30;
    p->sharedMemPerBlock = emu::SMEM_DEFAULT;
    p->sharedMemPerBlockOptin = emu::SMEM_OPTIN_MAX;
    p->sharedMemPerMultiprocessor = 228 * 1024;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsPerMultiProcessor = 2048;
    p->regsPerBlock = 65536;
    p->warpSize = 32;
    p->maxThreadsDim[0] = p->maxThreadsDim[1] = 1024;
    p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 0x7fffffff;
    p->maxGridSize[1] = p->maxGridSize[2] = 65535;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
    switch (a) {
        case cudaDevAttrMultiProcessorCount: *v = 132; break;
        case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
        case cudaDevAttrMaxSharedMemoryPerBlock: *v = (int)emu::SMEM_DEFAULT; break;
        case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = (int)emu::SMEM_OPTIN_MAX; break;
        case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
        case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
        case cudaDevAttrWarpSize: *v = 32; break;
        default: *v = 0;
    }
    return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(size_t* fr, size_t* tot) {
    *fr = (size_t)12 << 30;
    *tot = (size_t)16 << 30;
    return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void* f, cudaFuncAttribute a, int v) {
    if (a == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (v < 0 || (size_t)v > emu::SMEM_OPTIN_MAX) return emu::set_error(cudaErrorInvalidValue);
        std::lock_guard<std::mutex> g(emu::attr_mutex());
        emu::smem_optin()[f] = (size_t)v;
    }
    return cudaSuccess;
}
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = (cudaEvent_t) new emu::EventRec(); return cudaSuccess; }
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { return cudaEventCreate(e); }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) { delete (emu::EventRec*)e; return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    emu::stream_work(s, "cudaEventRecord", [e] { ((emu::EventRec*)e)->t = std::chrono::steady_clock::now(); });
    return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { emu::refuse_in_capture("cudaEventSynchronize"); emu::note_wait(); return cudaSuccess; }
inline cudaError_t cudaEventQuery(cudaEvent_t) { return cudaSuccess; }
// CPU time between the events: not a GPU time (dev/cuda skips its benchmarks under CUDA_EMU)
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
    *ms = std::chrono::duration<float, std::milli>(((emu::EventRec*)b)->t - ((emu::EventRec*)a)->t).count();
    return cudaSuccess;
}
}  // extern "C"

// ---- CUDA graphs (see "Stream capture" above): a graph is its recorded work, in order ----
namespace emu {
struct GraphRec {
    std::vector<Work> work;
};
}  // namespace emu
extern "C" {
inline cudaError_t cudaStreamBeginCapture(cudaStream_t s, enum cudaStreamCaptureMode) {
    emu::StreamRec* r = (emu::StreamRec*)s;
    if (!r) return emu::set_error(cudaErrorStreamCaptureUnsupported);  // the legacy stream cannot be captured
    if (r->capture) return emu::set_error(cudaErrorIllegalState);
    r->capture = new std::vector<emu::Work>();
    emu::captures_open()++;
    return cudaSuccess;
}
inline cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g) {
    emu::StreamRec* r = (emu::StreamRec*)s;
    if (!r || !r->capture) return emu::set_error(cudaErrorIllegalState);
    *g = (cudaGraph_t) new emu::GraphRec{std::move(*r->capture)};
    delete r->capture;
    r->capture = nullptr;
    emu::captures_open()--;
    return cudaSuccess;
}
inline cudaError_t cudaStreamIsCapturing(cudaStream_t s, enum cudaStreamCaptureStatus* st) {
    emu::StreamRec* r = (emu::StreamRec*)s;
    *st = r && r->capture ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
    return cudaSuccess;
}
inline cudaError_t cudaGraphInstantiate(cudaGraphExec_t* e, cudaGraph_t g, unsigned long long) {
    emu::refuse_in_capture("cudaGraphInstantiate");
    *e = (cudaGraphExec_t) new emu::GraphRec(*(emu::GraphRec*)g);
    return cudaSuccess;
}
inline cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s) {
    emu::graph_launches()++;
    const emu::GraphRec* gr = (const emu::GraphRec*)e;
    emu::stream_work(s, "cudaGraphLaunch", [gr] {
        for (const emu::Work& w : gr->work) w();
    });
    return cudaSuccess;
}
inline cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) { delete (emu::GraphRec*)e; return cudaSuccess; }
inline cudaError_t cudaGraphDestroy(cudaGraph_t g) { delete (emu::GraphRec*)g; return cudaSuccess; }
}  // extern "C"

// the kernel-pointer form that cuda_runtime.h declares only for nvcc
template <class R, class... A>
inline cudaError_t cudaFuncSetAttribute(R (*f)(A...), cudaFuncAttribute a, int v) {
    return cudaFuncSetAttribute((const void*)f, a, v);
}

#include "cublas_emu.h"
#include "mma_emu.h"
#if __has_include(<nccl.h>)
#include "nccl_emu.h"
#endif
