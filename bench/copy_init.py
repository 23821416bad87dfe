"""In-context copying from scratch: how fast each initialisation / architecture leaves the plateau.

`python bench/copy_init.py [--steps 600] [--arms ours-0.02 ours-0.1 ...] [--json runs/copy_init.json]`
`python bench/copy_init.py --recipe recipes/pico.json --arms ours-0.1 ours-0.1-em0.1 --steps 3000`  (pico's size)

Why: pico's post-training skills all need copying from the context (numbers into a tool call, the tool's
result into the answer), and pico's base never learned to copy (models/pico/README.md). This measures, on
the plainest copying task, which ingredient decides whether a small hybrid learns it in a few hundred steps.

Task: a row is 16 tokens drawn uniformly from 508 ids (4..511 of an 8192-token vocabulary, pico's size)
followed by the same 16 tokens again; the loss counts only the second copy's predictable tokens (chance:
ln 508 = 6.23). Every arm trains on the same batches (32 rows per step) with AdamW (lr 1e-3, betas 0.9/0.95,
no weight decay, no schedule), from the same seed.

Arms (all d = 64, 4 query / 2 KV heads of 16, relu2 / SiLU MLPs 4d wide):
- `ours-S`: `NemotronHForCausalLM`, pattern `M*M-` (Mamba-2 heads 8 x 16, state 16), `initializer_range` S,
  i.e. transformers' NemotronH init (normal(S) linears/embeddings/conv, kaiming/sqrt(L) Mamba out_proj);
- `ours-S-nogate`: the same with the Mamba gate removed (`norm(y)` instead of `norm(y * silu(z))`): an
  ablation of the architecture, to locate the plateau, not a model anyone ships;
- `ours-S-z0`: `ours-S` with the gate's rows of each Mamba `in_proj` (z, the first d_inner outputs) set to
  zero: the gate starts closed (silu(0) = 0) and is learned from the task instead of being a random
  token-dependent sign (an init choice, the architecture unchanged);
- `ours-S-emM`: `ours-S` plus one shared random vector (std M) added to every embedding row (the trainer's
  `train.init_embedding_mean`): every gate channel then has a token-independent part;
- `llama-rope` / `llama-nope`: transformers' `LlamaForCausalLM`, 2 attention layers, with and without its
  rotary embedding (Nemotron 3's attention has none: position must come from the Mamba layers).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nemotron3.config import NemotronConfig  # noqa: E402
from nemotron3.model import NemotronHForCausalLM  # noqa: E402
from nemotron3.model.norm import GatedRMSNorm  # noqa: E402

VOCAB, LO, HI, L = 8192, 4, 512, 16
ARMS = ["ours-0.02", "ours-0.1", "ours-0.02-nogate", "ours-0.1-nogate", "ours-0.1-z0", "ours-0.1-em0.1", "llama-rope", "llama-nope"]


@contextlib.contextmanager
def no_gate(active: bool):
    """Ablation: GatedRMSNorm computes norm(y) (the z branch is ignored) while active."""
    if not active:
        yield
        return
    orig = GatedRMSNorm.forward

    def forward(self, y, z):
        g = y.float().unflatten(-1, (-1, self.group_size))
        return self.weight * (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)

    GatedRMSNorm.forward = forward
    try:
        yield
    finally:
        GatedRMSNorm.forward = orig


@contextlib.contextmanager
def no_rope(active: bool):
    """transformers' Llama with its rotary embedding turned into the identity while active."""
    import transformers.models.llama.modeling_llama as llama
    if not active:
        yield
        return
    orig = llama.apply_rotary_pos_emb
    llama.apply_rotary_pos_emb = lambda q, k, *a, **kw: (q, k)
    try:
        yield
    finally:
        llama.apply_rotary_pos_emb = orig


def build(arm: str, d: int, recipe: str | None = None):
    """(model, forward: ids -> logits, context manager for the arm's ablation). With `recipe`, the `ours`
    arms use that recipe's model config (MTP off, initializer_range from the arm) instead of the d-wide one."""
    torch.manual_seed(0)
    if arm.startswith("llama"):
        import transformers
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=4 * d,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=16)
        m = transformers.LlamaForCausalLM(cfg)
        return m, lambda ids: m(ids).logits, no_rope(arm == "llama-nope")
    std = float(arm.split("-")[1])
    from nemotron3.train.pretrain import add_embedding_mean
    if recipe:
        mc = {**json.loads(Path(recipe).read_text())["model"], "initializer_range": std,
              "num_nextn_predict_layers": 0}
        if mc.get("vocab_size", VOCAB) < HI:
            raise SystemExit(f"{recipe}: vocab_size must be >= {HI} for this task")
        cfg = NemotronConfig(**mc)
    else:
        cfg = NemotronConfig(pattern="M*M-", vocab_size=VOCAB, hidden_size=d, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, intermediate_size=4 * d,
                             mamba_num_heads=2 * d // 16, mamba_head_dim=16, ssm_state_size=16, n_groups=1,
                             chunk_size=16, num_nextn_predict_layers=0, initializer_range=std)
    m = NemotronHForCausalLM(cfg)
    if arm.endswith("-z0"):
        with torch.no_grad():
            for blk in m.backbone.layers:
                if blk.kind == "M":
                    blk.mixer.in_proj.weight[:blk.mixer.d_inner].zero_()
    if "-em" in arm:
        add_embedding_mean(m, float(arm.split("-em")[1]))
    return m, m, no_gate(arm.endswith("nogate"))


def train(arm: str, steps: int, d: int, batch: int, lr: float, log_every: int, recipe=None) -> dict:
    model, fwd, ablation = build(arm, d, recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    ema, curve, solved, t0 = None, {}, None, time.perf_counter()
    with ablation:
        for step in range(1, steps + 1):
            x = torch.randint(LO, HI, (batch, L), generator=g)
            ids = torch.cat([x, x], 1)
            logits = fwd(ids)
            loss = F.cross_entropy(logits[:, L:-1].reshape(-1, VOCAB), ids[:, L + 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
            if solved is None and ema < 1.0:
                solved = step
            if step % log_every == 0:
                curve[step] = ema
                print(f"  [{arm}] step {step} loss(ema) {ema:.3f} {time.perf_counter() - t0:.0f}s", flush=True)
    return {"curve": curve, "solved_step": solved, "seconds": time.perf_counter() - t0,
            "params": sum(p.numel() for p in model.parameters())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--recipe", help="run the `ours` arms at this recipe's model config (e.g. recipes/pico.json)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log_every = max(1, args.steps // 6)
    res = {}
    for arm in args.arms:
        print(f"== {arm}", flush=True)
        if args.recipe and arm.startswith("llama"):
            continue
        res[arm] = train(arm, args.steps, args.d, args.batch, args.lr, log_every, args.recipe)
    cols = sorted(next(iter(res.values()))["curve"])
    print(f"\nloss on the second copy (EMA), chance ln {HI - LO} = {math.log(HI - LO):.2f}\n")
    print("| arm | params | " + " | ".join(f"step {c}" for c in cols) + " | first step < 1.0 |")
    print("|---|---|" + "---|" * (len(cols) + 1))
    for arm, r in res.items():
        print(f"| {arm} | {r['params']:,} | " + " | ".join(f"{r['curve'][c]:.2f}" for c in cols)
              + f" | {r['solved_step'] or '-'} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "arms": res}, indent=1))
    return res


if __name__ == "__main__":
    main()
