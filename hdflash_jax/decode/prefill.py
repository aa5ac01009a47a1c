"""Chunked prefill: a long prompt through the target's cache path `chunk` tokens at a time.

One compiled call covers the whole prompt (a `fori_loop` over its chunks), but every step is a cache extension
of `chunk` tokens: the program and its buffers are those of a `chunk`-token call, so a 128K prompt never builds a
128K-wide activation. Rows of different lengths advance together: chunk i carries
clip(len_b - i·chunk, 0, chunk) real tokens of row b (the rest is padding the cache ignores), so every row's
cache ends committed to its own length. The result equals one-shot prefill up to summation order (the keys of
earlier chunks come back from the cache instead of being attended fresh).

This is the generate program's prefill (`decode.generate._prefill`, with `check_finite` and a hook that feeds the
drafter each chunk) and the AOT planner's (`aot_plan/target.py`): the program measured is the program run.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from hdflash_jax.deepseek_v4.cache import set_committed_length
from hdflash_jax.deepseek_v4.model import DeepseekV4, TargetOutput


class PrefillResult(NamedTuple):
    logits: jax.Array  # [B, V] fp32: each row's last prompt token (zeros for an empty prompt)
    cache: dict  # committed to each row's prompt length
    carry: Any  # what `on_chunk` returned after the last chunk (None without one)
    moe_dropped: jax.Array  # [] int32, summed over chunks (nonzero only with moe_capacity > 0)
    finite: jax.Array | None = None  # [B] bool (check_finite): every logit of the row's prompt positions is finite


# on_chunk(carry, out, n_valid, chunk_index, last_logits) -> carry: sees each chunk's target output (streams, tapped
# layers, cache), its real token counts [B], and last_logits [B, V]: the last prompt token's logits of every row
# whose prompt has ended by this chunk (e.g. to choose the token after it, which a drafter observing the chunk needs).
ChunkHook = Callable[[Any, TargetOutput, jax.Array, Any, jax.Array], Any]


def chunk_valid(prompt_len: jax.Array, index, chunk: int) -> jax.Array:
    """Real tokens of chunk `index` per row [B]."""
    return jnp.clip(prompt_len - index * chunk, 0, chunk).astype(jnp.int32)


def chunked_prefill(model: DeepseekV4, tokens: jax.Array, prompt_len: jax.Array, cache: dict, chunk: int, *,
                    return_layers: tuple[int, ...] = (), on_chunk: ChunkHook | None = None,
                    carry: Any = None, check_finite: bool = False, cache_sharding: Any = None) -> PrefillResult:
    """Extend `cache` (each row's length is its start) by prompts tokens [B, T] (row b's first prompt_len[b]
    real) in chunks of `chunk` tokens. T need not be a multiple of `chunk` (the last chunk is padded).

    `check_finite`: each chunk computes the logits of all its positions, reduces them to `finite` [B] and drops
    them (a [B, chunk, V] array at a time, never [B, T, V]); without it each chunk's head runs on its last token only.
    `cache_sharding` (on a mesh): the cache's layout, pinned before and after every chunk, so the loop carries it
    in place (the rows of a long context are most of the memory).

    The cache must hold start + T positions; `max_block` of the cache does not bound `chunk` (a call reads the
    committed window before writing its own keys)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    b, t = tokens.shape
    prompt_len = jnp.asarray(prompt_len, jnp.int32)
    n_chunks = -(-t // chunk)
    padded = jnp.pad(tokens, ((0, 0), (0, n_chunks * chunk - t)))
    pin = ((lambda c: jax.lax.with_sharding_constraint(c, cache_sharding)) if cache_sharding is not None
           else (lambda c: c))
    cache = pin(cache)
    start = cache["length"]
    vocab = model.cfg.vocab_size

    def step(i, state):
        cache, logits, finite, dropped, carry = state
        n = chunk_valid(prompt_len, i, chunk)
        piece = jax.lax.dynamic_slice_in_dim(padded, i * chunk, chunk, axis=1)
        out = model(piece, cache, n, return_layers=return_layers, last_logits=not check_finite)
        if check_finite:
            real = (jnp.arange(chunk)[None, :] < n[:, None])[:, :, None]  # padding positions do not count
            finite = finite & jnp.all(jnp.isfinite(out.logits) | ~real, axis=(1, 2))
            last = jnp.take_along_axis(out.logits, jnp.maximum(n - 1, 0)[:, None, None], axis=1)[:, 0]
        else:
            last = out.logits[:, 0]
        logits = jnp.where((n > 0)[:, None], last, logits)  # the last chunk with n > 0 is the row's last
        if on_chunk is not None:
            carry = on_chunk(carry, out, n, i, logits)
        return pin(out.cache), logits, finite, dropped + out.moe_dropped, carry

    init = (cache, jnp.zeros((b, vocab), jnp.float32), jnp.ones((b,), bool), jnp.zeros((), jnp.int32), carry)
    if n_chunks == 1:
        cache, logits, finite, dropped, carry = step(0, init)
    else:
        cache, logits, finite, dropped, carry = jax.lax.fori_loop(0, n_chunks, step, init)
    return PrefillResult(logits, set_committed_length(cache, start + prompt_len), carry, dropped,
                         finite if check_finite else None)
