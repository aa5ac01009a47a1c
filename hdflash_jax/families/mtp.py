"""DeepSeek's native MTP block as a family: the target's own MTP layer chained `depth` times on its own streams."""

from __future__ import annotations

import dataclasses

from hdflash_jax.families.registry import DrafterFamily, register


@dataclasses.dataclass(frozen=True)
class MTPConfig:
    depth: int = 1  # drafts per step: the MTP layer chained this many times


@register
class MTPFamily(DrafterFamily):
    name = "mtp"
    what = "the target's MTP layer"
    config_cls = MTPConfig

    def example_config(self, target_cfg) -> MTPConfig:
        return MTPConfig(depth=2)

    def num_drafts(self, cfg: MTPConfig, block_size: int | None) -> int:
        return cfg.depth  # a chain of `depth` MTP steps, whatever the verify width of the block drafters

    def adapter(self, cfg, num_drafts: int, temperature: float, top_p: float = 1.0):
        from hdflash_jax.decode.drafters import MTPDrafter, draft_sampling

        return MTPDrafter(num_drafts, **draft_sampling(temperature, top_p))

    def describe(self, cfg: MTPConfig) -> str:
        return f"the target's MTP layer chained {cfg.depth}x"

    def check_target(self, cfg, target_cfg, where: str) -> None:
        if target_cfg.n_mtp_layers < 1:
            raise ValueError(f"{where}: the target has no MTP layer (n_mtp_layers = 0)")
