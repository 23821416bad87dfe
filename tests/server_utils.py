"""Helpers for the server tests: a tiny random model + trained tokenizer saved as a model directory, an
engine whose output can be scripted, and a live uvicorn server on a free loopback port."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch

from engine_utils import tiny_model
from nemotron3.engine import LLMEngine

CHAT_WORDS = ("You are a helpful assistant. What is the weather in Paris? It is sunny and 21 degrees. "
              "Let me think about this. The user asks about the weather, so I should call the tool. "
              "get_weather city unit celsius fahrenheit The answer is 42. Hello! How can I help you today? ")


def build_model_dir(root):
    """Train a 512-token byte-level BPE on the chat template + some chat text, save a tiny random model
    (with an MTP block) next to it: a normal nemotron_h model directory."""
    from nemotron3.chat import CHAT_TEMPLATE
    from nemotron3.checkpoint import save
    from nemotron3.tokenizer import load_tokenizer, train_tokenizer
    texts = [CHAT_TEMPLATE, CHAT_WORDS * 4] * 3
    train_tokenizer(texts, 512, root)
    tok = load_tokenizer(root)
    save(tiny_model(7, vocab_size=len(tok), max_position_embeddings=1024), root)
    return root


class ScriptedEngine(LLMEngine):
    """The real engine, with the model's choice steered: when the prompt contains one of the `scripts`'
    keys (the one occurring last wins), the scripted text's tokens get +60 logits, one after the other,
    then EOS does. Sampling, constraints (thinking budget, forced tool-call prefix), stop checks,
    detokenization and logprobs all run as usual, so the output is the script unless a constraint wins."""

    def __init__(self, model, tokenizer, scripts: dict[str, str], **kw):
        super().__init__(model, tokenizer, **kw)
        self.scripts = scripts
        self._cache: dict[tuple, list[int] | None] = {}

    def script_for(self, seq) -> list[int] | None:
        key = tuple(seq.prompt_ids)
        if key not in self._cache:
            text = self.tokenizer.decode(seq.prompt_ids)
            best, best_at = None, -1
            for k, v in self.scripts.items():
                at = text.rfind(k)
                if at > best_at:
                    best, best_at = v, at
            self._cache[key] = None if best is None else self.tokenizer.encode(best) + [self.tokenizer.eos_id]
        return self._cache[key]

    def _emit_logits(self, seqs, logits):
        logits = logits.clone()
        for b, s in enumerate(seqs):
            script = self.script_for(s)
            if script is not None:
                j = min(len(s.output_ids), len(script) - 1)
                logits[b, script[j]] += 60.0
        return super()._emit_logits(seqs, logits)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
    """Run `app` with uvicorn in a background thread on a free loopback port; yields the base URL."""
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(10)
        sock.close()


def wait_idle(engine, timeout=10.0) -> bool:
    """True once the engine has no unfinished requests (aborts take effect at the next engine step)."""
    t = time.time()
    while time.time() - t < timeout:
        if not engine.has_unfinished_requests() and not engine.requests:
            return True
        time.sleep(0.02)
    return False


def set_one_thread():
    torch.set_num_threads(1)
