// util.h: errors, file IO, atomic writes, directories, timing.
// Every program shares these so that every failure reads the same way:
// "error: <file>: <what was expected>, <what was found>" and a non-zero exit.
//
// defines: Error, FAIL, strfmt, parse_int_strict, parse_double_strict, file and directory helpers (path_join, read_text, AtomicFile,
//          AtomicDir, write_text_atomic, check_output_location, ...), now_seconds, format_duration,
//          bf16_to_f32
#pragma once
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

// All recoverable failures throw Error; each main() catches it, prints one line and
// exits 1. Tests catch it to check that bad inputs are refused with the right message.
struct Error : std::runtime_error {
    explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

inline std::string strfmt(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline std::string strfmt(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char buf[1024];
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n < (int)sizeof(buf)) return std::string(buf, n > 0 ? n : 0);
    std::string s(n + 1, '\0');
    va_start(ap, fmt);
    vsnprintf(&s[0], n + 1, fmt, ap);
    va_end(ap);
    s.resize(n);
    return s;
}

#define FAIL(...) throw Error(strfmt(__VA_ARGS__))

// Whole-string integer in [lo, hi]; `what` names the option or field for the message.
inline long long parse_int_strict(const std::string& s, long long lo, long long hi, const std::string& what) {
    if (s.empty() || isspace((unsigned char)s[0])) FAIL("%s expects an integer, found \"%s\"", what.c_str(), s.c_str());
    errno = 0;
    char* end = nullptr;
    long long v = strtoll(s.c_str(), &end, 10);
    if (*end) FAIL("%s expects an integer, found \"%s\"", what.c_str(), s.c_str());
    if (errno == ERANGE || v < lo || v > hi)
        FAIL("%s %s is out of range: expected an integer in [%lld, %lld]", what.c_str(), s.c_str(), lo, hi);
    return v;
}
// Whole-string finite number with |x| <= max_abs (FLT_MAX for float options).
inline double parse_double_strict(const std::string& s, double max_abs, const std::string& what) {
    if (s.empty() || isspace((unsigned char)s[0])) FAIL("%s expects a number, found \"%s\"", what.c_str(), s.c_str());
    errno = 0;
    char* end = nullptr;
    double v = strtod(s.c_str(), &end);
    if (*end) FAIL("%s expects a number, found \"%s\"", what.c_str(), s.c_str());
    if (!std::isfinite(v) || std::fabs(v) > max_abs)
        FAIL("%s %s is not a finite number%s", what.c_str(), s.c_str(), std::isfinite(v) ? " in this option's type" : "");
    return v;
}

inline bool path_exists(const std::string& p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0;
}
inline bool is_dir(const std::string& p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
inline std::string path_join(const std::string& a, const std::string& b) {
    if (a.empty()) return b;
    return a.back() == '/' ? a + b : a + "/" + b;
}

inline std::vector<uint8_t> read_file(const std::string& path) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) FAIL("%s: cannot open for reading: %s", path.c_str(), strerror(errno));
    std::vector<uint8_t> buf;
    uint8_t chunk[1 << 16];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0) buf.insert(buf.end(), chunk, chunk + n);
    bool err = ferror(f);
    fclose(f);
    if (err) FAIL("%s: read error", path.c_str());
    return buf;
}
inline std::string read_text(const std::string& path) {
    std::vector<uint8_t> b = read_file(path);
    return std::string(b.begin(), b.end());
}

inline void mkdir_p(const std::string& path) {
    std::string cur;
    for (size_t i = 0; i <= path.size(); i++) {
        if (i == path.size() || path[i] == '/') {
            if (!cur.empty() && !is_dir(cur)) {
                if (mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST)
                    FAIL("%s: cannot create directory: %s", cur.c_str(), strerror(errno));
            }
        }
        if (i < path.size()) cur += path[i];
    }
}

inline void remove_tree(const std::string& path) {
    struct stat st;
    if (lstat(path.c_str(), &st) != 0) return;
    if (S_ISDIR(st.st_mode)) {
        DIR* d = opendir(path.c_str());
        if (d) {
            while (dirent* e = readdir(d)) {
                if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
                remove_tree(path_join(path, e->d_name));
            }
            closedir(d);
        }
        rmdir(path.c_str());
    } else {
        unlink(path.c_str());
    }
}

inline std::vector<std::string> list_dir(const std::string& path) {
    std::vector<std::string> out;
    DIR* d = opendir(path.c_str());
    if (!d) FAIL("%s: cannot open directory: %s", path.c_str(), strerror(errno));
    while (dirent* e = readdir(d)) {
        if (e->d_name[0] == '.') continue;
        out.push_back(e->d_name);
    }
    closedir(d);
    std::sort(out.begin(), out.end());
    return out;
}

// Makes a rename in `dir` durable: without it, a power loss (not a process kill) after the
// rename may leave the directory entry pointing at the old file. Best effort: some file
// systems refuse fsync on a directory, which is not an error for us.
inline void fsync_dir(const std::string& dir) {
    int fd = open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
    if (fd < 0) return;
    (void)fsync(fd);
    close(fd);
}
inline std::string parent_dir(const std::string& path) {
    size_t slash = path.rfind('/');
    return slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
}

// A file written through AtomicFile appears under its final name only after commit():
// the data goes to "<path>.tmp.<pid>", is flushed to disk, then renamed over the target.
// A crash at any point leaves the previous good file (or no file), never a half-written one.
struct AtomicFile {
    std::string path, tmp;
    FILE* f = nullptr;
    explicit AtomicFile(const std::string& p) : path(p) {
        tmp = p + strfmt(".tmp.%d", (int)getpid());
        f = fopen(tmp.c_str(), "wb");
        if (!f) FAIL("%s: cannot open for writing: %s", tmp.c_str(), strerror(errno));
    }
    void write(const void* data, size_t n) {
        if (n && fwrite(data, 1, n, f) != n) {
            int e = errno;
            abort_write();
            FAIL("%s: write failed: %s", path.c_str(), strerror(e));
        }
    }
    void write(const std::string& s) { write(s.data(), s.size()); }
    void commit() {
        bool ok = fflush(f) == 0 && fsync(fileno(f)) == 0;
        ok = (fclose(f) == 0) && ok;
        f = nullptr;
        if (!ok) { unlink(tmp.c_str()); FAIL("%s: write failed (disk full?)", path.c_str()); }
        if (rename(tmp.c_str(), path.c_str()) != 0) {
            int e = errno;
            unlink(tmp.c_str());
            FAIL("%s: cannot rename temp file into place: %s", path.c_str(), strerror(e));
        }
        fsync_dir(parent_dir(path));
    }
    void abort_write() {
        if (f) { fclose(f); f = nullptr; }
        unlink(tmp.c_str());
    }
    ~AtomicFile() { abort_write(); }
};

inline void write_text_atomic(const std::string& path, const std::string& text) {
    AtomicFile f(path);
    f.write(text);
    f.commit();
}

// A directory built in "<dir>.tmp.<pid>" and swapped into place by commit(): the old
// directory (if any) is moved aside first and deleted only after the new one is in place.
struct AtomicDir {
    std::string path, tmp;
    bool done = false;
    explicit AtomicDir(const std::string& p) : path(p) {
        while (path.size() > 1 && path.back() == '/') path.pop_back();
        tmp = path + strfmt(".tmp.%d", (int)getpid());
        remove_tree(tmp);
        size_t slash = path.rfind('/');
        if (slash != std::string::npos && slash > 0) mkdir_p(path.substr(0, slash));
        if (mkdir(tmp.c_str(), 0755) != 0)
            FAIL("%s: cannot create output directory: %s", tmp.c_str(), strerror(errno));
    }
    std::string file(const std::string& name) const { return path_join(tmp, name); }
    void commit() {
        std::string old = path + strfmt(".old.%d", (int)getpid());
        bool had_old = path_exists(path);
        if (had_old && rename(path.c_str(), old.c_str()) != 0)
            FAIL("%s: cannot move the previous directory aside: %s", path.c_str(), strerror(errno));
        if (rename(tmp.c_str(), path.c_str()) != 0) {
            int e = errno;
            if (had_old) rename(old.c_str(), path.c_str());
            FAIL("%s: cannot move the new directory into place: %s", path.c_str(), strerror(e));
        }
        fsync_dir(parent_dir(path));  // the new name is durable before the old copy goes
        if (had_old) remove_tree(old);
        done = true;
    }
    ~AtomicDir() {
        if (!done) remove_tree(tmp);
    }
};

// The absolute, link-free form of a path that may not exist yet: realpath of its longest
// existing prefix, then the rest as written.
inline std::string absolute_path(const std::string& p) {
    char buf[4096];
    if (realpath(p.c_str(), buf)) return buf;
    std::string s = p;
    while (s.size() > 1 && s.back() == '/') s.pop_back();
    size_t slash = s.rfind('/');
    std::string parent = slash == std::string::npos ? "." : (slash == 0 ? "/" : s.substr(0, slash));
    std::string leaf = slash == std::string::npos ? s : s.substr(slash + 1);
    std::string base = absolute_path(parent);
    return base == "/" ? "/" + leaf : base + "/" + leaf;
}
inline int count_dir_entries(const std::string& dir) {
    int n = 0;
    if (DIR* d = opendir(dir.c_str())) {
        while (dirent* e = readdir(d)) n += strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
        closedir(d);
    }
    return n;
}

// Refuses an output directory that would destroy something the user did not ask to lose:
// an output that is, contains or lies inside one of the inputs (never allowed), an existing
// file, or an existing non-empty directory (allowed only with overwrite = --overwrite).
inline void check_output_location(const std::string& out, const std::vector<std::string>& inputs, bool overwrite,
                                  const char* option = "--out") {
    const std::string o = absolute_path(out);
    for (const std::string& in : inputs) {
        if (in.empty()) continue;
        const std::string i = absolute_path(in);
        if (o == i) FAIL("%s %s is the input %s itself: refusing to replace an input", option, out.c_str(), in.c_str());
        if (i.compare(0, o.size() + 1, o + "/") == 0)
            FAIL("%s %s contains the input %s: writing it would delete that input", option, out.c_str(), in.c_str());
        if (o.compare(0, i.size() + 1, i + "/") == 0)
            FAIL("%s %s lies inside the input %s: choose an output outside it", option, out.c_str(), in.c_str());
    }
    if (!path_exists(out)) return;
    if (!is_dir(out))
        FAIL("%s %s exists and is not a directory: refusing to replace a file (remove it or choose another %s)",
             option, out.c_str(), option);
    int n = count_dir_entries(out);
    if (n > 0 && !overwrite)
        FAIL("%s %s already exists and is not empty (%d %s): choose a new directory, or pass --overwrite to "
             "replace it", option, out.c_str(), n, n == 1 ? "entry" : "entries");
}

// Fail early (before hours of work) when an output location cannot be written.
inline void check_writable_dir(const std::string& dir) {
    try {
        mkdir_p(dir);
    } catch (const Error&) {
        FAIL("%s: output directory cannot be created", dir.c_str());
    }
    std::string probe = path_join(dir, strfmt(".write_test.%d", (int)getpid()));
    FILE* f = fopen(probe.c_str(), "wb");
    if (!f) FAIL("%s: output directory is not writable: %s", dir.c_str(), strerror(errno));
    fclose(f);
    unlink(probe.c_str());
}

// A decimal unsigned integer from a file (a counter stored as a string): only digits, no
// overflow. std::stoull would throw std::invalid_argument, which no main() catches.
inline uint64_t parse_uint64(const std::string& s, const std::string& what) {
    if (s.empty() || s.size() > 20 || s.find_first_not_of("0123456789") != std::string::npos)
        FAIL("%s: expected an unsigned decimal integer, found \"%s\"", what.c_str(), s.c_str());
    errno = 0;
    unsigned long long v = strtoull(s.c_str(), nullptr, 10);
    if (errno == ERANGE) FAIL("%s: %s does not fit 64 bits", what.c_str(), s.c_str());
    return v;
}

inline double now_seconds() {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
}

inline std::string format_duration(double s) {
    if (s < 0 || s != s) return "?";
    long t = (long)(s + 0.5);
    if (t >= 3600) return strfmt("%ldh%02ldm", t / 3600, (t % 3600) / 60);
    if (t >= 60) return strfmt("%ldm%02lds", t / 60, t % 60);
    return strfmt("%lds", t);
}

// bf16 <-> fp32. Round to nearest even; NaN stays NaN.
inline uint16_t f32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}
inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
        if (man == 0) u = sign;
        else {  // subnormal: renormalize
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            man &= 0x3ff;
            u = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) u = sign | 0x7f800000u | (man << 13);
    else u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float x;
    memcpy(&x, &u, 4);
    return x;
}
