"""Typed training configs: one loader for both trainers (`train.drafter`, `train.pretrain_target`).

A config is a frozen dataclass whose fields are scalars, free mappings or nested section dataclasses. The loader
reads a YAML or JSON file (a mapping at the top level), applies `--override a.b=c` items (values parsed as YAML)
to that raw mapping, then builds the dataclass, checking every value against its field's type. Any problem is
one `ConfigError` whose message names the key path:

    optim.lr: expected a number, got 'fast'
    train.steps: expected an integer, got 'three'
    optim.lrr: unknown key (known: b1, b2, ...)

Sections shared by the trainers: `OptimConfig` (the optimizer factory `train.optim.make_optimizer`),
`CheckpointConfig` (`train.checkpointing.Checkpointer`) and `LogConfig` (`train.metrics.MetricsWriter`). Each
trainer's own config (`DrafterRunConfig` in `train.drafter_config`, `PretrainConfig` in `train.pretrain_target`)
composes them with its own sections, with its own defaults.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from hdflash_jax.errors import UsageError


class ConfigError(UsageError):
    """A bad config value, key or file; `str()` is one line naming where (exit status 2)."""


def _fail(path: str, msg: str) -> typing.NoReturn:
    raise ConfigError(f"{path}: {msg}" if path else msg)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- shared sections -----------------------------------------------------------------------------------------

def check(ok: bool, field: str, msg: str) -> None:
    """For `__post_init__` range checks: the loader prefixes the section's path to `field`."""
    if not ok:
        raise ConfigError(f"{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """optax chain(clip_by_global_norm, AdamW); linear warmup from 0 to `lr`, then cosine to `lr·end_lr_frac`.

    Warmup: `warmup_steps` when set, else `warmup_frac` of the run's steps. `decay_matrices_only`: weight decay on
    parameters of rank >= 2 only (not on norms, biases, gate vectors)."""
    lr: float = 6e-4
    warmup_frac: float = 0.04
    warmup_steps: int | None = None
    end_lr_frac: float = 0.0
    weight_decay: float = 0.0
    decay_matrices_only: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # None or 0: no clipping

    def __post_init__(self):
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.warmup_frac <= 1, "warmup_frac", f"must be in [0, 1], got {self.warmup_frac}")
        check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps",
              f"must be >= 0, got {self.warmup_steps}")
        check(0 <= self.end_lr_frac <= 1, "end_lr_frac", f"must be in [0, 1], got {self.end_lr_frac}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "b1", f"b1 and b2 must be in [0, 1), got {self.b1}, {self.b2}")
        check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        check(self.grad_clip is None or self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under `<out_dir>/checkpoints` every `every` steps (0: only at the end), the last
    `max_to_keep` kept."""
    every: int = 500
    max_to_keep: int = 3

    def __post_init__(self):
        check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        check(self.max_to_keep >= 1, "max_to_keep", f"must be >= 1, got {self.max_to_keep}")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """`<out_dir>/metrics.jsonl` every `every` steps; TensorBoard when a writer is importable; a tqdm bar."""
    every: int = 10
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        check(self.every >= 1, "every", f"must be >= 1, got {self.every}")


# ---- values against types ------------------------------------------------------------------------------------

_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               type(None): "null"}


def _describe(tp) -> str:
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) in (dict, Mapping) or tp in (dict, Mapping):
        return "a mapping"
    if typing.get_origin(tp) is tuple:
        return "a list"
    return _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def _union_args(tp) -> tuple | None:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return typing.get_args(tp)
    return None


def coerce(value: Any, tp, path: str) -> Any:
    """`value` as type `tp` (int, float, str, bool, None, unions of those, tuple[X, ...], dict, a section
    dataclass); ConfigError naming `path` otherwise."""
    options = _union_args(tp)
    if options is not None:
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in (o for o in options if o is not type(None)):
            try:
                return coerce(value, opt, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        _fail(path, f"expected {' or '.join(_describe(o) for o in options)}, got {_show(value)}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    origin = typing.get_origin(tp)
    if tp in (dict, Mapping) or origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            _fail(path, f"expected a mapping, got {_show(value)}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(path, f"expected a list, got {_show(value)}")
        (item, *_rest) = typing.get_args(tp)
        return tuple(coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"expected an integer, got {_show(value)}")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-3` (no dot) as a string: a string that is a decimal number is accepted
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                _fail(path, f"expected a number, got {_show(value)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, f"expected a string, got {_show(value)}")
        return value
    if tp is type(None):
        if value is not None:
            _fail(path, f"expected null, got {_show(value)}")
        return None
    raise TypeError(f"{path}: unsupported config field type {tp!r}")


def field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_fields_of(values: Mapping, cls, path: str) -> dict:
    """A free mapping of `cls` field overrides (e.g. TargetConfig fields): known keys, values of their types."""
    types_ = field_types(cls)
    out = {}
    for k, v in values.items():
        if k not in types_:
            _fail(f"{path}.{k}", f"unknown key (not a {cls.__name__} field)")
        out[k] = coerce(v, types_[k], f"{path}.{k}")
    return out


def build(cls, data: Any, path: str = ""):
    """The dataclass `cls` from a raw mapping (missing keys take their defaults)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        _fail(path or "config", f"expected a mapping, got {_show(data)}")
    types_ = field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        _fail(f"{path}.{unknown[0]}" if path else str(unknown[0]), f"unknown key (known: {', '.join(types_)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            default = f.default
            if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
                # a section's keys not given keep this config's default for it (not the section class's)
                value = {**{k.name: getattr(default, k.name) for k in dataclasses.fields(default)}, **value}
            kwargs[f.name] = coerce(value, types_[f.name], f"{path}.{f.name}" if path else f.name)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{path}.{e}" if path else str(e)) from None


# ---- files and overrides -------------------------------------------------------------------------------------

def read_file(path: str | os.PathLike) -> dict:
    """A YAML or JSON file holding a mapping (an empty file is {})."""
    p = Path(path)
    if not p.is_file():
        _fail(f"--config {p}", "file not found")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        _fail(f"--config {p}", f"not valid YAML/JSON{where}: {problem}")
    except UnicodeDecodeError:
        _fail(f"--config {p}", "not a text file")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        _fail(f"--config {p}", f"expected a mapping at the top level, got a {type(loaded).__name__}")
    return loaded


def apply_override(raw: dict, item: str) -> dict:
    """'a.b.c=value' (value parsed as YAML: 1e-3, true, null, [1, 2], {x: 1}) set into a copy of `raw`."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        _fail(f"--override {item!r}", "expected key=value with a dotted key, e.g. optim.lr=3e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML: the literal string (the field's type check decides)
    parts = key.split(".")
    out = _deep_copy(raw)
    node = out
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif not isinstance(nxt, dict):
            _fail(".".join(parts[:i + 1]), f"is {_show(nxt)}, not a section (in --override {item!r})")
        node = nxt
    node[parts[-1]] = value
    return out


def _deep_copy(d: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load(cls, path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
         data: Mapping | None = None):
    """`cls` from defaults ← the file at `path` (or `data`) ← each override, validated; ConfigError on any
    problem."""
    raw = read_file(path) if path is not None else {}
    if data is not None:
        raw = merge(raw, data)
    for item in overrides:
        raw = apply_override(raw, item)
    return build(cls, raw)


def merge(base: Mapping, new: Mapping) -> dict:
    """`new` over `base`, recursively for mappings on both sides."""
    out = _deep_copy(dict(base))
    for k, v in new.items():
        out[k] = merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, Mapping) else v
    return out


def to_dict(cfg) -> dict:
    """A plain mapping (YAML-dumpable: tuples as lists) that `load(cls, data=...)` reads back equal."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)
