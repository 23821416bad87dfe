"""The pretraining objective: LM cross-entropy + MTP cross-entropy + MoE balancing (sources:
/work/shared/reference/recipes.md §1-3).

Design decisions:

* Loss = LM CE + mtp_loss_factor / D * sum_k CE_k + moe_aux_loss_coeff * seq-aux loss. Every term is a token (or
  sequence) SUM divided by the count over the whole global step (all micro-batches, all ranks: `norms`, summed
  by the caller), so gradient accumulation and data parallelism give the same gradients as one big batch.
* MTP depth k: logits at position t predict token t+k+1; targets are `eval.lm.mtp_labels(labels, k)`.
* MoE balancing (DeepSeek-V3 / Megatron): a per-sequence aux loss sum_i f_i P_i (f_i = E/(k T) * tokens routed
  to i, P_i = mean of scores normalised over experts), averaged over sequences and MoE calls (the shared MTP
  MoE counts once per depth), plus aux-loss-free balancing: after every optimizer step
  e_score_correction_bias += rate * sign(mean_load - load_i) from the step's globally summed counts
  (`update_bias`). Router outputs are captured with forward hooks, so every call of a layer is seen.
* Logits are fp32 and the losses are computed in fp32. The model and the losses run in one `forward`, so a
  data-parallel wrapper (DDP today) sees a single call.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..eval.lm import IGNORE, mtp_labels
from ..model import NemotronHForCausalLM
from ..model.moe import LatentMoE


def seq_aux_loss(scores: torch.Tensor, idx: torch.Tensor, B: int):
    """DeepSeek-V3 sequence-wise balance loss per sequence [B] and routed-token counts [E] of one MoE call."""
    E, k = scores.shape[-1], idx.shape[-1]
    s = scores.view(B, -1, E)
    T = s.shape[1]
    P = (s / s.sum(-1, keepdim=True)).mean(1)                                           # [B, E]
    counts = torch.zeros(B, E, device=s.device).scatter_add_(
        1, idx.view(B, -1), torch.ones(B, T * k, device=s.device))                       # [B, E]
    return (counts * (E / (k * T)) * P).sum(-1), counts.sum(0)


class TrainLoss(nn.Module):
    """Model + losses in one forward. Returns (loss to backprop, stats [2+D]) where stats = [lm, mtp_1..mtp_D,
    aux] as shares of the global-step means."""

    def __init__(self, model: NemotronHForCausalLM, t: dict):
        super().__init__()
        self.model, self.depths = model, t["mtp_depths"] if model.mtp is not None else 0
        self.mtp_factor, self.aux_coeff = t["mtp_loss_factor"], t["moe_aux_loss_coeff"]
        cfg = model.config
        self.moe_calls = cfg.pattern.count("E") + self.depths * cfg.mtp_pattern.count("E")  # MTP MoE: once a depth
        self.moes = [(n.replace("backbone.", "").replace(".mixer", ""), m)
                     for n, m in model.named_modules() if isinstance(m, LatentMoE)]
        self.calls: list = []
        self._active = False
        self.counts = {id(m): torch.zeros(m.gate.n_experts, device=model.device) for _, m in self.moes}
        for _, m in self.moes:
            m.register_forward_hook(self._hook)

    def _hook(self, mod, inputs, out):
        if self._active and mod.record_router:
            self.calls.append((mod, inputs[0].shape[0], *mod.router_stats))

    def record(self, on: bool):
        for _, m in self.moes:
            m.record_router = on

    def norms(self, labels: list[torch.Tensor]) -> torch.Tensor:
        """This rank's [n_lm, n_mtp_1..n_mtp_D, n_moe_sequences] over the step's micro-batch labels; the sum over
        ranks is the `norm` every forward of the step divides by."""
        norm = torch.zeros(self.depths + 2, device=self.model.device)
        for y in labels:
            norm[0] += (y != IGNORE).sum()
            for k in range(1, self.depths + 1):
                norm[k] += (mtp_labels(y, k) != IGNORE).sum()
        norm[-1] = sum(y.shape[0] for y in labels) * self.moe_calls
        return norm

    def combine(self, terms):
        """The loss from its terms [lm, mtp_1..mtp_D, aux] (tensor or list of floats)."""
        D = len(terms) - 2
        mtp = terms[1:1 + D].sum() if isinstance(terms, torch.Tensor) else sum(terms[1:1 + D])
        return terms[0] + (self.mtp_factor / D * mtp if D else 0) + self.aux_coeff * terms[-1]

    def forward(self, ids, labels, norm: torch.Tensor, world: int):
        """norm = global [n_lm, n_mtp_1..n_mtp_D, n_moe_sequences] of this optimizer step (`norms`, summed over
        ranks); the loss is scaled by `world` because data parallelism averages the ranks' gradients."""
        self.calls.clear()
        self._active = True
        try:
            main, mtps = self.model.forward_mtp(ids, self.depths)
        finally:
            self._active = False
            for _, m in self.moes:
                m.router_stats = None
        V = main.shape[-1]
        terms = [F.cross_entropy(main.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")]
        for k, logits in enumerate(mtps, 1):
            terms.append(F.cross_entropy(logits.reshape(-1, V), mtp_labels(labels, k).reshape(-1),
                                         ignore_index=IGNORE, reduction="sum"))
        aux = main.new_zeros(())
        for mod, B, scores, idx in self.calls:
            per_seq, counts = seq_aux_loss(scores, idx, B)
            aux = aux + per_seq.sum()
            self.counts[id(mod)] += counts.detach()
        self.calls.clear()
        terms = torch.stack(terms + [aux]) / norm.clamp(min=1)
        return self.combine(terms) * world, terms.detach()

    @torch.no_grad()
    def update_bias(self, rate: float, dist_on: bool) -> dict:
        """Aux-loss-free balancing from the step's (all-reduced when `dist_on`) counts; returns per-layer load
        stats."""
        stats = {}
        for name, m in self.moes:
            c = self.counts[id(m)]
            if dist_on:
                dist.all_reduce(c)
            mean = c.mean()
            if rate:
                m.gate.e_score_correction_bias += rate * torch.sign(mean - c).to(m.gate.e_score_correction_bias)
            if mean > 0:
                stats[name] = {"max": round((c.max() / mean).item(), 4), "min": round((c.min() / mean).item(), 4),
                               "cv": round((c.std(unbiased=False) / mean).item(), 4)}
            c.zero_()
        return stats
