// Fuzz harness: token shards (common/dataloader.h, llm.c format: 1024-byte header, uint16
// tokens). parse_shard runs the same header and token checks as load_shard, which reads
// from a file; the size field must never drive an allocation the bytes do not back.
#include "fuzz.h"
#include "../../common/dataloader.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    refuse_ok([&] {
        std::vector<uint16_t> toks = parse_shard(data, size, 512, "fuzz_train_000.bin");
        FUZZ_ASSERT(1024 + 2 * toks.size() == size);
        for (uint16_t t : toks) FUZZ_ASSERT(t < 512);
    });
    return 0;
}
