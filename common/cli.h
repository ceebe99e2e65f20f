// cli.h: GNU-style long options (--name value, --name=value, flags), --help generated from
// the same table, and clear errors for unknown options or bad values.
//
// Numbers are parsed strictly: the whole string, no overflow of the option's type, finite;
// an option may carry an allowed range (Range), checked at parse time and shown by --help,
// so that "--beta1 1.5" or "--batch 4294967297" is an error naming the option, the value
// and what is allowed, not a different number or a model of NaNs hours later.
//
// defines: Range, Cli
#pragma once
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include "util.h"          // defines: Error, FAIL, strfmt, parse_int_strict, parse_double_strict

// The allowed values of a numeric option: lo <= x <= hi, or lo < x / x < hi when open.
struct Range {
    double lo = -INFINITY, hi = INFINITY;
    bool lo_open = false, hi_open = false;
    bool any() const { return lo == -INFINITY && hi == INFINITY; }
    bool contains(double v) const {
        return (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
    }
    std::string str() const {  // "x >= 0", "0 <= x < 1", "x > 0"
        auto num = [](double v) { return strfmt("%g", v); };
        if (hi == INFINITY) return std::string("x ") + (lo_open ? "> " : ">= ") + num(lo);
        if (lo == -INFINITY) return std::string("x ") + (hi_open ? "< " : "<= ") + num(hi);
        return num(lo) + (lo_open ? " < x " : " <= x ") + (hi_open ? "< " : "<= ") + num(hi);
    }
    static Range at_least(double lo) { Range r; r.lo = lo; return r; }
    static Range positive() { Range r; r.lo = 0; r.lo_open = true; return r; }
    static Range between(double lo, double hi) { Range r; r.lo = lo; r.hi = hi; return r; }
    static Range unit_open() { Range r; r.lo = 0; r.hi = 1; r.hi_open = true; return r; }  // [0, 1)
};

class Cli {
   public:
    Cli(const std::string& prog, const std::string& summary) : prog_(prog), summary_(summary) {}

    void section(const std::string& title) { opts_.push_back(Opt{"", title, "", nullptr, 0}); }
    void add(const std::string& name, int* v, const std::string& help, Range r = Range()) {
        push(name, help, v, 'i', std::to_string(*v), r);
    }
    void add(const std::string& name, long* v, const std::string& help, Range r = Range()) {
        push(name, help, v, 'l', std::to_string(*v), r);
    }
    void add(const std::string& name, double* v, const std::string& help, Range r = Range()) {
        push(name, help, v, 'd', strfmt("%g", *v), r);
    }
    void add(const std::string& name, float* v, const std::string& help, Range r = Range()) {
        push(name, help, v, 'f', strfmt("%g", *v), r);
    }
    void add(const std::string& name, std::string* v, const std::string& help) { push(name, help, v, 's', *v, Range()); }
    void flag(const std::string& name, bool* v, const std::string& help) { push(name, help, v, 'b', "", Range()); }
    void epilog(const std::string& text) { epilog_ = text; }

    bool was_set(const std::string& name) const {
        for (auto& o : opts_) if (o.name == name) return o.set;
        return false;
    }

    // Returns normally on success; prints help and exits 0 for --help; throws Error otherwise.
    void parse(int argc, char** argv) {
        for (int i = 1; i < argc; i++) {
            std::string a = argv[i];
            if (a == "--help" || a == "-h") { print_help(stdout); exit(0); }
            if (a.rfind("--", 0) != 0) FAIL("unexpected argument \"%s\" (options start with --; see --help)", a.c_str());
            std::string name = a, value;
            bool has_value = false;
            size_t eq = a.find('=');
            if (eq != std::string::npos) { name = a.substr(0, eq); value = a.substr(eq + 1); has_value = true; }
            Opt* o = nullptr;
            for (auto& x : opts_) if (x.name == name) o = &x;
            if (!o) FAIL("unknown option %s (see %s --help)", name.c_str(), prog_.c_str());
            o->set = true;
            if (o->type == 'b') {
                if (has_value) FAIL("option %s takes no value", name.c_str());
                *(bool*)o->ptr = true;
                continue;
            }
            if (!has_value) {
                if (i + 1 >= argc) FAIL("option %s needs a value", name.c_str());
                value = argv[++i];
            }
            const std::string what = "option " + name;
            double num = 0;
            // integers: the option's range within its type's, in one message
            auto lo = [&](long long type_min) { return o->range.lo > (double)type_min ? (long long)std::ceil(o->range.lo + o->range.lo_open) : type_min; };
            auto hi = [&](long long type_max) { return o->range.hi < (double)type_max ? (long long)std::floor(o->range.hi - o->range.hi_open) : type_max; };
            switch (o->type) {
                case 'i': *(int*)o->ptr = (int)(num = (double)parse_int_strict(value, lo(INT_MIN), hi(INT_MAX), what)); break;
                case 'l': *(long*)o->ptr = (long)(num = (double)parse_int_strict(value, lo(LONG_MIN), hi(LONG_MAX), what)); break;
                case 'd': *(double*)o->ptr = num = parse_double_strict(value, DBL_MAX, what); break;
                case 'f': *(float*)o->ptr = (float)(num = parse_double_strict(value, FLT_MAX, what)); break;
                case 's': *(std::string*)o->ptr = value; break;
            }
            if (o->type != 's' && !o->range.contains(num))
                FAIL("option %s %s is out of range: allowed %s", name.c_str(), value.c_str(), o->range.str().c_str());
        }
    }

    void print_help(FILE* f) const {
        fprintf(f, "usage: %s [options]\n\n%s\n", prog_.c_str(), summary_.c_str());
        for (auto& o : opts_) {
            if (o.name.empty()) { fprintf(f, "\n%s:\n", o.help.c_str()); continue; }
            std::string left = o.name + (o.type == 'b' ? "" : " " + meta(o.type));
            std::string help = o.help;
            if (!o.range.any()) help += " (" + o.range.str() + ")";
            if (o.type != 'b' && !o.dflt.empty()) help += " [" + o.dflt + "]";
            fprintf(f, "  %-26s %s\n", left.c_str(), help.c_str());
        }
        fprintf(f, "  %-26s %s\n", "--help", "show this help and exit");
        if (!epilog_.empty()) fprintf(f, "\n%s\n", epilog_.c_str());
    }

   private:
    struct Opt {
        std::string name, help, dflt;
        void* ptr;
        char type;
        Range range;
        bool set = false;
        Opt(const std::string& n, const std::string& h, const std::string& d, void* p, char t, Range r = Range())
            : name(n), help(h), dflt(d), ptr(p), type(t), range(r) {}
    };
    static std::string meta(char t) {
        switch (t) { case 'i': case 'l': return "N"; case 'd': case 'f': return "X"; default: return "S"; }
    }
    void push(const std::string& name, const std::string& help, void* p, char t, const std::string& d, Range r) {
        opts_.push_back(Opt(name, help, d, p, t, r));
    }
    std::string prog_, summary_, epilog_;
    std::vector<Opt> opts_;
};
