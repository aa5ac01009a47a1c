"""Save/restore a DSpark drafter: a folder with `dspark_config.json` (`DSparkConfig.to_dict()`) and `params/`
(orbax, the `DSparkDrafter` tree). The blocks' shapes follow the target, so loading needs the target's config;
the embedding and head stay the target's. Writes are atomic; loading is strict and refuses NaN/Inf."""

from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

from hdflash_jax.checkpoint import read_typed_config, restore_strict, save_atomically
from hdflash_jax.config import TargetConfig
from hdflash_jax.dspark.config import DSparkConfig

DSPARK_CONFIG_FILE = "dspark_config.json"
PARAMS_DIR = "params"


def is_dspark_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / DSPARK_CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def save_dspark(path: str | Path, state, cfg: DSparkConfig, *, overwrite: bool = False) -> Path:
    """A `DSparkDrafter` (or its state / {dotted path: array}) and its config, atomically."""
    return save_atomically(Path(path), state, lambda folder: (folder / DSPARK_CONFIG_FILE).write_text(
        json.dumps(cfg.to_dict(), indent=1)), overwrite=overwrite)


def load_dspark_config(path: str | Path) -> DSparkConfig:
    return read_typed_config(path, DSPARK_CONFIG_FILE, DSparkConfig, "DSpark drafter")


def load_dspark(path: str | Path, target_cfg: TargetConfig):
    """→ (DSparkConfig, DSparkDrafter), checked against the target's config."""
    from hdflash_jax.dspark.model import abstract_dspark

    path = Path(path)
    cfg = load_dspark_config(path)
    cfg.check_target(target_cfg, where=f"DSpark drafter {path}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    graphdef, state = restore_strict(path / PARAMS_DIR, abstract_dspark(cfg, target_cfg), "a DSpark drafter",
                                     lambda key, var: device)
    return cfg, nnx.merge(graphdef, state)
