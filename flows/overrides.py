"""A flow run's parameter overrides: the typed form the Prefect UI shows, their validation, and applying them.

The form's fields are the knobs a run most often changes, typed and bounded by the params models themselves
(pipelines/common/params.py), so the UI refuses what `params.yaml` would refuse; any other key goes in
`other` as a dotted name. Before any work the overrides are merged over params.yaml and validated as a
whole (`check`), with messages naming the key.

Overrides reach the stages the way DVC records them: written into params.yaml only while `dvc repro <stage>`
runs (`overridden`), so dvc.lock holds the values each output was made with, and the user's file is put
back byte for byte afterwards. A copy of the original waits in .quill/params.yaml.orig while it is changed;
`recover` puts it back if a run was killed in between.

    >>> Overrides.from_dotted({"train.max_steps": 20, "train.lr": 0.002}).dotted()
    {'train.max_steps': 20, 'train.lr': 0.002}
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from ruamel.yaml import YAML

from pipelines.common.params import (
    PARAMS_FILE,
    EvalParams,
    FinetuneParams,
    ModelParams,
    Params,
    ParamsError,
    TokenizerParams,
    TrainParams,
    parse_params,
    read_yaml,
)

STATE_DIR = Path(".quill")
ORIGINAL = STATE_DIR / "params.yaml.orig"

# The knobs the run form offers, each typed and bounded by its params model.
KNOBS: dict[str, tuple[type[BaseModel], dict[str, str]]] = {
    "tokenizer": (TokenizerParams, {"vocab_size": "BPE vocabulary size (reruns tokenize and everything after)"}),
    "model": (ModelParams, {"preset": "model size: tiny | cpu | 124m | 350m (model/config.py)"}),
    "train": (
        TrainParams,
        {
            "max_steps": "optimizer steps",
            "checkpoint_every": "steps between checkpoints",
            "val_every": "steps between validations",
            "seed": "weights, data order, dropout",
        },
    ),
    "eval": (
        EvalParams,
        {"num_fewshot": "few-shot counts, each task runs once per entry", "tasks": "lm-eval task names"},
    ),
    "finetune": (
        FinetuneParams,
        {
            "method": "lora: low-rank adapters | full: every weight",
            "max_steps": "fine-tuning optimizer steps",
            "lr": "peak learning rate (LoRA; full wants ~10x less)",
        },
    ),
}

# Where the data and the fine-tuned base come from and the promotion policy change only through params.yaml in git,
# where a change is reviewed: a run's parameters (the Run form, the API, `--set`) that could point data.sources or
# finetune.base at any folder the worker can read, or turn registry.force_promote on, would have whatever it liked
# promoted and served.
REVIEWED_IN_GIT = ("data.sources", "finetune.sources", "finetune.base", "registry")


def refuse_reviewed(keys) -> None:
    """ParamsError naming the first dotted key that only params.yaml in git may change."""
    for key in keys:
        for reviewed in REVIEWED_IN_GIT:
            if key == reviewed or key.startswith(reviewed + ".") or reviewed.startswith(key + "."):
                raise ParamsError(
                    f"override '{key}': {reviewed} changes only through params.yaml in git (a reviewed change), "
                    "not from a run's parameters or --set; edit params.yaml and commit it"
                )


def _knob_model(section: str, model: type[BaseModel], fields: dict[str, str]) -> type[BaseModel]:
    """Optional copies of `fields` of `model`, keeping their types and bounds; unset means params.yaml's value."""
    specs: dict[str, Any] = {}
    for name, description in fields.items():
        info = model.model_fields[name]
        kind = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        specs[name] = (kind | None, Field(default=None, description=f"{section}.{name}: {description}"))
    return create_model(f"{section.capitalize()}Overrides", __config__=ConfigDict(extra="forbid"), **specs)


_SECTIONS = {section: _knob_model(section, model, fields) for section, (model, fields) in KNOBS.items()}


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _not_reviewed_keys(self):
        try:
            refuse_reviewed(self.other)
        except ParamsError as exc:
            raise ValueError(str(exc)) from None
        return self

    def dotted(self) -> dict[str, Any]:
        """{'section.key': value} for every value set (the form's knobs, then `other`)."""
        out = {
            f"{section}.{k}": v
            for section in _SECTIONS
            if section in type(self).model_fields
            for k, v in getattr(self, section).model_dump().items()
            if v is not None
        }
        return {**out, **self.other}

    @classmethod
    def from_dotted(cls, values: dict[str, Any]) -> Overrides:
        """The form's knobs in their fields, every other dotted key in `other`."""
        sections: dict[str, dict] = {}
        other = {}
        for key, value in values.items():
            section, _, name = key.partition(".")
            if section in cls.model_fields and section in KNOBS and name in KNOBS[section][1]:
                sections.setdefault(section, {})[name] = value
            else:
                other[key] = value
        return cls(**sections, other=other)


def overrides_model(name: str, sections: tuple[str, ...]) -> type[_Base]:
    """A Run form: the knobs of `sections`, and `other` for any other dotted key."""
    return create_model(
        name,
        __base__=_Base,
        **{
            section: (_SECTIONS[section], Field(default_factory=_SECTIONS[section], description=f"{section} knobs"))
            for section in sections
        },
        other=(
            dict[str, Any],
            Field(
                default_factory=dict,
                description='any other params.yaml key, dotted, e.g. {"train.lr": 0.002, "data.split.val": 0.1}',
            ),
        ),
    )


Overrides = overrides_model("Overrides", tuple(_SECTIONS))
Overrides.__doc__ = "Values that replace params.yaml's for one run; unset fields keep params.yaml's."


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, key = dotted.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}  # a section params.yaml leaves to its defaults (or an unknown one: parse_params says so)
        node = node[part]
    node[key] = value


def parse_sets(items: list[str]) -> dict[str, Any]:
    """The command line's `--set KEY=VALUE` items (VALUE read as YAML) as dotted overrides; ValueError naming the
    item that has no `=`."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item}: expected KEY=VALUE, e.g. train.max_steps=200")
        values[key.strip()] = read_yaml(value)
    refuse_reviewed(values)
    return values


def check(overrides: dict[str, Any], path: Path = PARAMS_FILE) -> Params:
    """params.yaml with `overrides` on top, validated; ParamsError naming each bad key otherwise."""
    raw = read_yaml(path.read_text(encoding="utf-8")) or {}
    for key, value in overrides.items():
        if not key or any(not part for part in key.split(".")):
            raise ParamsError(f"override '{key}' is not a dotted params.yaml key such as 'train.max_steps'")
        _set(raw, key, value)
    return parse_params(raw, source=f"{path} with overrides {overrides}" if overrides else str(path))


def recover(path: Path = PARAMS_FILE) -> bool:
    """Put back the user's params.yaml if a killed run left its overrides in it; True if it did."""
    if not ORIGINAL.is_file():
        return False
    shutil.copyfile(ORIGINAL, path)
    ORIGINAL.unlink()
    return True


@contextmanager
def overridden(overrides: dict[str, Any], path: Path = PARAMS_FILE) -> Iterator[None]:
    """params.yaml holds `overrides` (its comments and layout kept) inside the block, the original after it."""
    if not overrides:
        yield
        return
    original = path.read_bytes()
    STATE_DIR.mkdir(exist_ok=True)
    ORIGINAL.write_bytes(original)
    rt = YAML()  # round-trip: comments and key order survive
    rt.preserve_quotes = True
    tree = rt.load(original)
    for key, value in overrides.items():
        _set(tree, key, value)
    buffer = io.StringIO()
    rt.dump(tree, buffer)
    try:
        path.write_text(buffer.getvalue(), encoding="utf-8")
        yield
    finally:
        path.write_bytes(original)
        ORIGINAL.unlink(missing_ok=True)
