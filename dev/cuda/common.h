/*
dev/cuda/common.h: the test bench shared by every kernel file in dev/cuda/.

What it gives a kernel file:
  - cudaCheck / cublasCheck / launchCheck: every CUDA and cuBLAS call checked, failing
    loudly with file:line (exit code 0 proves nothing, so nothing is ignored).
  - Rng + rand_floats / rand_ints: fresh random inputs from a seed. Never zeros: zeros hide
    unwritten outputs and wrong indexing, and can even run faster than real data.
  - Dev<T>: a device buffer that knows its length, with upload / download / poison.
    poison() fills every byte with 0xFF: NaN for fp32 and bf16, -1 for int, so an output
    element the kernel forgot to write shows up as NaN (or -1) in the comparison.
  - check_close / check_equal: compare against the CPU reference by
        rel  = ||out - ref|| / ||ref||               (must be <= tol.rel)
        worst = max_i |out_i - ref_i| / (atol + rtol |ref_i|)   (must be <= 1)
    plus "no NaN, no Inf anywhere", each counted as one check.
  - check_scaled: for outputs made of cancelling terms (router-loss gradients), against a
    double reference, with the error measured relative to the magnitude of the terms that
    make up each element (mag) instead of |ref|; see compare_scaled.
  - check_catches: the self-test of a redesigned check: its comparison applied to a
    deliberately corrupted copy of the kernel output (a planted bug) must fail.
  - bench_ms: device-event timing; warm-up, many repeats, median, and the L2 cache flushed
    before every repeat by writing a buffer twice the L2 size (otherwise repeated runs over
    the same inputs measure the cache, not memory).
  - Suite: counts checks per version, collects timings and prints the table, ending with
    "N passed, M failed"; finish() returns the process exit code (non-zero on any failure).

Under emulation (CUDA_EMU, defined by dev/emu/cuda_emu.h when `make build/emu/dev_cuda/NAME`
builds a file with g++ to run on the CPU):
  - EMULATED is true (a constexpr bool, false under nvcc). It is the one switch a kernel file
    uses to cap its problem sizes, e.g.
        const Size sizes[] = {{7, 33}, {64, 256}, {EMULATED ? 256 : 1024, 768}, ...};
        if (EMULATED && c.bench_only) continue;
    so that a whole file runs in seconds on the CPU, while on a GPU the sizes are unchanged.
    Edge cases (odd sizes, empty experts, the largest head dims) stay in: only the number of
    rows and cases that exist only to be timed shrink.
  - bench / bench_ms time nothing (the emulator's clock measures the CPU, not a GPU): each
    prints "time <what>  skipped under emulation", runs nothing, records no timing, and the
    timing table is not printed.

The CPU references are the free functions of train_moe.cpp, included as a library by each
kernel file (#define TRAIN_MOE_NO_MAIN), so the GPU is held to the same code the CPU trainer
and its tests run.
*/
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// ----------------------------------------------------------------------------
// Error checks

inline void cuda_check_impl(cudaError_t e, const char* what, const char* file, int line) {
    if (e != cudaSuccess) {
        fprintf(stderr, "[CUDA ERROR] %s:%d: %s\n  in: %s\n", file, line, cudaGetErrorString(e), what);
        exit(EXIT_FAILURE);
    }
}
#define cudaCheck(call) cuda_check_impl((call), #call, __FILE__, __LINE__)
// after every launch: catches bad launch configurations at once, and (with the sync that
// every check path does) faults inside the kernel
#define launchCheck() cuda_check_impl(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

inline void cublas_check_impl(cublasStatus_t s, const char* what, const char* file, int line) {
    if (s != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "[cuBLAS ERROR] %s:%d: status %d\n  in: %s\n", file, line, (int)s, what);
        exit(EXIT_FAILURE);
    }
}
#define cublasCheck(call) cublas_check_impl((call), #call, __FILE__, __LINE__)

// true when this file runs on the CPU through dev/emu/cuda_emu.h: cap the sizes with it
#ifdef CUDA_EMU
constexpr bool EMULATED = true;
#else
constexpr bool EMULATED = false;
#endif

inline int ceil_div(long a, long b) { return (int)((a + b - 1) / b); }

// ----------------------------------------------------------------------------
// Random inputs (host side, reproducible from a seed; splitmix64)

struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 0x1234567ull) {}
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    float uniform() { return (next() >> 40) * (1.0f / 16777216.0f); }  // [0, 1)
    float uniform(float lo, float hi) { return lo + (hi - lo) * uniform(); }
    int below(int n) { return (int)(next() % (uint64_t)n); }
};

inline std::vector<float> rand_floats(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
    Rng r(seed);
    std::vector<float> v(n);
    for (auto& x : v) x = r.uniform(lo, hi);
    return v;
}
inline std::vector<int> rand_ints(size_t n, int hi, uint64_t seed) {  // uniform in [0, hi)
    Rng r(seed);
    std::vector<int> v(n);
    for (auto& x : v) x = r.below(hi);
    return v;
}

// ----------------------------------------------------------------------------
// Device buffers

template <class T>
struct Dev {
    T* p = nullptr;
    size_t n = 0;
    Dev() = default;
    explicit Dev(size_t n_) : n(n_) { cudaCheck(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T))); }
    explicit Dev(const std::vector<T>& h) : Dev(h.size()) { upload(h); }
    Dev(const Dev&) = delete;
    Dev& operator=(const Dev&) = delete;
    Dev(Dev&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr; o.n = 0; }
    Dev& operator=(Dev&& o) noexcept {
        std::swap(p, o.p);
        std::swap(n, o.n);
        return *this;
    }
    ~Dev() {
        if (p) cudaFree(p);
    }
    void upload(const std::vector<T>& h) {
        if (h.size() != n) { fprintf(stderr, "Dev::upload: size %zu != %zu\n", h.size(), n); exit(EXIT_FAILURE); }
        cudaCheck(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
    }
    std::vector<T> host() const {
        std::vector<T> h(n);
        cudaCheck(cudaDeviceSynchronize());  // surfaces asynchronous kernel faults here, with a line
        cudaCheck(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
        return h;
    }
    // all bits set: NaN for fp32/bf16, -1 for int; an element left unwritten fails the check
    void poison() { cudaCheck(cudaMemset(p, 0xFF, n * sizeof(T))); }
};

inline std::vector<__nv_bfloat16> to_bf16(const std::vector<float>& v) {
    std::vector<__nv_bfloat16> o(v.size());
    for (size_t i = 0; i < v.size(); i++) o[i] = __float2bfloat16(v[i]);
    return o;
}
inline std::vector<float> from_bf16(const std::vector<__nv_bfloat16>& v) {
    std::vector<float> o(v.size());
    for (size_t i = 0; i < v.size(); i++) o[i] = __bfloat162float(v[i]);
    return o;
}
// round a float vector through bf16 (so the CPU reference sees the same inputs the bf16 kernel sees)
inline std::vector<float> round_bf16(const std::vector<float>& v) { return from_bf16(to_bf16(v)); }
// a test vector as the element type T of the version under test (float or bf16), and back
template <typename T>
std::vector<T> to_t(const std::vector<float>& v) {
    if constexpr (sizeof(T) == 2) return to_bf16(v); else return v;
}
template <typename T>
std::vector<float> host_f(const Dev<T>& d) {
    if constexpr (sizeof(T) == 2) return from_bf16(d.host()); else return d.host();
}

// ----------------------------------------------------------------------------
// Tolerances. fp32 kernels differ from the fp32 CPU loops only in summation order: their
// relative error sits near 1e-7..1e-6, so 1e-5 catches any real bug with margin. bf16 keeps
// 8 bits of mantissa (relative rounding 2^-9 = 2e-3 per value), so 1e-2.
struct Tol {
    double rel;   // bound on ||out - ref|| / ||ref||
    double atol;  // elementwise: |out - ref| <= atol + rtol |ref|
    double rtol;
};
constexpr Tol TOL_FP32 = {1e-5, 1e-5, 1e-4};
constexpr Tol TOL_BF16 = {1e-2, 1e-2, 2e-2};
// For long sums of terms of both signs (column sums over thousands of rows, d-long dot
// products): their rounding grows with the partial sums, which are of the size of a
// TYPICAL element (a random walk) even in an element that happens to end near 0, so a flat
// atol fails a correct sum on such elements whenever the two sides add in different orders.
// Here atol is relative to the tensor's scale: t.atol x rms(ref) (never below t.atol). Use
// it with a reference accumulated in double, so that the bound measures the kernel alone.
inline Tol sum_tol(const std::vector<float>& ref, Tol t = TOL_FP32) {
    double ss = 0;
    for (float v : ref) ss += (double)v * v;
    t.atol *= std::max(1.0, std::sqrt(ss / std::max<size_t>(ref.size(), 1)));
    return t;
}

// ----------------------------------------------------------------------------
// The suite: checks, timings, the summary

struct Suite {
    struct Row {  // one per version: its checks
        std::string version;
        int passed = 0, failed = 0;
    };
    struct Timing {  // one per bench() call
        std::string version, what;
        double ms = -1, bytes = 0, flops = 0;
    };
    std::string family;
    std::vector<Row> rows;
    std::vector<Timing> timings;
    int only = -1;  // run only this version (command-line argument), -1 = all
    bool verbose = true;
    double flush_bytes = 0;
    void* flush_buf = nullptr;
    cudaEvent_t ev0{}, ev1{};

    Suite(const char* fam, int argc, char** argv) : family(fam) {
        if (argc > 1) only = atoi(argv[1]);
        int ndev = 0;
        cudaError_t e = cudaGetDeviceCount(&ndev);
        if (e != cudaSuccess || ndev == 0) {
            printf("%s: no CUDA device (%s)\n0 passed, 1 failed\n", fam, cudaGetErrorString(e));
            exit(2);
        }
        cudaDeviceProp prop;
        cudaCheck(cudaGetDeviceProperties(&prop, 0));
        printf("== dev/cuda/%s on %s (sm_%d%d, %d SMs, L2 %d MB)%s\n", fam, prop.name, prop.major, prop.minor,
               prop.multiProcessorCount, prop.l2CacheSize >> 20,
               only >= 0 ? (" [version " + std::to_string(only) + " only]").c_str() : "");
        if (EMULATED) {
            printf("   (emulated on the CPU: sizes capped, benchmarks skipped)\n");
            return;  // no timing: no flush buffer, no events
        }
        flush_bytes = 2.0 * prop.l2CacheSize;
        cudaCheck(cudaMalloc(&flush_buf, (size_t)flush_bytes));
        cudaCheck(cudaEventCreate(&ev0));
        cudaCheck(cudaEventCreate(&ev1));
    }
    bool want(int v) const { return only < 0 || only == v; }

    // start a version's row; checks and timings go to the last row begun
    // (a file that loops over cases outside versions calls begin() again: the row is reused)
    void begin(int v, const char* name) {
        std::string label = std::to_string(v) + " " + name;
        printf("-- version %d: %s\n", v, name);
        for (size_t i = 0; i < rows.size(); i++)
            if (rows[i].version == label) { cur_row = (int)i; return; }
        rows.push_back(Row());
        rows.back().version = label;
        cur_row = (int)rows.size() - 1;
    }
    int cur_row = -1;
    Row& cur() {
        if (cur_row < 0) begin(0, "(none)");
        return rows[cur_row];
    }
    void record(bool ok) { ok ? cur().passed++ : cur().failed++; }

    // One comparison's numbers, not yet recorded (check_* print and record them)
    struct Cmp {
        double rel = 0;     // normwise error, as a fraction of what the check divides by
        double worst = 0;   // largest elementwise error, as a fraction of its bound (<= 1 passes)
        size_t worst_i = 0, nonfinite = 0;
        bool size_ok = true, ok = false;
        double tol_rel = 0;
        // the error as a multiple of what the check allows: <= 1 passes
        double ratio() const { return nonfinite || !size_ok ? INFINITY : std::max(rel / tol_rel, worst); }
    };
    // ||out-ref||/||ref|| and the elementwise bound; NaN (unwritten, poisoned) never passes
    static Cmp compare_close(const std::vector<float>& out, const std::vector<float>& ref, Tol tol) {
        Cmp c;
        c.tol_rel = tol.rel;
        if (out.size() != ref.size()) { c.size_ok = false; return c; }
        double num = 0, den = 0;
        for (size_t i = 0; i < out.size(); i++) {
            double o = out[i], r = ref[i];
            if (!std::isfinite(o)) { if (c.nonfinite++ == 0) c.worst_i = i; continue; }
            num += (o - r) * (o - r);
            den += r * r;
            double q = std::fabs(o - r) / (tol.atol + tol.rtol * std::fabs(r));
            if (q > c.worst && !c.nonfinite) { c.worst = q; c.worst_i = i; }
        }
        c.rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
        c.ok = c.nonfinite == 0 && c.rel <= tol.rel && c.worst <= 1.0;
        return c;
    }
    // For outputs whose elements are differences of much larger terms (cancellation), where
    // a bound relative to |ref| (or to max |ref|) fails at random on a correct kernel. `mag`:
    // per element, the sum of the magnitudes of the terms it is made of (so |ref_j| <= mag_j);
    // `ref` computed in double. A correct fp32 kernel is off by a few ulps of the TERMS:
    //     rel   = ||out - ref|| / ||mag||                        <= tol.rel
    //     worst = max_j |out_j - ref_j| / (tol.atol mag_j + tol.rtol |ref_j|) <= 1
    static Cmp compare_scaled(const std::vector<float>& out, const std::vector<double>& ref,
                              const std::vector<double>& mag, Tol tol) {
        Cmp c;
        c.tol_rel = tol.rel;
        if (out.size() != ref.size() || mag.size() != ref.size()) { c.size_ok = false; return c; }
        double num = 0, den = 0;
        for (size_t i = 0; i < out.size(); i++) {
            double o = out[i], r = ref[i];
            if (!std::isfinite(o)) { if (c.nonfinite++ == 0) c.worst_i = i; continue; }
            num += (o - r) * (o - r);
            den += mag[i] * mag[i];
            double q = std::fabs(o - r) / (tol.atol * mag[i] + tol.rtol * std::fabs(r) + 1e-300);
            if (q > c.worst && !c.nonfinite) { c.worst = q; c.worst_i = i; }
        }
        c.rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
        c.ok = c.nonfinite == 0 && c.rel <= tol.rel && c.worst <= 1.0;
        return c;
    }
    void print_cmp(const char* what, const Cmp& c, size_t n, double out_w, double ref_w, const char* rel_name) {
        if (!c.size_ok)
            printf("   FAIL %-28s size %zu != reference\n", what, n);
        else if (c.nonfinite)
            printf("   FAIL %-28s %zu of %zu elements NaN/Inf (unwritten?), first at %zu\n", what, c.nonfinite, n,
                   c.worst_i);
        else
            printf("   %s %-28s n=%-10zu %s %.2e (tol %.0e)  worst %.3f of bound at %zu (out %.6g ref %.6g)\n",
                   c.ok ? "ok  " : "FAIL", what, n, rel_name, c.rel, c.tol_rel, c.worst, c.worst_i, out_w, ref_w);
    }
    template <class R>
    static double at(const std::vector<R>& v, size_t i) { return i < v.size() ? (double)v[i] : 0.0; }

    bool check_close(const char* what, const std::vector<float>& out, const std::vector<float>& ref, Tol tol) {
        Cmp c = compare_close(out, ref, tol);
        if (verbose || !c.ok) print_cmp(what, c, out.size(), at(out, c.worst_i), at(ref, c.worst_i), "rel");
        record(c.ok);
        return c.ok;
    }
    // compare_scaled, printed and recorded; the line adds kappa = ||mag|| / ||ref||: the
    // check catches any error larger than tol.rel * kappa of ||ref||
    bool check_scaled(const char* what, const std::vector<float>& out, const std::vector<double>& ref,
                      const std::vector<double>& mag, Tol tol) {
        Cmp c = compare_scaled(out, ref, mag, tol);
        print_cmp(what, c, out.size(), at(out, c.worst_i), at(ref, c.worst_i), "err/|mag|");
        double nr = 0, nm = 0;
        for (size_t i = 0; i < ref.size() && i < mag.size(); i++) { nr += ref[i] * ref[i]; nm += mag[i] * mag[i]; }
        printf("        (kappa ||mag||/||ref|| = %.3g: errors above %.1e of ||ref|| are caught)\n",
               nr > 0 ? std::sqrt(nm / nr) : INFINITY, nr > 0 ? tol.rel * std::sqrt(nm / nr) : INFINITY);
        record(c.ok);
        return c.ok;
    }
    // The test of a check: the same comparison, applied to a deliberately corrupted copy of
    // the kernel's output (a planted bug), must FAIL. Counted as one check, passed when the
    // comparison fails; the line gives the corrupted copy's error as a multiple of the bound
    // next to the real output's (`real`), so the margin on both sides is visible.
    bool check_catches(const char* bug, const Cmp& real, const Cmp& corrupted) {
        bool caught = !corrupted.ok;
        printf("   %s planted bug caught: %-40s error %.3g x bound (the real output: %.3g x bound)\n",
               caught ? "ok  " : "FAIL", bug, corrupted.ratio(), real.ratio());
        record(caught);
        return caught;
    }
    template <class T>
    bool check_equal(const char* what, const std::vector<T>& out, const std::vector<T>& ref) {
        size_t bad = 0, first = 0;
        if (out.size() != ref.size()) bad = 1;
        else
            for (size_t i = 0; i < out.size(); i++)
                if (!(out[i] == ref[i])) { if (bad++ == 0) first = i; }
        bool ok = bad == 0;
        if (ok) printf("   ok   %-28s n=%-10zu exact\n", what, out.size());
        else if (out.size() != ref.size()) printf("   FAIL %-28s size %zu != %zu\n", what, out.size(), ref.size());
        else printf("   FAIL %-28s %zu of %zu differ, first at %zu (out %g ref %g)\n", what, bad, out.size(), first,
                    (double)out[first], (double)ref[first]);
        record(ok);
        return ok;
    }
    // a condition that is neither closeness nor equality (e.g. "gradient is non-zero")
    bool check_true(const char* what, bool ok, const char* detail = "") {
        printf("   %s %-28s %s\n", ok ? "ok  " : "FAIL", what, detail);
        record(ok);
        return ok;
    }

    // median device time of f() in ms; the L2 flush runs between the events' windows.
    // Under emulation: runs nothing and returns NaN (a CPU time is no GPU time)
    template <class F>
    double bench_ms(F&& f, int warmup = 5, int reps = 50) {
        if (EMULATED) {
            printf("   time skipped under emulation\n");
            return NAN;
        }
        for (int i = 0; i < warmup; i++) f();
        cudaCheck(cudaDeviceSynchronize());
        launchCheck();
        std::vector<float> t(reps);
        for (int i = 0; i < reps; i++) {
            cudaCheck(cudaMemsetAsync(flush_buf, i & 0xFF, (size_t)flush_bytes));
            cudaCheck(cudaEventRecord(ev0));
            f();
            cudaCheck(cudaEventRecord(ev1));
            cudaCheck(cudaEventSynchronize(ev1));
            cudaCheck(cudaEventElapsedTime(&t[i], ev0, ev1));
        }
        launchCheck();
        std::sort(t.begin(), t.end());
        return t[reps / 2];
    }
    // time f and store it in the current row; bytes/flops: the minimum traffic and work, for
    // achieved GB/s and TFLOP/s (compare with the measured copy / GEMM ceilings)
    template <class F>
    double bench(const char* what, F&& f, double bytes, double flops = 0) {
        if (EMULATED) {  // nothing timed, nothing recorded
            printf("   time %-28s skipped under emulation\n", what);
            return NAN;
        }
        double ms = bench_ms(f);
        timings.push_back(Timing{cur().version, what, ms, bytes, flops});
        printf("   time %-28s %.4f ms", what, ms);
        if (bytes > 0) printf("  %.0f GB/s", bytes / ms / 1e6);
        if (flops > 0) printf("  %.1f TFLOP/s", flops / ms / 1e9);
        printf("\n");
        return ms;
    }

    int finish() {
        int P = 0, F = 0;
        printf("\n%s checks\n%-40s %7s %7s\n", family.c_str(), "version", "passed", "failed");
        for (auto& r : rows) {
            P += r.passed;
            F += r.failed;
            printf("%-40s %7d %7d%s\n", r.version.c_str(), r.passed, r.failed, r.failed ? "   <-- FAILED" : "");
        }
        if (!timings.empty())
            printf("\n%s timings (median, L2 flushed)\n%-40s %-26s %10s %8s %8s\n", family.c_str(), "version", "what",
                   "ms", "GB/s", "TFLOP/s");
        for (auto& t : timings) {
            printf("%-40s %-26s %10.4f ", t.version.c_str(), t.what.c_str(), t.ms);
            if (t.ms > 0 && t.bytes > 0) printf("%8.0f ", t.bytes / t.ms / 1e6); else printf("%8s ", "-");
            if (t.ms > 0 && t.flops > 0) printf("%8.1f", t.flops / t.ms / 1e9); else printf("%8s", "-");
            printf("\n");
        }
        if (rows.empty()) {
            printf("no version selected (argument %d)\n", only);
            F++;
        }
        printf("%s: %d passed, %d failed\n", family.c_str(), P, F);
        printf("%d passed, %d failed\n", P, F);
        fflush(stdout);
        return F ? 1 : 0;
    }
};
