"""DeepSpec's V4 layout (the `mtp.*` tensors), the DSpark family's serving format: `export` and `read_dspark`.

    python -m convert.drafter_export --to dspark --src DSPARK_CKPT --target T --dst OUT_DIR [--overwrite]
    python -m convert.drafter_export --to here --src DSPARK_DIR --target T --dst DSPARK_CKPT [--overwrite]

The other side is a folder with `model.safetensors` holding exactly the drafter's tensors under the names the V4
DSpark checkpoints use (`mtp.<i>.attn.wq_a.weight`, `mtp.0.main_proj.weight`, `mtp.<last>.markov_head.markov_w1.
weight`, experts unstacked `mtp.<i>.ffn.experts.E.w1.weight`; `hdflash_jax.dspark.keymap`), unquantized, and
`config.json` with the `dspark_*` keys, the target's width (`dim`, `hc_mult`, `vocab_size`) and an `hdflash_dspark`
block (n_blocks, pooling, confidence_head) so that here → there → here is bit-identical. A file without that block
imports with one block per tapped layer, mean pooling and a confidence head iff it holds its tensor. The gated
pooling's gates are the extra tensors `dspark_pool.<k>.hc_head_{fn,base,scale}`: serving engines' DSpark
loaders know no such tensors (they mean-pool the tapped layers' streams); what they lack is that one gate per
tapped layer in place of the mean. Import is strict: names, shapes, the target's width, finite values.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from hdflash_jax.fileio import OutputKind, atomic_dir, read_json
from hdflash_jax.safetensors_io import CheckpointError, load_all, write_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EXT = "hdflash_dspark"


def export(cfg, drafter, dst, *, target_cfg, overwrite: bool = False) -> dict:
    """A DSpark drafter (its config and module) as DeepSpec's V4 layout at `dst`, atomically → a summary."""
    from flax import nnx

    from hdflash_jax.checkpoint import dotted
    from hdflash_jax.dspark.keymap import tree_to_dspark_names

    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(drafter)):
        path, v = dotted(path), np.asarray(var.get_value())
        names = tree_to_dspark_names(path, cfg.num_blocks, v.shape[0] if ".experts." in path else None)
        if len(names) > 1:
            tensors.update({n: np.ascontiguousarray(v[e]) for e, n in enumerate(names)})
        else:
            tensors[names[0]] = v
    conf = {"dim": target_cfg.dim, "hc_mult": target_cfg.hc_mult, "vocab_size": target_cfg.vocab_size,
            **cfg.to_checkpoint_dict(),
            EXT: {"n_blocks": cfg.n_blocks, "pooling": cfg.pooling, "confidence_head": cfg.confidence_head}}
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        write_safetensors(tmp / WEIGHTS_FILE, tensors)
        (tmp / CONFIG_FILE).write_text(json.dumps(conf, indent=1))
    return {"dst": str(Path(dst).resolve()), "tensors": len(tensors), **cfg.to_checkpoint_dict(),
            "pooling": cfg.pooling, "notes": []}


def is_dspark_folder(path) -> bool:
    from hdflash_jax.dspark.config import is_dspark_config

    f = Path(path) / CONFIG_FILE
    try:
        return f.is_file() and is_dspark_config(read_json(f))
    except (ValueError, AttributeError):
        return False


DSPARK_FOLDER = OutputKind("a DeepSpec DSpark folder (config.json with dspark_* keys)", is_dspark_folder)


def read_dspark(src, *, target_cfg):
    """A DeepSpec V4 DSpark folder → (DSparkConfig, {this project's dotted path: array}), strictly checked."""
    from flax import nnx

    from hdflash_jax.checkpoint import count_nonfinite
    from hdflash_jax.dspark.config import DSparkConfig
    from hdflash_jax.dspark.keymap import assemble_dspark
    from hdflash_jax.dspark.model import abstract_dspark

    if target_cfg is None:
        raise CheckpointError("--target: a DSpark drafter's shapes follow its target; pass --target CKPT|PRESET")
    src = Path(src)
    f = src / CONFIG_FILE
    conf = read_json(f)
    try:
        cfg = DSparkConfig.from_checkpoint_dict(conf, where=str(f))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    for key, want in (("dim", target_cfg.dim), ("hc_mult", target_cfg.hc_mult), ("vocab_size", target_cfg.vocab_size)):
        if key in conf and conf[key] != want:
            raise CheckpointError(f"{f}: {key} = {conf[key]!r}, the target has {want}")
    flat = load_all(src / WEIGHTS_FILE)
    ext = conf.get(EXT) if isinstance(conf.get(EXT), dict) else {}
    try:
        cfg = dataclasses.replace(cfg, n_blocks=ext.get("n_blocks"), pooling=ext.get("pooling", "mean"),
                                  confidence_head=ext.get("confidence_head",
                                                          any(".confidence_head." in k for k in flat)))
        cfg.check_target(target_cfg, where=str(f))
    except ValueError as e:
        raise CheckpointError(f"{f}: {e}") from None
    for k, v in flat.items():
        n = count_nonfinite(v)
        if n:
            raise CheckpointError(f"{src / WEIGHTS_FILE}: tensor {k!r} holds {n} non-finite values (NaN or Inf)")
    abstract = abstract_dspark(cfg, target_cfg)
    try:
        tree = assemble_dspark(flat, nnx.state(abstract), cfg.num_blocks, source=str(src / WEIGHTS_FILE))
    except (KeyError, ValueError) as e:
        raise CheckpointError(str(e.args[0] if isinstance(e, KeyError) else e)) from None
    leaves = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(abstract))}
    for path, v in tree.items():  # only exact widening: a bf16 file into an fp32 drafter, never narrowing
        want = np.dtype(leaves[path].dtype)
        if np.dtype(v.dtype).itemsize > want.itemsize:
            raise CheckpointError(f"{src / WEIGHTS_FILE}: parameter {path!r} is {v.dtype}, the drafter keeps {want}")
        tree[path] = v.astype(want)
    return cfg, tree
