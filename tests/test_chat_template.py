"""Chat template: byte-identical to NVIDIA's Nano template, identical through transformers, and a
checkpoint's own template always wins over ours."""

import json
from pathlib import Path

import pytest

from nemotron3.chat import CHAT_TEMPLATE, render_chat
from nemotron3.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

FIXTURE = json.loads((Path(__file__).parent / "data" / "chat_template_nvidia.json").read_text(encoding="utf-8"))
CASES = {c["name"]: c for c in FIXTURE["cases"]}


def ours(case, template=None):
    kw = dict(case["kwargs"])
    return render_chat(case["messages"], tools=case["tools"], add_generation_prompt=kw.pop("add_generation_prompt"),
                       chat_template=template, **kw)


@pytest.mark.parametrize("name", sorted(CASES))
def test_byte_identical_to_nvidia_template(name):
    assert ours(CASES[name]) == CASES[name]["expected"]


def test_fixture_holds_the_shapes_the_issue_names():
    """The rendered data themselves show NVIDIA's rules, so a regenerated fixture cannot silently lose them."""
    assert len(CASES) >= 14
    e = {k: c["expected"] for k, c in CASES.items()}
    assert "<|im_start|>assistant\n<think></think>\nHello!<|im_end|>" in e["multi_turn_history_reasoning_dropped"]
    assert "<think>\nR\n\n</think>\n\nAnswer<|im_end|>" in e["reasoning_and_content_verbatim"]
    args = e["non_string_arguments"]
    for piece in ("<parameter=flag>\nTrue\n", "<parameter=none>\nNone\n", "<parameter=ratio>\n1.5\n",
                  "<parameter=big>\n1e+20\n", '<parameter=list>\n[1, "a", null]\n'):
        assert piece in args
    schema = e["schema_extra_keys"]
    assert "<strict>True</strict>\n</function>" in schema
    assert "<additionalProperties>False</additionalProperties>\n<$defs>" in schema
    assert "<type>string</type>\n<enum>[\"fast\", \"deep\"]</enum>\n<default>fast</default>" in schema
    assert "<think></think>Calling.\n<tool_call>" in e["history_call_inline_think"]
    assert e["tools_call_and_result"].count("<|im_start|>") == 5


def test_deliberate_differences_where_nvidias_template_breaks():
    user = {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}
    assert "<|im_start|>user\nHi there<|im_end|>" in render_chat([user])
    assert "<|im_start|>user\n<|im_end|>" in render_chat([{"role": "user", "content": None}])
    as_dict = CASES["non_string_arguments"]
    as_string = json.loads(json.dumps(as_dict))
    for m in as_string["messages"]:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.dumps(c["function"]["arguments"])
    assert ours(as_string) == as_dict["expected"]
    first_tool = render_chat([{"role": "tool", "content": "r"}], add_generation_prompt=False)
    assert first_tool.endswith("<|im_start|>user\n<tool_response>\nr\n</tool_response>\n<|im_end|>\n")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_tok")
    train_tokenizer(["def f(x):\n    return x\n"] * 4 + ["Hello, world! The weather is nice."] * 4, 300, d)
    return d


def test_wrapper_uses_saved_template(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert tok.chat_template == CHAT_TEMPLATE
    for case in CASES.values():
        text = tok.apply_chat_template(case["messages"], tools=case["tools"], **case["kwargs"])
        assert text == case["expected"]
        ids = tok.apply_chat_template(case["messages"], tools=case["tools"], tokenize=True, **case["kwargs"])
        assert tok.decode(ids) == text


def test_transformers_renders_identically(tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    tok = load_tokenizer(tok_dir)
    for case in CASES.values():
        theirs = hf.apply_chat_template(case["messages"], tools=case["tools"], tokenize=False, **case["kwargs"])
        assert theirs == case["expected"]
        assert hf.encode(theirs) == tok.encode(theirs)
        assert hf.encode(theirs).count(tok.im_start_id) == theirs.count("<|im_start|>")


def test_checkpoint_template_wins(tok_dir, tmp_path):
    """chat_template.jinja, then tokenizer_config.json's template (string or legacy list), then ours;
    transformers picks the same one."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer

    raw = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    msgs = [{"role": "user", "content": "hi"}]
    jinja_file = "{% for m in messages %}[file {{ m.content }}]{% endfor %}"
    in_config = "{% for m in messages %}[config {{ m.content }}]{% endfor %}"

    def make(name, config_template, file_template=None):
        d = tmp_path / name
        save_tokenizer(raw, d, chat_template=config_template)
        if config_template is None:
            cfg = json.loads((d / "tokenizer_config.json").read_text())
            del cfg["chat_template"]
            (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        if file_template is not None:
            (d / "chat_template.jinja").write_text(file_template)
        return d

    cases = {
        "config": (make("config", in_config), "[config hi]"),
        "file_over_config": (make("both", in_config, jinja_file), "[file hi]"),
        "file_only": (make("file", None, jinja_file), "[file hi]"),
        "legacy_list": (make("list", [{"name": "tool_use", "template": jinja_file},
                                      {"name": "default", "template": in_config}]), "[config hi]"),
    }
    for name, (d, want) in cases.items():
        assert load_tokenizer(d).apply_chat_template(msgs, add_generation_prompt=False) == want, name
        hf = transformers.AutoTokenizer.from_pretrained(str(d))
        assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False) == want, name
    no_template = make("none", None)
    assert load_tokenizer(no_template).chat_template == CHAT_TEMPLATE
    (no_template / "tokenizer_config.json").unlink()      # tokenizer.json alone: ours, and a file still wins
    assert load_tokenizer(no_template).chat_template == CHAT_TEMPLATE
    (no_template / "chat_template.jinja").write_text(jinja_file)
    assert load_tokenizer(no_template).apply_chat_template(msgs, add_generation_prompt=False) == "[file hi]"


@pytest.mark.parametrize("model", ["pico", "pico-nvfp4"])
def test_shipped_models_carry_the_default_template(model):
    """The embedded models' saved template (which wins over ours at load) is the NVIDIA-identical default."""
    cfg = json.loads((Path(__file__).parents[1] / "models" / model / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE
