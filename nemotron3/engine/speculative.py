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

from .sampling import choose, constrain, probabilities, sample_rows, uniforms


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


# ---------------------------------------------------------------------- the engine's side of a round
# These run inside `LLMEngine.step` (engine.py passes itself as `eng`: model, cache, k, logits, _constraint,
# _logprobs, _append, requests, stats); they keep the invariant mtp_length = num_computed - 1.

def mtp_prefill(eng, seq, s: int, prev: torch.Tensor | None, H: torch.Tensor) -> None:
    """MTP entries for a prefill chunk [s, e) (H [e - s, d] its backbone hiddens, prev the hidden at s - 1):
    entry j pairs the backbone hidden at j with token j + 1, so entries s-1 .. e-2 can be written now; entry
    e-1 stays pending until token e is fed or, after the last chunk, sampled."""
    p0 = s - 1 if s > 0 else 0
    hid = ([prev] if s > 0 else []) + list(H[:-1].unbind(0))
    if not hid:
        return
    assert int(eng.cache.mtp_lengths[seq.slot]) == p0, (int(eng.cache.mtp_lengths[seq.slot]), p0)
    toks = [seq.token(j + 1) for j in range(p0, p0 + len(hid))]
    ids = torch.tensor([toks], dtype=torch.long, device=eng.model.device)
    eng.model.mtp_hidden_states(torch.stack(hid)[None], ids, 1, eng.cache, [seq.slot])


def first_drafts(eng, seqs, hid: torch.Tensor) -> None:
    """After the first tokens were sampled from `hid` [B, d] (the last prompt positions): write the MTP entry
    of the last prompt position, which needs that token, and draft the first round."""
    live = [b for b, s in enumerate(seqs) if not s.finished]
    if not live:
        return
    lv = [seqs[b] for b in live]
    ids = torch.tensor([[s.output_ids[-1]] for s in lv], dtype=torch.long, device=eng.model.device)
    lslots = [s.slot for s in lv]
    # the MTP block's Mamba state (if it has Mamba layers) stays after entry P-2, as its K/V length does
    # (mtp_length = num_computed - 1): entry P-1 is written again next round
    saved = eng.cache.mtp_mamba_state(lslots)
    mh = eng.model.mtp_hidden_states(hid[live][:, None], ids, 1, eng.cache, lslots)[:, 0]
    draft(eng.model, eng.cache, lv, eng.logits(mh), mh, eng.k, eng._constraint, eng.logits)
    eng.cache.set_mtp_mamba_state(lslots, saved)


def verify_round(eng, seqs) -> None:
    """One speculative round (steps 1-4 above) for all decoding sequences: verify, accept, emit, roll back,
    draft the next round."""
    m, k, dev = eng.model, eng.k, eng.model.device
    B = len(seqs)
    slots = [s.slot for s in seqs]
    t0 = [s.num_computed for s in seqs]
    prev = torch.stack([s.last_hidden for s in seqs])                     # [B, d] hidden at t-1
    drafts = torch.tensor([s.drafts for s in seqs], dtype=torch.long)     # [B, k]
    ids = torch.cat([torch.tensor([[s.output_ids[-1]] for s in seqs]), drafts], 1).to(dev)
    H = m.hidden_states(ids, eng.cache, slots, record_states=True)         # [B, k+1, d]
    logits = eng.logits(H.reshape(B * (k + 1), -1)).view(B, k + 1, -1)   # [B, k+1, V]
    V = logits.shape[-1]
    cons = [eng._constraint(s, s.drafts[:i]) for s in seqs for i in range(k + 1)]
    flat = constrain(logits.reshape(B * (k + 1), V), cons)
    target = flat.argmax(-1).view(B, k + 1).cpu()
    a, nxt = accept_greedy(drafts, target)
    sampled = [b for b, s in enumerate(seqs) if not s.params.greedy]
    if sampled:
        sel = torch.tensor(sampled)
        p = probabilities(flat.view(B, k + 1, V)[sel].reshape(-1, V),
                          [seqs[b].params for b in sampled for _ in range(k + 1)]).view(len(sampled), k + 1, V)
        q = torch.stack([seqs[b].draft_probs for b in sampled])
        u = uniforms([seqs[b].generator for b in sampled], k + 1)
        a_s, nxt_s = accept_sampled(drafts[sel], p.cpu(), q.cpu(), u)
        a[sel], nxt[sel] = a_s, nxt_s
    a, nxt = a.tolist(), nxt.tolist()
    want_lp = any(s.params.logprobs is not None for s in seqs)
    keep = []
    for b, s in enumerate(seqs):
        toks = s.drafts[:a[b]] + [nxt[b]]
        lps = eng._logprobs([s] * len(toks), logits[b, :len(toks)], toks) if want_lp else [None] * len(toks)
        kept = 0
        for tok, lp in zip(toks, lps):
            eng._append(s, tok, lp)
            kept += 1
            if s.finished:
                break
        idx = kept - 1                           # < a[b] + 1 only when a stop cut the round short
        keep.append(idx)
        s.num_computed = t0[b] + idx + 1
        eng.cache.lengths[s.slot] = s.num_computed
        s.last_hidden = H[b, idx]
        s.spec_steps += 1
        s.spec_drafted += k
        s.spec_accepted += a[b]
        met = eng.requests[s.request_id].metrics
        met.spec_verify_steps += 1
        met.spec_draft_tokens += k
        met.spec_accepted_tokens += a[b]
        eng.stats.decode_tokens += kept
    eng.stats.spec_accepted_tokens += sum(a)
    eng.stats.decode_forwards += 1
    eng.stats.spec_verify_steps += B
    eng.stats.spec_draft_tokens += B * k
    eng.cache.keep_recorded(slots, keep)
    # MTP entries t-1 .. t+idx (tokens x_t, d_1 .., the last emitted one; junk after), then drafts
    mtp_ids = [[s.token(t0[b] + j) if t0[b] + j < s.prompt_len + len(s.output_ids) else 0
                for j in range(k + 2)] for b, s in enumerate(seqs)]
    hid = torch.cat([prev[:, None], H], 1)                                  # [B, k+2, d]
    mh = m.mtp_hidden_states(hid, torch.tensor(mtp_ids, dtype=torch.long, device=dev), 1, eng.cache, slots,
                             record_states=True)
    last = mh[torch.arange(B), torch.tensor(keep) + 1]                    # [B, d]
    for b, s in enumerate(seqs):
        eng.cache.mtp_lengths[s.slot] = t0[b] + keep[b] + 1 if not s.finished else s.num_computed - 1
    live = [b for b, s in enumerate(seqs) if not s.finished]
    # Mamba layers of the MTP block (if any) roll back like the backbone's: the state after entry
    # t0-1+keep (entries < num_computed - 1, the invariant) is kept; drafting starts one entry later
    rec = eng.cache.recorded
    eng.cache.keep_recorded(slots, keep)
    if live:
        sel = torch.tensor(live)
        lslots = [slots[b] for b in live]
        saved = eng.cache.mtp_mamba_state(lslots)
        if rec:
            eng.cache.recorded = {i: (c[sel], st[sel]) for i, (c, st) in rec.items()}
            eng.cache.keep_recorded(lslots, [keep[b] + 1 for b in live])
        draft(m, eng.cache, [seqs[b] for b in live], eng.logits(last[sel]), last[sel], k, eng._constraint,
              eng.logits)
        eng.cache.set_mtp_mamba_state(lslots, saved)
