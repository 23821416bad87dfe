"""Post-training: token-exact multi-turn rollouts, GRPO / MOPD losses and steps, MTP boosting (tiny random models)."""
import json
import math

import pytest
import torch

from engine_utils import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from nemotron3 import checkpoint
from nemotron3.engine import LLM, SamplingParams
from nemotron3.train import mtp_boost, rl
from nemotron3.train.envs import get_env
from nemotron3.train.recipe import load_recipe
from nemotron3.train.rollout import conversation_text, encode, rollout
from server_utils import ScriptedEngine

CALL = ("I need the calculator.\n</think>\n<tool_call>\n<function=calculator>\n<parameter=expression>\n2+3\n"
        "</parameter>\n</function>\n</tool_call>\n<|im_end|>")
ANSWER = "The calculator returned 5.\n</think>\nThe answer is 5.<|im_end|>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from server_utils import build_model_dir
    return build_model_dir(tmp_path_factory.mktemp("rl_model"))


def scripted_llm(model_dir, scripts):
    llm = LLM(str(model_dir), max_num_seqs=8)
    llm.engine = ScriptedEngine(llm.model, llm.tokenizer, scripts, max_num_seqs=8)
    return llm


def test_rollout_is_token_exact(model_dir):
    """Two turns (tool call, tool result, answer): the concatenated ids are the tokenization of the template's
    rendering of the whole conversation, and the mask covers exactly the sampled ids."""
    llm = scripted_llm(model_dir, {"Reminder": CALL, "</tool_response>": ANSWER})
    tok = llm.tokenizer
    env = get_env("calc")
    tasks = env.tasks("train", 2)
    rolls = rollout(llm, {"calc": env}, tasks, 2, SamplingParams(temperature=1.0, max_tokens=64, seed=3))
    assert len(rolls) == 4 and [r.group for r in rolls] == [0, 0, 1, 1]
    for r in rolls:
        ep = r.episode
        assert ep.turns == 2 and not ep.format_errors, ep
        assert [m["role"] for m in ep.messages] == ["assistant", "tool", "assistant"]
        assert ep.messages[1]["content"].strip() == "5"
        text = conversation_text(tok, r)
        assert tok.decode(r.tokens) + "\n" == text
        assert r.tokens == encode(tok, text[:-1])
        sampled = [t for t, m in zip(r.tokens, r.mask) if m]
        assert sampled == encode(tok, CALL) + encode(tok, ANSWER)
        # the sampled ids are two contiguous runs, each ending with <|im_end|>
        runs = "".join(map(str, r.mask)).strip("0").split("0")
        assert len([x for x in runs if x]) == 2
        assert r.mask[-1] == 1 and r.tokens[-1] == tok.token_to_id("<|im_end|>")
        assert r.prompt_len == r.mask.index(1)


def test_rollout_thinking_off_and_caps(model_dir):
    """Thinking off renders `<think></think>`; a turn cut by max_tokens ends the episode (truncated)."""
    llm = LLM(str(model_dir), max_num_seqs=8)
    env = get_env("format")
    tasks = env.tasks("train", 2)
    rolls = rollout(llm, {"format": env}, tasks, 2, SamplingParams(temperature=1.0, max_tokens=5, seed=1),
                    thinking=[False, True])
    for r in rolls:
        prompt = llm.tokenizer.decode(r.tokens[:r.prompt_len])
        assert prompt.endswith("<think></think>" if not r.thinking else "<think>\n")
        assert sum(r.mask) <= 5 * env.max_turns
        if r.truncated:
            assert r.episode.turns == 1
    # a group's samples differ (different seeds); the whole call is deterministic
    again = rollout(llm, {"format": env}, tasks, 2, SamplingParams(temperature=1.0, max_tokens=5, seed=1),
                    thinking=[False, True])
    assert [r.tokens for r in rolls] == [r.tokens for r in again]
    assert rolls[0].tokens != rolls[1].tokens or rolls[2].tokens != rolls[3].tokens


def test_grpo_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, -0.5, 0.0]])
    adv = rl.grpo_advantages(rewards)
    for g in range(3):
        r = rewards[g].tolist()
        std = torch.tensor(r).std().item()
        for i in range(4):
            loo = (sum(r) - r[i]) / 3
            want = 0.0 if std == 0 else (r[i] - loo) / (std + 1e-4)
            assert math.isclose(adv[g, i].item(), want, rel_tol=1e-5, abs_tol=1e-7)
    assert adv[1].abs().sum() == 0
    assert adv[0, 0] > 0 > adv[0, 1]


def test_clipped_loss_by_hand():
    logp_old = torch.zeros(1, 6)
    ratio = torch.tensor([[1.0, 1.5, 0.5, 1.5, 0.5, 1.1]])
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, clipped = rl.clipped_pg_loss(ratio.log(), logp_old, adv, mask, 0.2, 0.28)
    # per token min(r A, clip(r, 0.8, 1.28) A): 1, 1.28 (clipped), 0.5, -1.5, -0.8 (clipped); last masked out
    want = -(1.0 + 1.28 + 0.5 - 1.5 - 0.8) / 5
    assert math.isclose(loss.item(), want, rel_tol=1e-6)
    assert int(clipped) == 2
    # gradient flows only through unclipped tokens
    lp = ratio.log().clone().requires_grad_(True)
    rl.clipped_pg_loss(lp, logp_old, adv, mask)[0].backward()
    g = lp.grad[0]
    assert g[1] == 0 and g[4] == 0 and g[5] == 0 and g[0] != 0 and g[2] != 0 and g[3] != 0


def _recipe(model_dir, out, extra=None, **rl_over):
    r = {"init": str(model_dir), "out_dir": str(out), "envs": ["calc", "format"],
         "rl": {**dict(prompts_per_step=2, group_size=2, steps=2, max_tokens=6, max_total_tokens=600, lr=1e-3,
                       updates_per_batch=2, save_every=1, eval_every=0, thinking_fraction=0.5, seed=5, micro_batch=2,
                       max_num_seqs=8), **rl_over}, **(extra or {})}
    path = out.parent / (out.name + ".json")
    path.write_text(json.dumps(r))
    return load_recipe(path, schema=rl.RECIPE)


def _alternating_rewards(monkeypatch):
    """Random tiny models earn no reward; give sample s reward s % 2 so every group has variance."""
    real = rl.rollout

    def fake(*a, **k):
        out = real(*a, **k)
        for x in out:
            x.episode.reward = float(x.sample % 2)
        return out
    monkeypatch.setattr(rl, "rollout", fake)


def test_grpo_step_changes_weights_and_resumes(model_dir, tmp_path, monkeypatch):
    _alternating_rewards(monkeypatch)
    init = checkpoint.load(model_dir, dtype=torch.float32).state_dict()
    rl.train(_recipe(model_dir, tmp_path / "a"))
    recs = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    steps = [x for x in recs if x["phase"] == "rl"]
    assert [x["step"] for x in steps] == [1, 2]
    assert all(x["groups_used"] == 2 and x["updates"] == 2 for x in steps)
    assert (tmp_path / "a" / "model" / "tokenizer.json").exists() and (tmp_path / "a" / "rl.png").exists()
    full = checkpoint.load(tmp_path / "a" / "checkpoint", dtype=torch.float32).state_dict()
    changed = [k for k in full if not torch.equal(full[k], init[k])]
    assert changed and not any(k.startswith("mtp.") or "gate" in k for k in changed)
    # resume: one step, then --resume for the second, gives the same weights
    recipe = _recipe(model_dir, tmp_path / "b")
    rl.train(recipe, max_steps=1)
    with pytest.raises(FileExistsError):
        rl.train(recipe)
    rl.train(recipe, resume=True)
    resumed = checkpoint.load(tmp_path / "b" / "checkpoint", dtype=torch.float32).state_dict()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-6)
    recs_b = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs_b if x["phase"] == "rl"] == [1, 2]


def test_mopd_self_teacher_has_zero_advantage(model_dir, tmp_path):
    recipe = _recipe(model_dir, tmp_path / "m", {"mode": "mopd", "warmup_sft": {"steps": 0},
                     "teachers": {"calc": str(model_dir), "format": str(model_dir)}}, steps=1)
    rl.train(recipe)
    rec = [json.loads(x) for x in (tmp_path / "m" / "log.jsonl").read_text().splitlines()]
    step = [x for x in rec if x["phase"] == "rl"][0]
    assert abs(step["reverse_kl"]) < 1e-4 and abs(step["loss"]) < 1e-4


def test_evaluate_modes(model_dir):
    llm = LLM(str(model_dir), max_num_seqs=8)
    out = rl.evaluate(llm, ["calc", "format"], 2, mode="off", max_tokens=4)
    assert set(out["envs"]) == {"calc", "format"} and out["mode"] == "off"
    for v in out["envs"].values():
        assert v["n"] == 2 and v["mean_thinking_tokens"] == 0 and 0 < v["mean_generated_tokens"] <= 4 * 3
    out = rl.evaluate(llm, ["calc"], 2, mode="budget=2", max_tokens=6)
    assert out["envs"]["calc"]["mean_thinking_tokens"] <= 2 + 1 + 6


def test_mtp_boost_freezes_backbone_and_lowers_kl(model_dir, tmp_path):
    recipe = load_recipe(None, {"init": str(model_dir), "out_dir": str(tmp_path / "boost")}, mtp_boost.RECIPE)
    recipe["boost"].update(depths=2, steps=30, lr=3e-3, warmup_steps=0, batch_size=4, save_every=100)
    recipe["data"].update(envs=["format"], tasks_per_env=4, samples=1, max_tokens=24)
    recipe["acceptance"].update(k=2, tasks_per_env=2, max_tokens=8, ignore_eos=True)
    model = checkpoint.load(model_dir, dtype=torch.float32)
    out = mtp_boost.train(recipe)
    recs = [json.loads(x) for x in (tmp_path / "boost" / "log.jsonl").read_text().splitlines()]
    kl = [x["loss"] for x in recs if x["phase"] == "boost"]
    assert len(kl) == 30 and sum(kl[-5:]) < sum(kl[:5])
    trained = checkpoint.load(tmp_path / "boost" / "checkpoint", dtype=torch.float32).state_dict()
    for k, v in model.state_dict().items():
        if k.startswith("mtp."):
            continue
        assert torch.equal(trained[k], v), k
    assert any(not torch.equal(trained[k], v) for k, v in model.state_dict().items() if k.startswith("mtp."))
    assert out["before"]["acceptance_rate"] is not None and out["after"]["acceptance_rate"] is not None
    assert json.loads((tmp_path / "boost" / "acceptance.json").read_text())["after"]["k"] == 2
