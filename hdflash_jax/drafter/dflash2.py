"""DFlash 2 (z-lab, 2026-08) on the block drafter: two cheap parts on top of one non-causal pass.

* **Grouped dynamic causal convolution** around each draft layer's attention and MLP: before a sublayer its normed
  input is convolved over the block's slots (slot j mixes slots j, j − 1, …, j − K + 1 of its own block, zeros
  before the anchor), after it the output is convolved again; the taps are a learnt per-channel base plus a
  per-group delta projected from the sublayer's input at slot j. Initialised as the identity (base tap 0 = 1, the
  rest and the projection 0), so an untrained DFlash 2 layer is a DFlash layer. A slot now sees its predecessors'
  states, which attention over [context; block] alone gives it only through the non-causal mix.
* **Candidate selector**: per draft slot the unary logits' top-K candidates are re-scored with the predecessor
  token, score(c) = z_c + Σ_r P[prev, r] · (W h)_r · S[c, r] (rank-r codebooks P, S [V, r], W [r, D] on the slot's
  final-normed hidden h), and chosen sequentially: slot 1's predecessor is the anchor, slot j's the token chosen at
  j − 1. At T > 0 the choice is sampled from softmax(score / T) over the K candidates (cut to the run's top-p), and
  that distribution is the q the rejection sampler reads, so verification stays lossless.

The conditioning and reducer are the block drafter's (`DrafterConfig`): `dflash2` = tapped layers + linear
compressor, `hyperdflash2` = the final pre-collapse streams through the gate inherited from the target's hc_head.
The reference is speculators' `DFlash2DraftModel` (z-lab's MIT-licensed design); tests/test_ref_dflash2.py
compares the two.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from hdflash_jax import row_keys
from hdflash_jax.config import DrafterConfig
from hdflash_jax.deepseek_v4.layers import Linear, param
from hdflash_jax.drafter.model import BlockDrafter, DraftLayer

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class DFlash2Config(DrafterConfig):
    """A block drafter (`DrafterConfig`: conditioning × reducer, layers, block) plus DFlash 2's two parts. Defaults
    are speculators' (`DFlash2SpeculatorConfig`)."""
    conv_kernel_size: int = 2  # taps per convolution (slot j reads j, …, j − K + 1)
    conv_group_size: int = 16  # channels sharing one dynamic tap
    selector_rank: int = 256  # r of the predecessor / successor codebooks
    selector_top_k: int = 16  # K unary candidates re-scored per slot

    def validate(self) -> None:
        super().validate()

        def bad(field, why):
            raise ValueError(f"DFlash2Config.{field}: {why}")

        if self.conv_kernel_size < 1:
            bad("conv_kernel_size", f"must be >= 1, got {self.conv_kernel_size}")
        if self.conv_kernel_size > self.block_size:
            bad("conv_kernel_size", f"cannot exceed block_size={self.block_size}, got {self.conv_kernel_size}")
        if self.conv_group_size < 1 or self.dim % self.conv_group_size:
            bad("conv_group_size", f"must divide dim={self.dim}, got {self.conv_group_size}")
        if self.selector_rank < 1:
            bad("selector_rank", f"must be >= 1, got {self.selector_rank}")
        if not 1 <= self.selector_top_k <= self.vocab_size:
            bad("selector_top_k", f"must be in [1, vocab_size={self.vocab_size}], got {self.selector_top_k}")

    @property
    def conv_groups(self) -> int:
        return self.dim // self.conv_group_size


# ---- the convolution -------------------------------------------------------------------------------------------

def grouped_dynamic_conv(x, delta, base, block_len: int, group_size: int):
    """y[t] = Σ_tap x[t − tap] · (base[tap] + delta[t, tap, group]) over the slots of each block of `block_len`
    rows (a tap reaching before the block's first slot reads zeros).

    x [b, T, D] (T a multiple of block_len), delta [b, T, K, G], base [K, D] → [b, T, D] in x's dtype."""
    b, t, d = x.shape
    k, g = base.shape[0], delta.shape[-1]
    xb = x.reshape(b, t // block_len, block_len, g, group_size)
    db = delta.reshape(b, t // block_len, block_len, k, g)
    out = jnp.zeros_like(xb)
    for tap in range(min(k, block_len)):
        shifted = xb if tap == 0 else jnp.pad(xb[:, :, :block_len - tap], ((0, 0), (0, 0), (tap, 0), (0, 0), (0, 0)))
        coef = base[tap].astype(x.dtype).reshape(g, group_size) + db[:, :, :, tap, :, None].astype(x.dtype)
        out = out + shifted * coef
    return out.reshape(b, t, d)


class DynamicConv(nnx.Module):
    """One sublayer's pair of convolutions (input side, output side) driven by one projection of its input."""

    def __init__(self, cfg: DFlash2Config, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        k, g, d = cfg.conv_kernel_size, cfg.conv_groups, cfg.dim
        self.kernel_size, self.groups, self.group_size = k, g, cfg.conv_group_size
        self.base_kernel = nnx.Param(jnp.zeros((2, k, d), pdt).at[:, 0].set(1.0), out_sharding=(None, None, "embed"))
        self.kernel_projection = Linear(d, 2 * k * g, (None, "embed"), dtype=pdt, rngs=rngs)
        self.kernel_projection.weight[...] = jnp.zeros_like(self.kernel_projection.weight[...])  # identity at init

    def __call__(self, x, sublayer: Callable, block_len: int):
        """sublayer(conv_in(x)) convolved on the way out; x [b, T, D] normed."""
        b, t, _ = x.shape
        kernels = self.kernel_projection(x).reshape(b, t, 2, self.kernel_size, self.groups)
        base = self.base_kernel[...]
        y = sublayer(grouped_dynamic_conv(x, kernels[:, :, 0], base[0], block_len, self.group_size))
        return grouped_dynamic_conv(y, kernels[:, :, 1].astype(y.dtype), base[1], block_len, self.group_size)


class DFlash2Layer(DraftLayer):
    """A draft layer with a `DynamicConv` around its attention and around its MLP."""

    def __init__(self, cfg: DFlash2Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.attention_conv = DynamicConv(cfg, rngs=rngs)
        self.mlp_conv = DynamicConv(cfg, rngs=rngs)

    def __call__(self, h, positions, attend: Callable, block_len: int | None = None):
        block_len = h.shape[1] if block_len is None else block_len
        a = self.attention_conv(self.input_norm(h), lambda x: self.attention(x, positions, attend), block_len)
        h = h + a.astype(h.dtype)
        return h + self.mlp_conv(self.post_attn_norm(h), self.mlp, block_len).astype(h.dtype)


# ---- the selector ----------------------------------------------------------------------------------------------

class CandidateSelector(nnx.Module):
    """Rank-r bilinear re-scoring of the unary top-K by (predecessor token, slot hidden, candidate token)."""

    def __init__(self, cfg: DFlash2Config, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        r = cfg.selector_rank
        self.top_k = cfg.selector_top_k
        self.predecessor_codebook = param(rngs, (cfg.vocab_size, r), ("vocab", None), pdt)
        self.successor_codebook = param(rngs, (cfg.vocab_size, r), ("vocab", None), pdt)
        self.hidden_projection = Linear(cfg.dim, r, (None, "embed"), dtype=pdt, rngs=rngs)

    def context(self, hidden, prev_ids):
        """P[prev] ⊙ W h: [..., r] in fp32 (hidden [..., D], prev_ids [...])."""
        pred = self.predecessor_codebook[...][prev_ids].astype(jnp.float32)
        return pred * self.hidden_projection(hidden).astype(jnp.float32)

    def scores(self, unary, hidden, prev_ids, cand_ids):
        """unary [..., K] (the candidates' unary logits) + the transition scores → [..., K] fp32."""
        succ = self.successor_codebook[...][cand_ids].astype(jnp.float32)  # [..., K, r]
        return unary.astype(jnp.float32) + jnp.einsum("...r,...kr->...k", self.context(hidden, prev_ids), succ)


def select_drafts(selector: CandidateSelector, logits, hidden, anchor, choose: Callable, keys):
    """Sequential selection over the draft slots: logits [b, K_d, V] fp32 (unary), hidden [b, K_d, D], anchor [b];
    choose(full_logits [b, V], key) → (token [b], probs [b, V] | None), the run's rule (greedy or sampled from its
    nucleus) applied to the selector's scores (−∞ outside the K candidates).

    Returns (tokens [b, K_d] int32, probs [b, K_d, V] or None)."""
    vals, cand = jax.lax.top_k(logits, selector.top_k)  # the unary top-K, best first
    cand = cand.astype(jnp.int32)
    b, v = logits.shape[0], logits.shape[-1]
    rows = jnp.arange(b)[:, None]

    def step(prev, inp):
        vals_j, cand_j, hidden_j, key = inp
        s = selector.scores(vals_j, hidden_j, prev, cand_j)  # [b, K]
        full = jnp.full((b, v), _NEG, jnp.float32).at[rows, cand_j].set(s)
        tok, probs = choose(full, key)
        return tok.astype(jnp.int32), (tok.astype(jnp.int32), probs)

    xs = (jnp.swapaxes(vals, 0, 1), jnp.swapaxes(cand, 0, 1), jnp.swapaxes(hidden, 0, 1), keys)
    _, (tokens, probs) = jax.lax.scan(step, jnp.asarray(anchor, jnp.int32), xs)
    return tokens.T, (None if probs is None else jnp.swapaxes(probs, 0, 1))


class DFlash2Drafter(BlockDrafter):
    """The block drafter with `DFlash2Layer`s and a `CandidateSelector` (its reducer, cache and training path are
    the block drafter's)."""
    layer_cls = DFlash2Layer

    def __init__(self, cfg: DFlash2Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.selector = CandidateSelector(cfg, rngs=rngs)


def propose_dflash2(drafter: "DFlash2Drafter", target, anchor, cache: dict, choose: Callable, key, *,
                    block_size: int | None = None):
    """One DFlash 2 proposal from the draft cache as it is: the block drafter's pass (`draft_block_hidden`), then
    `select_drafts` with `choose` (the decoder's adapter passes the run's rule). Returns (tokens, probs | None)."""
    from hdflash_jax.drafter.model import draft_block_hidden

    anchor = jnp.asarray(anchor, jnp.int32)
    hidden, head = draft_block_hidden(drafter, target, anchor, cache, block_size=block_size)
    keys = row_keys.split(key, hidden.shape[1])
    return select_drafts(drafter.selector, head(hidden), hidden, anchor, choose, keys)


def make_dflash2_draft_fn(graphdef, *, block_size: int | None = None, jit: bool = True):
    """DFlash 2's drafting step, pure (what the AOT planner compiles): append the new context features to the draft
    cache, then `propose_dflash2` greedily. fn(drafter_state, target_embed, target_head, ctx_feats_new, n_ctx_new,
    anchor_tokens, cache) -> (draft_tokens [b, B−1], new_cache)."""
    from hdflash_jax.drafter.cache import extend_draft_cache

    def greedy(logits, key):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None

    def fn(state, target_embed, target_head, ctx_feats_new, n_ctx_new, anchor_tokens, cache):
        drafter = nnx.merge(graphdef, state)
        cache = extend_draft_cache(drafter, ctx_feats_new, n_ctx_new, cache)
        tokens, _ = propose_dflash2(drafter, (target_embed, target_head), anchor_tokens, cache, greedy,
                                    jax.random.key(0), block_size=block_size)
        return tokens, cache
    return jax.jit(fn) if jit else fn


def _v4_flash(**kw) -> DFlash2Config:
    from hdflash_jax.config import PRESETS

    return DFlash2Config.for_target(PRESETS["v4-flash"], draft_cache="kv", **kw)


# the V4-Flash block drafters' presets (`config.DRAFTER_PRESETS`) with DFlash 2's parts at speculators' defaults
DFLASH2_PRESETS = {
    "v4-flash-dflash2": lambda: _v4_flash(conditioning="layers", reducer="linear"),
    "v4-flash-hyperdflash2": lambda: _v4_flash(),
}
