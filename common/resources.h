// resources.h: what a run will need (memory, disk) against what the machine has, checked
// before anything is allocated or written, so that a run that cannot fit stops at once with
// the numbers instead of ending in an allocation failure (or the kernel's OOM killer) later.
//
// defines: format_bytes, host_memory_available, disk_free_bytes, MemoryPlan,
//          train_memory_plan, check_memory_plan, remove_stale_temporaries
#pragma once
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <string>
#include <vector>
#include <sys/statvfs.h>
#include "model.h"         // defines: ModelConfig, count_params
#include "util.h"          // defines: FAIL, strfmt, list_dir, remove_tree

inline std::string format_bytes(double b) {
    if (b >= 1e12) return strfmt("%.2f TB", b / 1e12);
    if (b >= 1e9) return strfmt("%.2f GB", b / 1e9);
    if (b >= 1e6) return strfmt("%.1f MB", b / 1e6);
    return strfmt("%.0f kB", b / 1e3);
}

// Host memory this process can still take: MemAvailable, lowered by a cgroup (container)
// limit when there is one. 0 when unknown (then no check is made).
inline double host_memory_available() {
    double avail = 0;
    if (FILE* f = fopen("/proc/meminfo", "r")) {
        char key[64];
        double kb;
        while (fscanf(f, "%63s %lf kB", key, &kb) == 2)
            if (std::string(key) == "MemAvailable:") { avail = kb * 1024; break; }
        fclose(f);
    }
    double limit = 0, used = 0;
    if (FILE* f = fopen("/sys/fs/cgroup/memory.max", "r")) {  // "max" = no limit: fscanf fails
        if (fscanf(f, "%lf", &limit) != 1) limit = 0;
        fclose(f);
    }
    if (FILE* f = fopen("/sys/fs/cgroup/memory.current", "r")) {
        if (fscanf(f, "%lf", &used) != 1) used = 0;
        fclose(f);
    }
    if (limit > 0 && (avail == 0 || limit - used < avail)) avail = std::max(0.0, limit - used);
    return avail;
}

// Free bytes on the file system that holds `path` (or its nearest existing parent); -1 if unknown.
inline double disk_free_bytes(const std::string& path) {
    std::string p = path.empty() ? "." : path;
    while (!path_exists(p)) {
        size_t slash = p.rfind('/');
        if (slash == std::string::npos) { p = "."; break; }
        p = slash == 0 ? "/" : p.substr(0, slash);
    }
    struct statvfs s;
    if (statvfs(p.c_str(), &s) != 0) return -1;
    return (double)s.f_bavail * (double)s.f_frsize;
}

// The memory a training run needs, by part. An estimate from the shapes (the trainers'
// allocations follow the same counts), with a margin for what is not counted.
struct MemoryPlan {
    double weights = 0, optimizer = 0, activations = 0, checkpoint = 0;
    double total() const { return (weights + optimizer + activations) * 1.05; }
    std::string str() const {
        return strfmt("weights + gradients %s, AdamW %s, activations %s: about %s", format_bytes(weights).c_str(),
                      format_bytes(optimizer).c_str(), format_bytes(activations).c_str(), format_bytes(total()).c_str());
    }
};

// `state_bytes`: bytes per parameter of weights + gradients (CPU fp32: 8; GPU bf16: 4 fp32
// master + 4 fp32 gradient + 2 bf16 copy); AdamW's two fp32 moments are 8 more. `act_bytes`:
// bytes per activation value. Activations are those kept for the backward pass
// ([B, T] rows of every layer, the attention matrix [B, H, T, T] where a trainer stores it,
// the logits [B, T, V]) plus one layer's backward scratch. `ffn_kept`: values per FFN row and
// unit kept (the GPU: gate, up, h; the CPU also sigmoid(gate)).
inline MemoryPlan train_memory_plan(const ModelConfig& c, int B, int T, double state_bytes, double act_bytes,
                                    bool stores_attention_matrix, double optimizer_bytes = 8, double ffn_kept = 3) {
    MemoryPlan p;
    const double P = (double)count_params(c), N = (double)B * T, d = c.d_model, F = c.ffn_dim;
    const double E = c.n_experts, K = c.top_k, V = c.vocab_size;
    p.weights = P * state_bytes;
    p.optimizer = P * optimizer_bytes;  // the two AdamW moments (sharded: 8 / ranks)
    double attn = stores_attention_matrix ? (double)B * c.n_head * T * T : 0;
    double ffn = c.is_moe() ? N * (4 * E + 4 * K + K * (2 * d + ffn_kept * F)) : N * ffn_kept * F;
    ffn += c.has_shared() ? N * (ffn_kept * c.shared_dim + d + 1) : 0;  // the shared expert: its FFN, output, gate
    if (c.has_grove())  // Grove: G adjugate rows per token (the GPU runs each over every token; the CPU at
        ffn += N * (c.grove_groups * (2 * d + ffn_kept * c.grove_dim + 2) + K);  // most min(K, G)), slot map
    double per_layer = N * (6 * d + 2 * c.q_dim() + 2 * c.kv_dim() + 3) + attn + ffn;
    double scratch = per_layer + N * V;  // one layer's gradients of activations, dlogits
    p.activations = (c.n_layer * per_layer + N * (2 * d + V + 4) + scratch) * act_bytes;
    p.checkpoint = P * 12 + 1e5;  // model.safetensors fp32 + the two AdamW moments
    return p;
}

// Refuses a run whose estimate exceeds what `where` has free (`available` <= 0: unknown, no check).
inline void check_memory_plan(const MemoryPlan& p, double available, const std::string& where,
                              const std::string& what) {
    if (available <= 0 || p.total() <= available) return;
    FAIL("%s needs more memory than %s has free: %s, but %s is free; use a smaller --batch / --seq "
         "(or gradient accumulation: --grad-accum) or a smaller model",
         what.c_str(), where.c_str(), p.str().c_str(), format_bytes(available).c_str());
}

// A run killed mid-write (SIGKILL, power loss) leaves "<name>.tmp.<pid>" / "<name>.old.<pid>"
// behind (util.h's AtomicFile/AtomicDir). Removes those in `dir` whose process no longer
// exists, so repeated crashes do not fill the disk. Returns how many were removed.
inline int remove_stale_temporaries(const std::string& dir) {
    if (!is_dir(dir)) return 0;
    int n = 0;
    for (const std::string& name : list_dir(dir)) {
        size_t at = name.rfind(".tmp.");
        if (at == std::string::npos) at = name.rfind(".old.");
        if (at == std::string::npos) continue;
        const std::string pid_str = name.substr(at + 5);
        if (pid_str.empty() || pid_str.find_first_not_of("0123456789") != std::string::npos) continue;
        long pid = atol(pid_str.c_str());
        if (pid <= 0 || pid == (long)getpid()) continue;
        if (kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue;  // that process still runs
        const std::string path = path_join(dir, name), base = path_join(dir, name.substr(0, at));
        // killed inside AtomicDir::commit, between its two renames: the ".old" copy is the
        // only one left of that directory, so it goes back to its name
        if (name.compare(at, 5, ".old.") == 0 && !path_exists(base)) {
            if (rename(path.c_str(), base.c_str()) != 0)
                FAIL("%s: cannot restore it as %s: %s", path.c_str(), base.c_str(), strerror(errno));
        } else {
            remove_tree(path);
        }
        n++;
    }
    return n;
}
