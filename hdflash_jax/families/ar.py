"""Autoregressive decoding as a family: no drafts, every step verifies the anchor alone (the baseline)."""

from __future__ import annotations

from hdflash_jax.families.registry import DrafterFamily, register


@register
class ARFamily(DrafterFamily):
    name = "ar"
    what = "autoregressive decoding"

    def describe(self, cfg) -> str:
        return "autoregressive"

    def num_drafts(self, cfg, block_size: int | None) -> int:
        return 0

    def adapter(self, cfg, num_drafts: int, temperature: float, top_p: float = 1.0):
        from hdflash_jax.decode.drafters import NoDrafter

        return NoDrafter()
