"""The converter's tensor map: every check that needs no tensor data, from the safetensors/torch headers alone.

`map_tensors` maps each source tensor to the tree leaf (or expert row of a stacked leaf) it fills, decides how it
is stored (plain, FP8 or packed FP4 with a `.scale` partner) and checks names, shapes and dtypes against the
config. Any problem is one `CheckpointError` naming the file and key, raised before any data is read.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from convert.quant import fp4_scale_shape, fp8_scale_shape
from hdflash_jax.safetensors_io import CheckpointError, TensorInfo

FLOAT_SRC = {"F16", "BF16", "F32", "F64"}
INT_SRC = {"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"}
FP4_SRC = {"I8", "U8", "F4"}
SCALE_SRC = {"F8_E8M0", "U8", "F32", "BF16", "F16"}
STACKED_LEAVES = ("ffn.experts.w1", "ffn.experts.w2", "ffn.experts.w3")


@dataclasses.dataclass
class Target:
    path: str  # tree leaf
    row: int | None = None  # expert row of a stacked leaf
    cols: tuple[int, int] | None = None  # slice of axis 1 of the source (transformers' stacked gate_up_proj)


@dataclasses.dataclass
class Job:
    info: TensorInfo
    official: str
    kind: str  # plain | fp8 | fp4
    targets: list[Target]
    scale: TensorInfo | None = None


@dataclasses.dataclass
class TensorMap:
    jobs: dict[str, Job]  # source key → job, for every tensor that is read
    contributions: dict[str, int]  # leaf path → number of jobs that fill it
    skipped_mtp: list[str]
    unused: list[str]


@dataclasses.dataclass
class _Ctx:
    """What every planning step reads: the source's headers, the config's leaves and the naming."""
    source: object
    layout: str
    names_back: object  # official (tree-side) name → the name to show in errors
    leaves: dict
    cfg: object
    config_path: Path
    allow_unused: bool
    hint: str  # appended to "unexpected tensor" errors when the detected layout differs
    official: dict[str, str]  # source key → official name
    by_official: dict[str, str]  # official name → source key


class _Unused(Exception):
    """A tensor the model has no parameter for, with --allow-unused: skipped and listed."""


def source_label(source) -> str:
    if source.index is not None:
        return str(source.index)
    return str(source.files[0]) if len(source.files) == 1 else str(source.files[0].parent)


def is_float_leaf(dtype) -> bool:
    return np.dtype(dtype).kind == "f" or np.dtype(dtype).name == "bfloat16"


def _official_names(source, layout: str, keys=None, rename=None) -> tuple[dict[str, str], dict[str, str]]:
    from hdflash_jax.keymap import to_official

    official: dict[str, str] = {}
    by_official: dict[str, str] = {}
    for key, info in source.infos.items():
        if keys is not None and key not in keys:
            continue
        off = to_official(key, layout)
        if rename is not None:
            try:
                off = rename(off)
            except KeyError as e:
                raise CheckpointError(f"{info.file}: tensor {key!r}: {e.args[0]}") from None
        if off in by_official:
            raise CheckpointError(f"{info.file}: tensors {by_official[off]!r} and {key!r} both map to {off!r} "
                                  f"(duplicate)")
        official[key], by_official[off] = off, key
    return official, by_official


def _unexpected(ctx: _Ctx, info: TensorInfo, why: str):
    if ctx.allow_unused:
        raise _Unused
    off = ctx.official[info.key]
    alias = f" (official name {off!r})" if off != info.key else ""
    raise CheckpointError(f"{info.file}: unexpected tensor {info.key!r}{alias}: {why} in a model with the config "
                          f"{ctx.config_path}; pass --allow-unused to skip it{ctx.hint}")


# the official config fields that set a tensor's shape (transformers names: `TargetConfig.to_hf_dict`)
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "rope_head_dim", "q_lora_rank", "o_groups",
                "o_lora_rank", "index_n_heads", "index_head_dim", "n_routed_experts", "n_shared_experts",
                "moe_inter_dim", "n_hash_layers", "hc_mult", "compress_ratios", "n_mtp_layers")


def defaulted_note(config_path: Path, cfg) -> str:
    """'; <config> does not set n_heads (the default 64 was used)...' for the shape-setting fields a config file
    leaves out, so a shape mismatch caused by a missing field says so instead of blaming the tensor."""
    from hdflash_jax.fileio import read_json

    try:
        raw = read_json(config_path)
    except (OSError, ValueError):
        return ""
    if not isinstance(raw, dict):
        return ""
    if "model_type" in raw or "hidden_size" in raw:
        hf = cfg.to_hf_dict()
        absent = [k for k in hf if k not in raw and k not in ("tie_word_embeddings", "bos_token_id", "eos_token_id")]
        shown = {k: hf[k] for k in absent}
    else:
        shown = {k: getattr(cfg, k) for k in SHAPE_FIELDS if k not in raw}
    if not shown:
        return ""
    return (f"; note: {config_path} does not set {', '.join(shown)}, so the defaults "
            f"{', '.join(f'{k}={v!r}' for k, v in shown.items())} were used")


def _bad_shape(ctx: _Ctx, info: TensorInfo, want, path: str, note: str = ""):
    raise CheckpointError(f"{info.file}: tensor {info.key!r} has shape {list(info.shape)}, the config "
                          f"{ctx.config_path} expects {list(want)} for parameter {path!r}{note}"
                          f"{defaulted_note(ctx.config_path, ctx.cfg)}")


def _place(ctx: _Ctx, info: TensorInfo, off: str) -> tuple[list[Target], tuple, bool]:
    """Where a tensor goes → (targets, the shape it must have, whether it is a stacked hf_memory expert tensor)."""
    from hdflash_jax.keymap import official_to_tree

    cfg = ctx.cfg
    stacked = ctx.layout == "hf_memory" and off.endswith((".ffn.experts.gate_up_proj", ".ffn.experts.down_proj"))
    if stacked:
        prefix = off.rsplit(".", 1)[0]
        if off.endswith("gate_up_proj"):
            inter = cfg.moe_inter_dim
            targets = [Target(f"{prefix}.w1", None, (0, inter)), Target(f"{prefix}.w3", None, (inter, 2 * inter))]
            want = (cfg.n_routed_experts, 2 * inter, cfg.dim)
        else:
            targets = [Target(f"{prefix}.w2")]
            want = (cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        if targets[0].path not in ctx.leaves:
            _unexpected(ctx, info, f"no parameter {targets[0].path!r}")
        return targets, want, True
    path, row = official_to_tree(off)
    if path not in ctx.leaves:
        _unexpected(ctx, info, f"no parameter {path!r}")
    leaf_shape = tuple(ctx.leaves[path].shape)
    if row is not None and not 0 <= row < leaf_shape[0]:
        _unexpected(ctx, info, f"expert {row} is out of range (n_routed_experts = {leaf_shape[0]})")
    return [Target(path, row)], (leaf_shape[1:] if row is not None else leaf_shape), False


def _quantized_kind(ctx: _Ctx, info: TensorInfo, scale: TensorInfo, want: tuple, path: str) -> str:
    """A weight with a `.scale` partner: FP8 or packed FP4, shapes of both checked → 'fp8' | 'fp4'."""
    if scale.dtype_name not in SCALE_SRC:
        raise CheckpointError(f"{scale.file}: scale {scale.key!r} has dtype {scale.dtype_name}; expected one "
                              f"of {sorted(SCALE_SRC)}")
    dt = info.dtype_name
    if dt == "F8_E4M3":
        kind = "fp8"
        if tuple(info.shape) != tuple(want):
            _bad_shape(ctx, info, want, path)
        want_s = fp8_scale_shape(tuple(want))
    elif dt in FP4_SRC:
        kind = "fp4"
        packed = (want[0], want[1] // 2) if len(want) == 2 and want[1] % 2 == 0 else None
        if packed is None or tuple(info.shape) != packed:
            _bad_shape(ctx, info, packed or want, path, " (packed FP4: two values per byte)")
        want_s = fp4_scale_shape(tuple(want))
    else:
        raise CheckpointError(f"{info.file}: tensor {info.key!r} has a scale {scale.key!r} but dtype {dt}, "
                              f"neither F8_E4M3 (FP8) nor I8 (packed FP4)")
    if tuple(scale.shape) != tuple(want_s):
        raise CheckpointError(f"{scale.file}: scale {scale.key!r} has shape {list(scale.shape)}, expected "
                              f"{list(want_s)} for {kind.upper()} weight {info.key!r} of shape {list(want)}")
    return kind


def _check_plain(ctx: _Ctx, info: TensorInfo, off: str, want: tuple, path: str, float_leaf: bool) -> None:
    dt = info.dtype_name
    if dt.startswith("F8_"):
        scale_name = off[: -len(".weight")] + ".scale" if off.endswith(".weight") else info.key + ".scale"
        raise CheckpointError(f"{info.file}: FP8 tensor {info.key!r} has no scale tensor (expected {scale_name!r})")
    if float_leaf and dt not in FLOAT_SRC:
        why = " (packed FP4 without its .scale?)" if dt in FP4_SRC else ""
        raise CheckpointError(f"{info.file}: tensor {info.key!r} has dtype {dt}, parameter {path!r} "
                              f"needs a float tensor{why}")
    if not float_leaf and dt not in INT_SRC:
        raise CheckpointError(f"{info.file}: tensor {info.key!r} has dtype {dt}, parameter {path!r} "
                              f"needs an integer tensor")
    if tuple(info.shape) != tuple(want):
        _bad_shape(ctx, info, want, path)


def _job(ctx: _Ctx, key: str, info: TensorInfo, off: str) -> tuple[Job, str | None]:
    """One source tensor → its Job and the key of the scale it consumes (None for plain tensors)."""
    targets, want, stacked = _place(ctx, info, off)
    path = targets[0].path
    float_leaf = is_float_leaf(ctx.leaves[path].dtype)
    scale_key = ctx.by_official.get(off[: -len(".weight")] + ".scale") if off.endswith(".weight") else None
    if scale_key is None:
        _check_plain(ctx, info, off, want, path, float_leaf)
        return Job(info, off, "plain", targets), None
    if stacked or not float_leaf:
        raise CheckpointError(f"{info.file}: tensor {key!r} has a scale {scale_key!r}, but quantized "
                              f"{'stacked experts' if stacked else 'integer parameters'} are not supported")
    scale = ctx.source.infos[scale_key]
    return Job(info, off, _quantized_kind(ctx, info, scale, want, path), targets, scale), scale_key


def _claim(cover: dict[str, set], job: Job) -> None:
    """Mark the leaves (rows) a job fills; a second filler of the same slot is a duplicate."""
    for t in job.targets:
        seen = cover.setdefault(t.path, set())
        if t.row in seen or (t.row is None and seen) or (None in seen):
            raise CheckpointError(f"{job.info.file}: tensor {job.info.key!r} fills parameter {t.path!r}"
                                  f"{'' if t.row is None else f' row {t.row}'} a second time (duplicate)")
        seen.add(t.row)


def _check_scales(ctx: _Ctx, used_scales: set, skipped: set, unused: list[str]) -> None:
    """Every `.scale` must have been consumed by its weight (or belong to a skipped / unused weight)."""
    for key, info in ctx.source.infos.items():
        off = ctx.official.get(key)
        if off is None or not off.endswith(".scale") or key in used_scales:
            continue
        weight_name = off[: -len(".scale")] + ".weight"
        weight = ctx.by_official.get(weight_name)
        if weight is not None and weight in skipped:
            continue
        if ctx.allow_unused:
            unused.append(key)
            continue
        raise CheckpointError(f"{info.file}: unexpected tensor {key!r}: a scale without a quantized weight "
                              f"{weight_name!r}; pass --allow-unused to skip it{ctx.hint}")


def _check_coverage(ctx: _Ctx, cover: dict[str, set]) -> None:
    """Every leaf (every expert row of a stacked leaf) must be filled by some tensor."""
    from hdflash_jax.keymap import tree_to_official

    has_mtp = any(o.startswith("mtp.") for o in ctx.official.values())
    for path, leaf in ctx.leaves.items():
        shape = tuple(leaf.shape)
        seen = cover.get(path, set())
        if None in seen:
            continue
        if path.endswith(STACKED_LEAVES):
            rows = [e for e in range(shape[0]) if e not in seen]
            if not rows:
                continue
            name = tree_to_official(path, shape[0])[rows[0]]
        else:
            name = tree_to_official(path)[0]
        note = ""
        if path.startswith("mtp.") and not has_mtp:
            note = "; the checkpoint has no MTP weights (transformers does not save them): pass --no-mtp"
        raise CheckpointError(f"{source_label(ctx.source)}: missing tensor {_file_key(ctx, ctx.names_back(name))} for "
                              f"parameter {path!r} of the config {ctx.config_path}{note}")


_DIGITS = re.compile(r"\d+")


def _file_key(ctx: _Ctx, official: str) -> str:
    """A missing tensor as the source's own files would name it. The layouts rename by regex, one way; the file's
    name is found by analogy with a present tensor whose official name differs only in its indices (layer,
    expert, MTP depth), the same indices substituted into its key. Unique tensors (or no analogue) are shown by
    their official name, said as such."""
    if ctx.layout == "official":
        return repr(official)
    skeleton, idx = _DIGITS.sub("#", official), _DIGITS.findall(official)
    for key, off in ctx.official.items():
        if not idx or _DIGITS.sub("#", ctx.names_back(off)) != skeleton:
            continue
        have, key_digits = _DIGITS.findall(ctx.names_back(off)), _DIGITS.findall(key)
        if key_digits != have:  # the key's numbers must be the official name's, in order, to swap them
            continue
        parts, new = _DIGITS.split(key), iter(idx)
        guess = "".join(p + (next(new) if i < len(parts) - 1 else "") for i, p in enumerate(parts))
        return f"{guess!r} (official name {official!r})"
    return f"{official!r} (official name; the {ctx.layout} file names it otherwise)"


def map_tensors(source, layout: str, leaves: dict, cfg, *, no_mtp: bool, allow_unused: bool, config_path: Path,
              detected: str, keys=None, rename=None, names_back=None) -> TensorMap:
    """Check every source tensor's name, shape and dtype against the config's leaves → the map to stream.

    `keys`: plan only these source keys (the others belong to another plan); `rename`: official name → the
    official-style name whose tree path is the leaf (a drafter stored under other names), `names_back` its
    inverse for error messages."""
    official, by_official = _official_names(source, layout, keys, rename)
    hint = f"; the names look like layout {detected!r}, not {layout!r}" if detected != layout else ""
    ctx = _Ctx(source, layout, names_back or (lambda n: n), leaves, cfg, config_path, allow_unused, hint, official,
               by_official)
    jobs: dict[str, Job] = {}
    cover: dict[str, set] = {}
    skipped_mtp: list[str] = []
    unused: list[str] = []
    used_scales: set[str] = set()
    for key, info in source.infos.items():
        off = official.get(key)
        if off is None or off.endswith(".scale"):
            continue  # another plan's, or a scale consumed with its weight
        if no_mtp and off.startswith("mtp."):
            skipped_mtp.append(key)
            continue
        try:
            job, scale_key = _job(ctx, key, info, off)
        except _Unused:
            unused.append(key)
            continue
        if scale_key is not None:
            used_scales.add(scale_key)
        _claim(cover, job)
        jobs[key] = job
    _check_scales(ctx, used_scales, set(skipped_mtp) | set(unused), unused)
    _check_coverage(ctx, cover)
    return TensorMap(jobs, {p: len(s) for p, s in cover.items()}, skipped_mtp, unused)
