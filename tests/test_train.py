"""Pretraining loop: WSD schedule, MTP / balance losses, bias update, learning, exact resume,
pickle-free checkpoints, export, Ctrl-C, and DDP == single process."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nemotron3
from nemotron3.model import NemotronHForCausalLM
from nemotron3.eval.lm import mtp_labels
from nemotron3.train.data import prepare_data
from nemotron3.train.loss import TrainLoss
from nemotron3.train.optim import wsd_lr
from nemotron3.train.pretrain import train
from nemotron3.train.recipe import PRETRAIN, apply_overrides, load_recipe, model_config

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny-test.json"


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """Corpus (8 small stdlib files) + 512-token BPE tokenizer, built once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    r = load_recipe(RECIPE, {"data.corpus_dir": str(root / "corpus"), "data.tokenizer_dir": str(root / "tok")})
    prepare_data(r, r["model"]["vocab_size"])
    return root


def recipe(data_dirs, out, **train):
    over = {"data.corpus_dir": str(data_dirs / "corpus"), "data.tokenizer_dir": str(data_dirs / "tok"),
            "data.seq_len": 32, "out_dir": str(out), "train.eval_every": 1000, "train.save_every": 1000,
            "train.threads": 1}   # one thread: a tiny model gains nothing from more, and a busy CPU hurts less
    over.update({f"train.{k}": v for k, v in train.items()})
    return load_recipe(RECIPE, over)


def losses(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_wsd_schedule():
    t = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=100, decay_fraction=0.2)
    assert wsd_lr(0, t) == pytest.approx(0.1)                         # (step+1)/warmup
    assert wsd_lr(4, t) == pytest.approx(0.5)
    assert wsd_lr(9, t) == wsd_lr(10, t) == wsd_lr(79, t) == 1.0       # flat until the decay starts
    assert wsd_lr(80, t) == 1.0                                         # decay start: 1 - sqrt(0)
    assert wsd_lr(85, t) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.25)))
    assert wsd_lr(90, t) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert wsd_lr(99, t) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.95)))
    assert wsd_lr(100, t) == pytest.approx(0.1)                         # reaches min_lr at total_steps
    lrs = [wsd_lr(s, t) for s in range(100)]
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_mtp_and_aux_loss_match_hand_computation():
    torch.manual_seed(0)
    r = load_recipe(RECIPE)
    model = NemotronHForCausalLM(model_config(r))
    t = dict(r["train"], mtp_depths=2, mtp_loss_factor=0.3, moe_aux_loss_coeff=0.01)
    lm = TrainLoss(model, t)
    B, T, V = 2, 12, model.config.vocab_size
    ids = torch.randint(0, V, (B, T))
    labels = torch.cat([ids[:, 1:], torch.randint(0, V, (B, 1))], 1)
    labels[0, 3] = labels[1, 7] = labels[1, 10] = -100                 # document boundaries
    norm = torch.tensor([float((labels != -100).sum())] + [float((mtp_labels(labels, k) != -100).sum())
                                                            for k in (1, 2)] + [B * 4.0])   # 4 MoE calls
    lm.record(True)
    loss, terms = lm(ids, labels, norm, 1)
    lm.record(False)

    # by hand: depth-k logits at t predict token t+k+1 = labels[t+k], valid only if labels[t..t+k] all valid
    with torch.no_grad():
        main, mtps = model.forward_mtp(ids, 2)
    ce = lambda logit, y: -F.log_softmax(logit, -1)[y]                  # noqa: E731
    main_terms = [ce(main[b, t], labels[b, t]) for b in range(B) for t in range(T) if labels[b, t] != -100]
    hand_lm = torch.stack(main_terms).mean()
    hand_mtp = []
    for k, logits in enumerate(mtps, 1):
        assert logits.shape[1] == T - k
        xs = [ce(logits[b, t], labels[b, t + k]) for b in range(B) for t in range(T - k)
              if all(labels[b, t + j] != -100 for j in range(k + 1))]
        hand_mtp.append(torch.stack(xs).mean())
    assert terms[0].item() == pytest.approx(hand_lm.item(), rel=1e-5)
    for k in (1, 2):
        assert terms[k].item() == pytest.approx(hand_mtp[k - 1].item(), rel=1e-5)
    # aux: per sequence, sum_i f_i P_i with f_i = E/(k T') count_i, P_i = mean_t s_ti / sum_j s_tj
    calls = []
    hooks = [m.register_forward_hook(lambda mod, i, o: calls.append(tuple(x.detach() for x in mod.router_stats)),
                                    prepend=True)
             for m in model.moe_layers()]
    for m in model.moe_layers():
        m.record_router = True
    with torch.no_grad():
        model.forward_mtp(ids, 2)
    for h in hooks:
        h.remove()
    assert len(calls) == 4                  # layers 2 and 4, the MTP MoE once per depth
    seq = []
    for scores, idx in calls:
        E, k = scores.shape[1], idx.shape[1]
        s, idx = scores.view(B, -1, E), idx.view(B, -1, k)
        for b in range(B):
            Tp = s.shape[1]
            f = torch.tensor([(idx[b] == i).sum().item() * E / (k * Tp) for i in range(E)])
            P = (s[b] / s[b].sum(-1, keepdim=True)).mean(0)
            seq.append((f * P).sum())
    hand_aux = torch.stack(seq).mean()
    assert terms[3].item() == pytest.approx(hand_aux.item(), rel=1e-5)
    hand_total = hand_lm + 0.3 / 2 * sum(hand_mtp) + 0.01 * hand_aux
    assert loss.item() == pytest.approx(hand_total.item(), rel=1e-5)


def test_bias_update_moves_towards_balance():
    torch.manual_seed(0)
    r = load_recipe(RECIPE)
    model = NemotronHForCausalLM(model_config(r))
    lm = TrainLoss(model, r["train"])
    ids = torch.randint(0, 512, (2, 16))
    lm.record(True)
    lm(ids, ids, torch.ones(4), 1)[0].backward()
    lm.record(False)
    before = {n: m.gate.e_score_correction_bias.clone() for n, m in lm.moes}
    counts = {n: lm.counts[id(m)].clone() for n, m in lm.moes}
    stats = lm.update_bias(1e-3, False)
    for n, m in lm.moes:
        c, delta = counts[n], m.gate.e_score_correction_bias - before[n]
        assert c.sum() > 0 and stats[n]["max"] >= 1 >= stats[n]["min"]
        assert torch.equal(torch.sign(delta), torch.sign(c.mean() - c))    # overloaded down, underloaded up
        assert torch.allclose(delta.abs()[c != c.mean()], torch.tensor(1e-3))
        assert lm.counts[id(m)].sum() == 0                                 # counts reset per step


def test_training_reduces_loss(data_dirs, tmp_path):
    res = train(recipe(data_dirs, tmp_path, total_steps=30, warmup_steps=3, eval_every=30), progress=False)
    log = losses(tmp_path)
    assert len(log) == 30 and res["step"] == 30
    first, last = sum(r["lm_loss"] for r in log[:3]) / 3, sum(r["lm_loss"] for r in log[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert log[0]["lm_loss"] == pytest.approx(math.log(512), abs=0.1)
    assert res["val_loss"] < log[0]["lm_loss"] - 0.5
    assert all(len(r["mtp_loss"]) == 2 and r["expert_load"] for r in log)
    assert (tmp_path / "loss.png").stat().st_size > 0
    # the evaluation record carries the copying probe of the model at that step (the saved checkpoint)
    from nemotron3.checkpoint import load
    from nemotron3.eval.lm import induction_score
    from nemotron3.train.state import find_checkpoint
    m = load(find_checkpoint(tmp_path), dtype=torch.float32).eval()
    batch = json.loads((tmp_path / "recipe.json").read_text())["train"]["batch_size"]
    want = induction_score(m, m.config.vocab_size, n=16, batch_size=batch, bos_id=m.config.bos_token_id)
    assert log[-1]["copy_gain"] == pytest.approx(want["copy_gain"], abs=1e-4)


def test_resume_is_exact_and_checkpoint_is_pickle_free(data_dirs, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(total_steps=12, warmup_steps=3, eval_every=6, save_every=4)
    train(recipe(data_dirs, a, **kw), progress=False)
    assert train(recipe(data_dirs, b, **kw), max_steps=7, progress=False)["step"] == 7
    state = json.loads((b / "checkpoint" / "trainer" / "state.json").read_text())
    assert state["step"] == 7 and not (b / "model").exists()
    with pytest.raises(FileExistsError):                                   # never silently overwrite a run
        train(recipe(data_dirs, b, **kw), progress=False)
    train(recipe(data_dirs, b, **kw), resume=True, progress=False)
    la, lb = losses(a), losses(b)
    assert [r["step"] for r in lb] == list(range(1, 13))
    for ra, rb in zip(la, lb):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["step"], key)
        assert ra.get("val_loss") == pytest.approx(rb.get("val_loss"), abs=1e-6)
    # safetensors + JSON only, and no pickle payload anywhere
    files = [p for p in (b / "checkpoint").rglob("*") if p.is_file()] + list((b / "model").iterdir())
    assert files and all(p.suffix in (".safetensors", ".json") for p in files), files
    assert not any(p.read_bytes()[:2] in (b"\x80\x02", b"\x80\x04", b"PK") for p in files)
    # the exported bf16 model loads and matches the fp32 checkpoint up to bf16 rounding
    exported = json.loads((b / "model" / "config.json").read_text())
    assert exported["torch_dtype"] == "bfloat16" and (b / "model" / "tokenizer.json").exists()
    m16, m32 = nemotron3.load(b / "model"), nemotron3.load(b / "checkpoint")
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert (m16(ids) - m32(ids)).abs().max() < 0.25


def test_sigint_saves_and_exits_cleanly(data_dirs, tmp_path):
    r = recipe(data_dirs, tmp_path, total_steps=100000, warmup_steps=3)
    (tmp_path / "r.json").write_text(json.dumps(r))
    proc = subprocess.Popen([sys.executable, "-m", "nemotron3.train", str(tmp_path / "r.json"), "--no-progress"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 60
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()
    state = json.loads((tmp_path / "checkpoint" / "trainer" / "state.json").read_text())
    assert state["step"] == len(losses(tmp_path)) >= 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, r):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    try:
        train(r, progress=False)
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_match_single_process(data_dirs, tmp_path):
    kw = dict(total_steps=6, warmup_steps=2, eval_every=3)
    train(recipe(data_dirs, tmp_path / "one", batch_size=4, **kw), progress=False)
    r = recipe(data_dirs, tmp_path / "two", batch_size=2, threads=2, **kw)      # 2 // 2 ranks = 1 thread each
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), r), nprocs=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert a["tokens"] == b["tokens"]
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
        assert a["mtp_loss"] == pytest.approx(b["mtp_loss"], abs=1e-5)
        assert a.get("val_loss") == pytest.approx(b.get("val_loss"), abs=1e-5)


# ---------------------------------------------------------------------------------------------- --precision nvfp4

def test_nvfp4_recipe_swaps_the_right_modules():
    """Super's NVFP4 run: attention and latent projections, routers, embeddings, lm_head, MTP and the last 15%
    of layers stay high precision; Mamba, shared- and routed-expert GEMMs go NVFP4. Parameters are kept."""
    from nemotron3.model.moe import Experts
    from nemotron3.quant.training import NVFP4TrainLinear, apply_nvfp4_training
    torch.manual_seed(0)
    model = NemotronHForCausalLM(model_config(load_recipe(RECIPE)))          # pattern M*EME: layer 4 is the last 15%
    before = {n: p for n, p in model.named_parameters()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    plan = apply_nvfp4_training(model)
    swapped = {n for n, m in model.named_modules() if isinstance(m, NVFP4TrainLinear)}
    swapped |= {n for n, m in model.named_modules() if isinstance(m, Experts) and m.linear_fn is not None}
    assert swapped == {n for n, v in plan.items() if v == "nvfp4"} == {
        "backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.out_proj",
        "backbone.layers.2.mixer.experts", "backbone.layers.2.mixer.shared_experts.up_proj",
        "backbone.layers.2.mixer.shared_experts.down_proj",
        "backbone.layers.3.mixer.in_proj", "backbone.layers.3.mixer.out_proj"}
    assert not any(n.startswith(("backbone.layers.4.", "mtp.", "lm_head")) for n in swapped)
    assert plan["backbone.layers.1.mixer.q_proj"] == "attention"
    assert plan["backbone.layers.2.mixer.fc1_latent_proj"] == "latent projection"
    assert {n: p for n, p in model.named_parameters()} == before                  # same names, same Parameters
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())
    # 12 layers (the pico pattern): ceil(0.15 * 12) = 2 layers stay high precision
    from nemotron3.quant.training import nvfp4_training_plan
    cfg = dict(load_recipe(RECIPE)["model"], pattern="MEM*EMEM*EME")
    plan12 = nvfp4_training_plan(NemotronHForCausalLM(model_config({"model": cfg})))
    assert {int(n.split(".")[2]) for n, v in plan12.items() if v.startswith("last")} == {10, 11}


def test_nvfp4_training_learns_and_writes_normal_checkpoint(data_dirs, tmp_path):
    res = train(recipe(data_dirs, tmp_path, precision="nvfp4", total_steps=30, warmup_steps=3, eval_every=30),
                progress=False)
    log = losses(tmp_path)
    assert len(log) == 30 and res["step"] == 30
    first, last = sum(r["lm_loss"] for r in log[:3]) / 3, sum(r["lm_loss"] for r in log[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert res["val_loss"] < log[0]["lm_loss"] - 0.5
    # an ordinary fp32 checkpoint and bf16 export: plain nn.Linear modules, the usual parameter names
    ref = set(NemotronHForCausalLM(model_config(load_recipe(RECIPE))).state_dict())
    for d in ("checkpoint", "model"):
        m = nemotron3.load(tmp_path / d)
        assert set(m.state_dict()) == ref
        assert not any(type(x).__name__ == "NVFP4TrainLinear" for x in m.modules())
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert torch.isfinite(nemotron3.load(tmp_path / "model")(ids)).all()


def test_nvfp4_resume_is_exact(data_dirs, tmp_path):
    """Stochastic rounding draws from torch's global RNG, which the checkpoint saves: bit-exact resume."""
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(precision="nvfp4", total_steps=8, warmup_steps=2, eval_every=4, save_every=1000)
    train(recipe(data_dirs, a, **kw), progress=False)
    train(recipe(data_dirs, b, **kw), max_steps=5, progress=False)
    train(recipe(data_dirs, b, **kw), resume=True, progress=False)
    la, lb = losses(a), losses(b)
    assert [r["step"] for r in lb] == list(range(1, 9))
    for ra, rb in zip(la, lb):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert ra[key] == rb[key], (ra["step"], key)
        assert ra.get("val_loss") == rb.get("val_loss")
    # nvfp4 really differs from fp32 on the same init and data, and an nvfp4 checkpoint resumes in fp32
    # (the paper's switch to high precision for the last part of training)
    c = tmp_path / "c"
    train(recipe(data_dirs, c, **kw), max_steps=5, progress=False)
    train(recipe(data_dirs, c, **dict(kw, precision="fp32")), resume=True, progress=False)
    lc = losses(c)
    assert [r["lm_loss"] for r in lc[:5]] == [r["lm_loss"] for r in la[:5]] and len(lc) == 8
    assert lc[5]["lm_loss"] != la[5]["lm_loss"]


def test_unknown_precision_rejected(data_dirs, tmp_path):
    with pytest.raises(ValueError, match="fp32, bf16, nvfp4 or auto"):
        train(recipe(data_dirs, tmp_path, precision="fp8"), progress=False)


def test_init_embedding_mean_adds_one_shared_vector(data_dirs, tmp_path):
    """`train.init_embedding_mean` shifts every embedding row by the same seeded vector (from scratch only)."""
    def emb(out, **kw):
        train(recipe(data_dirs, out, total_steps=1, warmup_steps=1, lr=1e-12, **kw), progress=False)
        return nemotron3.load(out / "model").backbone.embeddings.weight.float()
    plain, shifted = emb(tmp_path / "a"), emb(tmp_path / "b", init_embedding_mean=0.5)
    diff = shifted - plain                                  # same seed: same init, then the shared shift
    assert torch.allclose(diff, diff[:1].expand_as(diff), atol=2e-2)       # one vector for every row (bf16 export)
    assert 0.3 < diff[0].std().item() < 0.7 and plain.mean(0).abs().max() < 0.1


def test_auto_precision_picks_bf16_only_with_native_bf16(data_dirs, tmp_path, monkeypatch):
    """`auto` = bf16 autocast where bf16 matmuls are native (else emulated bf16 is ~20x slower than fp32)."""
    import nemotron3.train.pretrain as pt
    cpu = torch.device("cpu")
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(pt, "native_bf16", lambda device, native=native: native)
        assert pt.resolve_precision("auto", cpu) == want
        assert pt.resolve_precision("nvfp4", cpu) == "nvfp4" and pt.resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.undo()
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert pt.native_bf16(cpu) == ("avx512_bf16" in flags or "amx_bf16" in flags)
    r = recipe(data_dirs, tmp_path, total_steps=2, warmup_steps=1, precision="auto")
    train(r, progress=False)
    assert r["train"]["precision"] == ("bf16" if pt.native_bf16(cpu) else "fp32") and len(losses(tmp_path)) == 2


def test_mixture_recipe_and_init_continue_from_a_model(data_dirs, tmp_path):
    """A long/short mixture trains from an existing model dir (`init`) and logs the tokens it really saw."""
    base = recipe(data_dirs, tmp_path / "base", total_steps=2)
    train(base, progress=False)
    corpus = str(data_dirs / "corpus")
    r = recipe(data_dirs, tmp_path / "lc", total_steps=3, lr=1e-3, warmup_steps=1)
    r["init"] = str(tmp_path / "base" / "model")
    r["data"]["mix"] = [{"source": corpus, "seq_len": 16, "batch_size": 2, "weight": 2},
                        {"source": "corpus", "seq_len": 64, "batch_size": 1, "weight": 1}]
    first = nemotron3.load(r["init"], dtype=torch.float32)
    train(r, progress=False, max_steps=1)
    recs = losses(tmp_path / "lc")
    assert recs[0]["tokens"] == 2 * 16                 # step 0 = the short component
    assert recs[0]["lm_loss"] < 7.0                    # starts from the trained base, not from scratch
    train(r, resume=True, progress=False)
    recs = losses(tmp_path / "lc")
    assert [x["tokens"] for x in recs] == [32, 32 + 64, 32 + 64 + 32]
    after = nemotron3.load(tmp_path / "lc" / "model", dtype=torch.float32)
    assert not torch.equal(after.lm_head.weight, first.lm_head.weight)


def test_copy_component_in_a_mixture(data_dirs):
    """{"source": "copy"} adds rows of the copying curriculum (`copy_task_stream`, tested in test_sft) cut
    from the recipe's corpus, with its loss mask: only the repeated spans are learned."""
    from nemotron3.train.data import PackedDataset, copy_task_stream, load_tokens
    from nemotron3.tokenizer import load_tokenizer
    r = load_recipe(RECIPE, {"data.corpus_dir": str(data_dirs / "corpus"), "data.tokenizer_dir": str(data_dirs / "tok")})
    r["data"]["mix"] = [{"source": "corpus", "seq_len": 32, "batch_size": 2, "weight": 1},
                        {"source": "copy", "rows": 6, "seq_len": 48, "batch_size": 3, "weight": 1}]
    train_set, _ = prepare_data(r, r["model"]["vocab_size"])
    tok = load_tokenizer(data_dirs / "tok")
    t, m = copy_task_stream(load_tokens(data_dirs / "corpus", tok), 6, 48, r["train"]["seed"])
    want = PackedDataset(t, 48, tok.eos_id, seed=r["train"]["seed"], shuffle=True, loss_mask=m)
    x, y = train_set.components[1][0].batch(1, 3)
    wx, wy = want.batch(1, 3)
    assert torch.equal(torch.as_tensor(x), torch.as_tensor(wx)) and torch.equal(torch.as_tensor(y), torch.as_tensor(wy))
    assert (torch.as_tensor(y) == -100).float().mean() > 0.3          # filler and first spans are not learned
    r["data"]["mix"][1]["spans"] = "random"                          # spans drawn from the non-special ids
    train_set, _ = prepare_data(r, r["model"]["vocab_size"])
    t, m = copy_task_stream(load_tokens(data_dirs / "corpus", tok), 6, 48, r["train"]["seed"],
                            (max(tok.special_ids) + 1, tok.vocab_size))
    want = PackedDataset(t, 48, tok.eos_id, seed=r["train"]["seed"], shuffle=True, loss_mask=m)
    assert torch.equal(torch.as_tensor(train_set.components[1][0].batch(1, 3)[1]), torch.as_tensor(want.batch(1, 3)[1]))
    r["data"]["mix"][1]["spans"] = "words"
    with pytest.raises(ValueError, match="spans"):
        prepare_data(r, r["model"]["vocab_size"])
    r["data"]["mix"][1]["spans"] = "random"
    for key, bad in (("span_vocab", 1), ("span_vocab", "500"), ("span_len", 16), ("span_len", [16, 17, 18]),
                     ("filler_len", [5, 5])):
        r["data"]["mix"][1][key] = bad
        with pytest.raises(ValueError, match=key):
            prepare_data(r, r["model"]["vocab_size"])
        del r["data"]["mix"][1][key]
    r["data"]["mix"][1]["spans"] = "text"
    r["data"]["mix"][1]["rows"] = 0
    with pytest.raises(ValueError, match="rows"):
        prepare_data(r, r["model"]["vocab_size"])


def test_surgery_keeps_matching_tensors_and_reinitialises_the_rest():
    from helpers import randomize, small_config
    from nemotron3.train.surgery import transplant
    src = randomize(NemotronHForCausalLM(small_config("M*EM-E", num_nextn_predict_layers=1)))
    model, new = transplant(src, src.config.replace(pattern="MMEM-E", num_nextn_predict_layers=0), fresh_layers=[4])
    sd, old = model.state_dict(), src.state_dict()
    assert model.mtp is None and model.config.pattern == "MMEM-E"
    assert all(k.startswith(("backbone.layers.1.", "backbone.layers.4.")) for k in new)
    assert "backbone.layers.1.mixer.in_proj.weight" in new and "backbone.layers.4.mixer.up_proj.weight" in new
    for k, v in sd.items():
        if k not in new:
            assert torch.equal(v, old[k]), k
    assert not torch.equal(sd["backbone.layers.4.mixer.up_proj.weight"], old["backbone.layers.4.mixer.up_proj.weight"])


def test_unpacked_documents_get_a_row_each(data_dirs, tmp_path):
    from nemotron3.train.data import build_component
    from nemotron3.tokenizer import load_tokenizer
    tok = load_tokenizer(data_dirs / "tok")
    texts = ["alpha beta gamma", "one two three four five six seven eight nine ten " * 4, "x"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ds = build_component({"source": str(tmp_path / "d.jsonl"), "seq_len": 24, "pack": False}, None, tok, 0, False)
    x, y = ds.rows(range(3))
    for i, t in enumerate(texts):
        ids = tok.encode(t, parse_special=False)[:23]
        assert x[i, :len(ids)].tolist() == ids                        # each document starts its own row
        n = len(ids)
        assert y[i, :n - 1].tolist() == ids[1:]                       # learned: the document's own next tokens
        assert (y[i, n:] == -100).all()                               # padding and the next row's start are not


def test_init_learns_in_context_copying():
    """From our init, a tiny hybrid learns to copy a repeated random sequence within a few hundred steps, as
    transformers' NemotronH init does (PyTorch's default conv init did not: loss stayed at ~3.8 after 500 steps)."""
    from helpers import small_config
    torch.manual_seed(0)
    cfg = small_config("M*M-", vocab_size=64, hidden_size=64, head_dim=16, mamba_head_dim=16, ssm_state_size=16,
                       n_groups=1, chunk_size=16, num_nextn_predict_layers=0)
    model = NemotronHForCausalLM(cfg)
    conv = model.backbone.layers[0].mixer.conv1d
    assert abs(conv.weight.std().item() - cfg.initializer_range) < 0.005 and not conv.bias.any()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    torch.set_num_threads(1)
    for _ in range(400):
        x = torch.randint(4, 64, (32, 16), generator=g)
        ids = torch.cat([x, x], 1)
        loss = F.cross_entropy(model(ids)[:, 16:-1].reshape(-1, 64), ids[:, 17:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0          # chance is ln(60) = 4.1


@pytest.mark.parametrize("stage", ["pretrain", "sft", "longctx", "rl", "mtp_boost"])
def test_stage_clis_report_user_errors_in_one_line(stage, tmp_path, capsys):
    """Every training stage's CLI turns a user mistake into exit status 2 and one `error:` line (argparse's
    convention), not a traceback: here a missing recipe file and a malformed one."""
    import importlib
    main = importlib.import_module(f"nemotron3.train.{stage}").main
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for argv in ([str(tmp_path / "missing.json")], [str(bad)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, (argv, err)


def test_pico_recipes_form_one_chain():
    """Every pico recipe's `init` (and MOPD's teachers) is another recipe's output model, so
    scripts/pico_pipeline.sh runs them in a consistent order; every stage appears in the pipeline script."""
    recipes = {p.name: json.loads(p.read_text()) for p in (ROOT / "recipes").glob("pico*.json")}
    outputs = {r["out_dir"] + "/model" for r in recipes.values()}
    script = (ROOT / "scripts" / "pico_pipeline.sh").read_text()
    for name, r in recipes.items():
        assert f"recipes/{name}" in script, f"{name} is not run by the pipeline"
        for src in [r.get("init")] + list(r.get("teachers", {}).values()):
            assert src is None or src in outputs, f"{name}: {src} is no recipe's output"
    assert "init" not in recipes["pico.json"]


def test_set_overrides_index_lists_and_name_bad_paths():
    """`--set data.mix.1.weight=3` reaches into the mixture list; a key or index that does not exist is a
    ValueError naming the path instead of a KeyError/TypeError from deep inside."""
    r = {"data": {"mix": [{"weight": 1}, {"weight": 1}]}, "train": {"lr": 1e-3}}
    apply_overrides(r, {"data.mix.1.weight": 3, "train.lr": 2e-3})
    assert r == {"data": {"mix": [{"weight": 1}, {"weight": 3}]}, "train": {"lr": 2e-3}}
    for key, msg in [("data.mix.2.weight", "list of 2"), ("data.mix.x.weight", "list of 2"),
                     ("model.pattern", "no 'model'"), ("train.lr.x", "no 'train.lr.x'"),
                     ("trian.lr", "did you mean 'train'")]:
        with pytest.raises(ValueError, match=msg):
            apply_overrides(r, {key: 1})


@pytest.mark.parametrize("damaged", ["optimizer.safetensors", "rng.safetensors"])
def test_resume_on_a_damaged_trainer_state_is_one_error_line(data_dirs, tmp_path, capsys, damaged):
    from nemotron3.train.recipe import run_stage, stage_parser
    kw = dict(total_steps=4, warmup_steps=1, save_every=2)
    train(recipe(data_dirs, tmp_path, **kw), max_steps=2, progress=False)
    f = tmp_path / "checkpoint" / "trainer" / damaged
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])          # cut short, as a crash or full disk leaves it
    ap = stage_parser("python -m nemotron3.train", "doc")
    with pytest.raises(SystemExit) as e:
        run_stage(ap, lambda: train(recipe(data_dirs, tmp_path, **kw), resume=True, progress=False))
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert e.value.code == 2 and "Traceback" not in err, err
    assert last.startswith("error: ") and str(f) in last and "not a readable safetensors file" in last


@pytest.mark.parametrize("where", ["file", "set"])
@pytest.mark.parametrize("key, nearest", [("train.lrr", "train.lr"), ("data.seqlen", "data.seq_len"),
                                          ("out_dri", "out_dir"), ("model.hiden_size", "model.hidden_size"),
                                          ("data.mix.0.batchsize", "data.mix.0.batch_size")])
def test_unknown_recipe_key_names_the_nearest_valid_key(tmp_path, where, key, nearest):
    """A misspelt key is an error naming the nearest valid one, whether it is in the file or given by --set."""
    r = json.loads(RECIPE.read_text())
    r["data"]["mix"] = [{"source": "corpus", "seq_len": 32, "batch_size": 2}]
    over = {}
    if where == "set":
        over[key] = 5
    else:
        parts = key.split(".")
        d = r
        for part in parts[:-1]:
            d = d[int(part)] if isinstance(d, list) else d[part]
        d[parts[-1]] = 5
    (tmp_path / "r.json").write_text(json.dumps(r))
    with pytest.raises(ValueError, match=f"unknown recipe key '{key}' \\(did you mean '{nearest}'\\?\\)"):
        load_recipe(tmp_path / "r.json", over)


def test_recipe_types_and_every_stage_section_are_checked(tmp_path):
    from nemotron3.train import mtp_boost, rl, sft
    for over, msg in [({"train.total_steps": "many"}, "'train.total_steps' must be an integer, got \"many\""),
                      ({"train.lr": True}, "'train.lr' must be a number, got true"),
                      ({"train.betas": 0.9}, "'train.betas' must be a list"),
                      ({"model.hidden_size": -1}, "hidden_size"),         # values: the config loader's check
                      ({"data.mix": 3}, "'data.mix' must be an object")]:
        with pytest.raises(ValueError, match=msg):
            load_recipe(RECIPE, over)
    assert load_recipe(RECIPE, {"train.lr": 1})["train"]["lr"] == 1                  # an int where a float goes
    cases = [(rl.RECIPE, {"init": "m", "rl.gruop_size": 2}, "'rl.group_size'"),
             (rl.RECIPE, {"init": "m", "warmup_sft.step": 2}, "'warmup_sft.steps'"),
             (rl.RECIPE, {"init": "m", "mode": "ppo"}, "'mode' must be one of 'grpo', 'mopd'"),
             (rl.RECIPE, {}, "needs 'init'"),
             (mtp_boost.RECIPE, {"init": "m", "boost.depth": 2}, "'boost.depths'"),
             (mtp_boost.RECIPE, {"init": "m", "acceptance.K": 2}, "'acceptance.k'"),
             (sft.RECIPE, {"sft.train_per_envs": 2}, "'sft.train_per_env'"),
             (sft.RECIPE, {"sft.replay": [{"rows": 2, "seqlen": 8}]}, "'sft.replay.0.seq_len'")]
    for schema, over, msg in cases:
        with pytest.raises(ValueError, match=msg):
            load_recipe(None, over, schema)
    for path in ROOT.glob("recipes/*.json"):                     # every shipped recipe loads under its stage
        r = json.loads(path.read_text())
        schema = (rl.RECIPE if "rl" in r else mtp_boost.RECIPE if "boost" in r else
                  sft.RECIPE if "sft" in r else PRETRAIN)
        load_recipe(path, None, schema)


@pytest.mark.parametrize("argv, flags", [(["train", "--help"], ["--resume", "--max-steps", "--set", "--precision",
                                                                 "--device", "--export", "--no-progress"])])
def test_cli_train_help_lists_the_trainer_flags(argv, flags, capsys):
    from nemotron3.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: nemotron3 train") and all(f in out for f in flags), out


def test_plot_tokens_lays_stages_end_to_end(tmp_path):
    """scripts/plot_tokens.py (the model card's loss-vs-tokens plot): stages' own token counts add up; a log
    without token counts is a one-line error."""
    import subprocess
    logs = []
    for name, n in (("pre", 3), ("copy", 2)):
        (tmp_path / name).mkdir()
        recs = [{"step": s + 1, "tokens": 1000 * (s + 1), "lm_loss": 5.0 - s, **({"val_loss": 4.0} if s == n - 1 else {})}
                for s in range(n)]
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        logs.append(str(tmp_path / name / "log.jsonl"))
    script = ROOT / "scripts" / "plot_tokens.py"
    out = subprocess.run([sys.executable, str(script), *logs, "--out", str(tmp_path / "p.png")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "5,000 tokens" in out.stdout, out.stderr
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n')
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "q.png")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "error:" in bad.stderr and "Traceback" not in bad.stderr
