// Fuzz harness: common/safetensors.h, the reader of model.safetensors and
// optimizer.safetensors (8-byte header length, JSON header, data block). The bytes are a
// whole file; every tensor the header announces is then read and converted, so offsets
// that got past the checks would read outside the buffer (ASan).
#include "fuzz.h"
#include "../../common/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    refuse_ok([&] {
        SafeTensorsReader r("fuzz.safetensors", std::vector<uint8_t>(data, data + size));
        for (const TensorInfo& t : r.tensors) {
            FUZZ_ASSERT(r.has(t.name));
            FUZZ_ASSERT(t.end - t.begin == (uint64_t)t.numel() * dtype_size(t.dtype));
            std::vector<float> f = r.read_vec<float>(t.name);
            std::vector<double> d = r.read_vec<double>(t.name, t.shape);
            FUZZ_ASSERT((int64_t)f.size() == t.numel() && d.size() == f.size());
        }
    });
    return 0;
}
