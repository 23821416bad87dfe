"""Post-training environments (nemotron3.train.envs): determinism, disjoint splits, verified references,
format-error detection and penalties, calculator / sandbox safety, multi-turn `step`, chat with demo tools."""
import io
import random
from types import SimpleNamespace

import pytest

from nemotron3.chat.template import render_chat
from nemotron3.sandbox import sandbox_problem
from nemotron3.train.envs import (DEMO_TOOLS, ENVS, CalculatorEnv, CodeEnv, FormatEnv, calculate, execute_demo_tool,
                                  format_number, get_env, step)
from nemotron3.train.envs.base import reward_for, split_of
from nemotron3.train.envs.calc import last_number
from nemotron3.train.envs.code import extract_output

_NO_SANDBOX = sandbox_problem()
needs_sandbox = pytest.mark.skipif(_NO_SANDBOX is not None, reason=f"the code env needs the sandbox: {_NO_SANDBOX}")
ENV_NAMES = [pytest.param(n, marks=needs_sandbox) if n == "code" else n for n in ENVS]

N = {"calc": 60, "code": 10, "format": 60}


def raw_turns(task, continuation, thinking):
    """The raw text a policy would generate for each assistant turn of `continuation` (rendered with the
    chat template: the part after the generation prompt, without <|im_end|>)."""
    raws = []
    for i, m in enumerate(continuation):
        if m["role"] != "assistant":
            continue
        before = task.messages + continuation[:i]
        prompt = render_chat(before, tools=task.tools, add_generation_prompt=True, enable_thinking=thinking)
        full = render_chat(before + [m], tools=task.tools, add_generation_prompt=False, enable_thinking=thinking)
        head = prompt[:prompt.rindex("<|im_start|>assistant\n")]
        assert full.startswith(head)
        turn = full[len(head) + len("<|im_start|>assistant\n"):]
        turn = turn[:turn.rindex("<|im_end|>")]
        gen = "<think>\n" if thinking else "<think></think>"
        assert turn.startswith(gen), turn
        raws.append(turn[len(gen):])
    return raws


@pytest.mark.parametrize("name", ENV_NAMES)
def test_registry_and_determinism(name):
    assert set(ENVS) == {"calc", "code", "format"}
    with pytest.raises(ValueError):
        get_env("nope")
    a, b = get_env(name), get_env(name)
    for split in ("train", "test"):
        for i in range(3):
            ta, tb = a.task(split, i), b.task(split, i)
            assert ta == tb and ta.env == name and ta.split == split and ta.index == i
    assert [t.index for t in a.tasks("train", 3, start=5)] == [5, 6, 7]
    with pytest.raises(ValueError):
        a.task("dev", 0)


def test_splits_disjoint_and_prompts_short():
    for name in ENVS:
        env = get_env(name)
        train = {env.problem("train", i)["text"] for i in range(400)}
        test = {env.problem("test", i)["text"] for i in range(200)}
        assert not train & test
        assert all(split_of(t) == "train" for t in train) and all(split_of(t) == "test" for t in test)
        assert len(train) > 200 and len(test) > 100             # plenty of distinct problems
        assert max(len(t) for t in train | test) < 200         # well under 80 tokens
        levels = {env.problem("train", i).get("difficulty") for i in range(100)}
        assert "easy" in levels and len(levels) >= 2


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("name", ENV_NAMES)
def test_reference_episodes_score_correct(name, thinking):
    env = get_env(name)
    rng = random.Random(0)
    for split in ("train", "test"):
        for task in env.tasks(split, N[name] // 2):
            ref = env.reference(task, rng, thinking=thinking)
            if name == "code":      # the trace's prediction (shown in the reasoning) matches the sandbox
                assert env.problem(split, task.index)["expected"] == task.answer.strip()
            assert ref[-1]["role"] == "assistant" and ref[-1]["content"]
            assert all(bool(m.get("reasoning_content")) == thinking for m in ref if m["role"] == "assistant")
            assert env.verify(task, ref[-1]["content"])
            raws = raw_turns(task, ref, thinking)
            ep = env.score(task, ref, raws)
            assert ep.correct and ep.reward == 1.0 and ep.format_errors == [] and ep.turns == len(raws), (task, ep)
            # replaying the raw turns through step() reproduces an equally good episode
            history, done = [], False
            for raw in raws:
                assert not done
                new, done = step(env, task, history, raw, thinking=thinking)
                history += new
            assert done
            ep2 = env.score(task, history, raws)
            assert ep2.correct and ep2.reward == 1.0 and ep2.format_errors == []


@pytest.mark.parametrize("name", ENV_NAMES)
def test_wrong_answers_score_zero(name):
    env = get_env(name)
    for task in env.tasks("train", 5 if name == "code" else 20):
        ref = env.reference(task, random.Random(1), thinking=True)
        wrong = dict(ref[-1], content={"calc": f"The answer is {task.answer}1.", "code": "Output: 12345",
                                       "format": "I cannot do that."}[name])
        msgs = ref[:-1] + [wrong]
        ep = env.score(task, msgs, raw_turns(task, msgs, True))
        assert not ep.correct and ep.reward == 0.0 and ep.format_errors == []
        empty = dict(ref[-1], content="")
        ep = env.score(task, ref[:-1] + [empty], raw_turns(task, ref[:-1] + [empty], True))
        assert not ep.correct and "no_answer" in ep.format_errors and ep.reward == 0.0


def test_number_normalisation_and_extraction():
    assert [format_number(x) for x in (3500.0, 444, 6.25, 10 / 3, -0.0, 1.15 * 100, 2.5e-5, 0.30000000000000004)] == \
        ["3500", "444", "6.25", "3.3333", "0", "115", "0", "0.3"]
    assert last_number("37 * 12 = 444, so the answer is 444.") == "444"
    assert last_number("It is 1,234.50 meters") == "1234.5"
    assert last_number("no number") is None
    env = CalculatorEnv()
    t = env.task("train", 0)
    assert env.verify(t, f"The answer is {t.answer}.") and not env.verify(t, f"{t.answer} plus 1")
    assert extract_output("Let me see.\nOutput:\n```\n1\n2 \n```") == "1\n2"
    assert extract_output("13") == "13" and extract_output("output: 13\n") == "13"


def test_calc_references_copy_numbers_as_the_same_tokens():
    """Byte-level BPE tokenizes " 85" and "85" differently, so the reference spells every number it copies
    with the token ids it was read as: each operand of the tool call as in the question, and the result after
    the call as in the tool response. Checked with the shipped tokenizer on rendered episodes."""
    import re
    from pathlib import Path

    from nemotron3.tokenizer import load_tokenizer
    tok = load_tokenizer(Path(__file__).resolve().parent.parent / "models" / "pico")

    def count(ids, sub):
        return sum(ids[i:i + len(sub)] == sub for i in range(len(ids)))

    env = CalculatorEnv()
    for task in env.tasks("test", 150):
        question = tok.encode(render_chat(task.messages, add_generation_prompt=False))
        call = env.reference(task, random.Random(0))[0]["tool_calls"][0]["function"]["arguments"]["expression"]
        in_question = re.findall(r"\d+(?:\.\d+)?", task.messages[-1]["content"])  # not e.g. 60 s per minute
        for prefix, number in re.findall(r"(^|[ (])(\d+(?:\.\d+)?)", call):
            if number not in in_question:
                continue
            ids = tok.encode(prefix + number)[1 if prefix == "(" else 0:]  # "(" is a pre-token of its own
            assert count(question, ids), (call, task.messages)
        result = tok.encode("\n" + task.answer)[1:]  # as the template writes it: "<tool_response>\nN\n"
        for thinking in (True, False):
            ref = env.reference(task, random.Random(task.index), thinking=thinking)
            ids = tok.encode(render_chat(task.messages + ref, tools=task.tools, add_generation_prompt=False,
                                         enable_thinking=thinking))
            after = ids[ids.index(tok.token_to_id("<tool_response>")):]
            assert count(after, result) == (3 if thinking else 2), (task.answer, tok.decode(ids))


def test_format_verifier_checks_constraint_and_content():
    env = FormatEnv()
    by_kind = {}
    for i in range(200):
        t = env.task("train", i)
        by_kind.setdefault(t.answer["kind"], t)
    assert set(by_kind) == {"json", "bullets", "words", "upper", "lower"}
    j = by_kind["json"]
    good = env.reference(j, random.Random(0))[-1]["content"]
    assert env.verify(j, good) and env.verify(j, f"```json\n{good}\n```")
    assert not env.verify(j, good.replace("{", "", 1))                   # not JSON
    assert not env.verify(j, '{"name": "X Y", "year": 1}' if "name" in j.answer else '{"item": "x", "price": 1}')
    b = by_kind["bullets"]
    assert not env.verify(b, "\n".join(b.answer["words"]))               # missing dashes
    assert not env.verify(b, "- " + "\n- ".join(reversed(b.answer["words"] + ["extra"])))
    w = by_kind["words"]
    assert not env.verify(w, " ".join(["word"] * w.answer["n"]))          # right length, wrong content
    assert not env.verify(w, " ".join([w.answer["noun"]] * (w.answer["n"] + 1)))
    u = by_kind["upper"]
    assert not env.verify(u, " ".join(u.answer["phrase"]))                # lowercase
    assert not env.verify(u, "HELLO")


@needs_sandbox
def test_format_errors_and_penalties():
    assert reward_for(True, ["bad_tool_call"]) == 0.5 and reward_for(False, ["unknown_tool"]) == -0.5
    assert reward_for(False, ["unclosed_think", "bad_tool_call"]) == -0.5 and reward_for(True, ["no_answer"]) == 1.0
    env = CalculatorEnv()
    task = env.task("train", 3)
    # unclosed <think>: everything stays reasoning, no answer
    raw = f"I think the answer is {task.answer}."
    new, done = step(env, task, [], raw, thinking=True)
    assert done and new[0]["content"] == ""
    ep = env.score(task, new, [raw])
    assert "unclosed_think" in ep.format_errors and ep.reward == -0.5
    # malformed tool-call XML
    raw = "Use the tool.\n</think>\n<tool_call>\n<function=calculator>\n<parameter=expression>\n1+1\n</tool_call>"
    new, done = step(env, task, [], raw)
    assert done and "tool_calls" not in new[0]
    ep = env.score(task, new, [raw])
    assert "bad_tool_call" in ep.format_errors and ep.reward == -0.5
    # unknown tool, then a correct answer: correct but penalised
    raw1 = "x\n</think>\n<tool_call>\n<function=search>\n<parameter=q>\nhi\n</parameter>\n</function>\n</tool_call>"
    hist, done = step(env, task, [], raw1)
    assert not done and hist[1]["role"] == "tool" and hist[1]["content"].startswith("error: unknown tool")
    raw2 = f"ok\n</think>\nThe answer is {task.answer}."
    new, done = step(env, task, hist, raw2)
    assert done
    ep = env.score(task, hist + new, [raw1, raw2])
    assert ep.correct and ep.format_errors == ["unknown_tool"] and ep.reward == 0.5
    # no-tool env: any tool call is unknown; a tool call in the only turn ends the episode
    code = CodeEnv()
    ct = code.task("train", 0)
    new, done = step(code, ct, [], raw1)
    assert done and len(new) == 1
    ep = code.score(ct, new, [raw1])
    assert {"unknown_tool", "tool_in_answer_turn", "no_answer", "too_many_turns"} <= set(ep.format_errors)
    # thinking off: a self-opened <think> that never closes
    raw = "<think>\nhmm"
    new, _ = step(env, task, [], raw, thinking=False)
    assert "unclosed_think" in env.score(task, new, [raw], thinking=False).format_errors


def test_step_runs_a_full_calc_episode():
    env = CalculatorEnv()
    task = env.task("test", 7)
    expr = task.meta["expression"]
    raw1 = (f"I need to compute {expr}.\n</think>\n<tool_call>\n<function=calculator>\n<parameter=expression>\n"
            f"{expr}\n</parameter>\n</function>\n</tool_call>")
    history, done = step(env, task, [], raw1)
    assert not done and [m["role"] for m in history] == ["assistant", "tool"]
    assert history[0]["tool_calls"][0]["function"] == {"name": "calculator", "arguments": {"expression": expr}}
    assert history[1]["content"] == task.answer and history[1]["tool_call_id"] == history[0]["tool_calls"][0]["id"]
    # the next prompt renders (tool response included) and the policy answers
    prompt = render_chat(task.messages + history, tools=task.tools)
    assert f"<tool_response>\n{task.answer}\n</tool_response>" in prompt and prompt.endswith("<think>\n")
    raw2 = f"The calculator returned {task.answer}.\n</think>\nThe answer is {task.answer}."
    new, done = step(env, task, history, raw2)
    assert done
    ep = env.score(task, history + new, [raw1, raw2])
    assert ep.correct and ep.reward == 1.0 and ep.turns == 2
    # turn budget: a policy that keeps calling tools is stopped at max_turns
    hist = []
    for turn in range(env.max_turns):
        new, done = step(env, task, hist, raw1)
        hist += new
    assert done and hist[-1]["role"] == "assistant"
    ep = env.score(task, hist, [raw1] * env.max_turns)
    assert not ep.correct and "too_many_turns" in ep.format_errors


def test_calculator_safety():
    assert calculate("37 * 12") == "444" and calculate("(2 + 3) * -4") == "-20" and calculate("7 // 2 % 3") == "0"
    assert calculate("2 ** 10") == "1024" and calculate("3.5 * 1000") == "3500"
    for bad in ("__import__('os')", "os.system('ls')", "x + 1", "[1] * 10", "'a' * 3", "lambda: 1", "True + 1"):
        assert calculate(bad).startswith("error"), bad
    for huge in ("9 ** 9 ** 9", "2 ** 1000", "10 ** 50", "99999999999 ** 99", "(10 ** 20) * (10 ** 20)"):
        assert calculate(huge).startswith("error"), huge
    assert calculate("1 / 0") == "error: division by zero" and calculate("1" * 400).startswith("error")
    env = CalculatorEnv()
    t = env.task("train", 0)
    assert env.tool_result(t, "calculator", {}).startswith("error")
    assert env.tool_result(t, "calculator", {"expression": "6*7"}) == "42"


@needs_sandbox
def test_demo_tools():
    assert [t["function"]["name"] for t in DEMO_TOOLS] == ["calculator", "python"]
    assert execute_demo_tool("calculator", {"expression": "2 + 2"}) == "4"
    assert execute_demo_tool("python", {"code": "print('x' * 5000)"}).endswith("...(truncated)")
    assert len(execute_demo_tool("python", {"code": "print('x' * 5000)"})) < 2100
    assert execute_demo_tool("python", {"code": "1/0"}).rstrip().endswith("ZeroDivisionError: division by zero")
    assert execute_demo_tool("nope", {}).startswith("error: unknown tool")


class FakeTokenizer:
    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True, tokenize=False, **kw):
        return render_chat(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kw)

    def encode(self, text):
        return list(range(len(text) // 4))


class FakeEngine:
    """Answers by a script on the rendered prompt: calls the calculator until a tool response is present."""

    def __init__(self, reply):
        self.tokenizer, self.max_model_len, self.reply = FakeTokenizer(), 100_000, reply
        self.requests, self.prompts = {}, []

    def add_request(self, rid, prompt, params):
        ids = prompt["prompt_token_ids"]
        text = self.reply(self.prompts, ids)
        self.requests[rid] = [text[i:i + 7] for i in range(0, len(text), 7)]

    def step(self):
        outs = []
        for rid, chunks in list(self.requests.items()):
            delta = chunks.pop(0) if chunks else ""
            fin = "stop" if not chunks else None
            if fin:
                del self.requests[rid]
            outs.append(SimpleNamespace(request_id=rid, outputs=[SimpleNamespace(
                delta_text=delta, finished=fin is not None, finish_reason=fin)]))
        return outs

    def abort_request(self, rid):
        self.requests.pop(rid, None)


def test_terminal_chat_with_tools(monkeypatch):
    from nemotron3 import terminal_chat as terminal

    rendered = []
    orig = FakeTokenizer.apply_chat_template

    def spy(self, messages, tools=None, **kw):
        text = orig(self, messages, tools=tools, **kw)
        rendered.append((text, tools))
        return text

    monkeypatch.setattr(FakeTokenizer, "apply_chat_template", spy)
    call = ("Use the calculator.\n</think>\n<tool_call>\n<function=calculator>\n<parameter=expression>\n37 * 12\n"
            "</parameter>\n</function>\n</tool_call>")

    def reply(prompts, ids):
        text = rendered[-1][0]
        last_user = text.rfind("<|im_start|>user\n")
        if "loop forever" in text[last_user:] or text.count("<tool_response>") == 0:
            return call
        return "The calculator returned 444.\n</think>\nThe answer is 444."

    engine = FakeEngine(reply)
    lines = iter(["How many apples in 12 boxes of 37?", "/exit"])
    out = io.StringIO()
    terminal.run_chat(engine, input_fn=lambda p: next(lines), out=out, color=False, tools=True)
    text = out.getvalue()
    assert '[tool call] calculator {"expression": "37 * 12"}' in text
    assert "[tool result] 444" in text and "The answer is 444." in text
    assert rendered[0][1] is not None and "<function>\n<name>python</name>" in rendered[0][0]
    assert "<tool_response>\n444\n</tool_response>" in rendered[-1][0]

    # a model that never stops calling tools is cut off after MAX_TOOL_ROUNDS rounds
    rendered.clear()
    engine = FakeEngine(lambda p, ids: call)
    lines = iter(["loop forever", "/exit"])
    out = io.StringIO()
    terminal.run_chat(engine, input_fn=lambda p: next(lines), out=out, color=False, tools=True)
    text = out.getvalue()
    assert text.count("[tool result]") == terminal.MAX_TOOL_ROUNDS and "tool rounds" in text

    # tools off: calls are shown, not executed, and no tools reach the template
    rendered.clear()
    engine = FakeEngine(lambda p, ids: call)
    lines = iter(["hi", "/exit"])
    out = io.StringIO()
    terminal.run_chat(engine, input_fn=lambda p: next(lines), out=out, color=False)
    assert "[tool call] calculator" in out.getvalue() and "[tool result]" not in out.getvalue()
    assert all(t is None for _, t in rendered)


def test_chat_cli_tools_flag(monkeypatch):
    import nemotron3.terminal_chat as terminal
    import nemotron3.engine as engine_mod
    from nemotron3.cli import main
    seen = []
    monkeypatch.setattr(engine_mod, "LLM", lambda *a, **k: SimpleNamespace(engine=None))
    monkeypatch.setattr(terminal, "run_chat", lambda engine, **kw: seen.append(kw["tools"]))
    main(["chat"])
    main(["chat", "--no-tools"])
    main(["chat", "--tools"])
    assert seen == [True, False, True]
