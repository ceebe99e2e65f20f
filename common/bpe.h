// bpe.h: text -> token ids with the corpus's tokenizer.json (a Hugging Face `tokenizers`
// byte-level BPE: dev/data/build_corpus.py trains it), for prompts. Decoding stays with
// tokenizer.h (llm.c's tokenizer.bin).
//
// The encoding, as `tokenizers` does it for this model type:
//   1. special tokens (added_tokens, e.g. <|endoftext|>) are cut out of the text first;
//   2. the GPT-2 pre-tokenizer splits the rest into pieces:
//        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//      (written out below as a scanner, not a regex engine);
//   3. each piece's UTF-8 bytes start as one symbol per byte; the adjacent pair with the
//      lowest merge rank is merged until no listed pair remains; each symbol is a token.
// The vocabulary and merges are stored in byte-level form (byte b as a printable code point,
// GPT-2's bytes_to_unicode); they are mapped back to raw bytes on load, so the encoder works
// on bytes throughout.
//
// Unicode classes: \p{L} is iswalpha and \p{N} iswdigit plus the Latin-1 number signs
// (superscripts, fractions), under the C.UTF-8 locale; \s is iswspace. That is exact for
// ASCII and Latin-1 (the corpus's en, de and code text) and close elsewhere; test_tokenizer.py
// checks equality with `tokenizers` itself on the corpus and on hand-picked strings.
//
// defines: BpeTokenizer (encode, decode)
#pragma once
#include <clocale>
#include <cwctype>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>
#include "json.h"          // defines: Json
#include "util.h"          // defines: FAIL, read_text

struct BpeTokenizer {
    std::unordered_map<std::string, int> vocab;                 // raw bytes -> id
    std::map<std::pair<std::string, std::string>, int> ranks;   // merge (left, right) -> rank
    std::vector<std::pair<std::string, int>> specials;          // added tokens: text -> id
    std::vector<std::string> bytes_of;                          // id -> its bytes (decode)
    bool ok() const { return !vocab.empty(); }
    std::string decode(int id) const { return id >= 0 && id < (int)bytes_of.size() ? bytes_of[id] : std::string(); }

    void load(const std::string& path) {
        Json j = Json::parse(read_text(path), path);
        const Json* model = j.find("model");
        const Json* type = model ? model->find("type") : nullptr;
        if (!model || !type || type->str != "BPE") FAIL("%s: not a byte-level BPE tokenizer.json (model.type BPE)", path.c_str());
        const Json* v = model->find("vocab");
        const Json* m = model->find("merges");
        if (!v || v->type != Json::OBJ || !m || m->type != Json::ARR) FAIL("%s: model.vocab / model.merges missing", path.c_str());
        const std::vector<int> byte_of = unicode_to_byte();
        auto raw = [&](const std::string& s) {  // byte-level string -> the bytes it stands for
            std::string out;
            size_t i = 0;
            while (i < s.size()) {
                uint32_t cp = next_codepoint(s, &i);
                if (cp >= byte_of.size() || byte_of[cp] < 0) FAIL("%s: token \"%s\" is not in byte-level form", path.c_str(), s.c_str());
                out += (char)byte_of[cp];
            }
            return out;
        };
        for (const auto& kv : v->obj) vocab[raw(kv.first)] = (int)Json::checked_int(kv.second.num, "vocab id", path);
        int rank = 0;
        for (const Json& e : m->arr) {
            std::string a, b;
            if (e.type == Json::ARR && e.arr.size() == 2) { a = e.arr[0].str; b = e.arr[1].str; }
            else if (e.type == Json::STR && e.str.find(' ') != std::string::npos) {
                a = e.str.substr(0, e.str.find(' '));
                b = e.str.substr(e.str.find(' ') + 1);
            } else FAIL("%s: merge %d is neither [\"a\", \"b\"] nor \"a b\"", path.c_str(), rank);
            ranks[{raw(a), raw(b)}] = rank++;
        }
        if (const Json* added = j.find("added_tokens"))
            for (const Json& t : added->arr)
                if (const Json* c = t.find("content")) specials.push_back({c->str, (int)t.find("id")->num});
        for (auto& kv : vocab) {
            if (kv.second < 0) FAIL("%s: negative token id %d", path.c_str(), kv.second);
            if ((size_t)kv.second >= bytes_of.size()) bytes_of.resize(kv.second + 1);
            bytes_of[kv.second] = kv.first;
        }
        for (auto& s : specials) {
            if (s.second < 0) FAIL("%s: negative token id %d", path.c_str(), s.second);
            if ((size_t)s.second >= bytes_of.size()) bytes_of.resize(s.second + 1);
            bytes_of[s.second] = s.first;
        }
        std::setlocale(LC_CTYPE, "C.UTF-8");  // for iswalpha / iswspace beyond ASCII
    }

    std::vector<int> encode(const std::string& text) const {
        std::vector<int> out;
        size_t start = 0;
        while (start < text.size()) {  // cut out the special tokens, encode the text between
            size_t best = std::string::npos;
            int best_id = -1;
            size_t best_len = 0;
            for (auto& s : specials) {
                size_t p = text.find(s.first, start);
                if (p != std::string::npos && (p < best || (p == best && s.first.size() > best_len))) {
                    best = p; best_id = s.second; best_len = s.first.size();
                }
            }
            size_t end = best == std::string::npos ? text.size() : best;
            for (const std::string& piece : pretokenize(text.substr(start, end - start))) bpe(piece, &out);
            if (best == std::string::npos) break;
            out.push_back(best_id);
            start = best + best_len;
        }
        return out;
    }

   private:
    // GPT-2's byte <-> printable code point map: the printable Latin-1 bytes map to
    // themselves, the other 68 to 256, 257, ... in byte order
    static std::vector<int> unicode_to_byte() {
        std::vector<int> inv(512, -1);
        int n = 0;
        for (int b = 0; b < 256; b++) {
            bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
            inv[printable ? b : 256 + n++] = b;
        }
        return inv;
    }
    // one UTF-8 code point at *i (invalid bytes count as themselves: the scanner must not stop)
    static uint32_t next_codepoint(const std::string& s, size_t* i) {
        unsigned char c = (unsigned char)s[*i];
        int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
        if (*i + n > s.size()) n = 1;
        uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1f) : n == 3 ? (c & 0x0f) : (c & 0x07);
        for (int k = 1; k < n; k++) {
            unsigned char d = (unsigned char)s[*i + k];
            if ((d & 0xc0) != 0x80) { n = 1; cp = c; break; }
            cp = (cp << 6) | (d & 0x3f);
        }
        *i += n;
        return cp;
    }
    enum Class { SPACE, LETTER, NUMBER, OTHER };
    static Class cls(uint32_t cp) {
        if (cp < 0x80) {
            if (cp == ' ' || (cp >= 9 && cp <= 13)) return SPACE;
            if ((cp | 32) >= 'a' && (cp | 32) <= 'z') return LETTER;
            if (cp >= '0' && cp <= '9') return NUMBER;
            return OTHER;
        }
        if (cp == 0xb2 || cp == 0xb3 || cp == 0xb9 || (cp >= 0xbc && cp <= 0xbe) || iswdigit((wint_t)cp)) return NUMBER;
        if (iswspace((wint_t)cp) || cp == 0x85 || cp == 0xa0) return SPACE;
        if (iswalpha((wint_t)cp) || cp == 0xaa || cp == 0xb5 || cp == 0xba) return LETTER;
        return OTHER;
    }
    // the pre-tokenizer pattern at the top of this file, scanned left to right
    static std::vector<std::string> pretokenize(const std::string& s) {
        std::vector<size_t> pos;  // code point starts, and s.size() at the end
        std::vector<Class> c;
        std::vector<uint32_t> cp;
        for (size_t i = 0; i < s.size();) {
            pos.push_back(i);
            uint32_t x = next_codepoint(s, &i);
            cp.push_back(x);
            c.push_back(cls(x));
        }
        const size_t n = cp.size();
        pos.push_back(s.size());
        std::vector<std::string> out;
        size_t i = 0;
        auto run = [&](size_t j, Class k) { while (j < n && c[j] == k) j++; return j; };
        auto run_other = [&](size_t j) { while (j < n && c[j] == OTHER) j++; return j; };
        while (i < n) {
            size_t j = i;
            if (cp[i] == '\'' && i + 1 < n) {  // contractions: 's 't 'm 'd, 're 've 'll
                uint32_t a = cp[i + 1], b = i + 2 < n ? cp[i + 2] : 0;
                if (a == 's' || a == 't' || a == 'm' || a == 'd') j = i + 2;
                else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) j = i + 3;
            }
            if (j == i) {
                size_t k = cp[i] == ' ' && i + 1 < n && c[i + 1] != SPACE ? i + 1 : i;  // " ?" before L, N, other
                if (c[k] == LETTER) j = run(k, LETTER);
                else if (c[k] == NUMBER) j = run(k, NUMBER);
                else if (c[k] == OTHER) j = run_other(k);
                else {  // whitespace: \s+(?!\S) leaves the last one for the next piece, then \s+
                    j = run(i, SPACE);
                    if (j < n && j - i > 1) j--;
                }
            }
            out.push_back(s.substr(pos[i], pos[j] - pos[i]));
            i = j;
        }
        return out;
    }
    // byte-pair merges of one piece, lowest rank first (leftmost on ties)
    void bpe(const std::string& piece, std::vector<int>* out) const {
        std::vector<std::string> sym;
        for (char ch : piece) sym.push_back(std::string(1, ch));
        for (;;) {
            int best = -1, best_rank = 0;
            for (size_t k = 0; k + 1 < sym.size(); k++) {
                auto it = ranks.find({sym[k], sym[k + 1]});
                if (it != ranks.end() && (best < 0 || it->second < best_rank)) { best = (int)k; best_rank = it->second; }
            }
            if (best < 0) break;
            sym[best] += sym[best + 1];
            sym.erase(sym.begin() + best + 1);
        }
        for (const std::string& t : sym) {
            auto it = vocab.find(t);
            if (it == vocab.end()) FAIL("tokenizer: no token for the bytes \"%s\" (not a byte-level vocabulary?)", t.c_str());
            out->push_back(it->second);
        }
    }
};
