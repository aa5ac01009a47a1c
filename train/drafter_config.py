"""The drafter trainer's config (`python -m train.drafter --config FILE`): sections and defaults.

Loaded with `train.config.load(DrafterRunConfig, path, overrides)`; `load_config` is that call. The YAML files in
`train/configs/` are examples.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from hdflash_jax.config import DrafterConfig, TargetConfig
from train.config import CheckpointConfig, LogConfig, OptimConfig, check, check_fields_of, load
from train.dspark_loss import DSparkLossConfig


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


DRAFTER_KINDS = ("block", "dspark")


@dataclasses.dataclass(frozen=True)
class DrafterSection:
    """`kind` "block" (HyperDFlash / vanilla DFlash): a drafter preset, or None: `DrafterConfig.for_target(target,
    **overrides)`; `init_from_target` copies the target's hc_head into the gate and its final norm. `kind` "dspark":
    `DSparkConfig.for_target(target, mask_id, **overrides)` (DSparkConfig fields; no presets), trained with the
    `dspark_loss` section; `init_from_target` copies hc_head (and the gated pooling's gates) and the final norm."""
    kind: str = "block"
    preset: str | None = None
    overrides: dict = dataclasses.field(default_factory=dict)
    init_from_target: bool = True

    def __post_init__(self):
        from hdflash_jax.dspark.config import DSparkConfig

        check(self.kind in DRAFTER_KINDS, "kind", f"must be one of {', '.join(DRAFTER_KINDS)}; got {self.kind!r}")
        check(self.kind == "block" or self.preset is None, "preset", "DSpark drafters have no presets")
        fields_of = DSparkConfig if self.kind == "dspark" else DrafterConfig
        object.__setattr__(self, "overrides", check_fields_of(self.overrides, fields_of, "overrides"))


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
    """`steps` None: `epochs` × (records // global_batch); `block_size` None: the drafter config's."""
    global_batch: int = 8
    steps: int | None = None
    epochs: int = 1
    block_size: int | None = None
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
        check(self.block_size is None or self.block_size >= 2, "block_size", f"must be >= 2, got {self.block_size}")


@dataclasses.dataclass(frozen=True)
class LossSection:
    """train.losses.LossConfig's knobs; `gamma` None: the block size's default."""
    gamma: float | None = None
    kl_alpha: float = 0.1
    kl_slots: int = 2
    kl_temperature: float = 1.0
    vocab_chunk: int = 8192  # vocabulary rows per chunk of the loss (no [b, N, B, V] logits); 0: full logits
    kind: str = "decayed_ce_kl"  # the loss function (train.losses.LOSS_FUNCTIONS)

    def __post_init__(self):
        check(self.vocab_chunk >= 0, "vocab_chunk", f"must be >= 0, got {self.vocab_chunk}")
        check(self.gamma is None or self.gamma > 0, "gamma", f"must be > 0, got {self.gamma}")
        check(self.kl_alpha >= 0, "kl_alpha", f"must be >= 0, got {self.kl_alpha}")
        check(self.kl_slots >= 0, "kl_slots", f"must be >= 0, got {self.kl_slots}")
        check(self.kl_temperature > 0, "kl_temperature", f"must be > 0, got {self.kl_temperature}")


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
    drafter: DrafterSection = DrafterSection()
    data: DrafterData = DrafterData()
    train: DrafterTrain = DrafterTrain()
    loss: LossSection = LossSection()  # the block drafters' loss
    dspark_loss: DSparkLossConfig = DSparkLossConfig()  # drafter.kind "dspark": DeepSpec's loss
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalSection = EvalSection()
    log: LogConfig = LogConfig()
    export_drafter: bool = True  # write <out_dir>/drafter (a drafter checkpoint) at the end
    debug: DebugSection = DebugSection()

    def __post_init__(self):
        check(not (self.eval.every and not self.data.eval), "eval.every",
              "> 0 needs data.eval (a JSONL of held-out prompts)")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                data: dict[str, Any] | None = None) -> DrafterRunConfig:
    """Defaults ← the YAML/JSON file (or `data`) ← each 'key=value' override."""
    return load(DrafterRunConfig, path, overrides, data)
