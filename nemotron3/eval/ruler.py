"""RULER-style synthetic long-context retrieval (Hsieh et al. 2024, "RULER: What's the Real Context Size of
Your Long-Context Language Models?"), built on the offline corpus.

Each sample is a plain-text continuation prompt for a base model (no chat template):

    <instruction>\\n\\n<haystack with needles>\\n<question> <answer prefix>

The haystack is real text from the corpus's **val** split (never training text; the caller reads it, so this
module needs nothing from train/: eval sits below train), cut line by line and
cycled when the split is shorter than the requested length; needles are whole lines inserted between
haystack lines at random depths. Prompts are assembled from separately tokenized pieces, so a prompt is
`length` tokens exactly (the haystack's last line is cut to fit) and every needle's token ids appear in it
verbatim. Tasks:

  niah_single        one needle "The special magic number for {key} is {value}." at a random depth.
  niah_multikey      4 needles with different keys (3 distractors); asks for one key.
  niah_multivalue    4 needles with the same key and different values; asks for all of them.
  variable_tracking  two chains "VAR A = 48213." "VAR B = A." ... (4 hops each, different values), their
                     lines scattered in the haystack; asks for the value of the last variable of one chain
                     (answerable by generation and graded exactly; the other chain is the distractor).

Keys are adjective-noun pairs ("amber-falcon"), values random 5-7 digit numbers, variable names 5 capital
letters; everything is drawn from a seeded `random.Random`, so a (seed, task, length) always gives the same
prompts. Decoding is greedy (`SamplingParams(temperature=0)`) through the engine. Grading: a value counts
as found if it appears in the generated text as a whole number (digits not part of a longer number);
a sample's score is the fraction of its expected values found (1 or 0 except for niah_multivalue, where
partial credit is given; `all_found` is also reported). Accuracy = mean score.

Training data of the same family, worded differently, is `train/retrieval.py`'s (from the **train** split).
"""
from __future__ import annotations

import bisect
import random
import re
from dataclasses import dataclass, field

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")
DEFAULT_LENGTHS = (4096, 16384, 65536, 131072)
MAX_TOKENS = {"niah_single": 12, "niah_multikey": 12, "niah_multivalue": 48, "variable_tracking": 12}

_ADJ = ("amber ancient bold brisk calm clever coral crimson dusty eager fancy fierce gentle golden grand hidden "
        "humble icy jolly lively lucky misty noble olive polar proud quiet rapid rustic silent silver sleepy "
        "smooth snowy solar stormy sunny swift tidy vivid wild windy witty young zesty").split()
_NOUN = ("anchor badger beacon canyon cedar comet falcon ferret garden glacier harbor heron island jaguar kettle "
         "lantern maple meadow mirror nebula otter panda pepper pigeon quartz raven river saddle salmon "
         "spider spruce summit tiger tulip valley walrus willow wizard yak zebra").split()

_NIAH_INSTR = {
    "niah_single": "A special magic number is hidden within the following text. Make sure to memorize it. "
                   "I will quiz you about the number afterwards.",
    "niah_multikey": "Some special magic numbers are hidden within the following text. Make sure to memorize "
                     "them. I will quiz you about one of them afterwards.",
    "niah_multivalue": "Some special magic numbers are hidden within the following text. Make sure to memorize "
                       "them. I will quiz you about them afterwards.",
    "variable_tracking": "Memorize and track the chains of variable assignments hidden in the following text. "
                         "I will ask you for the value of a variable afterwards.",
}


# ---------------------------------------------------------------------------------------------- haystack
class Haystack:
    """Corpus documents cut into lines, tokenized lazily (each line on its own, ending in its newline)."""

    def __init__(self, docs: list[str], tokenizer):
        docs = [d for d in docs if d and d.strip()]
        if not docs:
            raise ValueError("the haystack needs at least one non-empty document")
        self.docs = docs
        self.tokenizer = tokenizer
        self._lines: dict[int, list[tuple[str, list[int]]]] = {}

    def lines_of(self, i: int) -> list[tuple[str, list[int]]]:
        if i not in self._lines:
            texts = [ln for ln in self.docs[i].splitlines(keepends=True) if ln.strip()]
            texts = [ln if ln.endswith("\n") else ln + "\n" for ln in texts]
            ids = self.tokenizer.encode_batch(texts, parse_special=False) if texts else []
            self._lines[i] = [(t, x) for t, x in zip(texts, ids) if x]
        return self._lines[i]

    def take(self, n_tokens: int, rng: random.Random) -> list[tuple[str, list[int]]]:
        """Consecutive lines (documents in a random order, starting at a random line, cycling) totalling
        exactly `n_tokens` tokens: the last line is cut (its text then comes from decoding the kept ids)."""
        out, have = [], 0
        if n_tokens <= 0:
            return out
        order = list(range(len(self.docs)))
        rng.shuffle(order)
        first = True
        while have < n_tokens:
            for i in order:
                lines = self.lines_of(i)
                if not lines:
                    continue
                start = rng.randrange(len(lines)) if first else 0
                first = False
                for text, ids in lines[start:]:
                    if have + len(ids) > n_tokens:
                        ids = ids[: n_tokens - have]
                        text = self.tokenizer.decode(ids)
                    out.append((text, ids))
                    have += len(ids)
                    if have >= n_tokens:
                        return out
            if not any(self.lines_of(i) for i in order):
                raise ValueError("the haystack documents have no tokens")
        return out


# ---------------------------------------------------------------------------------------------- needles
def random_key(rng: random.Random, used: set | None = None) -> str:
    while True:
        k = f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"
        if used is None or k not in used:
            if used is not None:
                used.add(k)
            return k


def random_value(rng: random.Random, used: set | None = None) -> str:
    while True:
        d = rng.randint(5, 7)
        v = str(rng.randint(10 ** (d - 1), 10 ** d - 1))
        if used is None or v not in used:
            if used is not None:
                used.add(v)
            return v


def random_var(rng: random.Random, used: set) -> str:
    while True:
        v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if v not in used:
            used.add(v)
            return v


def _spec(task: str, rng: random.Random):
    """(instruction, needle lines in chain order, question, answers) for one sample of `task`."""
    keys, vals = set(), set()
    if task == "niah_single":
        k, v = random_key(rng, keys), random_value(rng, vals)
        needles = [f"The special magic number for {k} is {v}."]
        q = f"What is the special magic number for {k}? The special magic number for {k} is"
        answers = [v]
    elif task == "niah_multikey":
        pairs = [(random_key(rng, keys), random_value(rng, vals)) for _ in range(4)]
        needles = [f"The special magic number for {k} is {v}." for k, v in pairs]
        k, v = pairs[rng.randrange(len(pairs))]
        q = f"What is the special magic number for {k}? The special magic number for {k} is"
        answers = [v]
    elif task == "niah_multivalue":
        k = random_key(rng, keys)
        answers = [random_value(rng, vals) for _ in range(4)]
        needles = [f"The special magic number for {k} is {v}." for v in answers]
        q = f"What are all the special magic numbers for {k}? The special magic numbers for {k} are"
    elif task == "variable_tracking":
        names: set = set()
        chains, needles = [], []
        for _ in range(2):
            val = random_value(rng, vals)
            chain = [random_var(rng, names) for _ in range(5)]
            chains.append((chain, val))
            needles += [f"VAR {chain[0]} = {val}."] + [f"VAR {b} = {a}." for a, b in zip(chain, chain[1:])]
        chain, val = chains[rng.randrange(2)]
        q = f"What is the value of VAR {chain[-1]}? The value of VAR {chain[-1]} is"
        answers = [val]
    else:
        raise ValueError(f"unknown RULER task {task!r} (tasks: {', '.join(TASKS)})")
    return _NIAH_INSTR[task], needles, q, answers


@dataclass
class Sample:
    task: str
    prompt_ids: list[int]
    answers: list[str]
    needles: list[str]
    needle_positions: list[int] = field(default_factory=list)   # token offset of each needle in prompt_ids
    depths: list[float] = field(default_factory=list)           # needle position / haystack tokens

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def build_sample(task: str, length: int, tokenizer, haystack, rng: random.Random,
                 depth: float | None = None) -> Sample:
    """One sample of exactly `length` prompt tokens. `haystack`: a `Haystack` or a list of document texts.
    `depth` (0..1) fixes where the first needle goes (the others stay random); default random."""
    hay = haystack if isinstance(haystack, Haystack) else Haystack(list(haystack), tokenizer)
    instr, needles, question, answers = _spec(task, rng)
    head = tokenizer.encode(instr + "\n\n", parse_special=False)
    tail = tokenizer.encode("\n" + question, parse_special=False)
    needle_ids = [tokenizer.encode(n + "\n", parse_special=False) for n in needles]
    budget = length - len(head) - len(tail) - sum(len(x) for x in needle_ids)
    if budget < len(needles):
        raise ValueError(f"length {length} is too short for task {task!r} (needs > {length - budget} tokens)")
    lines = hay.take(budget, rng)
    # needle depths: sorted positions among line boundaries (chains keep their order: A's value first)
    n = len(lines)
    depths = sorted(rng.random() for _ in needles)
    if depth is not None:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        depths = [depth] if len(needles) == 1 else sorted([depth] + depths[1:])
    cum = [0]
    for _, ids in lines:
        cum.append(cum[-1] + len(ids))
    total = cum[-1]
    # boundary index j (insert before line j) whose token offset is closest to depth * total
    slots = []
    for d in depths:
        target = d * total
        j = bisect.bisect_left(cum, target)
        if j > 0 and (j > n or target - cum[j - 1] < cum[j] - target):
            j -= 1
        slots.append(min(j, n))
    if task == "variable_tracking":
        # interleave the two chains: each chain's lines keep their order, chains' boundaries are random
        order = list(range(len(needles)))
        half = len(needles) // 2
        a, b = order[:half], order[half:]
        merged, ia, ib = [], 0, 0
        while ia < len(a) or ib < len(b):
            if ib >= len(b) or (ia < len(a) and rng.random() < 0.5):
                merged.append(a[ia]); ia += 1
            else:
                merged.append(b[ib]); ib += 1
        needle_ids = [needle_ids[i] for i in merged]
        needles = [needles[i] for i in merged]
    ids = list(head)
    positions, placed = [], []
    k = 0
    for j in range(n + 1):
        while k < len(slots) and slots[k] == j:
            positions.append(len(ids))
            placed.append(cum[j] / max(total, 1))
            ids += needle_ids[k]
            k += 1
        if j < n:
            ids += lines[j][1]
    ids += tail
    return Sample(task, ids, answers, needles, positions, placed)


def make_sample(task: str, length: int, tokenizer, haystack_docs, rng: random.Random):
    """(prompt_ids, answers) of one RULER sample of `length` tokens (see `build_sample`)."""
    s = build_sample(task, length, tokenizer, haystack_docs, rng)
    return s.prompt_ids, s.answers


# ---------------------------------------------------------------------------------------------- grading
def found_values(text: str) -> set[str]:
    return set(re.findall(r"(?<!\d)\d+(?!\d)", text))


def score(generated: str, answers: list[str]) -> float:
    """Fraction of the expected values that appear in `generated` as whole numbers."""
    if not answers:
        raise ValueError("no answers to grade against")
    got = found_values(generated)
    return sum(a in got for a in answers) / len(answers)


# ---------------------------------------------------------------------------------------------- evaluation
def sample_rng(seed: int, task: str, length: int, i: int) -> random.Random:
    return random.Random(f"ruler/{seed}/{task}/{length}/{i}")


def evaluate_ruler(llm, haystack_docs: list[str], tasks=TASKS, lengths=DEFAULT_LENGTHS, samples: int = 4,
                   seed: int = 0, batch: int = 1, log=None, depth: float | None = None) -> dict:
    """Run every (task, length) with `samples` prompts through `llm` (an `LLM`) greedily; `depth` (0..1) plants
    each sample's first needle there (0: the start of the document), default random. Returns {"results": {task: {length: {...}}}, "accuracy": {task: {length: acc}}, ...}."""
    import time

    from ..engine import SamplingParams
    tok = llm.tokenizer
    hay = Haystack(haystack_docs, tok)
    results: dict = {}
    acc: dict = {}
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown RULER task {task!r} (tasks: {', '.join(TASKS)})")
        for length in lengths:
            t0 = time.perf_counter()
            batch_samples = [build_sample(task, length, tok, hay, sample_rng(seed, task, length, i), depth)
                             for i in range(samples)]
            params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS[task])
            outs = []
            for s in range(0, len(batch_samples), max(1, batch)):
                group = batch_samples[s:s + max(1, batch)]
                outs += llm.generate([{"prompt_token_ids": x.prompt_ids} for x in group], params)
            rows = []
            for smp, out in zip(batch_samples, outs):
                text = out.outputs[0].text
                sc = score(text, smp.answers)
                rows.append({"answers": smp.answers, "generated": text, "score": sc, "depths": smp.depths,
                             "prompt_tokens": smp.prompt_len})
            mean = sum(r["score"] for r in rows) / max(len(rows), 1)
            results.setdefault(task, {})[str(length)] = {
                "accuracy": mean, "all_found": sum(r["score"] == 1.0 for r in rows) / max(len(rows), 1),
                "samples": rows, "seconds": time.perf_counter() - t0}
            acc.setdefault(task, {})[str(length)] = mean
            if log is not None:
                log(f"{task:18s} {length:>7d}  acc {mean:.3f}  ({time.perf_counter() - t0:.1f}s)")
    avg = {str(n): sum(acc[t][str(n)] for t in acc) / len(acc) for n in lengths} if acc else {}
    return {"tasks": list(tasks), "lengths": list(lengths), "samples": samples, "seed": seed, "depth": depth,
            "accuracy": acc, "average": avg, "results": results}


def format_table(report: dict) -> str:
    lengths = [str(n) for n in report["lengths"]]
    w = max([18] + [len(t) for t in report["accuracy"]])
    head = f"{'task':{w}s}" + "".join(f"{_short(int(n)):>9s}" for n in lengths)
    lines = [head, "-" * len(head)]
    for task, row in report["accuracy"].items():
        lines.append(f"{task:{w}s}" + "".join(f"{row[n]:9.3f}" for n in lengths))
    lines.append(f"{'average':{w}s}" + "".join(f"{report['average'][n]:9.3f}" for n in lengths))
    return "\n".join(lines)


def _short(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)
