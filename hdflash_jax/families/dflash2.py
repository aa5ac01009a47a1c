"""DFlash 2 as a family: the block drafter (any conditioning × reducer) with DFlash 2's grouped dynamic causal
convolutions and candidate selector (`hdflash_jax.drafter.dflash2`). `dflash2` (tapped layers + linear compressor)
and `hyperdflash2` (the final pre-collapse streams through the inherited hc_head gate) are two configurations of
it. Everything the two parts do not change — features, draft cache, what a block size means, offline capture — is
the block family's."""

from __future__ import annotations

from hdflash_jax.drafter.dflash2 import DFlash2Config
from hdflash_jax.families.block import BlockFamily
from hdflash_jax.families.registry import register, section_fields, training_section
from hdflash_jax.formats import SPECULATORS_DFLASH2
from hdflash_jax.training.dflash2_loss import DFlash2LossConfig


@register
class DFlash2Family(BlockFamily):
    name = "dflash2"
    what = "a DFlash 2 drafter"
    config_cls = DFlash2Config
    config_file = "dflash2_config.json"
    loss_cls = DFlash2LossConfig
    section_cls = training_section("dflash2", DFlash2Config, DFlash2LossConfig, init_from_target=(bool, True))
    formats = {"speculators": SPECULATORS_DFLASH2}

    def adapter(self, cfg: DFlash2Config, num_drafts: int, temperature: float, top_p: float = 1.0):
        from hdflash_jax.decode.drafters import DFlash2DrafterAdapter, draft_sampling

        return DFlash2DrafterAdapter(cfg, num_drafts, **draft_sampling(temperature, top_p))

    def draft_step(self, graphdef):
        from hdflash_jax.drafter.dflash2 import make_dflash2_draft_fn

        return make_dflash2_draft_fn(graphdef, jit=False)

    def describe(self, cfg) -> str:
        def field(name):  # a section's unset field (None) reads as the config's default
            v = getattr(cfg, name)
            return getattr(DFlash2Config, name) if v is None else v

        return (f"{super().describe(cfg)} + conv{field('conv_kernel_size')} + selector r{field('selector_rank')} "
                f"top-{field('selector_top_k')}")

    def describe_loss(self, loss: DFlash2LossConfig) -> str:
        return f"{super().describe_loss(loss)} + selector {loss.selector_alpha:g}"

    def config_for(self, target_cfg, section, mask_id: int | None = None) -> DFlash2Config:
        cfg = DFlash2Config.for_target(target_cfg, **section_fields(section))
        cfg.check_target(target_cfg, where="drafter config")
        return cfg

    def example_config(self, target_cfg) -> DFlash2Config:
        """The block family's example with a 2-tap convolution (groups of 8) and a rank-8, top-4 selector."""
        return DFlash2Config.for_target(target_cfg, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, inter_dim=64,
                                        block_size=4, conv_group_size=8, selector_rank=8, selector_top_k=4)

    def init(self, cfg: DFlash2Config, target, seed: int = 0, *, inherit: bool = True):
        from hdflash_jax.drafter.dflash2 import DFlash2Drafter
        from hdflash_jax.drafter.model import init_drafter, init_drafter_from_target

        return (init_drafter_from_target(target, cfg, seed, cls=DFlash2Drafter) if inherit
                else init_drafter(cfg, seed, DFlash2Drafter))

    def abstract(self, cfg: DFlash2Config, target_cfg=None):
        from hdflash_jax.drafter.dflash2 import DFlash2Drafter
        from hdflash_jax.drafter.model import abstract_drafter

        return abstract_drafter(cfg, DFlash2Drafter)

    def train_step(self, parts, state, target_params, batch):
        from hdflash_jax.training.step import block_train_step

        return block_train_step(parts, state, target_params, batch, selector=True)
