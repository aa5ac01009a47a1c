"""Typed configs: the one engine that checks a value against a field's type, and the one loader of config files.

Every config value the project reads goes through `coerce`: the JSON configs of checkpoints (`TargetConfig`,
`DrafterConfig`, `DSparkConfig`), transformers' config.json (`config_hf`), the training YAML (`load`) and the
evaluation's flags. A value of the wrong type is refused naming where it came from, never coerced silently or
crashed on later:

    {config}: field 'dim': expected an integer, got '48' (str)      (a checkpoint's JSON config)
    optim.lr: expected a number, got 'fast'                         (a training YAML: its `1e-3` is a string)
    optim.lrr: unknown key (known: lr, warmup_frac, ...)

A config is a frozen dataclass whose fields are scalars, tuples, free mappings, nested section dataclasses, or a
`TaggedUnion` of section dataclasses told apart by one key (the drafter section: one class per drafter family).
`load` reads a YAML or JSON file (a mapping at the top level), applies `--override a.b=c` items (values parsed as
YAML) to that raw mapping, then `build`s the dataclass. Any problem is one `ConfigError` (a `UsageError`, exit 2)
whose message names the key path.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Mapping

from hdflash_jax.errors import UsageError


class ConfigError(UsageError):
    """A bad config value, key or file; `str()` is one line naming where (exit status 2)."""


def _fail(path: str, msg: str) -> typing.NoReturn:
    raise ConfigError(f"{path}: {msg}" if path else msg)


def _show(value: Any, yaml: bool = False) -> str:
    """The value as a message shows it: JSON configs add its type (`'48' (str)`: a quoted number is a string there),
    YAML configs do not (`'fast'`)."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return text if yaml else f"{text} ({type(value).__name__})"


def check(ok: bool, field: str, msg: str) -> None:
    """For `__post_init__` range checks: the loader prefixes the section's path to `field`."""
    if not ok:
        raise ConfigError(f"{field}: {msg}")


# ---- values against types ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TaggedUnion:
    """`Annotated[Any, TaggedUnion("kind", members)]`: a mapping becomes the section dataclass `members()[value of
    its "kind" key]` (default: the field's default's kind). `members` is called when a config is built, so a
    registry can add members (a new drafter family's section) after this annotation was written."""
    tag: str
    members: Callable[[], Mapping[str, type]]


_WORDS = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false", type(None): "null"}


def _describe(tp, yaml: bool = False) -> str:
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) in (dict, Mapping) or tp in (dict, Mapping):
        return "a mapping"
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return "a list of integers" if args and args[0] is int else "a list"
    if tp is list or typing.get_origin(tp) is list:
        return "a list"
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if tp is float and yaml:
        return "a number"
    return _WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def _union_args(tp) -> tuple | None:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return typing.get_args(tp)
    return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def coerce(value: Any, tp, path: str, *, yaml: bool = False) -> Any:
    """`value` as type `tp`: int, float (finite), str, bool, None, Literal, unions of those, tuple[X, ...], list,
    dict / Mapping, a section dataclass, or a `TaggedUnion` of them; ConfigError naming `path` otherwise.

    `yaml`: also accept a string that is a decimal number for a float (YAML 1.1 reads `1e-3` as a string)."""
    if typing.get_origin(tp) is typing.Annotated:
        base, *meta = typing.get_args(tp)
        tagged = next((m for m in meta if isinstance(m, TaggedUnion)), None)
        return _tagged(value, tagged, path, yaml) if tagged else coerce(value, base, path, yaml=yaml)
    options = _union_args(tp)
    if options is not None:
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in (o for o in options if o is not type(None)):
            try:
                return coerce(value, opt, path, yaml=yaml)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        _fail(path, f"expected {' or '.join(_describe(o, yaml) for o in options)}, got {_show(value, yaml)}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, yaml=yaml)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            _fail(path, f"expected {_describe(tp, yaml)}, got {_show(value, yaml)}")
        return value
    if tp in (dict, Mapping) or origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            _fail(path, f"expected a mapping, got {_show(value, yaml)}")
        return dict(value)
    if tp is list or origin is list:
        if not isinstance(value, list):
            _fail(path, f"expected a list, got {_show(value, yaml)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(path, f"expected {_describe(tp, yaml)}, got {_show(value, yaml)}")
        item = typing.get_args(tp)[0]
        if item is int and not all(_is_int(v) for v in value):
            _fail(path, f"expected a list of integers, got {_show(value, yaml)}")
        return tuple(coerce(v, item, f"{path}[{i}]", yaml=yaml) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"expected true or false, got {_show(value, yaml)}")
        return value
    if tp is int:
        if not _is_int(value):
            _fail(path, f"expected an integer, got {_show(value, yaml)}")
        return value
    if tp is float:
        if yaml and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                _fail(path, f"expected {_describe(float, yaml)}, got {_show(value, yaml)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(path, f"expected {_describe(float, yaml)}, got {_show(value, yaml)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, f"expected a string, got {_show(value, yaml)}")
        return value
    if tp is type(None):
        if value is not None:
            _fail(path, f"expected null, got {_show(value, yaml)}")
        return None
    if tp is Any:
        return value
    raise TypeError(f"{path}: unsupported config field type {tp!r}")


def _tagged(value, union: TaggedUnion, path: str, yaml: bool):
    members = dict(union.members())
    if isinstance(value, tuple(members.values())):
        return value
    if not isinstance(value, Mapping):
        _fail(path, f"expected a mapping, got {_show(value, yaml)}")
    where = f"{path}.{union.tag}" if path else union.tag
    if union.tag not in value:
        _fail(where, f"missing; one of {', '.join(map(str, members))}")
    name = value[union.tag]
    if name not in members:
        _fail(where, f"unknown {name!r}; one of {', '.join(map(str, members))}")
    return build(members[name], value, path, yaml=yaml)


def field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_fields(values: Mapping, cls, where: str) -> None:
    """Each value of a config dict read from a file (a checkpoint's JSON config) against `cls`'s field types,
    named `{where}field '<name>'`: e.g. "field 'dim': expected an integer, got '48' (str)"."""
    types_ = field_types(cls)
    for k, v in values.items():
        if k in types_:
            coerce(v, types_[k], f"{where}field {k!r}")


def check_fields_of(values: Mapping, cls, path: str) -> dict:
    """A free mapping of `cls` field overrides (e.g. TargetConfig fields): known keys, values of their types."""
    types_ = field_types(cls)
    out = {}
    for k, v in values.items():
        if k not in types_:
            _fail(f"{path}.{k}", f"unknown key (not a {cls.__name__} field)")
        out[k] = coerce(v, types_[k], f"{path}.{k}", yaml=True)
    return out


def build(cls, data: Any, path: str = "", *, yaml: bool = True):
    """The dataclass `cls` from a raw mapping (missing keys take their defaults)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        _fail(path or "config", f"expected a mapping, got {_show(data, yaml)}")
    types_ = field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        _fail(f"{path}.{unknown[0]}" if path else str(unknown[0]), f"unknown key (known: {', '.join(types_)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            default = f.default
            tag = _tagged_tag(types_[f.name])
            if dataclasses.is_dataclass(default) and isinstance(value, Mapping) and (
                    tag is None or value.get(tag, getattr(default, tag)) == getattr(default, tag)):
                # a section's keys not given keep this config's default for it (not the section class's)
                value = {**{k.name: getattr(default, k.name) for k in dataclasses.fields(default)}, **value}
            kwargs[f.name] = coerce(value, types_[f.name], f"{path}.{f.name}" if path else f.name, yaml=yaml)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{path}.{e}" if path else str(e)) from None


def _tagged_tag(tp) -> str | None:
    if typing.get_origin(tp) is typing.Annotated:
        return next((m.tag for m in typing.get_args(tp)[1:] if isinstance(m, TaggedUnion)), None)
    return None


# ---- files and overrides -------------------------------------------------------------------------------------

def read_file(path: str | os.PathLike) -> dict:
    """A YAML or JSON file holding a mapping (an empty file is {})."""
    import yaml

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
    import yaml

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
            _fail(".".join(parts[:i + 1]), f"is {_show(nxt, True)}, not a section (in --override {item!r})")
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
