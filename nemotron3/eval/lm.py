"""Held-out language-model quality: loss, perplexity, next-token accuracy and MTP accuracy per depth.

MTP depth k at position t predicts token t+k+1 from the backbone's hidden state at t and the true
tokens up to t+k (teacher forcing, as in training); its top-1 accuracy is the acceptance rate a greedy
speculative decoder would see for the k-th draft if all earlier drafts were right.

`induction_score` is the in-context copying probe (Olsson et al. 2022, "In-context learning and induction
heads"): random tokens, then the same tokens again. Nothing in pretraining text predicts a random sequence, so
the loss on its second copy falls below the first only if the model copies from its context: the skill every
post-training environment needs (numbers from the question into a tool call, the tool's result into the answer).

Layering: eval sits below train. The trainers import the evaluators (validation loss, this probe, RULER's
training documents); eval never imports train. So the label convention the two share lives here: `IGNORE`
marks a position without a target (train/data.py writes it, train/loss.py and `evaluate_lm` read it) and
`mtp_labels` derives MTP depth k's targets from the next-token labels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..tokenizer import SPECIAL_TOKENS

IGNORE = -100          # F.cross_entropy's default ignore_index


def mtp_labels(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Depth-k targets [B, T-k]: labels[t+k], IGNORE where any of labels[t..t+k] is IGNORE (the chain
    t -> t+k+1 crosses a document boundary)."""
    T = labels.shape[1]
    out = labels[:, k:].clone()
    for j in range(k):
        out[labels[:, j:T - k + j] == IGNORE] = IGNORE
    return out


@torch.inference_mode()
def evaluate_lm(model, dataset, batch_size: int = 8, max_batches: int | None = None, mtp_depths: int = 0) -> dict:
    """`dataset`: a `PackedDataset` (rows of input ids / labels with -100 on cross-document targets)."""
    depths = mtp_depths if model.mtp is not None else 0
    nll, n, correct = 0.0, 0, 0
    mtp_hit, mtp_n = [0] * depths, [0] * depths
    for b, (x, y) in enumerate(dataset.eval_batches(batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        x, y = x.to(model.device), y.to(model.device)
        main, mtp = model.forward_mtp(x, depths) if depths else (model(x), [])
        mask = y != IGNORE
        nll += F.cross_entropy(main[mask], y[mask], reduction="sum").item()
        correct += (main.argmax(-1)[mask] == y[mask]).sum().item()
        n += mask.sum().item()
        for k, logits in enumerate(mtp, 1):
            target = mtp_labels(y, k)[:, : logits.shape[1]]
            m = target != IGNORE
            mtp_hit[k - 1] += (logits.argmax(-1)[m] == target[m]).sum().item()
            mtp_n[k - 1] += m.sum().item()
    if n == 0:
        raise ValueError("no evaluation tokens: the dataset is empty")
    loss = nll / n
    return {"loss": loss, "perplexity": math.exp(loss), "next_token_accuracy": correct / n, "tokens": n,
            "mtp_accuracy": [h / max(c, 1) for h, c in zip(mtp_hit, mtp_n)]}


@torch.inference_mode()
def induction_score(model, vocab_size: int, length: int = 64, n: int = 32, batch_size: int = 8, seed: int = 0,
                    low: int = len(SPECIAL_TOKENS), bos_id: int | None = 1) -> dict:
    """Loss and top-1 accuracy on the first and the second copy of `n` rows [BOS] + s + s, each `s` `length`
    tokens drawn uniformly from ids [low, vocab_size) (below `low`: our tokenizer's special tokens). The first
    token of each copy is left out (unpredictable either way). `copy_gain` = first-copy loss - second-copy loss: ~0 for a
    model that cannot copy, ~ln(vocab) for a perfect copier."""
    if length < 2 or n < 1 or not 0 <= low < vocab_size - 1:
        raise ValueError(f"induction_score needs length >= 2, n >= 1 and 0 <= low < vocab_size - 1, got "
                         f"length={length}, n={n}, low={low}, vocab_size={vocab_size}")
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(low, vocab_size, (n, length), generator=g)
    rows = torch.cat([seqs, seqs], 1)
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id), rows], 1)
    start = 0 if bos_id is None else 1                  # position of the first token of the first copy
    nll, hit = torch.zeros(2), torch.zeros(2)
    device = getattr(model, "device", torch.device("cpu"))
    for b in range(0, n, batch_size):
        x = rows[b:b + batch_size].to(device)
        logp = F.log_softmax(model(x[:, :-1]).float(), -1)            # logits at t predict x[t+1]
        tgt = x[:, 1:]
        tok_nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).cpu()
        tok_hit = (logp.argmax(-1) == tgt).float().cpu()
        for c in range(2):                     # tgt[:, j] is x[:, j + 1]: tokens 2..L of copy c
            sl = slice(start + c * length, start + (c + 1) * length - 1)
            nll[c] += tok_nll[:, sl].sum()
            hit[c] += tok_hit[:, sl].sum()
    count = n * (length - 1)
    first, second = (nll / count).tolist()
    return {"first_copy_loss": first, "second_copy_loss": second, "copy_gain": first - second,
            "first_copy_accuracy": hit[0].item() / count, "second_copy_accuracy": hit[1].item() / count,
            "length": length, "rows": n}
