// json.h: the small JSON reader/writer behind config.json, trainer_state.json,
// safetensors headers and metrics.jsonl. Objects keep their key order so files we write
// read like the ones Hugging Face writes. Numbers are doubles, except that integers up to
// 2^53 round-trip exactly (safetensors offsets, token counts, RNG counters as strings).
//
// defines: Json
#pragma once
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>
#include "util.h"          // defines: Error, FAIL, strfmt, file helpers

struct Json {
    enum Type { NUL, BOOL, NUM, STR, ARR, OBJ } type = NUL;
    bool b = false;
    double num = 0;
    std::string str;
    std::vector<Json> arr;
    std::vector<std::pair<std::string, Json>> obj;  // insertion-ordered

    Json() {}
    Json(bool v) : type(BOOL), b(v) {}
    Json(int v) : type(NUM), num(v) {}
    Json(long v) : type(NUM), num((double)v) {}
    Json(long long v) : type(NUM), num((double)v) {}
    Json(unsigned long v) : type(NUM), num((double)v) {}
    Json(unsigned long long v) : type(NUM), num((double)v) {}
    Json(double v) : type(NUM), num(v) {}
    Json(const char* s) : type(STR), str(s) {}
    Json(const std::string& s) : type(STR), str(s) {}
    static Json array() { Json j; j.type = ARR; return j; }
    static Json object() { Json j; j.type = OBJ; return j; }

    bool is_null() const { return type == NUL; }
    bool has(const std::string& k) const { return find(k) != nullptr; }
    const Json* find(const std::string& k) const {
        if (type != OBJ) return nullptr;
        for (auto& kv : obj) if (kv.first == k) return &kv.second;
        return nullptr;
    }
    Json& operator[](const std::string& k) {  // insert-or-get
        if (type == NUL) type = OBJ;
        for (auto& kv : obj) if (kv.first == k) return kv.second;
        obj.emplace_back(k, Json());
        return obj.back().second;
    }
    void push(const Json& v) { if (type == NUL) type = ARR; arr.push_back(v); }
    void erase(const std::string& k) {
        for (size_t i = 0; i < obj.size(); i++) if (obj[i].first == k) { obj.erase(obj.begin() + i); return; }
    }

    // ---- serialization ----
    static void write_string(std::string& out, const std::string& s) {
        out += '"';
        for (unsigned char c : s) {
            switch (c) {
                case '"': out += "\\\""; break;
                case '\\': out += "\\\\"; break;
                case '\n': out += "\\n"; break;
                case '\r': out += "\\r"; break;
                case '\t': out += "\\t"; break;
                default:
                    if (c < 0x20) out += strfmt("\\u%04x", c);
                    else out += (char)c;
            }
        }
        out += '"';
    }
    static std::string number_string(double v) {
        if (!std::isfinite(v)) return "null";  // JSON has no NaN/inf
        if (v == std::floor(v) && std::fabs(v) < 9007199254740992.0) return strfmt("%.0f", v);
        // shortest form that reads back to the same double
        for (int prec = 6; prec <= 17; prec++) {
            std::string s = strfmt("%.*g", prec, v);
            if (std::strtod(s.c_str(), nullptr) == v) return s;
        }
        return strfmt("%.17g", v);
    }
    void dump_to(std::string& out, int indent, int level) const {
        std::string nl = indent >= 0 ? "\n" + std::string((level + 1) * indent, ' ') : "";
        std::string nl_end = indent >= 0 ? "\n" + std::string(level * indent, ' ') : "";
        const char* sep = indent >= 0 ? ": " : ":";
        switch (type) {
            case NUL: out += "null"; break;
            case BOOL: out += b ? "true" : "false"; break;
            case NUM: out += number_string(num); break;
            case STR: write_string(out, str); break;
            case ARR: {
                // arrays of numbers stay on one line: expert-load tables remain readable
                bool flat = indent < 0;
                if (!flat) { flat = true; for (auto& v : arr) if (v.type == ARR || v.type == OBJ) flat = false; }
                out += '[';
                for (size_t i = 0; i < arr.size(); i++) {
                    if (i) out += flat ? (indent >= 0 ? ", " : ",") : ",";
                    if (!flat) out += nl;
                    arr[i].dump_to(out, indent, level + 1);
                }
                if (!flat && !arr.empty()) out += nl_end;
                out += ']';
                break;
            }
            case OBJ: {
                out += '{';
                for (size_t i = 0; i < obj.size(); i++) {
                    if (i) out += ',';
                    out += nl;
                    write_string(out, obj[i].first);
                    out += sep;
                    obj[i].second.dump_to(out, indent, level + 1);
                }
                if (!obj.empty()) out += nl_end;
                out += '}';
                break;
            }
        }
    }
    std::string dump(int indent = -1) const {
        std::string out;
        dump_to(out, indent, 0);
        return out;
    }

    // ---- accessors with clear errors; `what` names the file for the message ----
    double get_num(const std::string& k, const std::string& what) const {
        const Json* v = find(k);
        if (!v) FAIL("%s: missing key \"%s\"", what.c_str(), k.c_str());
        if (v->type != NUM) FAIL("%s: key \"%s\" should be a number", what.c_str(), k.c_str());
        if (!std::isfinite(v->num)) FAIL("%s: key \"%s\" should be a finite number", what.c_str(), k.c_str());
        return v->num;
    }
    double get_num(const std::string& k, double dflt, const std::string& what) const {
        const Json* v = find(k);
        if (!v || v->type == NUL) return dflt;
        if (v->type != NUM) FAIL("%s: key \"%s\" should be a number", what.c_str(), k.c_str());
        if (!std::isfinite(v->num)) FAIL("%s: key \"%s\" should be a finite number", what.c_str(), k.c_str());
        return v->num;
    }
    // Integers are exact only up to 2^53 in a double; beyond that (or inf/NaN) the cast to
    // long long would be undefined, so such values are refused here.
    static long long checked_int(double d, const std::string& k, const std::string& what) {
        if (d != std::floor(d) || std::fabs(d) > 9007199254740992.0)
            FAIL("%s: key \"%s\" should be an integer of magnitude <= 2^53, found %g", what.c_str(), k.c_str(), d);
        return (long long)d;
    }
    long long get_int(const std::string& k, const std::string& what) const {
        return checked_int(get_num(k, what), k, what);
    }
    long long get_int(const std::string& k, long long dflt, const std::string& what) const {
        return checked_int(get_num(k, (double)dflt, what), k, what);
    }
    // an integer in [lo, hi]: a size too large for its type is an error, not a wrapped number
    long long get_int(const std::string& k, long long dflt, long long lo, long long hi, const std::string& what) const {
        long long v = get_int(k, dflt, what);
        if (v < lo || v > hi)
            FAIL("%s: key \"%s\" is %lld, outside the allowed range [%lld, %lld]", what.c_str(), k.c_str(), v, lo, hi);
        return v;
    }
    long long get_int(const std::string& k, long long lo, long long hi, const std::string& what) const {
        long long v = get_int(k, what);
        if (v < lo || v > hi)
            FAIL("%s: key \"%s\" is %lld, outside the allowed range [%lld, %lld]", what.c_str(), k.c_str(), v, lo, hi);
        return v;
    }
    bool get_bool(const std::string& k, bool dflt, const std::string& what) const {
        const Json* v = find(k);
        if (!v || v->type == NUL) return dflt;
        if (v->type != BOOL) FAIL("%s: key \"%s\" should be true or false", what.c_str(), k.c_str());
        return v->b;
    }
    std::string get_str(const std::string& k, const std::string& dflt, const std::string& what) const {
        const Json* v = find(k);
        if (!v || v->type == NUL) return dflt;
        if (v->type != STR) FAIL("%s: key \"%s\" should be a string", what.c_str(), k.c_str());
        return v->str;
    }

    // ---- parsing ----
    static Json parse(const std::string& text, const std::string& what) {
        Parser p{text, 0, what};
        p.ws();
        Json v = p.value(0);
        p.ws();
        if (p.i != text.size()) p.fail("trailing characters after the JSON value");
        return v;
    }
    static Json parse_file(const std::string& path) { return parse(read_text(path), path); }

   private:
    struct Parser {
        const std::string& s;
        size_t i;
        const std::string& what;
        [[noreturn]] void fail(const char* msg) {
            FAIL("%s: invalid JSON at byte %zu: %s", what.c_str(), i, msg);
        }
        void ws() { while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++; }
        bool lit(const char* w) {
            size_t n = strlen(w);
            if (s.compare(i, n, w) == 0) { i += n; return true; }
            return false;
        }
        static void utf8(std::string& out, uint32_t cp) {
            if (cp < 0x80) out += (char)cp;
            else if (cp < 0x800) { out += (char)(0xc0 | (cp >> 6)); out += (char)(0x80 | (cp & 0x3f)); }
            else if (cp < 0x10000) { out += (char)(0xe0 | (cp >> 12)); out += (char)(0x80 | ((cp >> 6) & 0x3f)); out += (char)(0x80 | (cp & 0x3f)); }
            else { out += (char)(0xf0 | (cp >> 18)); out += (char)(0x80 | ((cp >> 12) & 0x3f)); out += (char)(0x80 | ((cp >> 6) & 0x3f)); out += (char)(0x80 | (cp & 0x3f)); }
        }
        uint32_t hex4() {
            if (i + 4 > s.size()) fail("short \\u escape");
            uint32_t v = 0;
            for (int k = 0; k < 4; k++) {
                char c = s[i++];
                v <<= 4;
                if (c >= '0' && c <= '9') v |= c - '0';
                else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
                else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
                else fail("bad \\u escape");
            }
            return v;
        }
        std::string string() {
            if (s[i] != '"') fail("expected a string");
            i++;
            std::string out;
            while (true) {
                if (i >= s.size()) fail("unterminated string");
                char c = s[i++];
                if (c == '"') break;
                if ((unsigned char)c < 0x20) fail("control character in string");
                if (c != '\\') { out += c; continue; }
                if (i >= s.size()) fail("unterminated escape");
                char e = s[i++];
                switch (e) {
                    case '"': out += '"'; break;
                    case '\\': out += '\\'; break;
                    case '/': out += '/'; break;
                    case 'b': out += '\b'; break;
                    case 'f': out += '\f'; break;
                    case 'n': out += '\n'; break;
                    case 'r': out += '\r'; break;
                    case 't': out += '\t'; break;
                    case 'u': {
                        uint32_t cp = hex4();
                        if (cp >= 0xd800 && cp < 0xdc00 && i + 1 < s.size() && s[i] == '\\' && s[i + 1] == 'u') {
                            i += 2;
                            uint32_t lo = hex4();
                            // a high surrogate must pair with a low one, or the code point is garbage
                            if (lo < 0xdc00 || lo >= 0xe000) fail("high surrogate \\u escape not followed by a low one");
                            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                        }
                        utf8(out, cp);
                        break;
                    }
                    default: fail("bad escape");
                }
            }
            return out;
        }
        // JSON's number grammar, -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?, checked here
        // because strtod alone would also take "0x1p3", "-inf", "-nan" and "1." as numbers.
        double number() {
            size_t start = i;
            auto digits = [&] { size_t d = i; while (i < s.size() && s[i] >= '0' && s[i] <= '9') i++; return i > d; };
            if (s[i] == '-') i++;
            if (i < s.size() && s[i] == '0') i++;
            else if (!digits()) fail("bad number: expected a digit");
            if (i < s.size() && s[i] == '.') { i++; if (!digits()) fail("bad number: expected a digit after '.'"); }
            if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
                i++;
                if (i < s.size() && (s[i] == '+' || s[i] == '-')) i++;
                if (!digits()) fail("bad number: expected a digit in the exponent");
            }
            // strtod stops at the same place: the text up to i is a valid C number too
            return strtod(std::string(s, start, i - start).c_str(), nullptr);
        }
        Json value(int depth) {
            if (depth > 64) fail("nesting too deep");
            if (i >= s.size()) fail("unexpected end of input");
            char c = s[i];
            if (c == '{') {
                i++;
                Json o = Json::object();
                ws();
                if (i < s.size() && s[i] == '}') { i++; return o; }
                while (true) {
                    ws();
                    if (i >= s.size()) fail("unterminated object");
                    std::string k = string();
                    ws();
                    if (i >= s.size() || s[i] != ':') fail("expected ':'");
                    i++;
                    ws();
                    o.obj.emplace_back(k, value(depth + 1));
                    ws();
                    if (i < s.size() && s[i] == ',') { i++; continue; }
                    if (i < s.size() && s[i] == '}') { i++; return o; }
                    fail("expected ',' or '}'");
                }
            }
            if (c == '[') {
                i++;
                Json a = Json::array();
                ws();
                if (i < s.size() && s[i] == ']') { i++; return a; }
                while (true) {
                    ws();
                    a.arr.push_back(value(depth + 1));
                    ws();
                    if (i < s.size() && s[i] == ',') { i++; continue; }
                    if (i < s.size() && s[i] == ']') { i++; return a; }
                    fail("expected ',' or ']'");
                }
            }
            if (c == '"') return Json(string());
            if (lit("true")) return Json(true);
            if (lit("false")) return Json(false);
            if (lit("null")) return Json();
            // Python's json writes these for non-finite floats; accept them when reading
            if (lit("NaN")) return Json(NAN);
            if (lit("Infinity")) return Json(INFINITY);
            if (lit("-Infinity")) return Json(-INFINITY);
            if (c == '-' || (c >= '0' && c <= '9')) return Json(number());
            fail("unexpected character");
        }
    };
};

// A JSON array from a vector of numbers (or strings), or nested: a vector<vector<double>>
// becomes an array of arrays. For the records that tools write (matrices of distances,
// per-layer selections), so that no caller spells out the nested loop.
template <class T> inline Json json_value(const T& x) { return Json(x); }
template <class T> inline Json json_value(const std::vector<T>& v);
template <class T> inline Json json_array(const std::vector<T>& v) {
    Json j = Json::array();
    for (const T& x : v) j.push(json_value(x));
    return j;
}
template <class T> inline Json json_value(const std::vector<T>& v) { return json_array(v); }
