"""The DeepSeek-V4 target: embedding → n streams → mHC blocks → hc_head → norm → head, plus MTP.

`DeepseekV4.__call__` extends a cache by a block of tokens per row and returns the logits, the final pre-collapse
streams [B, T, n, D] (what HyperDFlash and MTP condition on), the streams after any requested layers (vanilla
DFlash), and the new cache. Prefill, one-token decoding and draft verification are the same call.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hdflash_jax.config import TargetConfig
from hdflash_jax.deepseek_v4.attention import Attention
from hdflash_jax.deepseek_v4.cache import init_cache
from hdflash_jax.deepseek_v4.layers import KeyGen, Linear, RMSNorm, param
from hdflash_jax.deepseek_v4.mhc import HyperConnection, HyperHead, hc_post, hc_pre
from hdflash_jax.deepseek_v4.moe import MoE
from hdflash_jax.deepseek_v4.scan import layer_plan, run_units, stack_modules, unstack_module
from hdflash_jax.sharding import constrain_tokens


class TargetOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] fp32
    streams: jax.Array  # [B, T, n, D]: the last layer's output, before hc_head
    layer_streams: tuple  # streams after each requested layer (0-based layer l = output of decoder layer l)
    cache: dict
    moe_dropped: jax.Array | None = None  # [] int32: expert assignments that found no slot (moe_capacity > 0)


class Block(nnx.Module):
    """One mHC block: H ← hc_post(Attn(norm(hc_pre(H))), H); H ← hc_post(MoE(norm(hc_pre(H))), H)."""

    def __init__(self, cfg: TargetConfig, ratio: int, hashed: bool, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dt)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dt)
        self.hc_attn = HyperConnection(cfg.hc_mult, cfg.dim, rngs=rngs)
        self.hc_ffn = HyperConnection(cfg.hc_mult, cfg.dim, rngs=rngs)
        self.attn = Attention(cfg, ratio, dtype=dt, rngs=rngs)
        self.ffn = MoE(cfg, hashed, rngs=rngs)

    def _pre(self, hc: HyperConnection, streams):
        cfg = self.cfg
        return hc_pre(streams, hc.fn[...], hc.base[...], hc.scale[...], n=cfg.hc_mult, norm_eps=cfg.norm_eps,
                      hc_eps=cfg.hc_eps, sinkhorn_iters=cfg.hc_sinkhorn_iters)

    def __call__(self, streams, token_ids, positions, start, n_new, cache):
        """Returns (streams, cache, dropped expert assignments)."""
        x, post, comb = self._pre(self.hc_attn, streams)
        a, cache = self.attn(self.attn_norm(x), positions, start, n_new, cache)
        streams = hc_post(a, streams, post, comb)
        x, post, comb = self._pre(self.hc_ffn, streams)
        f, dropped = self.ffn.with_drops(self.ffn_norm(x), token_ids)
        return hc_post(f, streams, post, comb), cache, dropped


class MTPBlock(nnx.Module):
    """DeepSeek's native next-next-token module. Shares the target's embedding and head.

    Position i takes the target's streams at i and the token at i + 1, and predicts the token at i + 2.
    It returns its own pre-collapse streams, so drafting k tokens chains it on its own output.
    """

    def __init__(self, cfg: TargetConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.e_proj = Linear(cfg.dim, cfg.dim, ("embed_out", "embed"), dtype=dt, rngs=rngs)
        self.h_proj = Linear(cfg.dim, cfg.dim, ("embed_out", "embed"), dtype=dt, rngs=rngs)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dt)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dt)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dt)
        self.hc_head = HyperHead(cfg.hc_mult, cfg.dim, rngs=rngs)
        self.block = Block(cfg, 0, False, rngs=rngs)

    def __call__(self, streams, next_embed, next_ids, positions, start, n_new, cache):
        e = self.e_proj(self.enorm(next_embed))
        x = self.h_proj(self.hnorm(streams)) + e[..., None, :]
        return self.block(x.astype(streams.dtype), next_ids, positions, start, n_new, cache)


class DeepseekV4(nnx.Module):
    def __init__(self, cfg: TargetConfig, *, rngs: nnx.Rngs, moe_dispatch: str | None = None):
        if moe_dispatch is not None:  # kept for callers that choose per model; the config field is the default
            cfg = cfg.replace(moe_dispatch=moe_dispatch)
        dt = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), dt)
        # built in canonical order whatever the plan, so a seed gives the same weights scanned or unrolled
        blocks = [Block(cfg, r, cfg.is_hash_layer(i), rngs=rngs) for i, r in enumerate(cfg.layer_ratios)]
        plan = layer_plan(cfg)
        self.layers = nnx.List(blocks[:plan.prefix])  # the unrolled prefix (all layers when nothing is scanned)
        self.scan = nnx.List([  # one stacked Block per unit position, leading axis = unit
            stack_modules([blocks[plan.layer(u, j)] for u in range(plan.n_units)]) for j in range(plan.period)])
        self.tail = nnx.List(blocks[plan.tail_start:])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=dt)
        self.head = Linear(cfg.dim, cfg.vocab_size, ("vocab", "embed"), dtype=dt, rngs=rngs)
        self.hc_head = HyperHead(cfg.hc_mult, cfg.dim, rngs=rngs)
        self.mtp = nnx.List([MTPBlock(cfg, rngs=rngs) for _ in range(cfg.n_mtp_layers)])

    # -- pieces shared with the drafters ---------------------------------------------------------------------
    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return self.embed[...][tokens].astype(jnp.dtype(self.cfg.dtype))

    def lm_head(self, hidden: jax.Array) -> jax.Array:
        """The target's final norm → head, fp32 logits."""
        return self.head_logits(self.norm(hidden))

    def head_logits(self, normed: jax.Array) -> jax.Array:
        """The head alone (the block drafters apply their own norm, then share this head, frozen)."""
        w = self.head.weight[...]
        return jnp.einsum("...d,vd->...v", normed.astype(w.dtype), w, preferred_element_type=jnp.float32)

    def collapse(self, streams: jax.Array) -> jax.Array:
        return self.hc_head(streams, norm_eps=self.cfg.norm_eps, hc_eps=self.cfg.hc_eps)

    # -- forward ---------------------------------------------------------------------------------------------
    def __call__(self, tokens, cache: dict, n_new=None, return_layers: tuple[int, ...] = (),
                 last_logits: bool = False) -> TargetOutput:
        """Extend `cache` by tokens [B, T] (n_new[b] of them real, default all) at positions length[b] + t.

        `last_logits`: logits [B, 1, V] of each row's last real token only (a long prefill needs no more, and the
        head over every position is a [T, V] fp32 array)."""
        cfg = self.cfg
        b, t = tokens.shape
        start = cache["length"]
        n_new = jnp.full((b,), t, jnp.int32) if n_new is None else jnp.asarray(n_new, jnp.int32)
        positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        h = self.embed_tokens(tokens)
        streams = jnp.broadcast_to(h[:, :, None, :], (b, t, cfg.hc_mult, cfg.dim))
        plan = layer_plan(cfg)
        kept: dict[int, jax.Array] = {}
        streams, new_layers, dropped = self._unrolled(self.layers, 0, streams, tokens, positions, start, n_new,
                                                      cache["layers"], return_layers, kept)
        new_scan, new_tail = [], []
        if plan.n_units:
            taps = tuple(sorted(i for i in set(return_layers) if plan.prefix <= i < plan.tail_start))
            streams, new_scan, d, tapped = run_units(self.scan, plan, streams, tokens, positions, start, n_new,
                                                     cache["scan"], taps)
            dropped = dropped + d
            kept.update(zip(taps, tapped))
            streams, new_tail, d = self._unrolled(self.tail, plan.tail_start, streams, tokens, positions, start,
                                                  n_new, cache["tail"], return_layers, kept)
            dropped = dropped + d
        last = streams
        if last_logits:
            last = jnp.take_along_axis(streams, jnp.maximum(n_new - 1, 0)[:, None, None, None], axis=1)
        logits = self.lm_head(self.collapse(last))
        new_cache = {**cache, "length": start + n_new, "layers": new_layers}
        if plan.n_units:
            new_cache.update(scan=new_scan, tail=new_tail)
        layer_streams = tuple(kept[i] for i in sorted(set(return_layers)) if i in kept)
        return TargetOutput(logits, streams, layer_streams, new_cache, dropped)

    @staticmethod
    def _unrolled(blocks, first, streams, tokens, positions, start, n_new, caches, return_layers, kept):
        """Run `blocks` (canonical layers first, first + 1, ...) one after another; taps go into `kept`."""
        new, dropped = [], jnp.zeros((), jnp.int32)
        for k, block in enumerate(blocks):
            streams, c, d = block(constrain_tokens(streams), tokens, positions, start, n_new, caches[k])
            new.append(c)
            dropped = dropped + d
            if first + k in return_layers:
                kept[first + k] = streams
        return streams, new, dropped

    def block(self, layer: int) -> Block:
        """Decoder layer `layer` (canonical numbering) as a Block; a scanned layer comes back as an unstacked
        copy (for tests and tools: writing to it does not change the model)."""
        kind, k, unit = layer_plan(self.cfg).locate(layer)
        if kind == "scan":
            return unstack_module(self.scan[k], unit)
        return (self.layers if kind == "layers" else self.tail)[k]

    def mtp_step(self, streams, next_tokens, cache: dict, n_new=None, depth: int = 0):
        """Run MTP layer `depth` on target (or its own) streams [B, T, n, D] and the tokens one ahead [B, T].

        Uses `cache["mtp"]`, which has its own length (drafted positions are rolled back separately).
        Returns (logits [B, T, V], mtp_streams [B, T, n, D], cache).
        """
        b, t = next_tokens.shape
        mc = cache["mtp"]
        start = mc["length"]
        n_new = jnp.full((b,), t, jnp.int32) if n_new is None else jnp.asarray(n_new, jnp.int32)
        positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        block = self.mtp[depth]
        out, c, _ = block(streams, self.embed_tokens(next_tokens), next_tokens, positions, start, n_new,
                          mc["layers"][depth])
        layers = list(mc["layers"])
        layers[depth] = c
        # The MTP layer has its own final norm (`mtp.<i>.norm`) and shares only the head with the trunk.
        collapsed = block.hc_head(out, norm_eps=self.cfg.norm_eps, hc_eps=self.cfg.hc_eps)
        logits = self.head_logits(block.norm(collapsed))
        return logits, out, {**cache, "mtp": {"length": start + n_new, "layers": layers}}


def forward_full(model: DeepseekV4, tokens, return_layers: tuple[int, ...] = ()) -> TargetOutput:
    """Uncached forward of whole sequences (training, parity tests): a fresh cache sized to the input."""
    b, t = tokens.shape
    cache = init_cache(model.cfg, b, t, max_block=1)
    return model(tokens, cache, return_layers=return_layers)


def init_target(cfg: TargetConfig, seed: int = 0, moe_dispatch: str | None = None) -> DeepseekV4:
    """Random weights, transformers' init scheme (normal 0.02; hc base 0, scale 1; sinks and ape 0)."""
    with nnx.use_eager_sharding(False):
        return DeepseekV4(cfg, rngs=KeyGen(seed), moe_dispatch=moe_dispatch)


def abstract_target(cfg: TargetConfig) -> DeepseekV4:
    """Shapes, dtypes and logical axes of every parameter, nothing allocated (real sizes, checkpoint restore)."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=KeyGen(0)))
