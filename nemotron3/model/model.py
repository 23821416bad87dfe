"""The Nemotron-H causal LM: embeddings -> pattern of pre-norm residual blocks -> norm_f -> lm_head, plus MTP.

Module names are the checkpoint names (`backbone.embeddings`, `backbone.layers.{i}.norm`,
`backbone.layers.{i}.mixer.*`, `backbone.norm_f`, `lm_head`, `mtp.layers.{j}.*`), so a state dict maps
onto safetensors files one to one (routed experts aside: see `moe.py`).

MTP (Multi-Token Prediction, `num_nextn_predict_layers` physical steps of pattern `mtp_pattern`, `*E`
in Super/Ultra): for depth k the input at position t is the previous depth's hidden h_t (depth 0: the
backbone output after `norm_f`) and the shared embedding of token t+k; `eh_proj(cat(enorm(emb), hnorm(h)))`
feeds the step's blocks (`mtp.layers.0` holds enorm/hnorm/eh_proj and the first block, the last
`mtp.layers.*` holds `final_layernorm`); the shared `lm_head` turns the normed output into logits for
token t+k+1. One physical step is applied recursively for D depths (step k uses physical layer
(k-1) mod num_nextn_predict_layers; with several physical steps their sub-layers are numbered on:
step s, sub-layer j -> `mtp.layers.{s * len(mtp_pattern) + j}`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NemotronConfig
from .attention import Attention
from .cache import CacheRows, HybridCache
from .mamba2 import Mamba2Mixer
from .moe import MLP, Experts, LatentMoE, TopkRouter
from .norm import RMSNorm


def make_mixer(config: NemotronConfig, kind: str) -> nn.Module:
    if kind == "M":
        return Mamba2Mixer(config)
    if kind == "*":
        return Attention(config)
    if kind == "E":
        return LatentMoE(config)
    return MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)


class Block(nn.Module):
    """`h + mixer(norm(h))` with one mixer of kind `M`, `*`, `E` or `-`."""

    def __init__(self, config: NemotronConfig, kind: str, layer_id: int):
        super().__init__()
        self.kind, self.layer_id = kind, layer_id        # layer_id: this block's slot in a HybridCache
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = make_mixer(config, kind)

    def forward(self, h: torch.Tensor, rows: CacheRows | None = None, pad_mask=None) -> torch.Tensor:
        x = self.norm(h.to(self.norm.weight.dtype))
        if self.kind == "M":
            state = None if rows is None else rows.get_mamba(self.layer_id)
            out, state = self.mixer(x, state, pad_mask, record=rows is not None and rows.record)
            if rows is not None:
                rows.set_mamba(self.layer_id, *state)
        elif self.kind == "*":
            kv = None if rows is None else (lambda k, v: rows.append_kv(self.layer_id, k, v))
            out = self.mixer(x, kv, pad_mask)
        else:
            out = self.mixer(x)
        return h + out


class Backbone(nn.Module):
    def __init__(self, config: NemotronConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, kind, i) for i, kind in enumerate(config.pattern))
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids, rows=None, pad_mask=None) -> torch.Tensor:
        h = self.embeddings(input_ids).to(self.norm_f.weight.dtype)      # a bf16 table under fp32 activations
        for layer in self.layers:
            h = layer(h, rows, pad_mask)
        return self.norm_f(h)


class MTPLayer(Block):
    """One sub-layer of an MTP step; the first fuses embedding and hidden, the last applies the final norm."""

    def __init__(self, config: NemotronConfig, kind: str, layer_id: int, first: bool, last: bool):
        super().__init__(config, kind, layer_id)
        d, eps = config.hidden_size, config.layer_norm_epsilon
        if first:
            self.enorm, self.hnorm = RMSNorm(d, eps), RMSNorm(d, eps)
            self.eh_proj = nn.Linear(2 * d, d, bias=False)
        if last:
            self.final_layernorm = RMSNorm(d, eps)


class MTP(nn.Module):
    def __init__(self, config: NemotronConfig):
        super().__init__()
        n, p = config.num_hidden_layers, config.mtp_pattern
        self.steps, self.per_step = config.num_nextn_predict_layers, len(p)
        self.layers = nn.ModuleList(
            MTPLayer(config, p[j % len(p)], n + j, first=j % len(p) == 0, last=j % len(p) == len(p) - 1)
            for j in range(self.steps * len(p)))

    def forward(self, hidden, emb, depth: int = 1, rows=None) -> torch.Tensor:
        """hidden [B, T, d] (previous depth), emb [B, T, d] (embeddings of the next tokens) -> normed hidden."""
        s = (depth - 1) % self.steps
        layers = self.layers[s * self.per_step:(s + 1) * self.per_step]
        first = layers[0]
        x = first.eh_proj(torch.cat([first.enorm(emb), first.hnorm(hidden)], dim=-1))
        for layer in layers:
            x = layer(x, rows)
        return layers[-1].final_layernorm(x)


class NemotronHForCausalLM(nn.Module):
    def __init__(self, config: NemotronConfig, init: bool = True):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self.mtp = MTP(config) if config.has_mtp else None
        if init and not any(p.is_meta for p in self.parameters()):
            init_weights(self)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (norm_f's: lm_head / embeddings may be held in bf16 under fp32 activations)."""
        return self.backbone.norm_f.weight.dtype

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [batch, seq] tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): need at least one token per row")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token id out of range [0, {self.config.vocab_size}): "
                             f"min {int(input_ids.min())}, max {int(input_ids.max())}")

    def hidden_states(self, input_ids, cache: HybridCache | None = None, slots=None,
                      attention_mask: torch.Tensor | None = None, record_states: bool = False) -> torch.Tensor:
        """Backbone output after `norm_f` [B, T, d]; with a cache, continues and advances the given slots.
        `record_states` (speculative verification) also leaves every position's Mamba state in
        `cache.recorded` for `cache.keep_recorded`."""
        self._check_ids(input_ids)
        if attention_mask is not None and cache is not None:
            raise ValueError("attention_mask (padding) is only supported without a cache; "
                             "the engine batches ragged sequences through cache slots instead")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise ValueError(f"attention_mask must be a [batch, seq] tensor of 0/1, got "
                                 f"{type(attention_mask).__name__}")
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            if not ((attention_mask == 0) | (attention_mask == 1)).all():
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        if record_states and cache is None:
            raise ValueError("record_states needs a cache")
        if cache is not None:
            self._check_cache(cache)
        rows = None if cache is None else cache.rows(slots, input_ids.shape[0], record=record_states)
        h = self.backbone(input_ids, rows, attention_mask)
        if rows is not None:
            rows.advance(input_ids.shape[1])
        return h

    def _check_cache(self, cache) -> None:
        if not isinstance(cache, HybridCache):
            raise ValueError(f"cache must be a HybridCache, got {type(cache).__name__}")
        a, b = cache.config, self.config
        if a is not b and cache_layout(a) != cache_layout(b):
            raise ValueError("cache was built for a different model config (layer pattern or state sizes differ)")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden.to(self.dtype)).float()

    def forward(self, input_ids, cache: HybridCache | None = None, slots=None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, T] -> fp32 logits [B, T, vocab]."""
        return self.logits(self.hidden_states(input_ids, cache, slots, attention_mask))

    def mtp_step(self, hidden, next_ids, depth: int = 1, cache: HybridCache | None = None, slots=None):
        """One MTP depth: hidden [B, T, d] at positions t and next_ids [B, T] (tokens t+depth) ->
        (logits for tokens t+depth+1 [B, T, V] fp32, MTP hidden [B, T, d] for the next depth)."""
        h = self.mtp_hidden_states(hidden, next_ids, depth, cache, slots)
        return self.logits(h), h

    def mtp_hidden_states(self, hidden, next_ids, depth: int = 1, cache: HybridCache | None = None, slots=None,
                          record_states: bool = False):
        """`mtp_step` without the logits (the engine drafts from one position per row, so it applies
        `logits` to the rows it needs: lm_head over every row would cost as much as the backbone).
        `record_states`: as in `hidden_states`, for Mamba layers of the MTP block (an `mtp_pattern` with `M`)."""
        if self.mtp is None:
            raise ValueError("this model has no MTP block (num_nextn_predict_layers = 0)")
        self._check_ids(next_ids)
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"MTP depth must be an integer >= 1, got {depth!r}")
        if hidden.dim() != 3 or hidden.shape[:2] != next_ids.shape or hidden.shape[2] != self.config.hidden_size:
            raise ValueError(f"hidden {tuple(hidden.shape)} must be [batch, seq, {self.config.hidden_size}] "
                             f"matching next_ids {tuple(next_ids.shape)}")
        if cache is not None:
            self._check_cache(cache)
        if record_states and cache is None:
            raise ValueError("record_states needs a cache")
        rows = None if cache is None else cache.rows(slots, next_ids.shape[0], mtp=True, record=record_states)
        h = self.mtp(hidden, self.backbone.embeddings(next_ids).to(hidden.dtype), depth, rows)
        if rows is not None:
            rows.advance(next_ids.shape[1])
        return h

    def forward_mtp(self, input_ids, depths: int, attention_mask=None):
        """Training forward: main logits [B, T, V] and, for k = 1..depths, MTP logits [B, T-k, V] where
        position t predicts token t+k+1 (the sequence shortens by one per depth)."""
        if not isinstance(depths, int) or depths < 0:
            raise ValueError(f"depths must be an integer >= 0, got {depths!r}")
        h = self.hidden_states(input_ids, attention_mask=attention_mask)
        main = self.logits(h)
        out, T = [], input_ids.shape[1]
        for k in range(1, depths + 1):
            if T - k <= 0:
                break
            logits, h = self.mtp_step(h[:, : T - k], input_ids[:, k:], k)
            out.append(logits)
        return main, out

    def moe_layers(self) -> list[LatentMoE]:
        return [m for m in self.modules() if isinstance(m, LatentMoE)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def cache_layout(c: NemotronConfig) -> tuple:
    """The config fields that fix a HybridCache's layout (which layers hold what state, of what shape)."""
    return (c.pattern, c.num_nextn_predict_layers, c.mtp_pattern if c.has_mtp else "", c.mamba_num_heads,
            c.mamba_head_dim, c.n_groups, c.ssm_state_size, c.conv_kernel, c.num_key_value_heads, c.head_dim)


@torch.no_grad()
def init_weights(model: NemotronHForCausalLM) -> None:
    """Initialisation from scratch, as transformers' `NemotronHPreTrainedModel._init_weights`: normal(0,
    initializer_range) linears/embeddings/router/experts/depthwise conv (zero biases), A_log = log(1..H),
    D = 1, dt_bias = softplus^-1(dt) with dt log-uniform in [time_step_min, time_step_max], and `out_proj` scaled by
    1/sqrt(num_layers) when `rescale_prenorm_residual`."""
    c = model.config
    std = c.initializer_range
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
        elif isinstance(m, TopkRouter):
            m.weight.normal_(0.0, std)
            m.e_score_correction_bias.zero_()
        elif isinstance(m, Experts):
            m.up_proj.normal_(0.0, std)
            m.down_proj.normal_(0.0, std)
        elif isinstance(m, Mamba2Mixer):
            H = m.num_heads
            m.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
            m.D.fill_(1.0)
            lo, hi = math.log(c.time_step_min), math.log(c.time_step_max)
            dt = torch.exp(torch.rand(H) * (hi - lo) + lo).clamp(min=c.time_step_floor)
            m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            # transformers' base _init_weights: Conv1d like a Linear. (PyTorch's default kaiming init, std ~0.3
            # for a 4-tap depthwise conv, kept a from-scratch model from learning in-context copying: measured,
            # tests/test_train.py::test_init_learns_in_context_copying.)
            m.conv1d.weight.normal_(0.0, std)
            if m.conv1d.bias is not None:
                m.conv1d.bias.zero_()
    for m in model.modules():
        if isinstance(m, Mamba2Mixer) and c.rescale_prenorm_residual:
            nn.init.kaiming_uniform_(m.out_proj.weight, a=math.sqrt(5))
            m.out_proj.weight.div_(math.sqrt(c.num_hidden_layers))
