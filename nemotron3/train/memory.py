"""Per-GPU training memory for a parallel layout, from a config alone: `python -m nemotron3.train.memory ultra
[--world 64 --ep 64 --seq-len 8192 --micro-batch 1]`.

Design decisions (the model of what train/sharded.py does, at scale):

* Layout: routed experts (trunk and MTP) split over `ep` ranks and replicated over world/ep; every other
  weight FSDP2-sharded over all `world` ranks. Per parameter: fp32 master (4 B), fp32 gradient (4 B, fp32
  reduction), AdamW exp_avg + exp_avg_sq (8 B). FSDP2 with bf16 parameters also holds the all-gathered bf16
  copy of the unit being computed and of the prefetched next one (2 x the largest block's non-expert weights).
* Activations assume full activation checkpointing per block (what fits at this scale): the bf16 input of
  every block (trunk + MTP) is kept, plus one block's recompute working set (its largest of: Mamba in_proj
  output, attention QKV + output, MoE routed traffic k tokens x (latent in + intermediate) + shared expert),
  plus fp32 logits and their gradient for the main head and each MTP depth (no vocabulary-parallel loss).
"""
from __future__ import annotations

import argparse

from ..config import NemotronConfig
from ..presets import count_parameters, get_preset


def memory_model(cfg: NemotronConfig, world: int = 64, ep: int = 64, seq_len: int = 8192, micro_batch: int = 1,
                 mtp_depths: int | None = None) -> dict:
    """Bytes per GPU: params, grads, optimizer, gathered (FSDP all-gather buffers), activations, total."""
    if world % ep or cfg.n_routed_experts % ep:
        raise ValueError(f"ep={ep} must divide the world size ({world}) and the routed experts "
                         f"({cfg.n_routed_experts})")
    c = count_parameters(cfg)
    experts = c["breakdown"]["routed_experts"] + c["mtp_breakdown"].get("routed_experts", 0)
    dense = c["total_params"] - experts
    per_gpu = experts / ep + dense / world
    d, T = cfg.hidden_size, seq_len * micro_batch
    depths = cfg.num_nextn_predict_layers if mtp_depths is None else mtp_depths
    n_blocks = len(cfg.pattern) + depths * len(cfg.mtp_pattern)
    layer_params = [_block_dense(cfg, ch) for ch in set(cfg.pattern)]
    l_moe = cfg.moe_latent_size or d
    mamba_in = 2 * cfg.mamba_num_heads * cfg.mamba_head_dim + 2 * cfg.n_groups * cfg.ssm_state_size + cfg.mamba_num_heads
    work = max(mamba_in, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim * 2,
               cfg.num_experts_per_tok * (l_moe + cfg.moe_intermediate_size) + cfg.moe_shared_expert_intermediate_size)
    act = T * d * 2 * n_blocks + T * work * 2 * 2 + T * cfg.vocab_size * 4 * 2 * (1 + depths)
    out = {"params": 4 * per_gpu, "grads": 4 * per_gpu, "optimizer": 8 * per_gpu,
           "gathered": 2 * 2 * max(layer_params), "activations": act}
    out["total"] = sum(out.values())
    out.update(params_per_gpu=per_gpu, expert_params=experts, dense_params=dense)
    return out


def _block_dense(cfg: NemotronConfig, ch: str) -> int:
    """Non-routed-expert parameters of one block of kind `ch` (what one FSDP unit gathers)."""
    one = cfg.replace(pattern=ch, num_nextn_predict_layers=0)
    b = count_parameters(one)["breakdown"]
    return sum(v for k, v in b.items() if k not in ("routed_experts", "embeddings", "lm_head", "mtp", "norms"))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m nemotron3.train.memory", description=__doc__.split("\n")[0])
    ap.add_argument("preset", nargs="?", default="ultra")
    ap.add_argument("--world", type=int, default=64)
    ap.add_argument("--ep", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=1)
    a = ap.parse_args(argv)
    m = memory_model(get_preset(a.preset), a.world, a.ep, a.seq_len, a.micro_batch)
    print(f"{a.preset}: {m['expert_params'] / 1e9:.1f}B routed-expert + {m['dense_params'] / 1e9:.1f}B other params; "
          f"EP {a.ep} x FSDP {a.world} ({a.world // 8} nodes of 8 GPUs), {a.micro_batch} x {a.seq_len} tokens/GPU")
    for k in ("params", "grads", "optimizer", "gathered", "activations", "total"):
        print(f"  {k:12s} {m[k] / 2**30:8.1f} GiB per GPU")


if __name__ == "__main__":
    main()
