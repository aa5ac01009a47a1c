"""`DSparkConfig`: the drafter's own hyper-parameters, read from the `dspark_*` keys of a V4 config.json.

Everything else (width, heads, experts' inner size, mHC, norms, dtypes) is the target's: a DSpark drafter is built
for one target and checked against it (`check_target`). Values of the wrong type are refused naming the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hdflash_jax.config import TargetConfig
from hdflash_jax.config_hf import typed

POOLINGS = ("mean", "gated")

# checkpoint key -> (DSparkConfig field, kind); the first four are required in a DSpark checkpoint
CHECKPOINT_KEYS = {
    "dspark_block_size": ("block_size", "int"),
    "dspark_noise_token_id": ("noise_token_id", "int"),
    "dspark_target_layer_ids": ("target_layer_ids", "tuple[int, ...]"),
    "dspark_markov_rank": ("markov_rank", "int"),
    "dspark_n_routed_experts": ("n_routed_experts", "int"),
    "dspark_num_experts_per_tok": ("n_activated_experts", "int"),
}
REQUIRED_KEYS = ("dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank")


@dataclasses.dataclass(frozen=True)
class DSparkConfig:
    block_size: int = 5  # drafts per step: slot j of [anchor, noise x (B-1)] predicts the token j + 1 after it
    noise_token_id: int = 128799
    target_layer_ids: tuple[int, ...] = (40, 41, 42)  # 0-based decoder layers whose output streams are tapped
    markov_rank: int = 256
    n_routed_experts: int | None = None  # None: the target's
    n_activated_experts: int | None = None  # None: the target's
    n_blocks: int | None = None  # None: one block per tapped layer (as every released checkpoint has)
    pooling: str = "mean"  # "mean" over each tapped layer's hc_mult streams; "gated": the target's hc_head gate
    confidence_head: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            typed(f.name, getattr(self, f.name), f.type)
        object.__setattr__(self, "target_layer_ids", tuple(int(i) for i in self.target_layer_ids))

        def bad(field, why):
            raise ValueError(f"DSparkConfig.{field}: {why}")

        if self.block_size < 1:
            bad("block_size", f"must be >= 1, got {self.block_size}")
        if self.markov_rank < 1:
            bad("markov_rank", f"must be >= 1 (the V4 drafter always has a Markov head), got {self.markov_rank}")
        ids = self.target_layer_ids
        if not ids:
            bad("target_layer_ids", "must not be empty")
        if any(b <= a for a, b in zip(ids, ids[1:])) or min(ids) < 0:
            bad("target_layer_ids", f"must be non-negative and strictly increasing, got {list(ids)}")
        if self.n_blocks is not None and self.n_blocks < 1:
            bad("n_blocks", f"must be >= 1, got {self.n_blocks}")
        if self.pooling not in POOLINGS:
            bad("pooling", f"unknown {self.pooling!r}; one of {POOLINGS}")
        for f in ("n_routed_experts", "n_activated_experts"):
            v = getattr(self, f)
            if v is not None and v < 1:
                bad(f, f"must be >= 1, got {v}")

    @property
    def num_blocks(self) -> int:
        return self.n_blocks if self.n_blocks is not None else len(self.target_layer_ids)

    @classmethod
    def for_target(cls, tcfg: TargetConfig, noise_token_id: int | None = None, **overrides) -> "DSparkConfig":
        """The V4 realization scaled to a target: the last three layers tapped (V4-Flash: 40, 41, 42 of 43), one
        block per tapped layer, the noise token the drafters' mask id (default: the last id of the vocabulary),
        the Markov rank dim / 16 (V4-Flash: 256 of 4096) but at least 8; `overrides` are fields."""
        k = min(3, tcfg.n_layers)
        base = dict(target_layer_ids=tuple(range(tcfg.n_layers - k, tcfg.n_layers)),
                    noise_token_id=tcfg.vocab_size - 1 if noise_token_id is None else noise_token_id,
                    markov_rank=max(8, tcfg.dim // 16))
        return cls(**{**base, **overrides})

    def replace(self, **changes) -> "DSparkConfig":
        return dataclasses.replace(self, **changes)

    def block_config(self, tcfg: TargetConfig) -> TargetConfig:
        """The target config the drafter's blocks are built from (its own expert counts, sliding window only)."""
        e = self.n_routed_experts or tcfg.n_routed_experts
        k = self.n_activated_experts or tcfg.n_activated_experts
        if k > e:
            raise ValueError(f"dspark_num_experts_per_tok={k} exceeds dspark_n_routed_experts={e}")
        return tcfg.replace(n_routed_experts=e, n_activated_experts=k, n_hash_layers=0)

    def check_target(self, tcfg: TargetConfig, where: str = "DSpark drafter") -> None:
        """The one DSpark ↔ target compatibility rule (tapped layers inside the target, ids inside its vocabulary)."""
        if max(self.target_layer_ids) >= tcfg.n_layers:
            raise ValueError(f"{where}: dspark_target_layer_ids {list(self.target_layer_ids)} reach past the "
                             f"target's {tcfg.n_layers} layers")
        if not 0 <= self.noise_token_id < tcfg.vocab_size:
            raise ValueError(f"{where}: dspark_noise_token_id {self.noise_token_id} is outside the target's "
                             f"vocabulary of {tcfg.vocab_size}")
        self.block_config(tcfg)

    # ---- file formats ------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint_dict(cls, d: dict[str, Any], where: str = "config") -> "DSparkConfig":
        """The `dspark_*` keys of a V4 config.json (top level, or under `text_config` as V4.1 nests them)."""
        src = d
        if not any(k in d for k in REQUIRED_KEYS) and isinstance(d.get("text_config"), dict):
            src = d["text_config"]
        missing = [k for k in REQUIRED_KEYS if k not in src]
        if missing:
            raise ValueError(f"{where}: not a DSpark config: missing {', '.join(repr(k) for k in missing)}")
        kw = {}
        for key, (field, kind) in CHECKPOINT_KEYS.items():
            if key in src and src[key] is not None:
                kw[field] = typed(key, src[key], kind)
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_checkpoint_dict(self) -> dict[str, Any]:
        d = {"dspark_block_size": self.block_size, "dspark_noise_token_id": self.noise_token_id,
             "dspark_target_layer_ids": list(self.target_layer_ids), "dspark_markov_rank": self.markov_rank}
        if self.n_routed_experts is not None:
            d["dspark_n_routed_experts"] = self.n_routed_experts
        if self.n_activated_experts is not None:
            d["dspark_num_experts_per_tok"] = self.n_activated_experts
        return d

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_layer_ids"] = list(self.target_layer_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DSparkConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DSparkConfig field(s) {unknown}")
        return cls(**d)


def is_dspark_config(d: dict[str, Any]) -> bool:
    """Whether a config.json declares a DSpark drafter (any `dspark_*` key, top level or under text_config)."""
    srcs = [d] + ([d["text_config"]] if isinstance(d.get("text_config"), dict) else [])
    return any(k.startswith("dspark_") for s in srcs for k in s)
