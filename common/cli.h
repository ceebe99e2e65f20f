// cli.h: GNU-style long options (--name value, --name=value, flags), --help generated from
// the same table, and clear errors for unknown options or bad values.
//
// defines: Cli
#pragma once
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include "util.h"          // defines: Error, FAIL, strfmt, file helpers

class Cli {
   public:
    Cli(const std::string& prog, const std::string& summary) : prog_(prog), summary_(summary) {}

    void section(const std::string& title) { opts_.push_back(Opt{"", title, "", nullptr, 0}); }
    void add(const std::string& name, int* v, const std::string& help) { push(name, help, v, 'i', std::to_string(*v)); }
    void add(const std::string& name, long* v, const std::string& help) { push(name, help, v, 'l', std::to_string(*v)); }
    void add(const std::string& name, double* v, const std::string& help) { push(name, help, v, 'd', strfmt("%g", *v)); }
    void add(const std::string& name, float* v, const std::string& help) { push(name, help, v, 'f', strfmt("%g", *v)); }
    void add(const std::string& name, std::string* v, const std::string& help) { push(name, help, v, 's', *v); }
    void flag(const std::string& name, bool* v, const std::string& help) { push(name, help, v, 'b', ""); }
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
            char* end = nullptr;
            switch (o->type) {
                case 'i': case 'l': {
                    long v = strtol(value.c_str(), &end, 10);
                    if (value.empty() || *end) FAIL("option %s expects an integer, found \"%s\"", name.c_str(), value.c_str());
                    if (o->type == 'i') *(int*)o->ptr = (int)v; else *(long*)o->ptr = v;
                    break;
                }
                case 'd': case 'f': {
                    double v = strtod(value.c_str(), &end);
                    if (value.empty() || *end) FAIL("option %s expects a number, found \"%s\"", name.c_str(), value.c_str());
                    if (o->type == 'd') *(double*)o->ptr = v; else *(float*)o->ptr = (float)v;
                    break;
                }
                case 's': *(std::string*)o->ptr = value; break;
            }
        }
    }

    void print_help(FILE* f) const {
        fprintf(f, "usage: %s [options]\n\n%s\n", prog_.c_str(), summary_.c_str());
        for (auto& o : opts_) {
            if (o.name.empty()) { fprintf(f, "\n%s:\n", o.help.c_str()); continue; }
            std::string left = o.name + (o.type == 'b' ? "" : " " + meta(o.type));
            std::string help = o.help;
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
        bool set = false;
        Opt(const std::string& n, const std::string& h, const std::string& d, void* p, char t)
            : name(n), help(h), dflt(d), ptr(p), type(t) {}
    };
    static std::string meta(char t) {
        switch (t) { case 'i': case 'l': return "N"; case 'd': case 'f': return "X"; default: return "S"; }
    }
    void push(const std::string& name, const std::string& help, void* p, char t, const std::string& d) {
        opts_.push_back(Opt(name, help, d, p, t));
    }
    std::string prog_, summary_, epilog_;
    std::vector<Opt> opts_;
};
