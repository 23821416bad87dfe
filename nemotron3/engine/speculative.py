"""MTP self-speculative decoding: draft k tokens with the model's own MTP block, verify them in one forward.

One round for a sequence whose backbone has consumed positions < t and whose next token x_t is known:

1. **verify**: one backbone forward over [x_t, d_1 .. d_k] (k+1 positions, all running sequences in one
   batch) with `record_states=True`, so every Mamba layer leaves its conv window and SSM state after each
   position in `cache.recorded`.
2. **accept** (`accept_greedy` / `accept_sampled`): greedy keeps the longest prefix of drafts equal to the
   target argmax and then appends the target's own token (the bonus token if all k were accepted), which
   is exactly what plain greedy decoding emits. With temperature > 0, standard speculative rejection
   sampling (Leviathan et al. 2023; Chen et al. 2023): accept d_i with probability min(1, p(d_i)/q(d_i));
   at the first rejection sample from normalise(max(p - q, 0)) and stop; if all are accepted sample a
   bonus token from p. The output distribution is exactly the target's. p is the *processed* target
   distribution (temperature, top-k/p, min-p, reasoning-budget forcing), q the one the draft was drawn from.
3. **roll back**: the backbone keeps positions t .. t+a (a = accepted drafts): K/V by setting `lengths`
   (later positions are masked, then overwritten), Mamba by `cache.keep_recorded(slots, a)`.
4. **draft** the next round: the MTP block has its own attention K/V over positions. Entry j holds
   (backbone hidden h_j, embedding of token j+1), so it can be written only once token j+1 is known. The
   engine keeps the invariant `mtp_length = num_computed - 1` between steps, with the hidden of the last
   consumed position (`Sequence.last_hidden`) pending. A round feeds the MTP block
   [h_{t-1}, h_t .. h_{t+k}] with the tokens [x_t, d_1 .. d_a, y, (junk)] in ONE batched call: entries up
   to t+a are real (causal attention keeps junk rows from touching them), and the logits at entry t+a
   give draft d'_1. Depths 2..k feed the MTP block its own output hidden and the previous draft
   recursively (vLLM's NemotronH MTP does the same, one shared layer for all depths), appending
   temporary entries; then `mtp_lengths` is reset to the invariant.
"""
from __future__ import annotations

import torch

from .sampling import choose, sample_rows


def accept_greedy(drafts: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts [B, k], target [B, k+1] (argmax of the constrained target at each verify position) ->
    (accepted count a [B], the token after the accepted drafts [B] = target[b, a])."""
    match = (drafts == target[:, :-1]).int()
    a = match.cumprod(-1).sum(-1)
    return a, target.gather(1, a[:, None])[:, 0]


def accept_sampled(drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor, u: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling for B rows at once. drafts [B, k]; p [B, k+1, V] target
    distributions; q [B, k, V] the distributions the drafts were drawn from; u [B, k+1] uniforms (a fixed
    k+1 per row and round, from the row's own generator). Draft i is accepted iff u_i * q(d_i) < p(d_i),
    i.e. with probability min(1, p/q); the first rejection resamples from normalise(max(p - q, 0)), and if
    all k are accepted the bonus token comes from p at position k; that draw uses u_k, independent of the
    accept tests. Returns (accepted count a [B], the token after the accepted drafts [B])."""
    B, k = drafts.shape
    pd = p[:, :k].gather(-1, drafts[..., None])[..., 0].double()
    qd = q.gather(-1, drafts[..., None])[..., 0].double()
    a = (u[:, :k] * qd < pd).int().cumprod(-1).sum(-1)
    rows = torch.arange(B)
    p_a = p[rows, a]                                           # [B, V]: target at the first rejection / bonus
    q_a = q[rows, a.clamp_max(k - 1)]
    resid = (p_a - q_a).clamp_min(0)
    final = torch.where((a < k)[:, None], resid, p_a)
    empty = final.sum(-1) <= 0                                  # only reachable through float rounding
    if bool(empty.any()):
        final = torch.where(empty[:, None], p_a, final)
    return a, sample_rows(final, u[:, k])


@torch.inference_mode()
def draft(model, cache, seqs, first_logits: torch.Tensor, mtp_hidden: torch.Tensor, k: int,
          constraint_fn, logits_fn=None) -> None:
    """Draft k tokens per sequence. `first_logits` [B, V] / `mtp_hidden` [B, d]: the depth-1 MTP output
    at each row's last real entry; `cache.mtp_lengths` must point just past that entry for every slot.
    Each draft is the argmax (greedy rows) or a draw from the row's processed distribution q, with the
    row's constraints (reasoning budget) applied as if the earlier drafts were accepted. Sets
    `seq.drafts` / `seq.draft_probs` ([k, V], sampling rows) and restores `mtp_lengths` to
    `num_computed - 1`."""
    slots = [s.slot for s in seqs]
    params, gens = [s.params for s in seqs], [s.generator for s in seqs]
    sampling = not all(p.greedy for p in params)
    toks_all, qs = [], []
    logits, h = first_logits, mtp_hidden
    for depth in range(1, k + 1):
        cons = [constraint_fn(s, [t[b] for t in toks_all]) for b, s in enumerate(seqs)]
        toks, q = choose(logits, params, gens, cons)
        toks_all.append(toks)
        if sampling:
            qs.append(q)
        if depth == k:
            break
        ids = torch.tensor(toks, dtype=torch.long, device=model.device)[:, None]
        h = model.mtp_hidden_states(h[:, None], ids, depth + 1, cache, slots)[:, 0]
        logits = (logits_fn or model.logits)(h)
    q_all = torch.stack(qs, 1) if sampling else None                  # [B, k, V]
    for b, s in enumerate(seqs):
        s.drafts = [t[b] for t in toks_all]
        s.draft_probs = None if q_all is None else q_all[b]
        cache.mtp_lengths[s.slot] = s.num_computed - 1
