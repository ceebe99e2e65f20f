// dev/emu/nccl_emu.h: a stand-in for NCCL, for tests only: the collectives train_moe_gpu
// uses, between emulated GPUs that are separate processes on this machine (docs/emulation.md).
// cuda_emu.h includes it, so every emulated binary has it; the real trainer links libnccl.
//
// How: ncclGetUniqueId names a file in $TMPDIR (or /tmp); ncclCommInitRank maps it shared
// into every rank (rank 0 creates it and removes the name once all ranks have joined).
// The region holds, per rank, its pid, how many barriers it has passed, what collective it
// is in, and one slot of CHUNK bytes. A collective goes chunk by chunk: each rank copies its
// part of the send buffer into its slot, a barrier, each rank computes its output from all
// slots in rank order (so sums are in a fixed order and the results bit-for-bit
// reproducible), a barrier. Streams are synchronous in the emulation, so a collective is
// done when its call returns.
//
// What it checks, where real NCCL would hang or silently mix up data: ranks that call
// different collectives (kind, count, type, op) at the same point; a peer that has exited or
// been killed (its pid is gone or a zombie): ncclRemoteError within about 10 ms; a peer that
// stops answering: ncclRemoteError after NCCL_EMU_TIMEOUT_S seconds (default 300). The
// error is kept for ncclCommGetAsyncError and described by ncclGetLastError.
//
// Supported: ncclGetUniqueId, ncclCommInitRank, ncclAllReduce, ncclReduceScatter,
// ncclAllGather, ncclBroadcast (sum / min / max / avg of float, double, int32, int64,
// uint8, bf16 as float), ncclGroupStart/End (no-ops), ncclCommGetAsyncError,
// ncclCommAbort, ncclCommDestroy, ncclCommCount, ncclCommUserRank, ncclGetErrorString,
// ncclGetLastError, ncclGetVersion.
#pragma once
#include <nccl.h>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace nccl_emu {
static const uint64_t MAGIC = 0x4e43434c454d5531ull;  // "NCCLEMU1"
static const int MAX_RANKS = 64;
static const size_t CHUNK = 1 << 20;  // bytes per rank per round

struct OpInfo {
    int kind, type, op, root;
    size_t count;
    bool operator!=(const OpInfo& o) const {
        return kind != o.kind || type != o.type || op != o.op || root != o.root || count != o.count;
    }
};
struct Shared {
    std::atomic<uint64_t> magic;
    int nranks;
    std::atomic<int> joined;
    std::atomic<int> aborted;                  // a rank called ncclCommAbort: rank + 1
    std::atomic<int> pid[MAX_RANKS];
    std::atomic<uint64_t> passed[MAX_RANKS];   // barriers each rank has passed
    OpInfo op[MAX_RANKS];                      // the collective each rank is in
};
inline size_t region_bytes(int nranks) { return ((sizeof(Shared) + 4095) & ~(size_t)4095) + (size_t)nranks * CHUNK; }

inline double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
inline double timeout_s() {
    const char* t = getenv("NCCL_EMU_TIMEOUT_S");
    return t ? atof(t) : 300.0;
}
// gone: no such process, or one that has exited and waits to be reaped (a zombie)
inline bool pid_gone(int pid) {
    if (pid <= 0) return false;
    if (kill(pid, 0) != 0 && errno == ESRCH) return true;
    char path[64], buf[256];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE* f = fopen(path, "r");
    if (!f) return true;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    const char* p = strrchr(buf, ')');
    return p && (p[2] == 'Z' || p[2] == 'X');
}
}  // namespace nccl_emu

struct ncclComm {
    int rank = 0, nranks = 1;
    nccl_emu::Shared* sh = nullptr;
    char* slots = nullptr;
    size_t bytes = 0;
    uint64_t barriers = 0;
    ncclResult_t async_error = ncclSuccess;
    std::string last_error;
};

namespace nccl_emu {
inline ncclResult_t fail(ncclComm* c, ncclResult_t r, const std::string& msg) {
    if (c) {
        c->async_error = r;
        c->last_error = msg;
    }
    return r;
}
// everyone has passed barrier number c->barriers + 1 (or an error: which rank is gone)
inline ncclResult_t barrier(ncclComm* c) {
    const uint64_t target = ++c->barriers;
    c->sh->passed[c->rank].store(target, std::memory_order_release);
    const double start = now(), limit = timeout_s();
    double last_check = start;
    int spins = 0;
    for (;;) {
        bool all = true;
        for (int r = 0; r < c->nranks && all; r++) all = c->sh->passed[r].load(std::memory_order_acquire) >= target;
        if (all) return ncclSuccess;
        if (int a = c->sh->aborted.load()) return fail(c, ncclRemoteError, "rank " + std::to_string(a - 1) + " aborted the communicator");
        const double t = now();
        if (t - last_check > 0.01) {
            last_check = t;
            for (int r = 0; r < c->nranks; r++)
                if (r != c->rank && c->sh->passed[r].load() < target && pid_gone(c->sh->pid[r].load()))
                    return fail(c, ncclRemoteError, "rank " + std::to_string(r) + " (pid " + std::to_string(c->sh->pid[r].load()) +
                                                        ") exited or was killed during a collective");
            if (t - start > limit)
                return fail(c, ncclRemoteError, "no answer from the other ranks within NCCL_EMU_TIMEOUT_S = " +
                                                    std::to_string((int)limit) + " s");
        }
        if (++spins < 64) std::this_thread::yield();
        else usleep(spins < 1000 ? 50 : 500);
    }
}
inline size_t type_size(ncclDataType_t t) {
    switch (t) {
        case ncclInt8: case ncclUint8: return 1;
        case ncclFloat16: case ncclBfloat16: return 2;
        case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
        case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
        default: return 0;
    }
}
// dst[i] = op over ranks (in rank order) of src_r[i]
template <typename X>
void reduce_typed(void* dst, const char* const* src, int nranks, size_t n, ncclRedOp_t op) {
    X* d = (X*)dst;
    for (size_t i = 0; i < n; i++) {
        X a = ((const X*)src[0])[i];
        for (int r = 1; r < nranks; r++) {
            X b = ((const X*)src[r])[i];
            if (op == ncclSum || op == ncclAvg) a = a + b;
            else if (op == ncclMin) a = b < a ? b : a;
            else if (op == ncclMax) a = b > a ? b : a;
        }
        if (op == ncclAvg) a = a / (X)nranks;
        d[i] = a;
    }
}
inline void reduce_bf16(void* dst, const char* const* src, int nranks, size_t n, ncclRedOp_t op) {
    for (size_t i = 0; i < n; i++) {
        float a = __bfloat162float(((const __nv_bfloat16*)src[0])[i]);
        for (int r = 1; r < nranks; r++) {
            float b = __bfloat162float(((const __nv_bfloat16*)src[r])[i]);
            if (op == ncclSum || op == ncclAvg) a += b;
            else if (op == ncclMin) a = b < a ? b : a;
            else if (op == ncclMax) a = b > a ? b : a;
        }
        if (op == ncclAvg) a /= nranks;
        ((__nv_bfloat16*)dst)[i] = __float2bfloat16(a);
    }
}
inline bool reduce(void* dst, const char* const* src, int nranks, size_t n, ncclDataType_t t, ncclRedOp_t op) {
    switch (t) {
        case ncclFloat32: reduce_typed<float>(dst, src, nranks, n, op); return true;
        case ncclFloat64: reduce_typed<double>(dst, src, nranks, n, op); return true;
        case ncclInt32: reduce_typed<int32_t>(dst, src, nranks, n, op); return true;
        case ncclUint32: reduce_typed<uint32_t>(dst, src, nranks, n, op); return true;
        case ncclInt64: reduce_typed<int64_t>(dst, src, nranks, n, op); return true;
        case ncclUint64: reduce_typed<uint64_t>(dst, src, nranks, n, op); return true;
        case ncclUint8: reduce_typed<uint8_t>(dst, src, nranks, n, op); return true;
        case ncclInt8: reduce_typed<int8_t>(dst, src, nranks, n, op); return true;
        case ncclBfloat16: reduce_bf16(dst, src, nranks, n, op); return true;
        default: return false;
    }
}

enum Kind { ALL_REDUCE, REDUCE_SCATTER, ALL_GATHER, BROADCAST };
static const char* kind_name[] = {"ncclAllReduce", "ncclReduceScatter", "ncclAllGather", "ncclBroadcast"};

// One collective. `total` = elements of the buffer that goes through the slots (send side
// of all-reduce / reduce-scatter / broadcast, each rank's part of all-gather).
inline ncclResult_t collective(Kind kind, const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op,
                               int root, ncclComm* c) {
    if (!c || !c->sh) return ncclInvalidArgument;
    if (c->async_error != ncclSuccess) return c->async_error;
    const size_t es = type_size(type);
    if (es == 0) return fail(c, ncclInvalidArgument, std::string(kind_name[kind]) + ": data type not supported by the stand-in");
    const int n = c->nranks, me = c->rank;
    c->sh->op[me] = OpInfo{kind, (int)type, kind == ALL_GATHER || kind == BROADCAST ? -1 : (int)op, kind == BROADCAST ? root : -1, count};
    ncclResult_t r = barrier(c);
    if (r != ncclSuccess) return r;
    for (int q = 0; q < n; q++)
        if (c->sh->op[q] != c->sh->op[me])
            return fail(c, ncclInvalidUsage, std::string("rank ") + std::to_string(me) + " called " + kind_name[kind] +
                                                 " while rank " + std::to_string(q) + " called " +
                                                 kind_name[c->sh->op[q].kind] + " (or other counts / types)");
    r = barrier(c);  // everyone has read the op records: they may be overwritten
    if (r != ncclSuccess) return r;
    const size_t total = kind == REDUCE_SCATTER ? count * n : count;  // elements through the slots
    const size_t per = CHUNK / es;
    const char* srcs[MAX_RANKS];
    for (size_t c0 = 0; c0 < total || (total == 0 && c0 == 0); c0 += per) {
        if (total == 0) break;
        const size_t m = std::min(per, total - c0);
        char* mine = c->slots + (size_t)me * CHUNK;
        if (kind != BROADCAST || me == root) memcpy(mine, (const char*)send + c0 * es, m * es);
        if ((r = barrier(c)) != ncclSuccess) return r;
        for (int q = 0; q < n; q++) srcs[q] = c->slots + (size_t)q * CHUNK;
        if (kind == ALL_REDUCE) {
            reduce((char*)recv + c0 * es, srcs, n, m, type, op);
        } else if (kind == BROADCAST) {
            memcpy((char*)recv + c0 * es, srcs[root], m * es);
        } else if (kind == ALL_GATHER) {
            for (int q = 0; q < n; q++) memcpy((char*)recv + ((size_t)q * count + c0) * es, srcs[q], m * es);
        } else {  // reduce-scatter: this rank's part [me count, (me + 1) count) of the chunk
            const size_t lo = std::max(c0, (size_t)me * count), hi = std::min(c0 + m, (size_t)(me + 1) * count);
            if (lo < hi) {
                const char* part[MAX_RANKS];
                for (int q = 0; q < n; q++) part[q] = srcs[q] + (lo - c0) * es;
                reduce((char*)recv + (lo - (size_t)me * count) * es, part, n, hi - lo, type, op);
            }
        }
        if ((r = barrier(c)) != ncclSuccess) return r;  // slots free again
    }
    return ncclSuccess;
}
}  // namespace nccl_emu

inline ncclResult_t ncclGetVersion(int* version) { *version = NCCL_VERSION_CODE; return ncclSuccess; }
inline const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error";
        case ncclSystemError: return "unhandled system error";
        case ncclInternalError: return "internal error";
        case ncclInvalidArgument: return "invalid argument";
        case ncclInvalidUsage: return "invalid usage";
        case ncclRemoteError: return "remote process exited or there was a network error";
        case ncclInProgress: return "NCCL operation in progress";
        default: return "unknown result code";
    }
}
inline const char* ncclGetLastError(ncclComm_t c) { return c ? c->last_error.c_str() : ""; }

inline ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    memset(id, 0, sizeof(*id));
    const char* dir = getenv("TMPDIR");
    snprintf(id->internal, sizeof(id->internal), "%s/nccl_emu.%d.%lld.%u", dir && *dir ? dir : "/tmp", (int)getpid(),
             (long long)(nccl_emu::now() * 1e6), (unsigned)rand());
    return ncclSuccess;
}

inline ncclResult_t ncclCommInitRank(ncclComm_t* out, int nranks, ncclUniqueId id, int rank) {
    using namespace nccl_emu;
    *out = nullptr;
    if (nranks < 1 || nranks > MAX_RANKS || rank < 0 || rank >= nranks) return ncclInvalidArgument;
    const std::string path(id.internal, strnlen(id.internal, sizeof(id.internal)));
    const size_t bytes = region_bytes(nranks);
    int fd = -1;
    const double start = now();
    if (rank == 0) {
        fd = open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fd < 0 || ftruncate(fd, (off_t)bytes) != 0) {
            fprintf(stderr, "nccl_emu: cannot create %s: %s\n", path.c_str(), strerror(errno));
            return ncclSystemError;
        }
    } else {
        for (;;) {  // wait for rank 0 to make the file at its full size
            fd = open(path.c_str(), O_RDWR);
            struct stat st;
            if (fd >= 0 && fstat(fd, &st) == 0 && (size_t)st.st_size == bytes) break;
            if (fd >= 0) close(fd);
            fd = -1;
            if (now() - start > timeout_s()) return ncclSystemError;
            usleep(2000);
        }
    }
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return ncclSystemError;
    Shared* sh = (Shared*)p;
    if (rank == 0) {
        sh->nranks = nranks;
        sh->magic.store(MAGIC, std::memory_order_release);
    } else {
        while (sh->magic.load(std::memory_order_acquire) != MAGIC) {
            if (now() - start > timeout_s()) { munmap(p, bytes); return ncclSystemError; }
            usleep(1000);
        }
        if (sh->nranks != nranks) { munmap(p, bytes); return ncclInvalidUsage; }
    }
    ncclComm* c = new ncclComm();
    c->rank = rank; c->nranks = nranks; c->sh = sh; c->bytes = bytes;
    c->slots = (char*)p + ((sizeof(Shared) + 4095) & ~(size_t)4095);
    sh->pid[rank].store((int)getpid());
    sh->joined.fetch_add(1);
    ncclResult_t r = barrier(c);  // every rank has joined (ncclCommInitRank blocks until then too)
    if (rank == 0) unlink(path.c_str());
    if (r != ncclSuccess) { munmap(p, bytes); delete c; return r; }
    *out = c;
    return ncclSuccess;
}

inline ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t t, ncclRedOp_t op,
                                  ncclComm_t c, cudaStream_t) {
    emu::refuse_in_capture("an NCCL collective (not emulated inside CUDA graphs)");
    return nccl_emu::collective(nccl_emu::ALL_REDUCE, send, recv, count, t, op, 0, c);
}
inline ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t recvcount, ncclDataType_t t, ncclRedOp_t op,
                                      ncclComm_t c, cudaStream_t) {
    emu::refuse_in_capture("an NCCL collective (not emulated inside CUDA graphs)");
    return nccl_emu::collective(nccl_emu::REDUCE_SCATTER, send, recv, recvcount, t, op, 0, c);
}
inline ncclResult_t ncclAllGather(const void* send, void* recv, size_t sendcount, ncclDataType_t t, ncclComm_t c,
                                  cudaStream_t) {
    emu::refuse_in_capture("an NCCL collective (not emulated inside CUDA graphs)");
    return nccl_emu::collective(nccl_emu::ALL_GATHER, send, recv, sendcount, t, ncclSum, 0, c);
}
inline ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t t, int root, ncclComm_t c,
                                  cudaStream_t) {
    emu::refuse_in_capture("an NCCL collective (not emulated inside CUDA graphs)");
    return nccl_emu::collective(nccl_emu::BROADCAST, send, recv, count, t, ncclSum, root, c);
}
inline ncclResult_t ncclGroupStart() { return ncclSuccess; }
inline ncclResult_t ncclGroupEnd() { return ncclSuccess; }
inline ncclResult_t ncclCommGetAsyncError(ncclComm_t c, ncclResult_t* e) { *e = c ? c->async_error : ncclInvalidArgument; return ncclSuccess; }
inline ncclResult_t ncclCommCount(const ncclComm_t c, int* n) { *n = c->nranks; return ncclSuccess; }
inline ncclResult_t ncclCommUserRank(const ncclComm_t c, int* r) { *r = c->rank; return ncclSuccess; }
inline ncclResult_t ncclCommAbort(ncclComm_t c) {
    if (!c) return ncclSuccess;
    if (c->sh) {
        c->sh->aborted.store(c->rank + 1);
        munmap(c->sh, c->bytes);
    }
    delete c;
    return ncclSuccess;
}
inline ncclResult_t ncclCommDestroy(ncclComm_t c) {
    if (!c) return ncclSuccess;
    if (c->sh) munmap(c->sh, c->bytes);
    delete c;
    return ncclSuccess;
}
