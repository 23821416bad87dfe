"""Engine decode benchmarks; every ratio is measured in this run, on this machine.

    python bench/engine_decode.py [--threads 1] [--tokens 64] [--sections batch1,rows,nvfp4,concurrent,context,mtp]

1. batch1      decode tokens/s at batch 1: our engine (greedy; its batch-1 decode plan in the C kernel and
               in torch ops, and the generic batched forward with fast_decode=False) vs transformers `generate` (greedy), same
               fp32 weights (tests/helpers.py `hf_model_from`, SDPA attention). Decode-only time: a run of
               N new tokens minus a run of 1 (prefill + first token), median of interleaved repeats. Also at
               the tiny-test size (recipes/tiny-test.json), where per-token framework overhead dominates.
2. rows        ms per decode step with 1..64 running sequences: the decode plan's C kernel (all rows in
               one call) vs the generic batched forward (fast_decode=False).
   nvfp4       models/pico-nvfp4 at batch 1: the decode plan (codes dequantized once) vs the packed
               generic forward (dequantizing per call).
3. concurrent  aggregate tokens/s with 16 and 64 concurrent requests through the engine vs the same
               requests one by one in transformers (64: transformers time = 4 x its measured 16).
4. context     decode ms/token with 1K and 8K tokens of context: the hybrid (pattern MEM*EMEM*EME) vs the
               same model with every Mamba layer replaced by attention (*E**E*E**E*E), both in our engine.
5. mtp         MTP self-speculative decoding, k = 0..4: tokens/s (median of interleaved rounds), acceptance
               rate, mean accepted length; checks the greedy outputs are identical for every k.
               Uses models/pico if it exists, else the newest runs/pico checkpoint (named with its step),
               else random weights (acceptance then ~0 and only the overhead is measured).

The model is the pico recipe's architecture (recipes/pico.json) with random weights unless --model.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from nemotron3 import NemotronConfig, NemotronHForCausalLM, load  # noqa: E402
from nemotron3.engine import LLM, SamplingParams  # noqa: E402
from nemotron3.engine.decode_plan import DecodePlan  # noqa: E402


def pico_config(**overrides) -> NemotronConfig:
    cfg = json.loads((ROOT / "recipes" / "pico.json").read_text())["model"]
    return NemotronConfig(**{**cfg, **overrides})


def random_model(**overrides) -> NemotronHForCausalLM:
    torch.manual_seed(0)
    return NemotronHForCausalLM(pico_config(**overrides)).eval()


def prompts(n, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(20, vocab, (length,), generator=g).tolist() for _ in range(n)]


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def median_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hf_generate(hf, prompt, n):
    with torch.inference_mode():
        return hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)


def section_batch1(model, hf, args, out, key="batch1", label="pico architecture"):
    p = prompts(1, 64, model.config.vocab_size)[0]
    N = args.tokens
    llm = LLM(model, max_num_seqs=1, enable_prefix_caching=False)
    ops = LLM(model, max_num_seqs=1, enable_prefix_caching=False)
    generic = LLM(model, max_num_seqs=1, enable_prefix_caching=False, fast_decode=False)
    ours = lambda n: llm.generate([p], greedy(n))           # noqa: E731
    ours_t = lambda n: ops.generate([p], greedy(n))         # noqa: E731
    ours_g = lambda n: generic.generate([p], greedy(n))     # noqa: E731
    theirs = lambda n: hf_generate(hf, p, n)                 # noqa: E731
    ours(4), ours_t(4), ours_g(4), theirs(4)                 # warm-up
    # the same plan in torch ops instead of the C kernel (kept: it is rebuilt only when a weight changes)
    ops.engine._plan = DecodePlan(model, native=False)
    native = llm.engine._plan is not None and llm.engine._plan.native is not None
    # same tokens?
    toks = [r.generate([p], greedy(16))[0].outputs[0].token_ids for r in (llm, ops, generic)]
    same = toks[0] == toks[1] == toks[2] == hf_generate(hf, p, 16)[0, 64:].tolist()
    runs = dict(o=ours, t=ours_t, g=ours_g, h=theirs)
    times = {k: [] for k in runs}
    for _ in range(args.repeats):                            # interleaved: all see the same machine load
        for k, fn in runs.items():
            times[k].append(median_of(lambda: fn(N), 1) - median_of(lambda: fn(1), 1))
    o, t, g, h = (statistics.median(times[k]) / (N - 1) for k in runs)
    out[key] = dict(ours_ms_per_token=o * 1e3, torch_ops_plan_ms_per_token=t * 1e3, generic_ms_per_token=g * 1e3,
                    hf_ms_per_token=h * 1e3, ours_tok_s=1 / o, hf_tok_s=1 / h, ratio=h / o, torch_ops_ratio=h / t,
                    generic_ratio=h / g, native=native, same_greedy_tokens=same)
    print(f"[{key}] {label}: decode, batch 1, {N} new tokens after a 64-token prompt (greedy, fp32)")
    print(f"  ours (batch-1 plan)  {o * 1e3:8.2f} ms/token  {1 / o:7.1f} tok/s   (C kernel: {native})")
    print(f"  ours (plan, torch)   {t * 1e3:8.2f} ms/token  {1 / t:7.1f} tok/s   (the plan in torch ops)")
    print(f"  ours (generic path)  {g * 1e3:8.2f} ms/token  {1 / g:7.1f} tok/s   (fast_decode=False)")
    print(f"  transformers         {h * 1e3:8.2f} ms/token  {1 / h:7.1f} tok/s   (same greedy tokens: {same})")
    print(f"  speedup (transformers time / ours): {h / o:.2f}x  (plan in torch ops: {h / t:.2f}x, "
          f"generic path: {h / g:.2f}x)")


def section_rows(model, args, out):
    """ms per engine decode step with B running sequences: the decode plan's C kernel (all rows in one call)
    vs the generic batched forward (fast_decode=False); 32 steps after 64-token prompts, interleaved."""
    res = {}
    print("[rows] decode step time by number of running sequences (32 steps after 64-token prompts)")
    for B in args.rows:
        ps = prompts(B, 64, model.config.vocab_size, seed=B)
        llms = {"plan": LLM(model, max_num_seqs=B, enable_prefix_caching=False),
                "generic": LLM(model, max_num_seqs=B, enable_prefix_caching=False, fast_decode=False)}
        times = {k: [] for k in llms}
        for _ in range(args.repeats):
            for k, llm in llms.items():
                times[k].append((median_of(lambda: llm.generate(ps, greedy(33)), 1)
                                 - median_of(lambda: llm.generate(ps, greedy(1)), 1)) / 32)
        p, g = (statistics.median(times[k]) for k in llms)
        res[B] = dict(plan_ms=p * 1e3, generic_ms=g * 1e3, ratio=g / p)
        print(f"  {B:3d} sequences: plan {p * 1e3:7.2f} ms/step ({p / B * 1e3:5.2f} ms/token)  "
              f"generic {g * 1e3:7.2f} ms/step  ({g / p:.2f}x)")
    out["rows"] = res


def section_nvfp4(args, out):
    """models/pico-nvfp4 (mixed recipe) at batch 1: the decode plan (codes dequantized once into its fp32
    copies) vs the packed generic forward (fast_decode=False, dequantizing per call); same greedy tokens?"""
    path = ROOT / "models" / "pico-nvfp4"
    if not (path / "model.safetensors").exists():
        print("[nvfp4] models/pico-nvfp4 not found: skipped")
        return
    model = load(path)
    p, N = prompts(1, 64, model.config.vocab_size)[0], args.tokens
    llms = {"plan": LLM(model, max_num_seqs=1, enable_prefix_caching=False),
            "generic": LLM(model, max_num_seqs=1, enable_prefix_caching=False, fast_decode=False)}
    toks = [llm.generate([p], greedy(16))[0].outputs[0].token_ids for llm in llms.values()]
    times = {k: [] for k in llms}
    for _ in range(args.repeats):
        for k, llm in llms.items():
            times[k].append(median_of(lambda: llm.generate([p], greedy(N)), 1)
                            - median_of(lambda: llm.generate([p], greedy(1)), 1))
    t, g = (statistics.median(times[k]) / (N - 1) for k in llms)
    out["nvfp4"] = dict(plan_ms=t * 1e3, generic_ms=g * 1e3, ratio=g / t, same_greedy_tokens=toks[0] == toks[1])
    print(f"[nvfp4] models/pico-nvfp4, batch 1, {N} greedy tokens after a 64-token prompt")
    print(f"  decode plan     {t * 1e3:8.2f} ms/token")
    print(f"  packed forward  {g * 1e3:8.2f} ms/token   ({g / t:.2f}x; same greedy tokens: {toks[0] == toks[1]})")


def section_concurrent(model, hf, args, out):
    N = args.tokens
    res = {}
    hf_per_request = None
    for n_req in (16, 64):
        ps = prompts(n_req, 64, model.config.vocab_size, seed=n_req)
        llm = LLM(model, max_num_seqs=n_req, enable_prefix_caching=False)
        llm.generate(ps[:2], greedy(2))
        t = time.perf_counter()
        outs = llm.generate(ps, greedy(N))
        t_ours = time.perf_counter() - t
        total = sum(len(o.outputs[0].token_ids) for o in outs)
        if hf_per_request is None:
            t = time.perf_counter()
            for p in ps:
                hf_generate(hf, p, N)
            hf_per_request = (time.perf_counter() - t) / n_req
            measured = True
        else:
            measured = False
        t_hf = hf_per_request * n_req
        res[n_req] = dict(ours_s=t_ours, ours_tok_s=total / t_ours, hf_s=t_hf, hf_tok_s=total / t_hf,
                          ratio=t_hf / t_ours, hf_measured=measured)
        print(f"[concurrent] {n_req} requests x {N} new tokens (64-token prompts), greedy")
        print(f"  ours (continuous batching)   {t_ours:7.2f} s  {total / t_ours:8.1f} tok/s")
        print(f"  transformers one by one      {t_hf:7.2f} s  {total / t_hf:8.1f} tok/s"
              f"{'' if measured else '   (4 x the measured 16-request time)'}")
        print(f"  speedup: {t_hf / t_ours:.2f}x")
    out["concurrent"] = res


def decode_ms_at(model, context, n_tokens, repeats):
    llm = LLM(model, max_num_seqs=1, max_model_len=context + n_tokens + 8, enable_prefix_caching=False,
              max_num_batched_tokens=2048)
    p = prompts(1, context, model.config.vocab_size, seed=context)[0]
    eng = llm.engine
    eng.add_request("ctx", p, greedy(n_tokens + 1))
    while not eng.requests["ctx"].seqs[0].output_ids:        # prefill (chunked) + first token
        eng.step()
    times = []
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    kv = eng.cache.slot_nbytes(context)
    return statistics.median(times), kv


def section_context(args, out):
    hybrid = random_model()
    attn = random_model(pattern="*E**E*E**E*E")
    res = {}
    print(f"[context] decode ms/token (median of {args.tokens // 2} steps) at context length; batch 1")
    for ctx in args.contexts:
        th, kvh = decode_ms_at(hybrid, ctx, args.tokens // 2, args.repeats)
        ta, kva = decode_ms_at(attn, ctx, args.tokens // 2, args.repeats)
        res[ctx] = dict(hybrid_ms=th * 1e3, attention_ms=ta * 1e3, ratio=ta / th,
                        hybrid_cache_bytes=kvh["total"], attention_cache_bytes=kva["total"])
        print(f"  {ctx:6d} tokens: hybrid {th * 1e3:7.2f} ms  all-attention {ta * 1e3:7.2f} ms  "
              f"(x{ta / th:.2f});  cache/seq {kvh['total'] / 2**20:.1f} MiB vs {kva['total'] / 2**20:.1f} MiB")
    out["context"] = {"params_hybrid": hybrid.num_parameters(), "params_attention": attn.num_parameters(),
                      "by_context": res}


def mtp_model(args):
    """(model, description, its directory or None)."""
    if args.mtp_model:
        return load(args.mtp_model), args.mtp_model, args.mtp_model
    if (ROOT / "models" / "pico").exists():
        return load(ROOT / "models" / "pico"), "models/pico", ROOT / "models" / "pico"
    ck = ROOT / "runs" / "pico" / "checkpoint"
    if (ck / "model.safetensors").exists():
        step = "?"
        try:
            step = json.loads((ck / "trainer" / "state.json").read_text()).get("step", "?")
        except (OSError, ValueError):
            pass
        return load(ck), f"runs/pico/checkpoint (in-progress training run, step {step}; models/pico absent)", None
    return random_model(), "random pico-size weights (no trained model yet: acceptance ~0)", None


def mtp_prompts(vocab, model_dir=None):
    """Text prompts in the model's own tokenizer (its directory's, else the pipeline's runs/tokenizer)."""
    from nemotron3.tokenizer import load_tokenizer
    for tok_dir in ([Path(model_dir)] if model_dir else []) + [ROOT / "runs" / "tokenizer"]:
        if (tok_dir / "tokenizer.json").exists():
            tok = load_tokenizer(tok_dir)
            if len(tok) == vocab:
                src = (Path(json.__file__).parent / "encoder.py").read_text()
                return [tok.encode(src[i:i + 600]) for i in (0, 3000, 6000, 9000)], "stdlib json/encoder.py excerpts"
    return prompts(4, 128, vocab, seed=1), "random token ids"


def section_mtp(args, out):
    model, name, model_dir = mtp_model(args)
    ps, pname = mtp_prompts(model.config.vocab_size, model_dir)
    N = args.tokens * 2
    print(f"[mtp] self-speculative decoding on {name}; prompts: {pname}; batch 1, {N} greedy tokens each, "
          f"median of {args.repeats} interleaved rounds over k")
    # k > 0 verifies through the generic batched forward; plain decode (k = 0) normally takes the fused
    # batch-1 plan, so k = 0 is timed both ways: the plan is the baseline a user gets, the generic path is
    # what speculation itself speeds up
    llms = {"0": LLM(model, max_num_seqs=1, enable_prefix_caching=False),
            "0-generic": LLM(model, max_num_seqs=1, enable_prefix_caching=False, fast_decode=False)}
    for k in range(1, 5):
        llms[str(k)] = LLM(model, max_num_seqs=1, num_speculative_tokens=k, enable_prefix_caching=False)
    times = {k: [] for k in llms}
    ref = None
    for _ in range(args.repeats):
        for k, llm in llms.items():
            t = time.perf_counter()
            outs = llm.generate(ps, greedy(N))
            times[k].append(time.perf_counter() - t)
            ids = [o.outputs[0].token_ids for o in outs]
            ref = ref or ids
            assert ids == ref, "speculative greedy output differs from plain greedy"
    total = sum(map(len, ref))
    tps = {k: total / statistics.median(t) for k, t in times.items()}
    res = {}
    for k, llm in llms.items():
        st = llm.stats()
        spec = k not in ("0", "0-generic")
        res[k] = dict(tok_s=tps[k], speedup=tps[k] / tps["0"], speedup_vs_generic=tps[k] / tps["0-generic"],
                      acceptance=st["spec_acceptance_rate"] if spec else None,
                      mean_accepted_length=st["spec_mean_accepted_length"] if spec else None)
        acc = f"{st['spec_acceptance_rate']:.3f}" if spec else "-"
        mal = f"{st['spec_mean_accepted_length']:.2f}" if spec else "-"
        print(f"  k={k:9s} {tps[k]:7.1f} tok/s  vs plan {res[k]['speedup']:5.2f}x  vs generic "
              f"{res[k]['speedup_vs_generic']:5.2f}x  acceptance {acc}  mean accepted length {mal}")
    print("  (greedy outputs identical for every k)")
    out["mtp"] = dict(model=name, by_k=res)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--sections", default="batch1,rows,nvfp4,concurrent,context,mtp")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--mtp-model", default=None)
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    print(f"threads {args.threads}; torch {torch.__version__}")
    out = {"threads": args.threads}
    if "batch1" in sections or "concurrent" in sections:
        from helpers import hf_model_from
        model = random_model()
        hf = hf_model_from(model)
        hf.config._attn_implementation = "sdpa"
        print(f"model: pico architecture {model.config.pattern} d={model.config.hidden_size}, "
              f"{model.num_parameters() / 1e6:.1f}M params, random weights")
        if "batch1" in sections:
            section_batch1(model, hf, args, out)
            tiny = json.loads((ROOT / "recipes" / "tiny-test.json").read_text())["model"]
            torch.manual_seed(0)
            small = NemotronHForCausalLM(NemotronConfig(**tiny)).eval()
            small_hf = hf_model_from(small)
            small_hf.config._attn_implementation = "sdpa"
            section_batch1(small, small_hf, args, out, "batch1_tiny",
                           f"tiny-test architecture {small.config.pattern} d={small.config.hidden_size}, "
                           f"{small.num_parameters() / 1e6:.2f}M params (per-token overhead dominates)")
        if "concurrent" in sections:
            section_concurrent(model, hf, args, out)
    if "rows" in sections:
        section_rows(random_model(), args, out)
    if "nvfp4" in sections:
        section_nvfp4(args, out)
    if "context" in sections:
        section_context(args, out)
    if "mtp" in sections:
        section_mtp(args, out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
