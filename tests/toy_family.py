"""A toy drafter family written by following docs/adding_a_drafter_family.md step by step: a bigram table that
drafts by chaining its own argmax from the anchor. One module and one `@register`; tests/test_families.py then
runs it through every per-family check (checkpoint round trip, greedy = AR) with no other edit anywhere."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from hdflash_jax.families import DrafterFamily, register


# step 1: the config (a frozen dataclass with to_dict / from_dict: what the checkpoint's config file holds)
@dataclasses.dataclass(frozen=True)
class BigramConfig:
    vocab_size: int
    depth: int = 3  # drafts per step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BigramConfig":
        return cls(**d)


# step 2: the module (its nnx.Params are what the checkpoint's params/ holds)
class Bigram(nnx.Module):
    def __init__(self, cfg: BigramConfig, rngs: nnx.Rngs):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.vocab_size)))


# step 3: the decode adapter (hdflash_jax.decode.generate.Drafter)
@dataclasses.dataclass(frozen=True)
class BigramDrafter:
    num_drafts: int
    return_layers: tuple[int, ...] = ()
    sampled: bool = False

    def init_state(self, target, modules, batch, max_len):
        return ()

    def observe(self, target, modules, state, out, n_valid, next_tokens):
        return state

    def propose(self, target, modules, state, anchor, position, key):
        def step(tok, _):
            nxt = jnp.argmax(modules.table[...][tok], axis=-1).astype(jnp.int32)
            return nxt, nxt

        _, drafts = jax.lax.scan(step, anchor.astype(jnp.int32), None, length=self.num_drafts)
        return drafts.T, None, state


# step 4: the family, registered
@register
class BigramFamily(DrafterFamily):
    name = "toy-bigram"
    what = "a toy bigram drafter"
    config_cls = BigramConfig
    config_file = "bigram_config.json"

    def num_drafts(self, cfg: BigramConfig, block_size: int | None) -> int:
        return cfg.depth if block_size is None else block_size - 1

    def adapter(self, cfg: BigramConfig, num_drafts: int, temperature: float, top_p: float = 1.0):
        # point masses (argmax chains) at every temperature: top_p has nothing to cut
        return BigramDrafter(num_drafts)

    def check_target(self, cfg: BigramConfig, target_cfg, where: str) -> None:
        if cfg.vocab_size != target_cfg.vocab_size:
            raise ValueError(f"{where}: vocab_size {cfg.vocab_size}, the target has {target_cfg.vocab_size}")

    def init(self, cfg: BigramConfig, target, seed: int = 0, *, inherit: bool = True):
        return Bigram(cfg, nnx.Rngs(seed))

    def abstract(self, cfg: BigramConfig, target_cfg=None):
        return nnx.eval_shape(lambda: Bigram(cfg, nnx.Rngs(0)))

    def example_config(self, target_cfg) -> BigramConfig:
        return BigramConfig(target_cfg.vocab_size)
