// world.h: where this process stands in a data-parallel run, and how rank 0 hands the NCCL
// unique id to every rank. Host code only: no CUDA, no NCCL (the id is 128 opaque bytes), so
// that test_cpu checks it and train_moe.cu stays about the model.
//
// One process per GPU, started by a launcher that says which one it is:
//   torchrun (and anything PyTorch-like)  RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE
//   Open MPI's mpirun                     OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE
//   MPICH / Intel MPI (Hydra)             PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS
//   Slurm's srun                          SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID,
//                                         SLURM_STEP_TASKS_PER_NODE (first number)
// read in that order (torchrun or mpirun inside a Slurm allocation wins over the allocation's
// own variables). Slurm counts the step's tasks (SLURM_STEP_NUM_TASKS, set by srun), not the
// allocation's (SLURM_NTASKS is also set in the batch script itself, where this process is
// alone). None of them: one process, rank 0 of 1.
//
// The id hand-out (--nccl-init):
//   tcp (default)  rank 0 listens on MASTER_PORT + 1 (torchrun's own store already holds
//                  MASTER_PORT; default MASTER_PORT 29500) and sends the id to each rank that
//                  connects to MASTER_ADDR (default 127.0.0.1 when every rank is on one node).
//   file           rank 0 writes the id to a file on a file system every node sees; the others
//                  wait for it. The name carries the launcher's job id when there is one, so
//                  a file left by an earlier job is never read; rank 0 removes it once every
//                  rank has joined.
//   mpi            MPI_Bcast, in a build with MPI (make USE_MPI=1).
// Each waits at most `timeout` seconds and then says who was missing.
//
// defines: World, world_from_env, NcclInit, parse_nccl_init, launch_job_id, share_unique_id,
//          remove_unique_id_file, mpi_finalize_if_started
#pragma once
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef USE_MPI
#include <mpi.h>
#endif
#include "util.h"          // defines: FAIL, strfmt, parse_int_strict, AtomicFile, now_seconds, path_exists

struct World {
    int rank = 0, size = 1;              // global
    int local_rank = 0, local_size = 1;  // on this node
    std::string launcher = "none";       // which variables said so
    bool multi() const { return size > 1; }
    bool root() const { return rank == 0; }
    bool one_node() const { return local_size == size; }
};

// The launcher's variables (see the top of this file). `env` looks a name up (getenv, or a
// table in the tests).
template <typename Env>
World world_from_env(Env env) {
    struct Names { const char *launcher, *rank, *size, *local_rank, *local_size; };
    const Names table[] = {
        {"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"},
        {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"},
        {"mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"},
        {"slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"},
    };
    World w;
    for (const Names& n : table) {
        const char* r = env(n.rank);
        const char* s = env(n.size);
        if (!r || !s) continue;
        auto number = [&](const char* name, const char* v, long long lo, long long hi) {
            // Slurm writes tasks per node as "4(x2)" or "4,3": the first node's count
            std::string text = v;
            if (name == std::string("SLURM_STEP_TASKS_PER_NODE")) text = text.substr(0, text.find_first_of("(,"));
            return (int)parse_int_strict(text, lo, hi, strfmt("environment variable %s (set by %s)", name, n.launcher));
        };
        w.launcher = n.launcher;
        w.size = number(n.size, s, 1, 1 << 20);
        w.rank = number(n.rank, r, 0, w.size - 1);
        const char* lr = env(n.local_rank);
        const char* ls = env(n.local_size);
        // without the node-local size, all ranks are taken to be on this node
        w.local_size = ls ? number(n.local_size, ls, 1, w.size) : w.size;
        w.local_rank = lr ? number(n.local_rank, lr, 0, w.local_size - 1) : w.rank % w.local_size;
        return w;
    }
    return w;
}
inline World world_from_env() {
    return world_from_env([](const char* name) { return (const char*)getenv(name); });
}

enum NcclInit { NCCL_INIT_TCP, NCCL_INIT_FILE, NCCL_INIT_MPI };
inline NcclInit parse_nccl_init(const std::string& s) {
    if (s == "tcp") return NCCL_INIT_TCP;
    if (s == "file") return NCCL_INIT_FILE;
    if (s == "mpi") return NCCL_INIT_MPI;
    FAIL("--nccl-init must be tcp, file or mpi, found \"%s\"", s.c_str());
}

// A name for this launch that every rank shares and the next launch does not ("" if the
// launcher sets none): torchrun's run id, Slurm's job and step, Open MPI's job.
inline std::string launch_job_id() {
    auto get = [](const char* n) { const char* v = getenv(n); return std::string(v ? v : ""); };
    std::string id = get("TORCHELASTIC_RUN_ID");
    if (id.empty() && !get("SLURM_JOB_ID").empty()) id = get("SLURM_JOB_ID") + "." + get("SLURM_STEP_ID");
    if (id.empty()) id = get("OMPI_MCA_ess_base_jobid");
    if (id.empty()) id = get("PMIX_NAMESPACE");
    std::string safe;
    for (char c : id) safe += isalnum((unsigned char)c) || c == '.' || c == '-' ? c : '_';
    return safe;
}

namespace world_detail {
static const uint32_t MAGIC = 0x4d4f4549;  // "IEOM": a train_moe_gpu rank, not some other service
struct Hello { uint32_t magic, world, rank, bytes; };

inline int env_port() {
    const char* p = getenv("MASTER_PORT");
    int base = p ? (int)parse_int_strict(p, 1, 65534, "environment variable MASTER_PORT") : 29500;
    return base + 1;
}
inline std::string env_addr(const World& w) {
    const char* a = getenv("MASTER_ADDR");
    if (a && *a) return a;
    if (w.one_node()) return "127.0.0.1";
    FAIL("the %d ranks span several nodes (%d per node) but MASTER_ADDR is not set: export MASTER_ADDR=<rank 0's "
         "host> (and MASTER_PORT), or use --nccl-init file with a shared --nccl-init-file", w.size, w.local_size);
}
// waits until fd is readable (events POLLIN) or writable; false on timeout
inline bool wait_fd(int fd, short events, double deadline) {
    for (;;) {
        double left = deadline - now_seconds();
        if (left <= 0) return false;
        pollfd p = {fd, events, 0};
        int r = poll(&p, 1, (int)std::min(left * 1000 + 1, 1000.0));
        if (r > 0) return true;
        if (r < 0 && errno != EINTR) return false;
    }
}
inline bool send_all(int fd, const void* buf, size_t n, double deadline) {
    const char* p = (const char*)buf;
    while (n > 0) {
        if (!wait_fd(fd, POLLOUT, deadline)) return false;
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k <= 0) { if (k < 0 && errno == EINTR) continue; return false; }
        p += k; n -= (size_t)k;
    }
    return true;
}
inline bool recv_all(int fd, void* buf, size_t n, double deadline) {
    char* p = (char*)buf;
    while (n > 0) {
        if (!wait_fd(fd, POLLIN, deadline)) return false;
        ssize_t k = recv(fd, p, n, 0);
        if (k <= 0) { if (k < 0 && errno == EINTR) continue; return false; }
        p += k; n -= (size_t)k;
    }
    return true;
}

// rank 0: accept size - 1 ranks, check who they are, send each the id
inline void tcp_serve(const World& w, const void* id, size_t n, double timeout) {
    const int port = env_port();
    int s = socket(AF_INET6, SOCK_STREAM, 0);
    bool v6 = s >= 0;
    if (!v6) s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) FAIL("rank 0: cannot make a socket: %s", strerror(errno));
    int one = 1, zero = 0;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    int rc;
    if (v6) {
        setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));  // IPv4 clients too
        sockaddr_in6 a = {};
        a.sin6_family = AF_INET6; a.sin6_addr = in6addr_any; a.sin6_port = htons((uint16_t)port);
        rc = bind(s, (sockaddr*)&a, sizeof(a));
    } else {
        sockaddr_in a = {};
        a.sin_family = AF_INET; a.sin_addr.s_addr = htonl(INADDR_ANY); a.sin_port = htons((uint16_t)port);
        rc = bind(s, (sockaddr*)&a, sizeof(a));
    }
    if (rc != 0 || listen(s, 1024) != 0) {
        int e = errno;
        close(s);
        FAIL("rank 0: cannot listen on TCP port %d (MASTER_PORT + 1) for the other ranks: %s; choose another "
             "MASTER_PORT", port, strerror(e));
    }
    const double deadline = now_seconds() + timeout;
    std::vector<bool> seen(w.size, false);
    seen[0] = true;
    int joined = 1;
    while (joined < w.size) {
        if (!wait_fd(s, POLLIN, deadline)) {
            std::string missing;
            for (int r = 0; r < w.size; r++) if (!seen[r]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
            close(s);
            FAIL("waited %.0f s (--nccl-timeout) on port %d for the other ranks; %d of %d joined, missing rank(s) %s. "
                 "Were all %d processes started (the world size comes from %s), and can they reach this host?",
                 timeout, port, joined, w.size, missing.c_str(), w.size, w.launcher.c_str());
        }
        int c = accept(s, nullptr, nullptr);
        if (c < 0) continue;
        Hello h = {};
        bool ok = recv_all(c, &h, sizeof(h), std::min(deadline, now_seconds() + 10));
        if (!ok || h.magic != MAGIC) { close(c); continue; }  // not one of ours: ignore it
        if (h.world != (uint32_t)w.size || h.rank == 0 || h.rank >= (uint32_t)w.size || seen[h.rank] || h.bytes != n) {
            close(c);
            close(s);
            FAIL("a process that says it is rank %u of %u joined on port %d (this run has %d ranks); two launches "
                 "share this MASTER_ADDR:MASTER_PORT, or the ranks disagree on the world size", h.rank, h.world, port,
                 w.size);
        }
        if (!send_all(c, id, n, deadline)) { close(c); continue; }  // it will retry
        close(c);
        seen[h.rank] = true;
        joined++;
    }
    close(s);
}

// ranks 1..: connect to rank 0 (retrying until it listens), say who we are, read the id
inline void tcp_fetch(const World& w, void* id, size_t n, double timeout) {
    const std::string host = env_addr(w);
    const int port = env_port();
    const double deadline = now_seconds() + timeout;
    std::string last = "no answer";
    while (now_seconds() < deadline) {
        addrinfo hints = {}, *res = nullptr;
        hints.ai_socktype = SOCK_STREAM;
        int g = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
        if (g != 0) {
            last = strfmt("cannot resolve MASTER_ADDR %s: %s", host.c_str(), gai_strerror(g));
            usleep(200000);
            continue;
        }
        for (addrinfo* a = res; a; a = a->ai_next) {
            int c = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
            if (c < 0) continue;
            if (connect(c, a->ai_addr, a->ai_addrlen) != 0) { last = strerror(errno); close(c); continue; }
            Hello h = {MAGIC, (uint32_t)w.size, (uint32_t)w.rank, (uint32_t)n};
            bool ok = send_all(c, &h, sizeof(h), deadline) && recv_all(c, id, n, deadline);
            close(c);
            if (ok) { freeaddrinfo(res); return; }
            last = "rank 0 closed the connection (it refused this rank: see its error)";
        }
        freeaddrinfo(res);
        usleep(100000);
    }
    FAIL("no NCCL id from rank 0 at %s:%d (MASTER_ADDR, MASTER_PORT + 1) within %.0f s (--nccl-timeout): %s. Is rank "
         "0 running, and is the port open?", host.c_str(), port, timeout, last.c_str());
}

// the id file: magic, world size, then the id
inline void file_write(const std::string& path, const World& w, const void* id, size_t n) {
    Hello h = {MAGIC, (uint32_t)w.size, 0, (uint32_t)n};
    AtomicFile f(path);
    f.write(&h, sizeof(h));
    f.write(id, n);
    f.commit();
}
inline void file_read(const std::string& path, const World& w, void* id, size_t n, double timeout, double started) {
    const double deadline = now_seconds() + timeout;
    std::string last = "it does not exist";
    while (now_seconds() < deadline) {
        struct stat st;
        // a file older than this launch (minus clock skew) is an earlier run's: wait for ours
        if (stat(path.c_str(), &st) == 0 && (double)st.st_mtime >= started - 120 && st.st_size == (off_t)(sizeof(Hello) + n)) {
            std::vector<uint8_t> b = read_file(path);
            Hello h;
            memcpy(&h, b.data(), sizeof(h));
            if (h.magic == MAGIC && h.world == (uint32_t)w.size && h.bytes == n) {
                memcpy(id, b.data() + sizeof(h), n);
                return;
            }
            last = strfmt("it holds an id for %u ranks, not %d", h.world, w.size);
        } else if (path_exists(path)) {
            last = "it is older than this launch (an earlier run's?)";
        }
        usleep(100000);
    }
    FAIL("waited %.0f s (--nccl-timeout) for the NCCL id file %s from rank 0: %s. Is the file system shared by "
         "every node, and is rank 0 running?", timeout, path.c_str(), last.c_str());
}
}  // namespace world_detail

// The id file of --nccl-init file: `path`, with the launch's job id appended when it has one
inline std::string unique_id_file(const std::string& path) {
    std::string job = launch_job_id();
    return job.empty() ? path : path + "." + job;
}

// Rank 0 passes the id it made; every other rank receives it into `id` (n bytes).
inline void share_unique_id(const World& w, NcclInit how, const std::string& file, void* id, size_t n,
                            double timeout, double started) {
    if (!w.multi()) return;
    switch (how) {
        case NCCL_INIT_TCP:
            if (w.root()) world_detail::tcp_serve(w, id, n, timeout);
            else world_detail::tcp_fetch(w, id, n, timeout);
            return;
        case NCCL_INIT_FILE: {
            if (file.empty()) FAIL("--nccl-init file needs --nccl-init-file PATH on a file system every node shares");
            const std::string path = unique_id_file(file);
            if (w.root()) world_detail::file_write(path, w, id, n);
            else world_detail::file_read(path, w, id, n, timeout, started);
            return;
        }
        case NCCL_INIT_MPI:
#ifdef USE_MPI
            {
                int inited = 0;
                MPI_Initialized(&inited);
                if (!inited) MPI_Init(nullptr, nullptr);
                int r = -1, s = 0;
                MPI_Comm_rank(MPI_COMM_WORLD, &r);
                MPI_Comm_size(MPI_COMM_WORLD, &s);
                if (r != w.rank || s != w.size)
                    FAIL("--nccl-init mpi: MPI says rank %d of %d, the launcher's variables (%s) say %d of %d", r, s,
                         w.launcher.c_str(), w.rank, w.size);
                MPI_Bcast(id, (int)n, MPI_BYTE, 0, MPI_COMM_WORLD);
            }
            return;
#else
            FAIL("--nccl-init mpi: this train_moe_gpu was built without MPI (rebuild with make USE_MPI=1, which needs "
                 "mpicxx); mpirun's variables work with the default --nccl-init tcp (set MASTER_ADDR for several nodes)");
#endif
    }
}
// at the end of a run that used --nccl-init mpi
inline void mpi_finalize_if_started() {
#ifdef USE_MPI
    int started = 0, finished = 0;
    MPI_Initialized(&started);
    MPI_Finalized(&finished);
    if (started && !finished) MPI_Finalize();
#endif
}
// after every rank joined the communicator: rank 0 removes the id file (--nccl-init file)
inline void remove_unique_id_file(const World& w, NcclInit how, const std::string& file) {
    if (w.multi() && w.root() && how == NCCL_INIT_FILE) unlink(unique_id_file(file).c_str());
}
