"""DeepSeek's DSpark drafter as a family: V4 blocks at the target's width over the tapped layers' pooled streams
(mean, or the inherited hc_head gate: `pooling`), then a rank-r Markov head drafting sequentially. A block of B
slots [anchor, noise × (B − 1)] drafts B tokens (slot j the token j + 1 after the anchor)."""

from __future__ import annotations

from hdflash_jax.dspark.config import DSparkConfig
from hdflash_jax.families.registry import DrafterFamily, register, section_fields, training_section
from hdflash_jax.formats import DSPARK
from hdflash_jax.training.dspark_loss import DSparkLossConfig


@register
class DSparkFamily(DrafterFamily):
    name = "dspark"
    what = "a DSpark drafter"
    config_cls = DSparkConfig
    config_file = "dspark_config.json"
    loss_cls = DSparkLossConfig
    section_cls = training_section("dspark", DSparkConfig, DSparkLossConfig, init_from_target=(bool, True))
    formats = {"dspark": DSPARK}

    def num_drafts(self, cfg: DSparkConfig, block_size: int | None) -> int:
        return cfg.block_size if block_size is None else block_size - 1

    def adapter(self, cfg: DSparkConfig, num_drafts: int, temperature: float, top_p: float = 1.0):
        from hdflash_jax.decode.drafters import draft_sampling
        from hdflash_jax.decode.dspark_drafter import DSparkDrafterAdapter

        return DSparkDrafterAdapter(cfg, num_drafts, **draft_sampling(temperature, top_p))

    def describe(self, cfg: DSparkConfig) -> str:
        return f"dspark/{cfg.pooling or 'mean'}"

    def describe_loss(self, loss) -> str:
        return "TV+CE" if not loss.confidence_weight else "TV+CE+confidence"

    def check_target(self, cfg: DSparkConfig, target_cfg, where: str) -> None:
        cfg.check_target(target_cfg, where=where)

    def config_for(self, target_cfg, section, mask_id: int | None = None) -> DSparkConfig:
        """`DSparkConfig.for_target`: the noise token the tokenizer's mask id, the fields the section sets."""
        cfg = DSparkConfig.for_target(target_cfg, mask_id, **section_fields(section))
        cfg.check_target(target_cfg, where="drafter config")
        return cfg

    def example_config(self, target_cfg) -> DSparkConfig:
        """One block over the last two layers, a rank-8 Markov head, B = 3."""
        return DSparkConfig.for_target(target_cfg, target_layer_ids=(target_cfg.n_layers - 2, target_cfg.n_layers - 1),
                                       n_blocks=1, markov_rank=8, block_size=3)

    def init(self, cfg: DSparkConfig, target, seed: int = 0, *, inherit: bool = True):
        """Random blocks; with `inherit`, hc_head (and the gated pooling's gates) and the final norm copied."""
        from hdflash_jax.dspark.model import init_dspark, init_dspark_from_target

        return init_dspark_from_target(target, cfg, seed) if inherit else init_dspark(cfg, target.cfg, seed)

    def abstract(self, cfg: DSparkConfig, target_cfg):
        from hdflash_jax.dspark.model import abstract_dspark

        if target_cfg is None:
            raise ValueError("a DSpark drafter's shapes follow its target: pass the target's config")
        return abstract_dspark(cfg, target_cfg)

    def train_step(self, parts, state, target_params, batch):
        from hdflash_jax.training.step import dspark_train_step

        return dspark_train_step(parts, state, target_params, batch)

    def draft_shape(self, cfg: DSparkConfig, target_cfg):
        from hdflash_jax.training.flops import DraftShape

        return DraftShape(cfg.num_blocks, target_cfg.n_heads, target_cfg.head_dim, cfg.block_size)

    def offline_layout(self, cfg: DSparkConfig, loss, target_cfg) -> dict:
        # the tapped layers' streams unpooled: the gated pooling trains
        k, n, d = len(cfg.target_layer_ids), target_cfg.hc_mult, target_cfg.dim
        return {"features": ((k, n, d), target_cfg.dtype), "hidden": ((d,), target_cfg.dtype)}

    def teacher_slots(self, cfg: DSparkConfig, loss) -> int:
        return cfg.block_size  # slot j = 0..B−1 reads a + j

    def feature_fields(self, cfg: DSparkConfig) -> dict:
        return {"target_layer_ids": cfg.target_layer_ids}

    def capture(self, cfg: DSparkConfig, loss, target, tokens) -> dict:
        import jax.numpy as jnp

        from hdflash_jax.deepseek_v4.model import forward_full
        from hdflash_jax.training.features import normed_hidden

        out = forward_full(target, tokens, return_layers=tuple(cfg.target_layer_ids))
        return {"features": jnp.stack(out.layer_streams, axis=2), "hidden": normed_hidden(target, out.streams)}
