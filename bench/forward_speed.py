"""CPU prefill speed: our forward vs transformers' NemotronH forward on the same weights, same inputs.

    python bench/forward_speed.py [--preset tiny|PATH] [--seq 512] [--batch 1] [--repeats 5]

Prints the median time of each and the ratio (transformers / ours; > 1 means we are faster).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import hf_model_from  # noqa: E402
from nemotron3 import NemotronConfig, NemotronHForCausalLM, load  # noqa: E402
from timing import median_seconds  # noqa: E402

# A pico-sized default: every layer kind, latent MoE, realistic CPU widths.
BENCH_CONFIG = dict(vocab_size=8192, hidden_size=256, pattern="MEM*EMEM*EME", num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, mamba_num_heads=8, mamba_head_dim=64, ssm_state_size=64,
                    n_groups=2, chunk_size=64, n_routed_experts=16, num_experts_per_tok=2,
                    moe_intermediate_size=256, moe_latent_size=128, moe_shared_expert_intermediate_size=512,
                    routed_scaling_factor=2.5)



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model directory (default: a random pico-sized config)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ours = load(a.model) if a.model else NemotronHForCausalLM(NemotronConfig(**BENCH_CONFIG)).eval()
    hf = hf_model_from(ours)
    hf.config._attn_implementation = "sdpa"          # transformers' fastest CPU attention
    ids = torch.randint(0, ours.config.vocab_size, (a.batch, a.seq))
    with torch.inference_mode():
        diff = (ours(ids) - hf(ids, use_cache=False).logits).abs().max().item()
        t_ours = median_seconds(lambda: ours(ids), a.repeats, warmup=True)
        t_hf = median_seconds(lambda: hf(ids, use_cache=False), a.repeats, warmup=True)
    n = a.batch * a.seq
    print(f"config: {ours.config.pattern} d={ours.config.hidden_size} params={ours.num_parameters():,}; "
          f"batch {a.batch} x seq {a.seq}; threads {a.threads}; max |logit diff| {diff:.2e}")
    print(f"ours         {t_ours * 1e3:9.1f} ms  {n / t_ours:9.0f} tok/s")
    print(f"transformers {t_hf * 1e3:9.1f} ms  {n / t_hf:9.0f} tok/s")
    print(f"speedup (transformers time / ours): {t_hf / t_ours:.2f}x")


if __name__ == "__main__":
    main()
