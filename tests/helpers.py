"""Shared test helpers: small random configs and weights that exercise every code path."""
import torch

from nemotron3.config import NemotronConfig

SMALL = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             intermediate_size=40, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
             chunk_size=8, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=12,
             moe_shared_expert_intermediate_size=20, routed_scaling_factor=2.5)


def small_config(pattern="M*EM-E", **overrides) -> NemotronConfig:
    return NemotronConfig(pattern=pattern, **{**SMALL, **overrides})


@torch.no_grad()
def randomize(model, seed=0, scale=0.05):
    """Perturb every parameter and the router bias so no weight sits at its trivial init value."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "norm_f.weight", "enorm.weight", "hnorm.weight", "layernorm.weight")):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith("D"):
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
        elif name.endswith("A_log"):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        elif name.endswith("dt_bias"):
            p.add_(0.5 * torch.randn(p.shape, generator=g))
        else:
            p.add_(scale * torch.randn(p.shape, generator=g))
    for m in model.moe_layers():
        m.gate.e_score_correction_bias.copy_(0.1 * torch.randn(m.gate.e_score_correction_bias.shape, generator=g))
    return model


def to_hf_state(model) -> dict:
    """Our state dict under transformers' in-memory names (the MTP block has no transformers counterpart)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("mtp."):
            continue
        out["model." + k[len("backbone."):] if k.startswith("backbone.") else k] = v
    return out


def hf_model_from(model):
    """A transformers NemotronHForCausalLM holding the same weights as ours (fp32)."""
    import transformers
    # eager experts/attention: transformers' plain reference loops (its grouped_mm path rejects odd sizes on CPU)
    cfg = transformers.NemotronHConfig(**model.config.to_dict(), experts_implementation="eager",
                                       attn_implementation="eager")
    hf = transformers.NemotronHForCausalLM(cfg)
    missing, unexpected = hf.load_state_dict(to_hf_state(model), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf.eval()
