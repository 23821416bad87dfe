"""`format`: answer under a verifiable format constraint. No tools.

Kinds (answer = a dict with "kind" + what the verifier needs):
* `json`    — "Reply with a JSON object with keys "name" and "year" for: ..." : content (optionally in a ```
              fence) must `json.loads` to a dict with exactly those keys and the right values (strings compared
              case-insensitively, numbers as ints).
* `bullets` — "Write the words a, b, c as a bulleted list.": every non-empty line starts with "- " and the
              items are exactly the words, in order (case-insensitive).
* `words`   — "Write exactly N words about a red fox.": exactly N words (`[A-Za-z0-9']+` runs), including the noun.
* `upper` / `lower` — "Repeat in uppercase: ...": no lower- (upper-) case letters, and the words are the phrase's.
"""
from __future__ import annotations

import json
import random
import re

from .base import Env, Task

FIRST = ["Ada", "Alan", "Grace", "Linus", "Marie", "Nina", "Omar", "Rosa", "Ivan", "Lena", "Hugo", "Clara",
         "Felix", "Maya", "Oscar", "Iris"]
LAST = ["Lovelace", "Turing", "Hopper", "Curie", "Novak", "Reyes", "Stone", "Berg", "Moreau", "Silva", "Quinn",
        "Weber", "Costa", "Frost"]
GOODS = ["lamp", "chair", "book", "kettle", "clock", "radio", "bike", "pillow", "mug", "scarf"]
NOUNS = ["fox", "cat", "river", "tree", "house", "bird", "ship", "garden", "mountain", "city", "dog", "road"]
ADJS = ["red", "quiet", "old", "small", "bright", "green", "cold", "happy", "tall", "dark"]
WORDS = ["apple", "river", "stone", "cloud", "green", "light", "paper", "music", "ocean", "table", "sun", "bread",
         "glass", "winter", "tiger", "honey", "storm", "chair", "garden", "silver"]
TAILS = [["sleeps", "under", "the", "warm", "sun"], ["stands", "near", "the", "old", "road"],
         ["waits", "by", "the", "calm", "lake"], ["looks", "very", "nice", "at", "night"],
         ["is", "here", "again", "this", "morning"]]
_WORD = re.compile(r"[A-Za-z0-9']+")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")

_THINK = {
    "json": ["The user wants JSON with keys {keys}. {detail}", "I need a JSON object with keys {keys}. {detail}"],
    "bullets": ["I should list {n} words, one per line, each starting with a dash.",
                "A bulleted list: one line per word, each starting with '- '."],
    "words": ["I need exactly {n} words and must mention the {noun}.", "Exactly {n} words about the {noun}."],
    "upper": ["I should repeat the phrase in capital letters.", "Repeat it, all uppercase."],
    "lower": ["I should repeat the phrase in lowercase letters.", "Repeat it, all lowercase."],
}


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


class FormatEnv(Env):
    name = "format"
    max_turns = 1
    tool_schemas = None

    def _draw(self, rng: random.Random) -> dict:
        kind = rng.choice(["json", "json", "bullets", "words", "upper", "lower"])
        if kind == "json":
            if rng.random() < 0.6:
                name, year = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.randint(1700, 2010)
                text = f'Reply with a JSON object with keys "name" and "year" for: {name} was born in {year}.'
                answer = {"name": name, "year": year}
            else:
                item, price = rng.choice(GOODS), rng.randint(2, 300)
                text = f'Reply with a JSON object with keys "item" and "price" for: A {item} costs {price} dollars.'
                answer = {"item": item, "price": price}
            level = "medium"
        elif kind == "bullets":
            n = rng.randint(2, 5)
            words = rng.sample(WORDS, n)
            text = f"Write the words {', '.join(words)} as a bulleted list."
            answer = {"words": words}
            level = "easy" if n <= 3 else "medium"
        elif kind == "words":
            n, adj, noun = rng.randint(3, 8), rng.choice(ADJS), rng.choice(NOUNS)
            text = f"Write exactly {n} words about a {adj} {noun}."
            answer = {"n": n, "noun": noun, "adj": adj}
            level = "easy" if n <= 4 else "hard"
        else:
            phrase = rng.sample(WORDS, rng.randint(2, 4))
            shown = " ".join(phrase) if kind == "upper" else " ".join(w.capitalize() for w in phrase)
            text = f"Repeat in {kind}case: {shown}"
            answer = {"phrase": phrase}
            level = "easy"
        answer["kind"] = kind
        return {"text": text, "answer": answer, "difficulty": level}

    def _finish(self, split: str, index: int, p: dict) -> Task:
        return Task(env=self.name, split=split, index=index, messages=[{"role": "user", "content": p["text"]}],
                    tools=None, answer=p["answer"], meta={"difficulty": p["difficulty"], "kind": p["answer"]["kind"]})

    def verify(self, task: Task, answer_text: str) -> bool:
        a, text = task.answer, (answer_text or "").strip()
        kind = a["kind"]
        if not text:
            return False
        if kind == "json":
            try:
                obj = json.loads(_FENCE.sub("", text))
            except ValueError:
                return False
            want = {k: v for k, v in a.items() if k != "kind"}
            if not isinstance(obj, dict) or set(obj) != set(want):
                return False
            for k, v in want.items():
                got = obj[k]
                if isinstance(v, int):
                    if isinstance(got, bool) or not (isinstance(got, int)
                                                     or (isinstance(got, str) and got.strip() == str(v))):
                        return False
                    if isinstance(got, int) and got != v:
                        return False
                elif not isinstance(got, str) or got.strip().lower() != v.lower():
                    return False
            return True
        if kind == "bullets":
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            if not lines or not all(ln.startswith("- ") for ln in lines):
                return False
            return [ln[2:].strip().rstrip(".").lower() for ln in lines] == [w.lower() for w in a["words"]]
        if kind == "words":
            words = [w.lower() for w in _words(text)]
            return len(words) == a["n"] and a["noun"] in words
        if kind == "upper":
            return not any(c.islower() for c in text) and _words(text) == [w.upper() for w in a["phrase"]]
        if kind == "lower":
            return not any(c.isupper() for c in text) and _words(text) == [w.lower() for w in a["phrase"]]
        raise ValueError(f"unknown format kind {kind!r}")

    def _content(self, a: dict, rng: random.Random) -> str:
        kind = a["kind"]
        if kind == "json":
            return json.dumps({k: v for k, v in a.items() if k != "kind"})
        if kind == "bullets":
            return "\n".join(f"- {w}" for w in a["words"])
        if kind == "words":
            words = ["The", a["adj"], a["noun"]] + rng.choice(TAILS)
            words = words[:a["n"]]
            return " ".join(words) + "."
        if kind == "upper":
            return " ".join(a["phrase"]).upper()
        return " ".join(a["phrase"]).lower()

    def reference(self, task: Task, rng: random.Random, thinking: bool = True) -> list[dict]:
        a = task.answer
        content = self._content(a, rng)
        reasoning = ""
        if thinking:
            keys = " and ".join(k for k in a if k != "kind")
            detail = " ".join(f"{k} is {v}." for k, v in a.items() if k != "kind")
            n = a.get("n", len(a.get("words", [])))
            reasoning = rng.choice(_THINK[a["kind"]]).format(keys=keys, detail=detail, n=n, noun=a.get("noun", ""))
        return [{"role": "assistant", "content": content, "reasoning_content": reasoning}]
