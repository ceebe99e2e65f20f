// Fuzz harness: common/json.h, the parser behind config.json, trainer_state.json,
// safetensors headers and metrics.jsonl. Whatever parses must also serialize to text that
// parses again (the trainer writes what it read), and the typed getters must refuse rather
// than misconvert.
#include "fuzz.h"
#include "../../common/json.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    std::string text((const char*)data, size);
    refuse_ok([&] {
        Json j = Json::parse(text, "fuzz.json");
        // round trip: compact and indented output both read back, and re-serialize identically
        std::string once = j.dump(), pretty = j.dump(2);
        Json again = Json::parse(once, "fuzz.json (re-read)");
        FUZZ_ASSERT(again.dump() == once);
        FUZZ_ASSERT(Json::parse(pretty, "fuzz.json (indented)").dump() == once);
        // every getter on every key of an object: conversions are where casts go wrong
        for (auto& kv : j.obj) {
            refuse_ok([&] { j.get_int(kv.first, "fuzz.json"); });
            refuse_ok([&] { j.get_int(kv.first, 7, "fuzz.json"); });
            refuse_ok([&] { j.get_num(kv.first, "fuzz.json"); });
            refuse_ok([&] { j.get_bool(kv.first, false, "fuzz.json"); });
            refuse_ok([&] { j.get_str(kv.first, "", "fuzz.json"); });
        }
    });
    return 0;
}
