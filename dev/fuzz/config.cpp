// Fuzz harness: config.json -> ModelConfig (common/model.h), including Hugging Face
// configs. An accepted config must be one the trainer can hold (validate()) and must
// survive being written and read again with the same shape.
#include "fuzz.h"
#include "../../common/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    std::string text((const char*)data, size);
    refuse_ok([&] {
        ModelConfig c = ModelConfig::from_json(Json::parse(text, "config.json"), "config.json");
        ModelConfig b = ModelConfig::from_json(Json::parse(c.to_json().dump(2), "written"), "written config.json");
        FUZZ_ASSERT(b.vocab_size == c.vocab_size && b.d_model == c.d_model && b.n_layer == c.n_layer &&
                    b.n_head == c.n_head && b.n_kv_head == c.n_kv_head && b.head_dim == c.head_dim &&
                    b.ffn_dim == c.ffn_dim && b.n_experts == c.n_experts && b.top_k == c.top_k &&
                    b.routing == c.routing && b.tie_embeddings == c.tie_embeddings &&
                    b.shared_dim == c.shared_dim && b.shared_gate == c.shared_gate &&
                    b.sliding_window == c.sliding_window);
    });
    return 0;
}
