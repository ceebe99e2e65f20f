// test_bpe.cpp: common/bpe.h's encoder as a filter, for test/test_tokenizer.py, which checks
// it against the `tokenizers` library: reads a tokenizer.json and a file of JSON strings
// (one per line), prints each string's ids as one JSON array per line.
#include <cstdio>
#include <fstream>
#include <string>
#include "../common/bpe.h"

int main(int argc, char** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: test_bpe TOKENIZER.json TEXTS.jsonl  (prints one JSON array of ids per line)\n");
        return 2;
    }
    try {
        BpeTokenizer tok;
        tok.load(argv[1]);
        std::ifstream in(argv[2]);
        if (!in) FAIL("%s: cannot open", argv[2]);
        std::string line;
        while (std::getline(in, line)) {
            Json s = Json::parse(line, argv[2]);
            std::string out = "[";
            for (int id : tok.encode(s.str)) out += (out.size() > 1 ? "," : "") + std::to_string(id);
            printf("%s]\n", out.c_str());
        }
    } catch (const Error& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
