"""The drafters the decoder drives, all behind one protocol (`generate.Drafter`).

* `NoDrafter` — autoregressive decoding (K = 0).
* `ReplayDrafter` — proposes a known continuation at no cost: the oracle of the tests (τ = block size) and the
  ceiling of the benchmarks.
* `MTPDrafter` — DeepSeek's native MTP block chained k times on its own streams.
* `BlockDrafterAdapter` — the block drafters (HyperDFlash and vanilla DFlash: `hdflash_jax.drafter`), one pass a
  block; `DFlash2DrafterAdapter` — the same pass, then DFlash 2's selector chooses each slot's token in turn.
* `TargetSampleDrafter` — the target itself sampled K tokens ahead on the committed context: what the target's own
  distribution allows a drafter (the self-sample ceiling at T > 0; a strong sampled drafter for the tests).

Which adapter a drafter gets, and with how many drafts, is its family's to say (`hdflash_jax.families`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hdflash_jax import row_keys
from hdflash_jax.config import DrafterConfig, TargetConfig
from hdflash_jax.drafter.cache import constrain_draft_cache, draft_cache_shardings
from hdflash_jax.drafter.dflash2 import propose_dflash2
from hdflash_jax.drafter.model import draft_block, extend_draft_cache, init_draft_cache
from hdflash_jax.drafter.reducer import features_from_target, target_return_layers
from hdflash_jax.deepseek_v4.cache import init_cache, set_committed_length
from hdflash_jax.decode.verify import check_block_size, target_probs


class _Stateless:
    """For drafters that learn nothing from the target's output: no state, nothing to observe."""

    def init_state(self, target, modules, batch, max_len):
        return ()

    def observe(self, target, modules, state, out, n_valid, next_tokens):
        return state


@dataclasses.dataclass(frozen=True)
class NoDrafter(_Stateless):
    """Autoregressive decoding: no drafts, every step verifies the anchor alone."""
    num_drafts: int = 0
    return_layers: tuple[int, ...] = ()
    sampled: bool = False

    def propose(self, target, modules, state, anchor, position, key):
        return jnp.zeros((anchor.shape[0], 0), jnp.int32), None, state


@dataclasses.dataclass(frozen=True)
class ReplayDrafter(_Stateless):
    """Proposes a known continuation at no cost (an oracle when it is the target's own greedy output).

    `reference` [N, L] holds each queue entry's full sequence (prompt + continuation); the state is the entry each
    row serves. Its τ equals the block size for greedy decoding of that continuation; its speedup is the ceiling
    that only the verify path limits.
    """
    num_drafts: int
    return_layers: tuple[int, ...] = ()
    sampled: bool = False

    def init_state(self, target, modules, batch, max_len):
        return {"prompt": jnp.zeros((batch,), jnp.int32)}

    def for_prompt(self, state, prompt):
        return {"prompt": prompt.astype(jnp.int32)}

    def propose(self, target, modules, state, anchor, position, key):
        ref = jnp.take(modules.reference[...], state["prompt"], axis=0, mode="clip")
        idx = jnp.clip(position[:, None] + 1 + jnp.arange(self.num_drafts)[None, :], 0, ref.shape[1] - 1)
        return jnp.take_along_axis(ref, idx, axis=1), None, state


class ReplayTokens(nnx.Module):
    """Holds the replay drafter's reference tokens as explicit state, so a new reference does not recompile."""

    def __init__(self, tokens):
        self.reference = nnx.Variable(jnp.asarray(tokens, jnp.int32))

    @classmethod
    def of_answers(cls, prompts, answers, max_len: int) -> "ReplayTokens":
        """The reference [len(prompts), max_len]: each prompt, then its answer (AR's output, for the ceiling), in
        the queue's order."""
        ref = np.zeros((len(prompts), max_len), np.int32)
        for r, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            ref[r, : len(p)] = p
            ref[r, len(p): len(p) + len(a)] = a
        return cls(ref)


@dataclasses.dataclass(frozen=True)
class MTPDrafter:
    """DeepSeek's native MTP block (`DeepseekV4.mtp_step`), chained k times on its own output streams: draft i + 1
    conditions on the MTP block's streams after draft i."""
    num_drafts: int
    return_layers: tuple[int, ...] = ()
    sampled: bool = False
    temperature: float = 1.0
    top_p: float = 1.0  # sampled drafts come from the run's nucleus, as the target's tokens do

    def check_target(self, tcfg: TargetConfig) -> None:
        if tcfg.n_mtp_layers < 1:
            raise ValueError("the target has no MTP layer (n_mtp_layers = 0)")
        check_block_size(self.num_drafts + 1, where="block size")

    def init_state(self, target, modules, batch, max_len):
        c = init_cache(target.cfg, batch, max_len, max_block=self.num_drafts + 1)["mtp"]
        dt = jnp.dtype(target.cfg.dtype)
        return {"cache": c, "logits": jnp.zeros((batch, target.cfg.vocab_size), jnp.float32),
                "streams": jnp.zeros((batch, target.cfg.hc_mult, target.cfg.dim), dt)}

    def observe(self, target, modules, state, out, n_valid, next_tokens):
        """Catch up on the committed positions: MTP at i sees the target's streams at i and token i + 1."""
        logits, streams, c = target.mtp_step(out.streams, next_tokens, {"mtp": state["cache"]}, n_valid)
        last = jnp.clip(n_valid - 1, 0, None)
        keep = (n_valid > 0)[:, None]
        pick = lambda x: jnp.take_along_axis(x, last.reshape(-1, *([1] * (x.ndim - 1))), axis=1)[:, 0]
        return {"cache": c["mtp"], "logits": jnp.where(keep, pick(logits), state["logits"]),
                "streams": jnp.where(keep[..., None], pick(streams), state["streams"])}

    def propose(self, target, modules, state, anchor, position, key):
        keys = row_keys.split(key, self.num_drafts)

        def choose(logits, k):
            return choose_drafts(logits, k, self.sampled, self.temperature, self.top_p)

        first, first_p = choose(state["logits"], keys[0])

        def chain(carry, k):
            tok, streams, c = carry
            logits, streams, c = target.mtp_step(streams[:, None], tok[:, None], c, jnp.ones_like(tok))
            nxt, p = choose(logits[:, 0], k)
            return (nxt, streams[:, 0], c), (nxt, p)

        carry = (first, state["streams"], {"mtp": state["cache"]})
        _, (rest, rest_p) = jax.lax.scan(chain, carry, keys[1:])
        drafts = jnp.concatenate([first[:, None], rest.T], axis=1)
        probs = None if not self.sampled else jnp.concatenate([first_p[:, None], rest_p.transpose(1, 0, 2)], 1)
        # the chained writes stay in the scan: the state's MTP cache keeps only what was committed
        return drafts, probs, state


def draft_sampling(temperature: float, top_p: float = 1.0) -> dict:
    """A sampling adapter's fields for a run at `temperature` / `top_p`: at T > 0 its drafts are sampled from that
    nucleus (with their probabilities, for the rejection sampler); at T = 0 they are greedy (the fields unused)."""
    sampled = temperature > 0
    return {"sampled": sampled, "temperature": temperature if sampled else 1.0, "top_p": top_p if sampled else 1.0}


def choose_drafts(logits, key, sampled: bool, temperature: float, top_p: float = 1.0):
    """Greedy drafts (point masses) or samples with their probabilities (for rejection sampling), drawn from the
    draft distribution at `temperature` cut to its `top_p` nucleus (`verify.target_probs`, the target's own rule:
    a draft outside the nucleus would be one the target never emits)."""
    if not sampled:
        return jnp.argmax(logits, -1).astype(jnp.int32), None
    probs = target_probs(logits, temperature, top_p)
    return row_keys.categorical(key, jnp.log(probs + 1e-38)).astype(jnp.int32), probs


@dataclasses.dataclass(frozen=True)
class BlockDrafterAdapter:
    """HyperDFlash / vanilla DFlash: one non-causal pass over [anchor, mask × K] per step.

    The drafter's context cache holds what `DrafterConfig.draft_cache` keeps of committed positions (by default the
    reduced feature c); `observe` appends the positions a verify step committed, `propose` drafts from it without
    changing it. Under a mesh the cache is pinned to `drafter.cache.draft_cache_shardings` (rows over
    data/fsdp/expert, features over tensor).
    """
    cfg: DrafterConfig
    num_drafts: int
    sampled: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    @property
    def return_layers(self) -> tuple[int, ...]:
        return target_return_layers(self.cfg)

    def check_target(self, tcfg: TargetConfig) -> None:
        self.cfg.check_target(tcfg)
        check_block_size(self.num_drafts + 1, where="block size")

    def init_state(self, target, modules, batch, max_len):
        return {"cache": constrain_draft_cache(init_draft_cache(self.cfg, batch, max_len))}

    def state_shardings(self, mesh, abstract_state):
        """The loop state's layout of the draft cache: the one `constrain_draft_cache` pins inside the step (so the
        while loop carries it without resharding)."""
        return {"cache": draft_cache_shardings(abstract_state["cache"], mesh)}

    def observe(self, target, modules, state, out, n_valid, next_tokens):
        feats = features_from_target(self.cfg, out)
        return {"cache": extend_draft_cache(modules, feats, n_valid, state["cache"])}

    def propose(self, target, modules, state, anchor, position, key):
        _, logits = draft_block(modules, target, anchor, state["cache"], block_size=self.num_drafts + 1)
        keys = row_keys.split(key, self.num_drafts)
        tokens, probs = jax.vmap(lambda l, k: choose_drafts(l, k, self.sampled, self.temperature, self.top_p),
                                 in_axes=(1, 0), out_axes=1)(logits, keys)
        return tokens, probs, state


@dataclasses.dataclass(frozen=True)
class DFlash2DrafterAdapter(BlockDrafterAdapter):
    """DFlash 2 / HyperDFlash-2 (`drafter.dflash2`): the block drafter's pass, then the candidate selector picks
    slot by slot among the unary top-K with the previous pick as predecessor (greedy, or sampled at T > 0 from
    softmax(score / T) over the K candidates cut to the run's nucleus, which is the q the rejection sampler
    reads)."""

    def propose(self, target, modules, state, anchor, position, key):
        tokens, probs = propose_dflash2(modules, target, anchor, state["cache"],
                                        lambda l, k: choose_drafts(l, k, self.sampled, self.temperature, self.top_p),
                                        key, block_size=self.num_drafts + 1)
        return tokens, probs, state


@dataclasses.dataclass(frozen=True)
class TargetSampleDrafter:
    """The target as its own drafter: K tokens sampled from the target at `temperature` / `top_p` on the committed
    context (its own copy of the target cache, updated by `observe`), each step conditioned on the drafts before it.

    Point masses (`sampled=False`) at the run's temperature give the self-sample ceiling: each draft is an
    independent sample of the target, accepted with probability p(d), so its τ is what the target's entropy alone
    allows a drafter that proposes point masses. With `sampled=True` the drafts carry their probabilities (q = p at
    the run's settings: everything accepted; another temperature: a strong drafter with q ≠ p). Temperature 0:
    the target's greedy continuation. It costs K target steps per verify: its τ means something, its speed not."""
    num_drafts: int
    return_layers: tuple[int, ...] = ()
    sampled: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def check_target(self, tcfg: TargetConfig) -> None:
        check_block_size(self.num_drafts + 1, where="block size")

    def init_state(self, target, modules, batch, max_len):
        return {"cache": init_cache(target.cfg, batch, max_len, max_block=self.num_drafts + 1)}

    def observe(self, target, modules, state, out, n_valid, next_tokens):
        """The target's cache after the call, committed up to what the decoder commits."""
        return {"cache": set_committed_length(out.cache, state["cache"]["length"] + n_valid)}

    def propose(self, target, modules, state, anchor, position, key):
        def step(carry, k):
            tok, cache = carry
            out = target(tok[:, None], cache, jnp.ones_like(tok))
            logits = out.logits[:, 0].astype(jnp.float32)
            if self.temperature == 0:
                return (jnp.argmax(logits, -1).astype(jnp.int32), out.cache), (jnp.argmax(logits, -1), logits)
            probs = target_probs(logits, self.temperature, self.top_p)
            nxt = row_keys.categorical(k, jnp.log(probs + 1e-38)).astype(jnp.int32)
            return (nxt, out.cache), (nxt, probs)

        _, (tokens, probs) = jax.lax.scan(step, (anchor.astype(jnp.int32), state["cache"]),
                                          row_keys.split(key, self.num_drafts))
        drafts = tokens.T.astype(jnp.int32)
        return drafts, (probs.transpose(1, 0, 2) if self.sampled else None), state  # the scan's writes are dropped
