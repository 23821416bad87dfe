"""Held-out language-model quality: loss, perplexity, next-token accuracy and MTP accuracy per depth.

MTP depth k at position t predicts token t+k+1 from the backbone's hidden state at t and the true
tokens up to t+k (teacher forcing, as in training); its top-1 accuracy is the acceptance rate a greedy
speculative decoder would see for the k-th draft if all earlier drafts were right.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..train.pretrain import IGNORE, mtp_labels


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
