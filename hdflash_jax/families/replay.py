"""The replay ceiling as a family: a known continuation (AR's own greedy answer) proposed at no cost, so τ is the
block size and the speedup is what the verify step alone allows."""

from __future__ import annotations

import dataclasses

from hdflash_jax.families.registry import DrafterFamily, register


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    drafts: int = 7  # per step without --block-size: B = 8, the built-in block drafters' block


@register
class ReplayFamily(DrafterFamily):
    name = "replay"
    what = "the replay ceiling"
    config_cls = ReplayConfig
    replays_reference = True

    def example_config(self, target_cfg) -> ReplayConfig:
        return ReplayConfig()

    def describe(self, cfg: ReplayConfig) -> str:
        return "AR's greedy output replayed (the verify step's ceiling)"

    def num_drafts(self, cfg: ReplayConfig, block_size: int | None) -> int:
        return cfg.drafts if block_size is None else block_size - 1

    def adapter(self, cfg, num_drafts: int, temperature: float, top_p: float = 1.0):
        from hdflash_jax.decode.drafters import ReplayDrafter

        return ReplayDrafter(num_drafts)

    def decode_modules(self, cfg):
        """A placeholder reference (one token): the caller sets each batch's with `Generator.set_drafter_modules`."""
        import numpy as np

        from hdflash_jax.decode.drafters import ReplayTokens

        return ReplayTokens(np.zeros((1, 1), np.int32))
