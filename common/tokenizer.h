// tokenizer.h: the decode table (token id -> bytes) used to print generated text.
// File format (llm.c's tokenizer.bin): 256 x uint32 header (magic 20240328, version 2,
// vocab size, end-of-text id), then per token: one uint8 length and that many bytes.
// Encoding: the corpus is encoded in Python (dev/data); prompts with common/bpe.h, from the
// matching tokenizer.json.
//
// defines: Tokenizer, printable
#pragma once
#include <string>
#include <vector>
#include "util.h"          // defines: Error, FAIL, strfmt, file helpers

struct Tokenizer {
    std::vector<std::string> tokens;
    int eot = -1;
    bool ok() const { return !tokens.empty(); }

    void load(const std::string& path) { load_bytes(read_file(path), path); }

    // The file's bytes (`path` names it in messages); every count is checked against the
    // bytes present, so a damaged file fails with a message instead of reading past its end.
    void load_bytes(const std::vector<uint8_t>& b, const std::string& path) {
        if (b.size() < 1024) FAIL("%s: shorter than the 1024-byte tokenizer header", path.c_str());
        uint32_t h[256];
        memcpy(h, b.data(), 1024);
        if (h[0] != 20240328) FAIL("%s: bad magic %u (expected 20240328): not a tokenizer.bin", path.c_str(), h[0]);
        if (h[1] != 1 && h[1] != 2) FAIL("%s: tokenizer version %u not supported (1 or 2)", path.c_str(), h[1]);
        // each token takes at least its length byte: a larger count cannot be right
        if (h[2] > b.size() - 1024)
            FAIL("%s: header says %u tokens but the file has only %zu bytes after the header: truncated?",
                 path.c_str(), h[2], b.size() - 1024);
        // the sampler feeds the end-of-text id to the model: it must be one of the tokens
        if (h[1] == 2 && h[3] >= h[2])
            FAIL("%s: end-of-text id %u is not below the vocabulary size %u", path.c_str(), h[3], h[2]);
        eot = h[1] == 2 ? (int)h[3] : -1;
        size_t p = 1024;
        tokens.clear();
        for (uint32_t i = 0; i < h[2]; i++) {
            if (p >= b.size()) FAIL("%s: truncated at token %u of %u", path.c_str(), i, h[2]);
            size_t n = b[p++];
            if (n > b.size() - p) FAIL("%s: truncated at token %u of %u", path.c_str(), i, h[2]);
            tokens.emplace_back((const char*)&b[p], n);
            p += n;
        }
    }
    std::string decode(int id) const {
        if (id >= 0 && id < (int)tokens.size()) return tokens[id];
        return strfmt("<%d>", id);
    }
};

// Prints bytes so that a terminal shows them: valid UTF-8 passes, control bytes are escaped.
inline std::string printable(const std::string& s) {
    std::string out;
    for (unsigned char c : s) {
        if (c == '\n' || c == '\t' || c >= 0x20) out += (char)c;
        else out += strfmt("\\x%02x", c);
    }
    return out;
}
