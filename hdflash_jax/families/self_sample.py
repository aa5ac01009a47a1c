"""The self-sample ceiling as a family: the target's own sample at the run's temperature and top-p, K tokens ahead
on the committed context, proposed as point masses (`decode.drafters.TargetSampleDrafter`). Each draft is an
independent sample of the target, accepted with probability p(d), so its τ is what the target's entropy alone
allows a drafter that proposes tokens: the T > 0 counterpart of the replay ceiling. At T = 0 it proposes the
target's greedy continuation (every draft accepted). It runs the target K times a step: its τ means something,
its speed not."""

from __future__ import annotations

import dataclasses

from hdflash_jax.families.registry import DrafterFamily, register


@dataclasses.dataclass(frozen=True)
class SelfSampleConfig:
    drafts: int = 7  # per step without --block-size: B = 8, the built-in block drafters' block


@register
class SelfSampleFamily(DrafterFamily):
    name = "self-sample"
    what = "the self-sample ceiling"
    config_cls = SelfSampleConfig

    def example_config(self, target_cfg) -> SelfSampleConfig:
        return SelfSampleConfig()

    def describe(self, cfg: SelfSampleConfig) -> str:
        return "the target's own sample as point-mass drafts (the entropy ceiling)"

    def num_drafts(self, cfg: SelfSampleConfig, block_size: int | None) -> int:
        return cfg.drafts if block_size is None else block_size - 1

    def adapter(self, cfg, num_drafts: int, temperature: float, top_p: float = 1.0):
        from hdflash_jax.decode.drafters import TargetSampleDrafter

        return TargetSampleDrafter(num_drafts, temperature=temperature, top_p=top_p)
