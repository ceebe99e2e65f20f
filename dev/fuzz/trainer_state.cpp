// Fuzz harness: trainer_state.json (common/checkpoint.h), read on --resume: step and token
// counters, the data loader's position per domain, the sampler's RNG counter (a string).
// Every counter must be refused or converted without an undefined cast or a foreign exception.
#include "fuzz.h"
#include "../../common/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    std::string text((const char*)data, size);
    refuse_ok([&] {
        TrainerState st;
        long adam_t = 0;
        Json settings;
        parse_trainer_state(Json::parse(text, "trainer_state.json"), 2, "trainer_state.json", st, &adam_t, &settings);
        FUZZ_ASSERT(st.data.epoch.size() == 2 && st.data.pos.size() == 2 && st.step >= 0 && adam_t >= 0);
        // what the trainer writes back reads back the same
        TrainerState again;
        long adam_again = 0;
        Json j = Json::object();
        j["step"] = st.step; j["tokens"] = st.tokens; j["adam_t"] = adam_t; j["data"] = st.data.to_json();
        j["sample_rng_counter"] = std::to_string(st.sample_counter); j["elapsed_seconds"] = st.elapsed;
        parse_trainer_state(Json::parse(j.dump(2), "written"), 2, "written", again, &adam_again, &settings);
        FUZZ_ASSERT(again.step == st.step && adam_again == adam_t && again.sample_counter == st.sample_counter &&
                    again.data.rows_drawn == st.data.rows_drawn && again.data.pos == st.data.pos);
    });
    return 0;
}
