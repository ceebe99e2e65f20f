"""make_hf_fixtures.py: checkpoints written by Hugging Face transformers itself, for the
test that real HF Llama / Mixtral / Qwen2-MoE directories load without conversion.

Writes test/fixtures/hf_llama/, test/fixtures/hf_mixtral/ and test/fixtures/hf_qwen2_moe/
(transformers >= 4.40 for Qwen2-MoE; hf_qwen2_moe was written with 4.40.2) with transformers'
save_pretrained (bf16 weights, split into shards with a model.safetensors.index.json, HF's
own config.json with its many extra keys, rms_norm_eps 1e-6, rope_theta 500000), plus
hf_logits.safetensors: fixed tokens ("tokens", I32 [B, T]) and the logits transformers
computes for them in float32 ("logits", F32 [B, T, V]). test/test_cpu.cpp loads the
directory with the CPU trainer and compares.

Run (a dev tool; needs torch + transformers, see hf_check.py):
    /tmp/hfenv/bin/python dev/reference/make_hf_fixtures.py --out test/fixtures [--only qwen2_moe]
Qwen2-MoE's q/k/v projections always have biases; this model has none, so they stay zero here
(HF's own init) and the test loads them as zeros.
"""
import argparse
import os
import sys

try:
    import torch
except ImportError as e:  # --help works without PyTorch; anything else says what to install
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(print(__doc__))
    sys.exit(f"make_hf_fixtures.py: {e}: it needs torch: apt-get install python3-torch (it brings numpy), then run it with /usr/bin/python3")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as ref  # noqa: E402


def build(kind):
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                  rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed({"llama": 11, "mixtral": 12, "qwen2_moe": 13}[kind])
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(intermediate_size=80, **common))
    elif kind == "qwen2_moe":
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
        m = Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=24,
                                               shared_expert_intermediate_size=48, num_experts=4,
                                               num_experts_per_tok=2, norm_topk_prob=False, **common))
    else:
        m = MixtralForCausalLM(MixtralConfig(intermediate_size=40, num_local_experts=4,
                                             num_experts_per_tok=2, **common))
    with torch.no_grad():  # HF's init (std 0.02) is too flat to test much: widen it
        for n, p in m.named_parameters():
            if n.endswith("_proj.bias"):  # Qwen2-MoE's attention biases: zero (HF's init)
                p.zero_()
            elif p.dim() == 2:
                p.normal_(0, 0.5 if "gate.weight" in n and "experts" not in n else 0.15)
            else:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="test/fixtures")
    ap.add_argument("--only", default="llama,mixtral,qwen2_moe", help="comma-separated kinds")
    args = ap.parse_args()
    for kind in args.only.split(","):
        m = build(kind).to(torch.bfloat16)
        d = os.path.join(args.out, "hf_" + kind)
        m.save_pretrained(d, safe_serialization=True, max_shard_size="40KB")
        # the logits of the bf16 weights, computed in float32 by transformers
        m32 = type(m).from_pretrained(d, torch_dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(5)
        tokens = torch.randint(0, 96, (2, 12), generator=g)
        with torch.no_grad():
            logits = m32(tokens).logits
        ref.write_safetensors(os.path.join(d, "hf_logits.safetensors"),
                              {"tokens": tokens.to(torch.int32).numpy(), "logits": logits.float().numpy()},
                              {"description": f"transformers {__import__('transformers').__version__} float32 logits"})
        print(d, sorted(os.listdir(d)))


if __name__ == "__main__":
    main()
