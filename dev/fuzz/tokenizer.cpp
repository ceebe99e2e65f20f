// Fuzz harness: tokenizer.bin (common/tokenizer.h, llm.c format: 1024-byte header, then a
// length byte and the bytes of each token). Decoding and printing every token of an
// accepted file must stay in bounds, and the end-of-text id must be a token.
#include "fuzz.h"
#include "../../common/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    refuse_ok([&] {
        Tokenizer t;
        t.load_bytes(std::vector<uint8_t>(data, data + size), "tokenizer.bin");
        FUZZ_ASSERT(t.eot < (int)t.tokens.size());
        size_t total = 0;
        for (int i = -1; i <= (int)t.tokens.size(); i++) total += printable(t.decode(i)).size();
        FUZZ_ASSERT(total > 0);
    });
    return 0;
}
