"""hf_check.py: does Hugging Face transformers compute the same function as our checkpoint?

Loads a checkpoint directory written by train_moe / upcycle twice: with transformers'
AutoModelForCausalLM (LlamaForCausalLM / MixtralForCausalLM, float32) and with our float64
reference (model.py), runs the same tokens through both and compares the logits and the
HF Mixtral load-balancing loss against ours (`pooled`).

Needs torch and transformers (a dev tool, not part of `make test`). Here it ran with
Debian's python3-torch 1.13 and transformers 4.36.2 in a venv:
    /usr/bin/python3 -m venv --system-site-packages /tmp/hfenv
    /tmp/hfenv/bin/pip install transformers==4.36.2
    /tmp/hfenv/bin/python dev/reference/hf_check.py runs/moe/step_000300
Exit code 0 when the max logit difference is below --tol relative to the max |logit|.
"""
import argparse
import json
import os
import sys

try:
    import torch
except ImportError as e:  # --help works without PyTorch; anything else says what to install
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(print(__doc__))
    sys.exit(f"hf_check.py: {e}: it needs torch: apt-get install python3-torch (it brings numpy), then run it with /usr/bin/python3")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as ref  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="checkpoint directory (config.json + model.safetensors)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--tol", type=float, default=1e-4, help="max |logit diff| / max |logit| (fp32 HF vs float64 ours)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    with open(os.path.join(args.ckpt, "config.json")) as f:
        cfgj = json.load(f)
    if cfgj.get("model_type") == "qwen2_moe":  # both routings map to norm_topk_prob
        if cfgj.get("shared_expert_gating", "sigmoid") != "sigmoid":
            print("note: ungated shared expert: HF Qwen2-MoE always applies a sigmoid gate (and draws a "
                  "random one here), so it computes a different function by design; expecting a difference")
    elif cfgj.get("moe_routing", "topk_softmax") != "topk_softmax":
        print("note: softmax_topk routing: HF Mixtral renormalizes the top-K weights, so it computes "
              "a different function by design; expecting a difference")
    hf = AutoModelForCausalLM.from_pretrained(args.ckpt, torch_dtype=torch.float32)
    hf.eval()
    cfg, P = ref.load_checkpoint(args.ckpt)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.V, (args.batch, args.seq), generator=g)
    with torch.no_grad():
        out = hf(tokens, output_router_logits=cfg.moe) if cfg.moe else hf(tokens)
        ours, _ = ref.forward(P, cfg, tokens)
    diff = (out.logits.double() - ours).abs().max().item()
    scale = ours.abs().max().item()
    print(f"{args.ckpt}: {type(hf).__name__}, max |logit diff| {diff:.3g}, max |logit| {scale:.3g}, "
          f"ratio {diff / scale:.3g}")
    ok = diff <= args.tol * scale
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
