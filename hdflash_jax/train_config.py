"""Training configs, typed: the sections both trainers share (`OptimConfig` from `training.optim`,
`CheckpointConfig`, `LogConfig`) and
the drafter trainer's whole config (`DrafterRunConfig`, `python -m train.drafter --config FILE`).

Loaded with `hdflash_jax.typed_config.load(DrafterRunConfig, path, overrides)`; `load_config` is that call. The
`drafter:` section is a tagged union: `kind` names the drafter family (`hdflash_jax.families`), whose section class
takes any field of the family's config (null: the target's or the preset's) and the family's own loss config as
`loss`. The YAML files in `train/configs/` are examples.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Annotated, Any

from hdflash_jax.config import TargetConfig
from hdflash_jax.families import families, family
from hdflash_jax.training.optim import OptimConfig  # noqa: F401 — a section of both trainers' configs
from hdflash_jax.typed_config import TaggedUnion, check, check_fields_of, load

# ---- shared sections -----------------------------------------------------------------------------------------

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


# ---- the drafter trainer -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TargetSection:
    """A preset with random weights from `seed` (optionally a sharpened LM head), or a params checkpoint folder
    (`hdflash_jax.checkpoint`), which wins over the preset. `overrides`: TargetConfig fields."""
    preset: str = "tiny"
    seed: int = 0
    overrides: dict = dataclasses.field(default_factory=dict)
    head_scale: float = 1.0  # preset only: multiply the random LM head (sharper, more learnable toy targets)
    checkpoint: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "overrides", check_fields_of(self.overrides, TargetConfig, "overrides"))


def _drafter_sections() -> dict[str, type]:
    return {f.name: f.section_cls for f in families() if f.section_cls is not None}


def _default_drafter():
    return family("block").section_cls()


DrafterSection = Annotated[Any, TaggedUnion("kind", _drafter_sections)]


@dataclasses.dataclass(frozen=True)
class DrafterData:
    """`train`: JSONL of records (see train/data.py); `eval`: JSONL of held-out prompts for τ (prompt / messages /
    prompt_ids)."""
    train: str | None = None
    eval: str | None = None
    tokenizer: str = "byte"
    max_len: int = 512
    num_anchors: int = 64
    shuffle_seed: int = 0
    prefetch: int = 2

    def __post_init__(self):
        check(self.max_len >= 2, "max_len", f"must be >= 2, got {self.max_len}")
        check(self.num_anchors >= 1, "num_anchors", f"must be >= 1, got {self.num_anchors}")
        check(self.prefetch >= 0, "prefetch", f"must be >= 0, got {self.prefetch}")


@dataclasses.dataclass(frozen=True)
class DrafterTrain:
    """`steps` None: `epochs` × (records // global_batch). The block size is the drafter's (`drafter.block_size`)."""
    global_batch: int = 8
    steps: int | None = None
    epochs: int = 1
    attention: str = "block_sparse"  # the training attention: "block_sparse" or "dense" (the reference)
    attention_q_blocks: int = 64  # block_sparse: blocks per query chunk
    attention_k_chunk: int = 512  # block_sparse: context keys per key chunk
    remat: str = "none"  # per draft layer: "none", "nothing", "dots", "attention" (drafter.training)
    master_dtype: str = "float32"  # the trained copy of the drafter's params and Adam's moments

    def __post_init__(self):
        check(self.attention in ("block_sparse", "dense"), "attention",
              f"must be 'block_sparse' or 'dense', got {self.attention!r}")
        check(self.remat in ("none", "nothing", "dots", "attention"), "remat",
              f"must be one of none, nothing, dots, attention; got {self.remat!r}")
        check(self.attention_q_blocks >= 1 and self.attention_k_chunk >= 1, "attention_q_blocks",
              "attention_q_blocks and attention_k_chunk must be >= 1")
        check(self.master_dtype in ("float32", "bfloat16"), "master_dtype",
              f"must be float32 or bfloat16, got {self.master_dtype!r}")
        check(self.global_batch >= 1, "global_batch", f"must be >= 1, got {self.global_batch}")
        check(self.steps is None or self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")

    def attention_options(self):
        """The training attention of the step (`drafter.training.TrainAttention`), checked."""
        from hdflash_jax.drafter.training import TrainAttention

        attention = TrainAttention(impl=self.attention, q_blocks=self.attention_q_blocks,
                                   k_chunk=self.attention_k_chunk, remat=self.remat)
        attention.check()
        return attention


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Held-out τ every `every` steps (0: never) and at the start, through the real speculative decoder."""
    every: int = 0
    at_start: bool = True
    num_prompts: int = 16
    batch_size: int = 16
    max_new_tokens: int = 64
    temperature: float = 0.0

    def __post_init__(self):
        check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        for f in ("num_prompts", "batch_size", "max_new_tokens"):
            check(getattr(self, f) >= 1, f, f"must be >= 1, got {getattr(self, f)}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class FeaturesSection:
    """Where the drafter's conditioning features come from: `online` (the frozen target runs inside every step) or
    `offline` (read from `dir`, written once by `python -m train.drafter --capture-features`, which runs the target
    over data.train in rows of `capture_batch` and writes `shard_records` records per shard file)."""
    mode: str = "online"
    dir: str | None = None
    capture_batch: int = 8
    shard_records: int = 256

    def __post_init__(self):
        check(self.mode in ("online", "offline"), "mode", f"must be 'online' or 'offline', got {self.mode!r}")
        check(self.capture_batch >= 1, "capture_batch", f"must be >= 1, got {self.capture_batch}")
        check(self.shard_records >= 1, "shard_records", f"must be >= 1, got {self.shard_records}")
        check(self.mode == "online" or bool(self.dir), "dir", "required with features.mode offline")


@dataclasses.dataclass(frozen=True)
class DebugSection:
    step_sleep: float = 0.0  # seconds to sleep after each step (tests kill a run mid-way)


@dataclasses.dataclass(frozen=True)
class DrafterRunConfig:
    out_dir: str = "runs/drafter"
    seed: int = 0  # drafter init and the RNG carried in the train state
    resume: bool = True  # continue from the latest checkpoint in out_dir/checkpoints when there is one
    mesh: str | dict | None = None  # "data=2,fsdp=2,tensor=2" or {axis: size}; None: data = every device
    compilation_cache: str | None = None  # a folder for JAX's persistent compilation cache
    target: TargetSection = TargetSection()
    drafter: DrafterSection = _default_drafter()  # a tagged union: one section class per drafter family
    data: DrafterData = DrafterData()
    train: DrafterTrain = DrafterTrain()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalSection = EvalSection()
    log: LogConfig = LogConfig()
    export_drafter: bool = True  # write <out_dir>/drafter (a drafter checkpoint) at the end
    features: FeaturesSection = FeaturesSection()
    debug: DebugSection = DebugSection()

    def __post_init__(self):
        check(not (self.eval.every and not self.data.eval), "eval.every",
              "> 0 needs data.eval (a JSONL of held-out prompts)")
        # held-out τ runs the speculative decoder, whose target an offline run does not hold
        for key in ("every", "at_start"):
            check(not (self.features.mode == "offline" and self.data.eval and getattr(self.eval, key)),
                  f"eval.{key}", "needs the target's layers, which an offline-features run does not build; set "
                  "eval.every: 0 and eval.at_start: false (or evaluate the exported drafter with eval.run)")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                data: dict[str, Any] | None = None) -> DrafterRunConfig:
    """Defaults ← the YAML/JSON file (or `data`) ← each 'key=value' override."""
    return load(DrafterRunConfig, path, overrides, data)
