"""Grammar libraries for structured outputs: mask cost per token, and the mask's share of a pico decode step.

    python bench/grammar.py [--libs llguidance,xgrammar,outlines] [--vocabs 8k,131k] [--repeats 3] [--decode 48]

1. **Mask cost per token**: a JSON-schema grammar (nested object, enums, arrays, free strings) walked along a
   valid answer's tokens: compile the grammar, then per token compute the next-token mask and consume the
   token. Vocabularies: pico's 8K byte-level BPE and a synthetic 131K byte-level BPE (Nemotron 3's size):
   BPE trained on the Python standard library's sources, topped up with merges of frequent tokens (no
   download). llguidance, xgrammar and outlines-core when installed (`pip install --no-deps xgrammar
   apache-tvm-ffi outlines-core`; only llguidance is a dependency of nemotron3).
2. **Engine overhead**: models/pico at batch 1 (greedy, the C decode step), ms per generated token with no
   grammar and with the JSON schema (`SamplingParams.structured_outputs`, thinking off).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "level", "items", "note"],
          "properties": {"title": {"type": "string"}, "level": {"enum": ["low", "mid", "high"]},
                         "note": {"type": "string"},
                         "items": {"type": "array", "items": {
                             "type": "object", "additionalProperties": False, "required": ["id", "ok", "name"],
                             "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"},
                                            "name": {"type": "string"}}}}}}
ANSWER = json.dumps({"title": "Quarterly report on the weather in Paris", "level": "mid",
                     "note": "All stations reported normally; two need new batteries before winter.",
                     "items": [{"id": i, "ok": i % 2 == 0, "name": f"station number {i} near the river"}
                               for i in range(6)]})


def big_tokenizer(size: int = 131072):
    """A byte-level BPE with `size` tokens: trained on the standard library, topped up with merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from nemotron3.tokenizer import SPECIAL_TOKENS
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    texts = [f.read_text(errors="ignore") for f in files[:3000]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, special_tokens=list(SPECIAL_TOKENS),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    d = json.loads(tok.to_str())
    vocab, merges = d["model"]["vocab"], d["model"]["merges"]
    rng, words = random.Random(0), list(vocab)[300:20000]
    while len(vocab) < size:
        a, b = rng.choice(words), rng.choice(words)
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append([a, b] if isinstance(merges[0], list) else f"{a} {b}")
    return Tokenizer.from_str(json.dumps(d))


def walk(new, compute, consume, ids, repeats):
    """Microseconds per token of the mask (`compute`: median, mean, max) along `ids`, from a fresh matcher
    (`new`) each repeat; consuming the token is not timed."""
    mask_t = []
    for _ in range(repeats):
        m = new()
        for t in ids:
            t0 = time.perf_counter()
            compute(m)
            mask_t.append(time.perf_counter() - t0)
            assert consume(m, t), (t, ids.index(t))
    return statistics.median(mask_t) * 1e6, statistics.mean(mask_t) * 1e6, max(mask_t) * 1e6


def bench_llguidance(backend, V, ids, repeats):
    import llguidance as L
    from nemotron3.engine.grammar import JSON_OPTIONS, mask_of
    t0 = time.perf_counter()
    tok = L.LLTokenizer(backend.to_str(), n_vocab=V, eos_token=[2])
    t1 = time.perf_counter()
    g = L.LLMatcher.grammar_from_json_schema(SCHEMA, overrides=JSON_OPTIONS)
    L.LLMatcher(tok, g)
    compile_s = time.perf_counter() - t1
    return t1 - t0, compile_s, walk(lambda: L.LLMatcher(tok, g), mask_of, lambda m, t: m.consume_token(t), ids,
                                    repeats)


def bench_xgrammar(backend, V, ids, repeats):
    import xgrammar as xgr
    vocab = backend.get_vocab(with_added_tokens=True)
    enc = [""] * V
    for s, i in vocab.items():
        enc[i] = s
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(enc, xgr.VocabType.BYTE_LEVEL, vocab_size=V, stop_token_ids=[2])
    comp = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t1 = time.perf_counter()
    compiled = comp.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
    compile_s = time.perf_counter() - t1
    bitmask = xgr.allocate_token_bitmask(1, V)
    return t1 - t0, compile_s, walk(lambda: xgr.GrammarMatcher(compiled), lambda m: m.fill_next_token_bitmask(bitmask),
                                    lambda m, t: m.accept_token(t), ids, repeats)


def _byte_chars():
    """GPT-2's byte -> printable character table (byte-level BPE token spelling), in byte order."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def bench_outlines(backend, V, ids, repeats):
    import outlines_core as oc
    import torch
    byte = {c: b for b, c in enumerate(_byte_chars())}
    vocab = {bytes(byte[c] for c in s): i for s, i in backend.get_vocab(with_added_tokens=False).items()
             if i != 2 and all(c in byte for c in s)}
    t0 = time.perf_counter()
    voc = oc.Vocabulary(2, {s: [i] for s, i in vocab.items()})
    t1 = time.perf_counter()
    regex = oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    index = oc.Index(regex, voc)
    compile_s = time.perf_counter() - t1
    mask = torch.zeros((V + 31) // 32, dtype=torch.int32)

    def consume(g, t):
        g.advance(t)
        return True
    return t1 - t0, compile_s, walk(lambda: oc.Guide(index), lambda g: g.write_mask_into(
        mask.data_ptr(), mask.numel(), mask.element_size()), consume, ids, repeats)


def decode_overhead(n_tokens: int):
    import torch
    from nemotron3.engine import LLM, SamplingParams, StructuredOutputs
    torch.set_num_threads(1)
    llm = LLM(str(ROOT / "models" / "pico"))
    prompt = llm.tokenizer.encode("<|im_start|>user\nReport the weather as JSON.<|im_end|>\n<|im_start|>assistant\n"
                                  "<think></think>")
    base = dict(max_tokens=n_tokens, temperature=0, reasoning_mode="off", ignore_eos=True)
    # a schema with unbounded strings, so the run is as long as the plain one (ignore_eos and no end)
    long_schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    out = {}
    for name, extra in (("plain", {}), ("json schema", {"structured_outputs": StructuredOutputs(json=long_schema)})):
        llm.generate([prompt], SamplingParams(**base, **extra))            # warm-up (C step, grammar cache)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            o = llm.generate([prompt], SamplingParams(**base, **extra))[0].outputs[0]
            times.append((time.perf_counter() - t) / len(o.token_ids) * 1e3)
        out[name] = (statistics.median(times), len(o.token_ids))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--libs", default="llguidance,xgrammar,outlines")
    ap.add_argument("--vocabs", default="8k,131k")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", type=int, default=48, help="tokens per decode-overhead run (0: skip)")
    a = ap.parse_args()
    from nemotron3.tokenizer import load_tokenizer
    fns = {"llguidance": bench_llguidance, "xgrammar": bench_xgrammar, "outlines": bench_outlines}
    for vname in a.vocabs.split(","):
        if vname == "8k":
            backend = load_tokenizer(ROOT / "models" / "pico").backend_tokenizer
        else:
            t = time.perf_counter()
            backend = big_tokenizer()
            print(f"(131K tokenizer built in {time.perf_counter() - t:.0f} s)")
        V = backend.get_vocab_size(with_added_tokens=True)
        ids = backend.encode(ANSWER, add_special_tokens=False).ids
        print(f"\nvocabulary {V}: answer of {len(ids)} tokens")
        print(f"{'library':<11} {'tokenizer s':>11} {'compile ms':>10} {'mask us p50':>11} {'mean':>8} {'max':>9}")
        for lib in a.libs.split(","):
            try:
                tok_s, comp_s, (p50, mean, mx) = fns[lib](backend, V, ids, a.repeats)
            except ImportError as e:
                print(f"{lib:<11} not installed ({e.name})")
                continue
            print(f"{lib:<11} {tok_s:>11.2f} {comp_s * 1e3:>10.1f} {p50:>11.1f} {mean:>8.1f} {mx:>9.1f}")
    if a.decode:
        res = decode_overhead(a.decode)
        plain = res["plain"][0]
        print(f"\npico batch 1 decode ({a.decode} tokens, greedy, 1 thread):")
        for name, (ms, n) in res.items():
            print(f"  {name:<12} {ms:.2f} ms/token ({n} tokens)  overhead {100 * (ms / plain - 1):+.1f}%")


if __name__ == "__main__":
    main()
