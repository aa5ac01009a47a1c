"""speculators' DFlash 2 format (`speculators_model_type: "dflash2"`, `DFlash2DraftModel`), for the DFlash 2 family:
the DFlash folder (`formats.speculators`: the same config, names and conventions) plus

* per draft layer, its two convolutions: `layers.{i}.{attention_conv,mlp_conv}.base_kernel` [2, K, D] (input and
  output side) and `.kernel_projection.weight` [2·K·G, D] (rows ordered side, tap, group), as here;
* the selector: `candidate_selector.{predecessor_codebook, successor_codebook}` [V, r] and
  `candidate_selector.hidden_projection.weight` [r, D] (this project's `selector.*`);
* config fields `conv_kernel_size`, `conv_group_size`, `selector_rank`, `selector_top_k`.

The convolutions act on hidden channels (no RoPE permutation). Like DFlash's, the format holds tapped layers through
a linear `fc` only: HyperDFlash-2 (the gate) is refused in one line.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hdflash_jax.config import DrafterConfig
from hdflash_jax.formats.speculators import (ExportError, _open, dflash_from_speculators, dflash_tensors,
                                             speculators_config, write_folder)
from hdflash_jax.formats.zlab import flat_params
from hdflash_jax.safetensors_io import load_all

DEFAULTS = {"conv_kernel_size": 2, "conv_group_size": 16, "selector_rank": 256, "selector_top_k": 16}


def extra_names(cfg) -> list[tuple[str, str]]:
    """(this project's dotted path, speculators' name) of every DFlash 2 tensor beyond DFlash's."""
    out = [(f"layers.{i}.{part}.{p}", f"layers.{i}.{part}.{p}") for i in range(cfg.n_layers)
           for part in ("attention_conv", "mlp_conv") for p in ("base_kernel", "kernel_projection.weight")]
    return out + [(f"selector.{p}", f"candidate_selector.{p}")
                  for p in ("predecessor_codebook", "successor_codebook", "hidden_projection.weight")]


def extra_shapes(cfg) -> dict[str, tuple[int, ...]]:
    k, g, d, r, v = cfg.conv_kernel_size, cfg.dim // cfg.conv_group_size, cfg.dim, cfg.selector_rank, cfg.vocab_size
    shapes = {"base_kernel": (2, k, d), "kernel_projection.weight": (2 * k * g, d), "predecessor_codebook": (v, r),
              "successor_codebook": (v, r), "hidden_projection.weight": (r, d)}
    return {there: shapes[next(s for s in shapes if there.endswith(s))] for _, there in extra_names(cfg)}


def _dflash2_only(name: str) -> bool:
    """A tensor of DFlash 2's parts (a convolution or the selector), not of the DFlash folder beneath them."""
    return name.startswith("candidate_selector.") or "_conv." in name


def _dflash_part(cfg) -> DrafterConfig:
    return DrafterConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(DrafterConfig)})


def export(cfg, drafter, dst, *, target_cfg=None, overwrite: bool = False) -> dict:
    """A DFlash 2 drafter (tapped layers + linear compressor) as a speculators folder at `dst` → a summary."""
    flat = {k: np.asarray(v) for k, v in flat_params(drafter).items()}
    extras = {there: flat.pop(here) for here, there in extra_names(cfg)}
    base = _dflash_part(cfg)
    tensors = {**dflash_tensors(base, flat), **extras}
    config = speculators_config(base)
    config.update({"speculators_model_type": "dflash2", "architectures": ["DFlash2DraftModel"],
                   "sliding_window_non_causal": True, **{k: getattr(cfg, k) for k in DEFAULTS}})
    config["speculators_config"]["algorithm"] = "dflash2"
    return write_folder(dst, config, tensors, cfg, overwrite=overwrite)


def read(src, *, target_cfg):
    """A speculators DFlash 2 folder → (DFlash2Config, {this project's dotted path: array}), strictly checked."""
    from hdflash_jax.drafter.dflash2 import DFlash2Config

    cpath, wpath, raw = _open(src, target_cfg, "dflash2")
    if not wpath.is_file():
        raise FileNotFoundError(f"{wpath}: not found")
    fields = {}
    for key, default in DEFAULTS.items():
        v = raw.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ExportError(f"{cpath}: {key} must be an integer >= 1, got {v!r}")
        fields[key] = v
    tensors = load_all(wpath)
    base, tree = dflash_from_speculators(cpath, wpath, raw, {k: v for k, v in tensors.items()
                                                             if not _dflash2_only(k)}, target_cfg)
    try:
        cfg = DFlash2Config(**{**dataclasses.asdict(base), **fields})
    except ValueError as e:
        raise ExportError(f"{cpath}: {e}") from None
    shapes = extra_shapes(cfg)
    names = dict((there, here) for here, there in extra_names(cfg))
    left = sorted(k for k in tensors if _dflash2_only(k) and k not in names)
    if left:
        raise ExportError(f"{wpath}: unexpected tensor {left[0]!r} (not a DFlash 2 tensor of a "
                          f"{cfg.n_layers}-layer drafter)")
    dtype = next(iter(tree.values())).dtype
    for there, here in names.items():
        if there not in tensors:
            raise ExportError(f"{wpath}: missing tensor {there!r}")
        a = tensors[there]
        if tuple(a.shape) != shapes[there]:
            raise ExportError(f"{wpath}: {there!r} has shape {tuple(a.shape)}, expected {shapes[there]}")
        if not np.all(np.isfinite(np.asarray(a, np.float32))):
            raise ExportError(f"{wpath}: {there!r} has non-finite values")
        tree[here] = np.asarray(a).astype(dtype)
    return cfg, tree
