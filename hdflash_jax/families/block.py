"""The block drafters as a family: HyperDFlash and vanilla DFlash are configurations of one `DrafterConfig`
(conditioning × reducer: the final pre-collapse streams through the inherited hc_head gate, or tapped layers
through a linear compressor, and the ablations between them). One non-causal pass drafts B − 1 tokens."""

from __future__ import annotations

import dataclasses

from hdflash_jax.config import DrafterConfig, get_drafter_preset
from hdflash_jax.families.registry import DrafterFamily, register, section_fields, training_section
from hdflash_jax.formats import SPECULATORS, ZLAB
from hdflash_jax.training.losses import LossConfig


@register
class BlockFamily(DrafterFamily):
    name = "block"
    what = "a block drafter (HyperDFlash / DFlash)"
    config_cls = DrafterConfig
    config_file = "drafter_config.json"
    loss_cls = LossConfig
    section_cls = training_section("block", DrafterConfig, LossConfig, preset=(str | None, None),
                                   init_from_target=(bool, True))
    formats = {"zlab": ZLAB, "speculators": SPECULATORS}

    def num_drafts(self, cfg: DrafterConfig, block_size: int | None) -> int:
        return (cfg.block_size if block_size is None else block_size) - 1  # [anchor, mask × (B − 1)]

    def adapter(self, cfg: DrafterConfig, num_drafts: int, temperature: float, top_p: float = 1.0):
        from hdflash_jax.decode.drafters import BlockDrafterAdapter, draft_sampling

        return BlockDrafterAdapter(cfg, num_drafts, **draft_sampling(temperature, top_p))

    def draft_step(self, graphdef):
        from hdflash_jax.drafter.model import make_draft_fn

        return make_draft_fn(graphdef, jit=False)

    def describe(self, cfg: DrafterConfig) -> str:
        extra = " + per-stream norm" if cfg.gate_path_norm else ""
        extra += f" + rank-{cfg.gate_residual_rank} residual" if cfg.gate_residual_rank else ""
        return f"{cfg.conditioning}/{cfg.reducer}{extra}"

    def describe_loss(self, loss: LossConfig) -> str:
        return "no KL" if not loss.uses_teacher else f"KL {loss.kl_alpha:g} × {loss.kl_slots} slots"

    def check_target(self, cfg: DrafterConfig, target_cfg, where: str) -> None:
        cfg.check_target(target_cfg, where=where)

    def config_for(self, target_cfg, section, mask_id: int | None = None) -> DrafterConfig:
        """A preset (`section.preset`) or `DrafterConfig.for_target`, with the fields the section sets."""
        fields = section_fields(section)
        cfg = (get_drafter_preset(section.preset, **fields) if section.preset
               else DrafterConfig.for_target(target_cfg, **fields))
        cfg.check_target(target_cfg, where="drafter config")
        if mask_id is not None and mask_id != cfg.mask_token_id:
            from hdflash_jax.distributed import log

            log(f"note: tokenizer mask_id {mask_id} != drafter mask_token_id {cfg.mask_token_id}; the drafter's "
                f"is used")
        return cfg

    def example_config(self, target_cfg) -> DrafterConfig:
        """One small draft layer (the tiny presets' shapes), HyperDFlash's design."""
        return DrafterConfig.for_target(target_cfg, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, inter_dim=64,
                                        block_size=4)

    def init(self, cfg: DrafterConfig, target, seed: int = 0, *, inherit: bool = True):
        """Random draft layers; with `inherit`, the gate from the target's hc_head and its final norm."""
        from hdflash_jax.drafter.model import init_drafter, init_drafter_from_target

        return init_drafter_from_target(target, cfg, seed) if inherit else init_drafter(cfg, seed)

    def abstract(self, cfg: DrafterConfig, target_cfg=None):
        from hdflash_jax.drafter.model import abstract_drafter

        return abstract_drafter(cfg)

    def loss_for(self, loss: LossConfig, cfg: DrafterConfig) -> LossConfig:
        """The loss at the drafter's block size (its slot checks need it): errors name `drafter.loss.<key>`."""
        from hdflash_jax.typed_config import ConfigError

        if loss.block_size not in (None, cfg.block_size):
            raise ConfigError(f"drafter.loss.block_size: {loss.block_size} differs from the drafter's "
                              f"{cfg.block_size}")
        try:
            return dataclasses.replace(loss, block_size=cfg.block_size)
        except ConfigError as e:
            raise ConfigError(f"drafter.loss.{e}") from None

    def train_step(self, parts, state, target_params, batch):
        from hdflash_jax.training.step import block_train_step

        return block_train_step(parts, state, target_params, batch)

    def draft_shape(self, cfg: DrafterConfig, target_cfg):
        from hdflash_jax.training.flops import DraftShape

        return DraftShape(cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.block_size)

    def offline_layout(self, cfg: DrafterConfig, loss: LossConfig, target_cfg) -> dict:
        from hdflash_jax.drafter.reducer import feature_shape

        out = {"features": (feature_shape(cfg), target_cfg.dtype)}
        if loss.uses_teacher:
            out["hidden"] = ((target_cfg.dim,), target_cfg.dtype)
        return out

    def teacher_slots(self, cfg: DrafterConfig, loss: LossConfig) -> int:
        return loss.kl_slots if loss.uses_teacher else 0  # slot j = 1..P reads a + j − 1

    def feature_fields(self, cfg: DrafterConfig) -> dict:
        return {"conditioning": cfg.conditioning, "target_layer_ids": cfg.layer_ids}

    def capture(self, cfg: DrafterConfig, loss: LossConfig, target, tokens) -> dict:
        from hdflash_jax.deepseek_v4.model import forward_full
        from hdflash_jax.drafter.reducer import features_from_target, target_return_layers
        from hdflash_jax.training.features import normed_hidden

        out = forward_full(target, tokens, return_layers=target_return_layers(cfg))
        arrays = {"features": features_from_target(cfg, out)}
        if loss.uses_teacher:
            arrays["hidden"] = normed_hidden(target, out.streams)
        return arrays
