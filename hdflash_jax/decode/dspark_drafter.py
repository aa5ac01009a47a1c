"""DSpark behind the decoder's `Drafter` protocol: one parallel block pass, then the Markov head drafts sequentially.

The drafter's state is its context ring (keys of committed positions only; `observe` appends what a verify step
committed), so rollback needs nothing: rejected positions never enter it. `propose` drafts B tokens for a block of
B slots [anchor, noise...] (verify width B + 1), greedy or sampled: with sampling, draft j is drawn from
softmax((base_j + Markov bias(d_{j-1})) / T), cut to the run's top-p nucleus, and that distribution goes to the
rejection sampler, which makes the output exactly the target's distribution (each draft's proposal is conditioned
on the drafts before it).
`propose_with_confidence` adds the confidence head's estimate per draft, for DSpark's verify schedule
(`DecodeSettings.confidence_schedule`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from hdflash_jax import row_keys
from hdflash_jax.config import TargetConfig
from hdflash_jax.decode.drafters import choose_drafts
from hdflash_jax.decode.verify import check_block_size
from hdflash_jax.dspark.config import DSparkConfig
from hdflash_jax.dspark.model import draft_hidden, extend_dspark_cache, init_dspark_cache, markov_draft


@dataclasses.dataclass(frozen=True)
class DSparkDrafterAdapter:
    cfg: DSparkConfig
    num_drafts: int  # = the block's slots B (slot j drafts the token j + 1 after the anchor)
    sampled: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    @property
    def return_layers(self) -> tuple[int, ...]:
        return self.cfg.target_layer_ids

    def check_target(self, tcfg: TargetConfig) -> None:
        self.cfg.check_target(tcfg)
        check_block_size(self.num_drafts + 1, where="block size")

    def init_state(self, target, modules, batch, max_len):
        return {"cache": init_dspark_cache(modules, batch)}

    def observe(self, target, modules, state, out, n_valid, next_tokens):
        feats = modules.pool(out.layer_streams)
        return {"cache": extend_dspark_cache(modules, feats, n_valid, state["cache"])}

    @property
    def confidence_head(self) -> bool:
        """Whether the drafter estimates its drafts' acceptance (a verify schedule can use it)."""
        return self.cfg.confidence_head

    def propose(self, target, modules, state, anchor, position, key):
        drafts, probs, _, state = self._draft(target, modules, state, anchor, key)
        return drafts, probs, state

    def propose_with_confidence(self, target, modules, state, anchor, position, key):
        """`propose` and each draft's confidence c_j = P(draft j accepted | drafts before it accepted) [B, K] from
        the confidence head on the drafted tokens (`DSparkDrafter.confidence`): what DSpark's schedule reads."""
        drafts, probs, x, state = self._draft(target, modules, state, anchor, key)
        prev = jnp.concatenate([jnp.asarray(anchor, jnp.int32)[:, None], drafts[:, :-1]], axis=1)
        return drafts, probs, modules.confidence(x, prev), state

    def _draft(self, target, modules, state, anchor, key):
        x = draft_hidden(modules, target.embed_tokens, anchor, state["cache"], self.num_drafts)
        base = modules.base_logits(target.head_logits, x)
        keys = row_keys.split(key, self.num_drafts)
        tokens, _, probs = markov_draft(modules, base, anchor,
                                        lambda l, k: choose_drafts(l, k, self.sampled, self.temperature,
                                                                   self.top_p), keys)
        return tokens.astype(jnp.int32), probs, x, state
