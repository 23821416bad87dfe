"""`nemotron3 serve` as a real process (flags, API key, the openai client against it) and the terminal chat
loop of `nemotron3 chat` (scripted input)."""
import io
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from engine_utils import one_thread  # noqa: F401
from server_utils import ScriptedEngine, free_port
from nemotron3.terminal_chat import DIM, run_chat
from nemotron3.checkpoint import load
from nemotron3.tokenizer import load_tokenizer


def test_serve_command(server_model_dir):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nemotron3.cli", "serve", str(server_model_dir), "--port", str(port),
                             "--api-key", "k", "--max-model-len", "600",
                             "--max-num-seqs", "2", "--num-speculative-tokens", "1", "--log-level", "warning",
                             "--threads", "1", "--weight-dtype", "bfloat16", "--responses-store-size", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        [m] = client.models.list().data                       # the default name: the directory's, not its path
        assert m.id == server_model_dir.name and m.model_extra["max_model_len"] == 600
        r = client.chat.completions.create(model=m.id, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                           extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 6
        assert httpx.get(url + "/v1/models").status_code == 401
        resp = client.responses.create(model=m.id, input="hi", max_output_tokens=4)
        assert 1 <= resp.usage.output_tokens <= 4 and resp.object == "response"
        with pytest.raises(openai.NotFoundError):               # --responses-store-size 0: nothing is kept
            client.responses.retrieve(resp.id)
        assert httpx.get(url + "/metrics").status_code == 401
        metrics = httpx.get(url + "/metrics", headers={"Authorization": "Bearer k"}).text
        assert "nemotron3_spec_decode_num_draft_tokens_total" in metrics
        assert f'nemotron3_spec_decode_num_draft_tokens_total{{model_name="{m.id}"}} 0\n' not in metrics  # drafted
        assert str(server_model_dir.parent) not in metrics and f'model_name="{m.id}"' in metrics
    finally:
        proc.terminate()
        proc.wait(20)


def test_serve_bad_model_dir(tmp_path):
    from nemotron3.cli import main
    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path / "missing"), "--port", str(free_port())])
    assert str(e.value.code).startswith("error:")


def test_terminal_chat(server_model_dir):
    tok = load_tokenizer(server_model_dir)
    engine = ScriptedEngine(load(server_model_dir), tok, {"SCRIPT_HELLO": "Let me think.\n</think>\nHello there!",
                                                          "SCRIPT_PLAIN": "Plain answer."},
                            max_num_seqs=2, max_model_len=512)
    lines = iter(["hi SCRIPT_HELLO", "/think off", "and now SCRIPT_PLAIN", "/reset", "/bogus", "/exit", "never read"])
    prompts = []

    def fake_input(prompt):
        prompts.append(prompt)
        return next(lines)

    out = io.StringIO()
    run_chat(engine, input_fn=fake_input, out=out, color=True, max_tokens=40)
    text = out.getvalue()
    assert f"{DIM}Let me think." in text and "Hello there!" in text
    assert "(thinking off)" in text and "Plain answer." in text and "(conversation cleared)" in text
    assert "commands:" in text and len(prompts) == 6
    assert not engine.has_unfinished_requests()


def test_terminal_chat_asks_before_running_code():
    from test_envs import FakeEngine
    code_call = ("Run it.\n</think>\n<tool_call>\n<function=python>\n<parameter=code>\nprint(6 * 7)\n"
                 "</parameter>\n</function>\n</tool_call>")

    def chat(answers, **kw):
        ran, out, prompts = [], io.StringIO(), []
        lines = iter(["compute it", *answers, "/exit"])
        replies = iter([code_call, "Done.\n</think>\nIt printed something."])

        def reply(prompts, ids):
            return next(replies)

        def fake_input(prompt):
            prompts.append(prompt)
            return next(lines)

        run_chat(FakeEngine(reply), input_fn=fake_input, out=out, color=False, tools=True,
                 tool_executor=lambda name, args: ran.append(args["code"]) or "42\n", **kw)
        return out.getvalue(), ran, prompts

    text, ran, prompts = chat(["n"])
    assert "The model wants to run this python code:\nprint(6 * 7)" in text and "run it? [y/N] " in prompts
    assert ran == [] and "[tool result] error: the user declined" in text
    text, ran, prompts = chat([""])                                     # Enter means no
    assert ran == []
    text, ran, prompts = chat(["y"])
    assert ran == ["print(6 * 7)"] and "[tool result] 42" in text
    text, ran, prompts = chat([], yes=True)
    assert ran == ["print(6 * 7)"] and "run it? [y/N] " not in prompts and "wants to run" not in text
