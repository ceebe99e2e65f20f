// testing.h: a minimal test harness. Each check prints a line only when it fails (with
// the values involved); report() prints "N passed, M failed" and the process exits 1 on
// any failure, so `make test` cannot pass over a broken check.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <sys/wait.h>
#include "../common/util.h"

static int g_pass = 0, g_fail = 0;
static std::string g_test = "";

inline void check(bool ok, const std::string& what) {
    if (ok) g_pass++;
    else { g_fail++; printf("  FAIL [%s] %s\n", g_test.c_str(), what.c_str()); }
}
#define CHECK(cond) check((cond), strfmt("%s (%s:%d)", #cond, __FILE__, __LINE__))
#define CHECK_MSG(cond, ...) check((cond), strfmt(__VA_ARGS__))

// Runs one named test; an exception counts as a failure with its message.
inline void run_test(const std::string& name, const std::function<void()>& fn) {
    g_test = name;
    int f0 = g_fail, p0 = g_pass;
    double t0 = now_seconds();
    try {
        fn();
    } catch (const std::exception& e) {
        g_fail++;
        printf("  FAIL [%s] unexpected exception: %s\n", name.c_str(), e.what());
    }
    printf("%-4s %s (%d checks, %.1fs)\n", g_fail == f0 ? "ok" : "FAIL", name.c_str(), g_pass - p0 + g_fail - f0,
           now_seconds() - t0);
    fflush(stdout);
}

// Checks that fn throws Error whose message contains `needle`.
inline void expect_error(const std::function<void()>& fn, const std::string& needle, const std::string& what) {
    try {
        fn();
        check(false, what + ": expected an error containing \"" + needle + "\", got none");
    } catch (const Error& e) {
        std::string m = e.what();
        check(m.find(needle) != std::string::npos, what + ": error \"" + m + "\" lacks \"" + needle + "\"");
    }
}

// max over i of |a - b| / (atol + rtol |b|) must be <= 1; returns that worst ratio.
template <typename A, typename B>
double worst_ratio(const A* a, const B* b, size_t n, double atol, double rtol, size_t* where = nullptr) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double r = std::fabs((double)a[i] - (double)b[i]) / (atol + rtol * std::fabs((double)b[i]));
        if (!(r <= worst)) { worst = r; if (where) *where = i; }  // NaN counts as worst
    }
    return worst;
}

inline int report() {
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}

// Runs a shell command with stderr merged into stdout; returns its exit code (-1 if it did
// not exit normally) and its output in *output.
inline int run_cmd(const std::string& cmd, std::string* output) {
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    if (!p) return -1;
    char buf[4096];
    output->clear();
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), p)) > 0) output->append(buf, n);
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

// A refused input's output: exactly one line, "error: ...", containing `needle`.
inline bool is_one_error_line(const std::string& out, const std::string& needle) {
    return std::count(out.begin(), out.end(), '\n') == 1 && out.rfind("error: ", 0) == 0 &&
           out.find(needle) != std::string::npos;
}
