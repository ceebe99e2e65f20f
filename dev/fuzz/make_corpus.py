#!/usr/bin/env python3
"""Writes the seed corpus of each fuzz harness: dev/fuzz/corpus/<harness>/, a few valid inputs
and a few broken ones (the fuzzer mutates from both). Rerun after changing a format; the
output is deterministic and committed. `make fuzz` never writes into these directories."""
import json
import os
import struct
import sys

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(harness, name, data):
    d = os.path.join(OUT, harness)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def safetensors(tensors, metadata=None, pad=True):
    """tensors: [(name, dtype, shape, raw bytes)] -> file bytes, laid out like the project's writer."""
    header, blob = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    h = json.dumps(header, separators=(",", ":"))
    while pad and (8 + len(h)) % 8:
        h += " "
    return struct.pack("<Q", len(h)) + h.encode() + blob


def shard(tokens, count=None, magic=20240520, version=1):
    h = [0] * 256
    h[0], h[1], h[2] = magic, version, len(tokens) if count is None else count
    return struct.pack("<256i", *h) + struct.pack(f"<{len(tokens)}H", *tokens)


def tokenizer(tokens, eot, version=2, count=None, magic=20240328):
    h = [0] * 256
    h[0], h[1], h[2], h[3] = magic, version, len(tokens) if count is None else count, eot
    body = b"".join(bytes([len(t)]) + t for t in tokens)
    return struct.pack("<256I", *h) + body


def main():
    # generic JSON: the shapes the project reads, and the corners of the grammar
    put("json", "object.json", '{"a": 1, "b": [1.5, -2e-3, true, false, null], "c": {"d": "x\\u00e9\\ud83d\\ude00"}}')
    put("json", "numbers.json", '[0, -0, 9007199254740993, 1e308, 1e400, 123.456e-7, NaN, Infinity, -Infinity]')
    put("json", "metrics.jsonl.json", '{"step": 10, "loss": 3.25, "lr": 0.0006, "expert_load": [[0.25, 0.75]]}')
    put("json", "escapes.json", '"\\"\\\\\\/\\b\\f\\n\\r\\t\\u0000"')
    put("json", "bad_trailing.json", '{"a": 1} x')
    put("json", "bad_unterminated.json", '{"a": [1, 2')
    put("json", "bad_number.json", '[01, 1., .5, 0x10, -inf]')
    put("json", "bad_surrogate.json", '"\\ud800\\u0041"')
    put("json", "deep.json", "[" * 70 + "]" * 70)

    # config.json: ours (dense, MoE), Hugging Face's Llama 3 with rope_scaling, broken ones
    dense = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
             "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": 1e-05,
             "rope_theta": 10000, "tie_word_embeddings": False, "torch_dtype": "float32"}
    put("config", "dense.json", json.dumps(dense, indent=2))
    moe = dict(dense, architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=8,
               num_experts_per_tok=2, moe_routing="softmax_topk", upcycled_from={"method": "drop", "ratio": 0.5})
    put("config", "moe.json", json.dumps(moe, indent=2))
    llama3 = dict(dense, num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                  "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    put("config", "llama3.json", json.dumps(llama3))
    # Qwen2-MoE (a shared expert): Hugging Face's keys, ungated (our key), a dense-MLP layer (refused)
    qwen = dict(dense, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
                sliding_window=4096)
    put("config", "qwen2_moe.json", json.dumps(qwen, indent=2))
    put("config", "qwen2_moe_ungated.json", json.dumps(dict(qwen, norm_topk_prob=True, shared_expert_gating="none")))
    put("config", "bad_qwen2_moe_layers.json", json.dumps(dict(qwen, mlp_only_layers=[1])))
    put("config", "bad_missing_key.json", json.dumps({k: v for k, v in dense.items() if k != "hidden_size"}))
    put("config", "bad_topk.json", json.dumps(dict(moe, num_experts_per_tok=9)))
    put("config", "bad_huge.json", json.dumps(dict(dense, num_hidden_layers=4294967297)))
    put("config", "bad_type.json", json.dumps(dict(dense, vocab_size="512")))

    # safetensors: F32 / BF16 / I64 tensors with metadata, an empty tensor, broken ones
    f32 = struct.pack("<6f", 1, -2, 3.5, 0, 1e-3, -7)
    ok = safetensors([("a.weight", "F32", [2, 3], f32), ("b", "BF16", [2], b"\x80\x3f\x00\xc0"),
                      ("c", "I64", [1], struct.pack("<q", -5)), ("empty", "F16", [0, 4], b"")],
                     metadata={"format": "pt", "adam_t": "12"})
    put("safetensors", "ok.safetensors", ok)
    put("safetensors", "ok_f16_f64_u8.safetensors",
        safetensors([("h", "F16", [2], b"\x00\x3c\x01\x00"), ("d", "F64", [1], struct.pack("<d", 2.5)),
                     ("u", "U8", [3], b"\x01\x02\xff"), ("i", "I32", [1], struct.pack("<i", -1))], pad=False))
    put("safetensors", "bad_truncated.safetensors", ok[:-9])
    put("safetensors", "bad_hlen.safetensors", struct.pack("<Q", 1 << 40) + ok[8:])
    overlap = b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}'
    put("safetensors", "bad_overlap.safetensors", struct.pack("<Q", len(overlap)) + overlap + bytes(8))
    put("safetensors", "bad_shape.safetensors",
        safetensors([("x", "F32", [4294967296, 4294967296], b"")]))

    # token shards: a valid one, one with a token over the harness's vocab (512), broken headers
    toks = [(i * 37) % 512 for i in range(200)]
    put("shard", "ok.bin", shard(toks))
    put("shard", "empty.bin", shard([]))
    put("shard", "bad_token.bin", shard(toks[:10] + [600]))
    put("shard", "bad_count.bin", shard(toks, count=2147483647))
    put("shard", "bad_truncated.bin", shard(toks)[:-3])
    put("shard", "bad_version.bin", shard(toks, version=2))

    # tokenizer.bin: version 2 (with end-of-text) and 1, broken ones
    vocab = [bytes([b]) for b in range(256)] + [b"the", b" and", b"\xe2\x82\xac", b"<|endoftext|>"]
    put("tokenizer", "ok_v2.bin", tokenizer(vocab, eot=len(vocab) - 1))
    put("tokenizer", "ok_v1.bin", tokenizer(vocab[:40], eot=0, version=1))
    put("tokenizer", "bad_eot.bin", tokenizer(vocab[:40], eot=40))
    put("tokenizer", "bad_count.bin", tokenizer(vocab[:40], eot=3, count=4000000000))
    put("tokenizer", "bad_truncated.bin", tokenizer(vocab[:40], eot=3)[:-2])
    put("tokenizer", "bad_magic.bin", tokenizer(vocab[:4], eot=3, magic=1234))
    # trainer_state.json (the harness expects 2 domains)
    state = {"step": 100, "tokens": 409600, "adam_t": 100, "sample_rng_counter": "18446744073709551615",
             "elapsed_seconds": 12.5, "data": {"rows_drawn": 800, "epoch": [1, 0], "pos": [17, 399]},
             "settings": {"lr": 0.0006, "batch": 8}}
    put("trainer_state", "ok.json", json.dumps(state, indent=2))
    put("trainer_state", "bad_domains.json", json.dumps(dict(state, data={"rows_drawn": 1, "epoch": [0], "pos": [0]})))
    put("trainer_state", "bad_counter.json", json.dumps(dict(state, sample_rng_counter="12x")))
    put("trainer_state", "bad_negative.json", json.dumps(dict(state, data={"rows_drawn": 1, "epoch": [-1, 0], "pos": [0, 1e300]})))
    put("trainer_state", "bad_step.json", json.dumps(dict(state, step=1e300)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
