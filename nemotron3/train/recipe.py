"""Recipes: a JSON file -> a dict with every default filled in, `--set` overrides, validation; and the command
line every training stage shares (RECIPE, --out-dir, --resume, --max-steps, --set).

Design decisions:

* A stage describes its recipe with a `Schema`: top-level keys with defaults, and sections whose defaults
  dicts name every valid key. Defaults fill in first, `--set` overrides apply next, then one `validate` pass
  checks the result, so a misspelt key in the file and one given as `--set train.lrr=5` fail the same way: a
  ValueError naming the key and the nearest valid one (difflib).
* Types come from the defaults: a value must have its default's JSON type (an int is accepted for a float,
  never a bool for a number); a default of None accepts anything (e.g. `data.sources`).
* Free-form places are checked by what they are: `model` holds NemotronConfig fields (with `pattern`) or
  config.json keys, and the config loader validates their values; data components (`data.mix[i]`,
  `data.val`, `sft.copy`) have their own key set (COMPONENT_KEYS); dict-valued keys such as `teachers` or
  `sft.modes` are the stage's to check.
* Every written recipe.json is the full resolved recipe, so a run directory says exactly what it ran.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import NemotronConfig

TRAIN_DEFAULTS = dict(
    batch_size=8, grad_accum=1, lr=3e-3, min_lr=3e-5, warmup_steps=50, total_steps=1000, decay_fraction=0.2,
    weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8, grad_clip=1.0, mtp_depths=2, mtp_loss_factor=0.3,
    moe_aux_loss_coeff=1e-4, bias_update_rate=1e-3, eval_every=100, eval_batches=8, save_every=250,
    seed=1337, threads=2, precision="fp32", device="cpu", log_every=1, nvfp4_hp_last_fraction=0.15,
    init_embedding_mean=0.0)
# parallel layout (train/parallel.py): FSDP2 over the non-expert weights; expert-parallel size (1 = none)
PARALLEL_DEFAULTS = dict(fsdp=False, expert=1)
DATA_DEFAULTS = dict(corpus_dir="runs/data/corpus", tokenizer_dir="runs/data/tokenizer", seq_len=512,
                     sources=None, mix=None, val=None)
# keys of one data component (train/data.py `build_component`; longctx's "retrieval" source takes `rows`, `seed`)
COMPONENT_KEYS = ("source", "seq_len", "batch_size", "weight", "split", "mask", "pack", "rows", "spans",
                  "span_vocab", "span_len", "filler_len", "seed")


@dataclass(frozen=True)
class Schema:
    """What a stage's recipe may hold: `top` level keys with defaults, `sections` (name -> defaults dict, whose
    keys are the section's valid keys), `components` ("section.key" holding a data component or a list of
    them), whether a `model` section belongs to it, top-level keys that must be set (`required`) and the
    allowed values of top-level keys that take one of a few (`choices`)."""
    top: dict
    sections: dict = field(default_factory=dict)
    components: tuple = ()
    model: bool = False
    required: tuple = ()
    choices: dict = field(default_factory=dict)

    def extend(self, sections: dict, components: tuple = ()) -> "Schema":
        return dataclasses.replace(self, sections={**self.sections, **sections},
                                   components=self.components + components)


PRETRAIN = Schema(top={"out_dir": "runs/out", "init": None}, sections={"data": DATA_DEFAULTS, "train": TRAIN_DEFAULTS,
                                                                        "parallel": PARALLEL_DEFAULTS},
                  components=("data.mix", "data.val"), model=True)


def load_recipe(path, overrides: dict | None = None, schema: Schema = PRETRAIN) -> dict:
    """Recipe JSON (None: defaults only) -> the resolved recipe: defaults, then `overrides` ("train.lr" ->
    value, see apply_overrides), then validation against `schema`."""
    r = json.loads(Path(path).read_text()) if path is not None else {}
    if not isinstance(r, dict):
        raise ValueError(f"{path}: a recipe is a JSON object, got {type(r).__name__}")
    r = {**copy.deepcopy(schema.top), **r}
    for name, defaults in schema.sections.items():
        given = r.get(name) or {}
        if not isinstance(given, dict):
            raise ValueError(f"recipe key {name!r} must be an object, got {type(given).__name__}")
        r[name] = {**copy.deepcopy(defaults), **given}
    if schema.model:
        r["model"] = dict(r.get("model") or {})
    apply_overrides(r, overrides)
    validate(r, schema)
    return r


def apply_overrides(recipe: dict, overrides: dict | None) -> dict:
    """Set dotted keys in place ("train.lr" -> recipe["train"]["lr"]; a number indexes a list, so
    "data.mix.1.weight" is the second mixture component's weight); returns the recipe. A path through a key or
    index that does not exist is a ValueError naming it; a new last key is set here and judged by `validate`."""
    for key, value in (overrides or {}).items():
        d, parts = recipe, key.split(".")
        for i, part in enumerate(parts):
            if isinstance(d, list):
                if not (part.isdigit() and int(part) < len(d)):
                    raise ValueError(f"--set {key}: {'.'.join(parts[:i]) or 'recipe'} is a list of {len(d)}; "
                                     f"{part!r} is not an index into it")
                part = int(part)
            elif not isinstance(d, dict) or (i < len(parts) - 1 and part not in d):
                raise ValueError(f"--set {key}: the recipe has no {'.'.join(parts[:i + 1])!r}"
                                 + _nearest(part, d if isinstance(d, dict) else {}, ".".join(parts[:i])))
            if i == len(parts) - 1:
                d[part] = value
            else:
                d = d[part]
    return recipe


def validate(recipe: dict, schema: Schema) -> None:
    """Unknown keys (top level, sections, data components, model) and values of the wrong type are a
    ValueError naming the key (and the nearest valid key)."""
    top = {**schema.top, **schema.sections, **({"model": None} if schema.model else {})}
    _check_keys(recipe, top, "")
    for name, defaults in schema.sections.items():
        _check_keys(recipe[name], defaults, name)
        for key, default in defaults.items():
            _check_type(f"{name}.{key}", recipe[name][key], default)
    for key, default in schema.top.items():
        _check_type(key, recipe[key], default)
    for key in schema.required:
        if recipe[key] is None:
            raise ValueError(f"the recipe needs {key!r}")
    for key, allowed in schema.choices.items():
        if recipe[key] not in allowed:
            raise ValueError(f"recipe key {key!r} must be one of {', '.join(map(repr, allowed))}, got {recipe[key]!r}")
    for path in schema.components:
        section, key = path.split(".")
        value = recipe[section][key]
        if isinstance(value, list):
            for i, comp in enumerate(value):
                _check_component(comp, f"{path}.{i}")
        elif value is not None:
            _check_component(value, path)
    if schema.model and recipe["model"]:
        model_config(recipe)


def model_config(recipe: dict) -> NemotronConfig:
    """`model` holds NemotronConfig fields (with `pattern`) or config.json keys (`hybrid_override_pattern`);
    the config loader checks the values, this the keys (config.json's loader keeps unknown keys as `extra`)."""
    m = recipe["model"]
    fields = {f.name: None for f in dataclasses.fields(NemotronConfig) if f.name != "extra"}
    if "pattern" in m:
        _check_keys(m, fields, "model")
        return NemotronConfig(**m)
    cfg = NemotronConfig.from_dict(m)
    _check_keys({k: None for k in cfg.extra}, fields, "model")
    return cfg


def _check_component(comp, where: str) -> None:
    if not isinstance(comp, dict):
        raise ValueError(f"recipe key {where!r} must be an object (a data component), got {type(comp).__name__}")
    _check_keys(comp, dict.fromkeys(COMPONENT_KEYS), where)


def _nearest(key: str, valid, where: str) -> str:
    """" (did you mean 'where.nearest'?)" by difflib's similarity, ignoring case; "" when nothing is close."""
    lower = {str(k).lower(): str(k) for k in valid}
    close = difflib.get_close_matches(str(key).lower(), list(lower), n=1, cutoff=0.6)
    return f" (did you mean {(where + '.' if where else '') + lower[close[0]]!r}?)" if close else ""


def _check_keys(d: dict, valid: dict, where: str) -> None:
    for key in d:
        if key not in valid:
            name = f"{where}.{key}" if where else key
            raise ValueError(f"unknown recipe key {name!r}{_nearest(key, valid, where)}; valid keys"
                             f"{' of ' + repr(where) if where else ''}: {', '.join(map(str, valid))}")


_JSON_TYPE = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,), dict: (dict,)}


def _check_type(name: str, value, default) -> None:
    if default is None:
        return
    ok = _JSON_TYPE[type(default)]
    if not isinstance(value, ok) or (isinstance(value, bool) and bool not in ok):
        want = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
                dict: "an object"}[type(default)]
        raise ValueError(f"recipe key {name!r} must be {want}, got {json.dumps(value)}")


# ----------------------------------------------------------------------------------------------------
# the command line every stage shares
# ----------------------------------------------------------------------------------------------------

def parse_overrides(pairs) -> dict:
    """`--set KEY=VALUE` pairs -> {KEY: JSON value (or the raw string when it is not JSON)}."""
    over = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        try:
            over[k] = json.loads(v)
        except json.JSONDecodeError:
            over[k] = v
    return over


def stage_parser(prog: str, doc: str, progress: bool = True) -> argparse.ArgumentParser:
    """The arguments every training stage's CLI shares: RECIPE, --out-dir, --resume, --max-steps, --set
    (and --no-progress where the stage shows a progress bar)."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    ap.add_argument("recipe", help="recipe JSON")
    ap.add_argument("--out-dir")
    ap.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint")
    ap.add_argument("--max-steps", type=int, help="stop (and checkpoint) after this many steps; the schedule "
                    "still spans the recipe's step count")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a recipe value, e.g. --set train.total_steps=3000")
    if progress:
        ap.add_argument("--no-progress", action="store_true")
    return ap


def run_stage(ap: argparse.ArgumentParser, fn):
    """Run a stage CLI's work; a user mistake (missing recipe or model, bad recipe value, existing checkpoint
    without --resume, unsupported setting) exits with status 2 and one `error:` line, as argparse does."""
    try:
        return fn()
    except (FileNotFoundError, FileExistsError, NotImplementedError, ValueError) as e:
        ap.exit(2, f"error: {e}\n")


def stage_overrides(a: argparse.Namespace) -> dict:
    """`--set` pairs plus `--out-dir` as recipe overrides."""
    over = parse_overrides(a.set)
    if a.out_dir:
        over["out_dir"] = a.out_dir
    return over


def train_stage(ap: argparse.ArgumentParser, a: argparse.Namespace, schema: Schema, train, prepare=None,
                overrides: dict | None = None):
    """A stage CLI's work: load the recipe named by `a` (with --set / --out-dir, then `overrides`), `prepare`
    it (e.g. build the stage's data), `train(recipe, resume=, max_steps=[, progress=])`, under `run_stage`."""
    def work():
        recipe = load_recipe(a.recipe, {**stage_overrides(a), **(overrides or {})}, schema)
        kw = {"progress": not a.no_progress} if "no_progress" in a else {}
        return train(prepare(recipe) if prepare else recipe, resume=a.resume, max_steps=a.max_steps, **kw)
    return run_stage(ap, work)
