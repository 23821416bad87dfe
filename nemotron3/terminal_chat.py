"""`nemotron3 chat`: an interactive terminal chat over the engine (no server).

Reasoning is printed dimmed as it streams, then the answer; tool calls (if the model emits any) are shown
as `[tool call] name {arguments}`; with tools on (`nemotron3 chat --tools`, the default there) the demo
calculator / python tools run and `[tool result] ...` is shown before the model continues. Code the model
wrote is shown and run only when the user answers `y` (`yes=True`, `nemotron3 chat --yes`, skips the question).
Commands: `/exit` (or Ctrl-D), `/reset` (forget the conversation), `/think on|off`, `/help`. Ctrl-C stops
the reply being generated. History keeps the answers (the chat template drops the reasoning of earlier
turns anyway).
"""
from __future__ import annotations

import sys
from typing import Callable, TextIO

from .chat.parsers import StreamParser

DIM, RESET = "\033[2m", "\033[0m"
HELP = "commands: /exit, /reset, /think on|off, /help"
MAX_TOOL_ROUNDS = 4
CODE_TOOLS = {"python": "code"}          # tools that run model-written code: the argument holding it
DECLINED = "error: the user declined to run this code"


def confirm_code(name: str, arguments, input_fn: Callable[[str], str], out: TextIO) -> bool:
    """Show the code of a `CODE_TOOLS` call and ask y/N; other tools need no question."""
    if name not in CODE_TOOLS:
        return True
    code = arguments.get(CODE_TOOLS[name], "") if isinstance(arguments, dict) else ""
    out.write(f"The model wants to run this {name} code:\n{code}\n")
    out.flush()
    try:
        return input_fn("run it? [y/N] ").strip().lower() in ("y", "yes")
    except (EOFError, KeyboardInterrupt):
        return False


def run_chat(engine, *, system: str | None = None, thinking: bool = True, thinking_budget: int | None = None,
             temperature: float = 0.6, top_p: float = 0.95, max_tokens: int = 1024,
             input_fn: Callable[[str], str] = input, out: TextIO | None = None, color: bool | None = None,
             tools: bool = False, tool_executor: Callable[[str, dict], str] | None = None, yes: bool = False
             ) -> None:
    """Chat loop over an `LLMEngine` (sync). `input_fn` / `out` make it scriptable.

    `tools=True` offers the demo tools (`nemotron3.train.envs.DEMO_TOOLS`: calculator, sandboxed python) to
    the model; its tool calls are executed (`tool_executor`, default `execute_demo_tool`), shown as
    `[tool call] ...` / `[tool result] ...`, and the model continues, up to `MAX_TOOL_ROUNDS` rounds per
    user message. Code calls are shown and run only if the user answers y (`yes=True`: without asking)."""
    from .engine import SamplingParams
    from .tokenizer import encode_text
    out = out or sys.stdout
    color = out.isatty() if color is None else color
    dim, reset = (DIM, RESET) if color else ("", "")
    tok = engine.tokenizer
    if tok is None:
        raise ValueError("chat needs a model directory with a tokenizer")
    tool_schemas = None
    if tools:
        from .train.envs.tools import DEMO_TOOLS, execute_demo_tool
        tool_schemas = DEMO_TOOLS
        tool_executor = tool_executor or execute_demo_tool
    history: list[dict] = []
    turn = 0
    out.write(f"nemotron3 chat ({HELP}); thinking {'on' if thinking else 'off'}"
              f"{'; tools: calculator, python' if tools else ''}\n")
    while True:
        try:
            line = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/reset":
                history.clear()
                out.write("(conversation cleared)\n")
            elif cmd == "/think" and arg.strip() in ("on", "off"):
                thinking = arg.strip() == "on"
                out.write(f"(thinking {arg.strip()})\n")
            else:
                out.write(HELP + "\n")
            continue
        history.append({"role": "user", "content": text})
        for round_ in range(MAX_TOOL_ROUNDS + 1):
            msgs = ([{"role": "system", "content": system}] if system else []) + history
            prompt = tok.apply_chat_template(msgs, tools=tool_schemas, add_generation_prompt=True, tokenize=False,
                                             enable_thinking=thinking)
            ids = encode_text(tok, prompt)
            room = engine.max_model_len - len(ids)
            if room < 1:
                if round_ == 0:
                    history.pop()
                out.write("error: the conversation no longer fits the context; /reset to start over\n")
                break
            params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=min(max_tokens, room),
                                    skip_special_tokens=False, reasoning_mode="regular" if thinking else "off",
                                    thinking_budget=thinking_budget if thinking else None)
            rid = f"chat-{turn}"
            turn += 1
            parser = StreamParser(prompt.rfind("<think>") > prompt.rfind("</think>"), tools=tool_schemas)
            answer, reasoning, calls, in_reasoning = [], [], [], False
            interrupted = False
            engine.add_request(rid, {"prompt_token_ids": ids}, params)
            try:
                done = False
                while not done:
                    for o in engine.step():
                        if o.request_id != rid:
                            continue
                        c = o.outputs[0]
                        d = parser.feed(c.delta_text)
                        if c.finished:
                            d += parser.finish()
                            done = True
                        if d.reasoning:
                            if not in_reasoning:
                                out.write(dim)
                                in_reasoning = True
                            out.write(d.reasoning)
                            reasoning.append(d.reasoning)
                        if (d.content or d.tool_calls) and in_reasoning:
                            out.write(reset + "\n")
                            in_reasoning = False
                        if d.content:
                            out.write(d.content if answer else d.content.lstrip())
                            answer.append(d.content)
                        for call in d.tool_calls:
                            out.write(f"\n[tool call] {call.name} {call.arguments_json}\n")
                            calls.append(call)
                        out.flush()
                        if done and c.finish_reason == "length":
                            out.write(f"{reset}\n(stopped: max tokens)")
            except KeyboardInterrupt:
                engine.abort_request(rid)
                engine.requests.pop(rid, None)
                out.write(f"{reset}\n(interrupted)")
                interrupted = True
            if in_reasoning:
                out.write(reset)
            out.write("\n")
            msg = {"role": "assistant", "content": "".join(answer).strip()}
            run_tools = tools and calls and not interrupted
            if run_tools:       # keep the reasoning of the ongoing tool-calling turn (the template shows it)
                msg["reasoning_content"] = "".join(reasoning).strip()
                msg["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
            history.append(msg)
            if not run_tools:
                break
            if round_ == MAX_TOOL_ROUNDS:
                out.write(f"(stopped: {MAX_TOOL_ROUNDS} tool rounds)\n")
                break
            for c in calls:
                ok = yes or confirm_code(c.name, c.arguments, input_fn, out)
                result = tool_executor(c.name, c.arguments) if ok else DECLINED
                shown = result if len(result) <= 500 else result[:500] + "..."
                out.write(f"[tool result] {shown}\n")
                history.append({"role": "tool", "tool_call_id": c.id, "name": c.name, "content": result})
            out.flush()
