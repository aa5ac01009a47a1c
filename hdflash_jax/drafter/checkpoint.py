"""Save/restore a block drafter (HyperDFlash, vanilla DFlash) with its config.

A drafter checkpoint is a folder:
    drafter_config.json   `DrafterConfig.to_dict()` (every field; `DrafterConfig.from_dict` reads it back)
    params/               an orbax PyTree checkpoint of the `BlockDrafter`'s NNX state, nested dicts keyed by the
                          dotted tree path (`layers` → `0` → `wq` → `weight`, `reducer` → `fn`, `norm` → `weight`)

The target's embedding and head are not part of it (frozen, shared with the target). Writing goes to
`<path>.tmp-<pid>` renamed into place (hdflash_jax.checkpoint's helpers), so an interrupted save leaves nothing
that loads. `DrafterConfig.check_target` is the check that a drafter was built for the target it is used with; it
only needs the two configs, so callers can run it before loading any weights. Loading checks every parameter is
finite (NaN/Inf: one error naming the folder and the parameter).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

from hdflash_jax.checkpoint import read_typed_config, restore_strict, save_atomically
from hdflash_jax.config import DrafterConfig, TargetConfig

DRAFTER_CONFIG_FILE = "drafter_config.json"
PARAMS_DIR = "params"


def is_drafter_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / DRAFTER_CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def save_drafter(path: str | Path, drafter, cfg: DrafterConfig | None = None, *, overwrite: bool = False) -> Path:
    """Save a `BlockDrafter` (or its NNX state / {dotted path: array}, then `cfg` is required) atomically."""
    path = Path(path)
    if cfg is None:
        cfg = getattr(drafter, "cfg", None)
        if not isinstance(cfg, DrafterConfig):
            raise ValueError("save_drafter: pass cfg= when saving a state rather than a BlockDrafter")
    return save_atomically(path, drafter, lambda folder: (folder / DRAFTER_CONFIG_FILE).write_text(
        json.dumps(cfg.to_dict(), indent=1)), overwrite=overwrite)


def load_drafter_config(path: str | Path) -> DrafterConfig:
    """The `DrafterConfig` of a drafter checkpoint (no weights read)."""
    return read_typed_config(path, DRAFTER_CONFIG_FILE, DrafterConfig, "drafter")


def load_drafter(path: str | Path, target_cfg: TargetConfig | None = None):
    """Restore a drafter checkpoint → (DrafterConfig, BlockDrafter), checked against `target_cfg` if given.

    Raises FileNotFoundError / ValueError naming the path (and parameter) for a missing or unfinished folder, a
    tree that disagrees with the config, a parameter holding NaN/Inf, or a drafter built for another target.
    """
    from hdflash_jax.drafter.model import abstract_drafter

    path = Path(path)
    cfg = load_drafter_config(path)
    if target_cfg is not None:
        cfg.check_target(target_cfg, where=f"drafter {path}")
    params = path / PARAMS_DIR
    if not params.is_dir():
        raise FileNotFoundError(f"{path}: not a drafter checkpoint (no {PARAMS_DIR}/)")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's (multi-process runs)
    graphdef, state = restore_strict(params, abstract_drafter(cfg), "a drafter", lambda key, var: device)
    return cfg, nnx.merge(graphdef, state)
