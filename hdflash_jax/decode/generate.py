"""On-device generation: one jitted program whose loop is `lax.while_loop`, for AR and every drafter.

Every method runs the same step: propose K drafts → verify [anchor, d_1..d_K] in one target call that extends
the cache by K + 1 → accept (`verify.py`) → emit d_1..d_a and the bonus → roll the target cache back to the
committed length → hand the verified positions' features to the drafter. Autoregressive decoding is this step
with K = 0. Rows accept independently.

A program works through a queue of prompts with a batch of rows (continuous refill): each row prefills a prompt,
decodes it to its end, and takes the next prompt of the queue at the next step boundary, so no row idles while
prompts wait. Starting a prompt in a row resets that row of the target cache and of the drafter's state to a fresh
one-row state (the drafter's own `init_state`), prefills the prompt into it (chunked, the one prefill) and writes
the row back; outputs and statistics are kept per prompt, not per row. A queue no longer than the batch is the
plain batch (every row starts at once). At T > 0 each row draws from its own key, made from the seed, a hash of its
prompt and its own step (`hdflash_jax.row_keys`): a prompt's output does not depend on its row, its batch or its
neighbours.

A drafter is a small object with three pure methods over its own state pytree (see `Drafter`):
`observe` takes the target's output for the positions just committed (prefill or verify) and the token that
follows each of them; `propose` returns K drafts for the positions after the anchor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import zlib
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hdflash_jax import row_keys
from hdflash_jax.decode.prefill import chunked_prefill
from hdflash_jax.decode.stats import AcceptanceStats
from hdflash_jax.decode.verify import (accept_block, accept_greedy, accept_sampled, check_verify_rule, sample,
                                      schedule_width, target_probs)
from hdflash_jax.deepseek_v4.cache import init_cache, set_committed_length
from hdflash_jax.decode.drafters import NoDrafter
from hdflash_jax.deepseek_v4.model import DeepseekV4, TargetOutput
from hdflash_jax.sharding import mesh_of, place, row_shardings, to_host  # noqa: F401 (mesh_of: API)


class Drafter(Protocol):
    """Optionally also `state_shardings(mesh, abstract_state) -> shardings` (on a mesh: the layout its state keeps
    in the decode loop; without it every leaf's batch-row dimension is sharded over the mesh's row axes) and
    `for_prompt(state, prompt) -> state` (a fresh one-row state made that of queue entry `prompt` [1], for a drafter
    whose modules hold something per prompt: the replay's reference)."""
    num_drafts: int  # K = block size - 1
    return_layers: tuple[int, ...]  # target layers whose streams the drafter conditions on
    sampled: bool  # True: drafts are samples with probabilities (standard rejection sampling)

    def init_state(self, target: DeepseekV4, modules: Any, batch: int, max_len: int) -> Any: ...

    def observe(self, target: DeepseekV4, modules: Any, state: Any, out: TargetOutput, n_valid: jax.Array,
                next_tokens: jax.Array) -> Any: ...

    def propose(self, target: DeepseekV4, modules: Any, state: Any, anchor: jax.Array, position: jax.Array,
                key: jax.Array) -> tuple[jax.Array, jax.Array | None, Any]: ...


class GenerateResult(NamedTuple):
    """Per prompt, in the order given, whichever row ran each."""
    tokens: np.ndarray  # [N, max_new_tokens], -1 past each prompt's end
    lengths: np.ndarray  # [N] generated tokens per prompt (EOS included)
    accepted: np.ndarray  # [max_new_tokens, N] accepted drafts at each of the prompt's steps, -1 past its last
    steps: np.ndarray  # [N] verify steps per prompt
    block_size: int
    prefill_finite: np.ndarray  # [N] bool: every prefill logit of the prompt's positions is finite
    widths: np.ndarray | None = None  # [max_new_tokens, N] verify width of each step (anchor + drafts judged), -1
    batch: int = 0  # rows of the program
    loop_steps: int = 0  # verify steps of the batch (each runs every row)
    idle_row_steps: int = 0  # row-steps a row sat free while the queue still held prompts (refill keeps this 0)
    drain_row_steps: int = 0  # row-steps a row sat free after the queue emptied (the batch's slowest rows finishing)

    def width_hist(self) -> list[int]:
        """Row-steps per verify width 1..block_size (a confidence schedule's choices; unscheduled: all the block)."""
        w = np.asarray(self.widths if self.widths is not None else [])
        return [int((w == i).sum()) for i in range(1, self.block_size + 1)]

    @property
    def stats(self) -> AcceptanceStats:
        """τ, per-position acceptance and the accepted-length histogram over every prompt's verify steps."""
        return AcceptanceStats.from_accepted(self.accepted, self.accepted >= 0, block_size=self.block_size)

    def row_tokens(self, row: int) -> list[int]:
        """The tokens generated for prompt `row`."""
        return self.tokens[row, : self.lengths[row]].tolist()

DEFAULT_PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# the default ladder's largest bucket: every default bucket prefills in one call, longer prompts in chunks of this
DEFAULT_PREFILL_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    eos_token_id: int | None = None
    prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS
    # past the largest bucket: double it up to the model's context (see `prompt_buckets`). None: the default
    # ladder extends, a list given by the caller is exact (its largest bucket is a limit the caller chose)
    extend_buckets: bool | None = None
    # prompt tokens per prefill call: a longer bucket prefills in chunks through the cache (`decode/prefill.py`), so
    # its activations and logits are a chunk's, not the bucket's; a bucket up to this size is one call
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    verify: str = "token"  # the acceptance rule at T > 0: "token" (accept_sampled) or "block" (accept_block)
    # DSpark's verify schedule: the step's cost at verify widths 1..K+1 (anchor + 0..K drafts; relative, e.g. measured
    # seconds); the drafter's confidence head picks a width each step (`verify.schedule_width`). None: every step
    # verifies the whole block
    confidence_schedule: tuple[float, ...] | None = None

    @property
    def extends_buckets(self) -> bool:
        if self.extend_buckets is None:
            return tuple(self.prompt_buckets) == DEFAULT_PROMPT_BUCKETS
        return self.extend_buckets


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """The shape of one generate program: prompts padded to `bucket`, `batch` rows, caches of `max_len` slots, a
    queue of `queue` prompts (more than `batch`: rows take the next prompt as they finish)."""
    bucket: int
    batch: int
    max_len: int  # bucket + max_new_tokens + K + 1: the last verify block may run K + 1 slots past the budget
    queue: int  # prompts the program works through (at least the batch)

    @property
    def shape(self) -> tuple[int, int, int]:
        """What a compiled program is keyed by: (bucket, batch, queue)."""
        return (self.bucket, self.batch, self.queue)


def queue_capacity(prompts: int, batch: int) -> int:
    """The queue length a program of `batch` rows is compiled for: the batch doubled until it holds `prompts`
    (entries past the real prompts are never started), so the compile count stays logarithmic in the prompts."""
    size = batch
    while size < prompts:
        size *= 2
    return size


def prompt_buckets(buckets, room: int) -> list[int]:
    """The sizes a prompt may be padded to: the given buckets, then the largest one doubled while it stays under
    `room` (the longest prompt the context holds), then `room` itself, so any prompt that fits the context has a
    bucket and the compile count stays logarithmic in the prompt length."""
    sizes = sorted(set(int(b) for b in buckets))
    if room < 1:
        return sizes
    size = sizes[-1]
    while size * 2 < room:
        size *= 2
        sizes.append(size)
    if sizes[-1] < room:
        sizes.append(room)
    return sizes


def plan_decode(settings: DecodeSettings, num_drafts: int, max_seq_len: int, prompt_lengths,
                batch: int | None = None) -> DecodePlan:
    """The one rule for prompt buckets and cache length: the smallest bucket that holds the longest prompt, and
    a cache for it, the new tokens and one verify block; it must fit the model's context. `batch` (default: one
    row per prompt) may exceed the number of prompts (a fixed shape) or be smaller (continuous refill)."""
    lengths = [int(n) for n in prompt_lengths]
    if not lengths:
        raise ValueError("no prompts given")
    if min(lengths) < 1:
        raise ValueError(f"empty prompt at row {lengths.index(min(lengths))}")
    longest = max(lengths)
    room = max_seq_len - settings.max_new_tokens - num_drafts - 1  # the longest prompt the context holds
    sizes = (prompt_buckets(settings.prompt_buckets, room) if settings.extends_buckets
             else sorted(settings.prompt_buckets))
    bucket = next((size for size in sizes if size >= longest), None)
    if bucket is None and settings.extends_buckets:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens {settings.max_new_tokens} + a block of "
                         f"{num_drafts + 1} exceeds the model's context of {max_seq_len} tokens")
    if bucket is None:
        raise ValueError(f"prompt of {longest} tokens exceeds the largest bucket {max(settings.prompt_buckets)}")
    max_len = bucket + settings.max_new_tokens + num_drafts + 1
    if max_len > max_seq_len:
        raise ValueError(f"prompt bucket {bucket} + max_new_tokens {settings.max_new_tokens} + a block of "
                         f"{num_drafts + 1} exceeds the model's context of {max_seq_len} tokens")
    batch = len(lengths) if batch is None else batch
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return DecodePlan(bucket, batch, max_len, queue_capacity(len(lengths), batch))


def _emit(out_buf, n_out, done, emitted, count, settings: DecodeSettings):
    """Append up to `count[b]` tokens of `emitted[b]` to each row, stopping at EOS or max_new_tokens."""
    b, w = emitted.shape
    idx = jnp.arange(w)[None, :]
    live = (idx < count[:, None]) & ~done[:, None]
    if settings.eos_token_id is not None:
        is_eos = live & (emitted == settings.eos_token_id)
        first = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), w)
        live = live & (idx <= first[:, None])
        hit_eos = jnp.any(is_eos, axis=1)
    else:
        hit_eos = jnp.zeros((b,), bool)
    room = settings.max_new_tokens - n_out
    live = live & (idx < room[:, None])
    n_write = jnp.sum(live, axis=1).astype(jnp.int32)
    target = jnp.where(live, n_out[:, None] + idx, out_buf.shape[1])
    out_buf = out_buf.at[jnp.arange(b)[:, None], target].set(emitted, mode="drop")
    n_out = n_out + n_write
    done = done | hit_eos | (n_out >= settings.max_new_tokens)
    return out_buf, n_out, done



class Queue(NamedTuple):
    """The prompts one generate program works through, on device: entry i is the i-th prompt."""
    tokens: jax.Array  # [N, P] right-padded to the bucket
    lengths: jax.Array  # [N]
    keys: jax.Array  # [N] int32: each prompt's randomness key (`prompt_keys`)
    count: jax.Array  # [] the real entries; the ones past it are padding no row starts


class Outputs(NamedTuple):
    """What a generate program returns, per queue entry."""
    tokens: jax.Array  # [N, max_new_tokens], -1 past the end
    lengths: jax.Array  # [N]
    accepted: jax.Array  # [max_new_tokens, N] accepted drafts at the prompt's step s, -1 past its last step
    widths: jax.Array  # [max_new_tokens, N] the verify width of that step (K + 1 unless a schedule cut it), -1
    prefill_finite: jax.Array  # [N] the prefill logits of the prompt's positions are all finite
    counts: jax.Array  # [3] int32: loop steps, idle row-steps (queue not empty), drain row-steps (queue empty)


class LoopState(NamedTuple):
    """Everything the decode loop carries (a pytree; the host never sees it until the end)."""
    seed: jax.Array  # [] int32
    cache: dict  # the target's cache, committed tokens only
    drafter: Any  # the drafter's own state
    anchor: jax.Array  # [B] the bonus token at position cache.length, emitted but not yet run through the target
    prompt: jax.Array  # [B] the queue entry each row serves (N: none yet)
    prompt_key: jax.Array  # [B] that entry's randomness key
    row_step: jax.Array  # [B] verify steps of the row's prompt so far
    done: jax.Array  # [B] nothing left to generate in the row (its prompt ended, or it has none): free
    next: jax.Array  # [] the next queue entry to start
    out: Outputs


def prompt_keys(prompts) -> np.ndarray:
    """Each prompt's randomness key [N] int32: a hash of its token ids and of how many equal prompts came before it
    in the call, so a prompt samples alike alone, in any batch or row, and copies of one prompt sample apart."""
    seen: dict[bytes, int] = {}
    keys = np.zeros((len(prompts),), np.int32)
    for i, p in enumerate(prompts):
        ids = np.asarray(p, np.int32).tobytes()
        copy = seen[ids] = seen.get(ids, -1) + 1
        keys[i] = np.uint32(zlib.crc32(np.int32(copy).tobytes(), zlib.crc32(ids))).view(np.int32)
    return keys


def _empty_state(target, modules, drafter: Drafter, settings: DecodeSettings, plan: DecodePlan, batch: int,
                 seed) -> LoopState:
    """`batch` free rows (fresh caches, the drafter's fresh state), nothing started, no output yet."""
    n, t = plan.queue, settings.max_new_tokens
    zeros = jnp.zeros((batch,), jnp.int32)
    return LoopState(jnp.asarray(seed, jnp.int32),
                     init_cache(target.cfg, batch, plan.max_len, max_block=drafter.num_drafts + 1),
                     drafter.init_state(target, modules, batch, plan.max_len), zeros, jnp.full((batch,), n, jnp.int32),
                     zeros, zeros, jnp.ones((batch,), bool), jnp.int32(0),
                     Outputs(jnp.full((n, t), -1, jnp.int32), jnp.zeros((n,), jnp.int32),
                             jnp.full((t, n), -1, jnp.int32), jnp.full((t, n), -1, jnp.int32),
                             jnp.ones((n,), bool), jnp.zeros((3,), jnp.int32)))


def _prefill(target, modules, drafter: Drafter, settings: DecodeSettings, max_len: int, prompt, prompt_len, keys):
    """Prompts [b, P] through a fresh cache in chunks of `settings.prefill_chunk` (one call when the bucket fits
    one); the drafter observes each chunk's committed positions as they come, and only the last position's logits
    per row are kept (every prompt position's are checked finite per chunk). keys [b]: each row's key for its first
    token. Returns (cache, drafter state, first token [b], finite [b])."""
    b, p = prompt.shape
    cache = init_cache(target.cfg, b, max_len, max_block=drafter.num_drafts + 1)
    chunk = min(settings.prefill_chunk, p)
    # the token after each prompt position: the prompt shifted, then (per chunk) the first generated token
    after = jnp.concatenate([prompt[:, 1:], jnp.zeros((b, 1), prompt.dtype)], axis=1)
    after = jnp.pad(after, ((0, 0), (0, -(-p // chunk) * chunk - p)))

    def observe(carry, out, n_valid, i, last_logits):
        dst, _ = carry
        # right for every row whose prompt has ended by this chunk (the rest are chosen again in a later chunk):
        # a row's sample depends on its own logits only, so every row gets the token a one-shot prefill gives it
        first = sample(keys, last_logits, settings.temperature, settings.top_p)
        nxt = jax.lax.dynamic_slice_in_dim(after, i * chunk, chunk, axis=1)
        nxt = jnp.where(jnp.arange(chunk)[None, :] == (prompt_len - 1 - i * chunk)[:, None], first[:, None], nxt)
        return drafter.observe(target, modules, dst, out, n_valid, nxt), first

    carry = (drafter.init_state(target, modules, b, max_len), jnp.zeros((b,), jnp.int32))
    r = chunked_prefill(target, prompt, prompt_len, cache, chunk, return_layers=drafter.return_layers,
                        on_chunk=observe, carry=carry, check_finite=True)
    dst, first = r.carry
    return r.cache, dst, first, r.finite


def put_row(batched, row, r, batch: int):
    """`batched` (a pytree of leaves with `batch` rows on some axis) with row `r` replaced by `row`'s (the same
    pytree at one row): each leaf's row axis is the one where the two shapes differ. A select over the whole leaf,
    not a dynamic update, so a row-sharded leaf (on a mesh) is written where it lives without gathering its rows."""
    def one(x, y):
        axes = [i for i, (m, n) in enumerate(zip(x.shape, y.shape)) if m != n]
        if not axes:  # one row: it is the whole leaf; otherwise a leaf without rows keeps the batch's
            return y.astype(x.dtype) if batch == 1 else x
        ax = axes[0]
        mine = (jnp.arange(x.shape[ax]) == r).reshape((-1,) + (1,) * (x.ndim - ax - 1))
        return jnp.where(mine, y.astype(x.dtype), x)

    return jax.tree.map(one, batched, row)


def _start_row(target, modules, drafter: Drafter, settings: DecodeSettings, max_len: int, queue: Queue,
               st: LoopState, r) -> LoopState:
    """Row `r` takes the next queue entry: a fresh one-row cache and drafter state, the prompt prefilled into
    them, written over the row; its first token emitted into the entry's outputs."""
    q = st.next
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, q, 1)  # noqa: E731
    key = take(queue.keys)
    first_key = row_keys.prompt_row_keys(st.seed, key, jnp.zeros((1,), jnp.int32))  # counter 0; step s uses s + 1
    cache, dst, first, finite = _prefill(target, modules, drafter, settings, max_len, take(queue.tokens),
                                         take(queue.lengths), first_key)
    for_prompt = getattr(drafter, "for_prompt", None)
    if for_prompt is not None:
        dst = for_prompt(dst, q[None])
    t = settings.max_new_tokens
    row_out, n_out, done = _emit(jnp.full((1, t), -1, jnp.int32), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), bool),
                                 first[:, None], jnp.ones((1,), jnp.int32), settings)
    o = st.out
    o = o._replace(tokens=o.tokens.at[q].set(row_out[0]), lengths=o.lengths.at[q].set(n_out[0]),
                   prefill_finite=o.prefill_finite.at[q].set(finite[0]))
    b = st.anchor.shape[0]
    return st._replace(cache=put_row(st.cache, cache, r, b), drafter=put_row(st.drafter, dst, r, b),
                       anchor=st.anchor.at[r].set(first[0]), prompt=st.prompt.at[r].set(q),
                       prompt_key=st.prompt_key.at[r].set(key[0]), row_step=st.row_step.at[r].set(0),
                       done=st.done.at[r].set(done[0]), next=q + 1, out=o)


def _fill(target, modules, drafter: Drafter, settings: DecodeSettings, max_len: int, queue: Queue, st: LoopState,
          pin=lambda s: s) -> LoopState:
    """Every free row takes the next queue entry while the queue has one (a row whose prompt ends at its first
    token is free again at once)."""
    def body(s):
        return pin(_start_row(target, modules, drafter, settings, max_len, queue, s, jnp.argmax(s.done)))

    return jax.lax.while_loop(lambda s: jnp.any(s.done) & (s.next < queue.count), body, st)


def _start(target, modules, drafter: Drafter, settings: DecodeSettings, plan: DecodePlan, queue: Queue, seed,
           pin=lambda s: s) -> LoopState:
    """The loop's first state: `plan.batch` free rows filled from the queue."""
    st = pin(_empty_state(target, modules, drafter, settings, plan, plan.batch, seed))
    return _fill(target, modules, drafter, settings, plan.max_len, queue, st, pin)


def _step(target, modules, drafter: Drafter, settings: DecodeSettings, st: LoopState, queued) -> LoopState:
    """Draft → verify → accept → emit → commit (roll back) → observe: one speculative step for every row.
    `queued`: the queue still holds prompts (a free row this step is idle; otherwise it drains)."""
    b, k = st.anchor.shape[0], drafter.num_drafts
    k_draft, k_acc = row_keys.split(row_keys.prompt_row_keys(st.seed, st.prompt_key, st.row_step + 1), 2)
    start = st.cache["length"]
    schedule, judged = settings.confidence_schedule, {}
    if schedule is None:
        drafts, draft_probs, dst = drafter.propose(target, modules, st.drafter, st.anchor, start, k_draft)
    else:
        drafts, draft_probs, confidence, dst = drafter.propose_with_confidence(target, modules, st.drafter, st.anchor,
                                                                              start, k_draft)
    block = jnp.concatenate([st.anchor[:, None], drafts.astype(jnp.int32)], axis=1)
    if schedule is None:
        n_new = jnp.where(st.done, 0, k + 1).astype(jnp.int32)
        vout = target(block, st.cache, n_new, return_layers=drafter.return_layers)
    else:
        vout, judged["n_verify"] = _scheduled_verify(target, drafter, block, st.cache, st.done, confidence, schedule)
    if settings.temperature == 0:
        acc = accept_greedy(vout.logits, block[:, 1:], **judged)
    else:
        probs = target_probs(vout.logits, settings.temperature, settings.top_p)
        rule = accept_block if settings.verify == "block" else accept_sampled
        acc = rule(k_acc, probs, block[:, 1:], draft_probs if drafter.sampled else None, **judged)
    a = jnp.where(st.done, 0, acc.accepted)
    slot = jnp.arange(k + 1)[None, :]
    shifted = jnp.concatenate([block[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    emitted = jnp.where(slot < a[:, None], shifted, acc.bonus[:, None])  # d_1..d_a, then the bonus
    o = st.out
    at = jnp.where(st.done, o.lengths.shape[0], st.prompt)  # free rows write nowhere
    rows = jnp.take(o.tokens, at, axis=0, mode="fill", fill_value=-1)
    out_rows, n_out, done = _emit(rows, jnp.take(o.lengths, at, mode="fill", fill_value=0), st.done, emitted, a + 1,
                                  settings)
    free = jnp.sum(st.done).astype(jnp.int32)
    width = jnp.broadcast_to(judged.get("n_verify", k) + 1, (b,)).astype(jnp.int32)
    o = Outputs(o.tokens.at[at].set(out_rows, mode="drop"), o.lengths.at[at].set(n_out, mode="drop"),
                o.accepted.at[st.row_step, at].set(a, mode="drop"), o.widths.at[st.row_step, at].set(width, mode="drop"),
                o.prefill_finite,
                o.counts + jnp.stack([jnp.int32(1), jnp.where(queued, free, 0), jnp.where(queued, 0, free)]))
    committed = jnp.where(st.done, 0, a + 1)  # the anchor and the accepted drafts enter the cache
    cache = set_committed_length(vout.cache, start + committed)
    dst = drafter.observe(target, modules, dst, vout, committed, emitted)
    return st._replace(cache=cache, drafter=dst, anchor=jnp.where(st.done, st.anchor, acc.bonus),
                       row_step=st.row_step + (~st.done).astype(jnp.int32), done=done, out=o)


def _scheduled_verify(target, drafter: Drafter, block, cache, done, confidence, costs):
    """Verify the prefix of `block` whose width `verify.schedule_width` picks from the drafter's confidence: one
    branch per width 1..K+1, each a target call of that width (the saving), its outputs padded back to the block's
    width. Returns (TargetOutput, drafts judged: width − 1)."""
    width = schedule_width(confidence, ~done, costs)
    branches = [functools.partial(verify_width, target, drafter, block, cache, done, w)
                for w in range(1, block.shape[1] + 1)]
    return jax.lax.switch(width - 1, branches), width - 1


def verify_width(target, drafter: Drafter, block, cache, done, w: int) -> TargetOutput:
    """The target's verify call on the first `w` slots of `block` (rows done: none), its outputs padded back to the
    block's width (what the acceptance rules and the drafter's observe read)."""
    k1 = block.shape[1]
    out = target(block[:, :w], cache, jnp.where(done, 0, w).astype(jnp.int32), return_layers=drafter.return_layers)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, k1 - w)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    return out._replace(logits=pad(out.logits), streams=pad(out.streams),
                        layer_streams=tuple(pad(x) for x in out.layer_streams))


def check_confidence_schedule(costs, drafter: Drafter, where: str = "confidence_schedule") -> None:
    """A schedule needs a drafter with a confidence head and one positive cost per verify width 1..K+1."""
    if costs is None:
        return
    if not getattr(drafter, "confidence_head", False):  # and then it has `propose_with_confidence`
        raise ValueError(f"{where}: this drafter has no confidence head to schedule its verify with")
    if len(costs) != drafter.num_drafts + 1 or not all(c > 0 for c in costs):
        raise ValueError(f"{where}: one cost > 0 per verify width 1..{drafter.num_drafts + 1}, got {list(costs)}")


def _generate(tgraph, dgraph, drafter: Drafter, settings: DecodeSettings, plan: DecodePlan, tstate, dstate,
              tokens, lengths, keys, count, seed, max_steps, *, loop_shardings=None) -> Outputs:
    """Fill the rows from the queue, then the while_loop for at most `max_steps` verify steps (a traced scalar, so
    a caller can run the same compiled program with 0 steps: the first rows' prefill alone), each step followed by
    the refill of the rows it freed. `loop_shardings` (a `LoopState` of shardings, on a mesh) pins the loop state's
    layout, so the carry — both caches included — keeps one sharding and is updated in place."""
    target = nnx.merge(tgraph, tstate)
    modules = nnx.merge(dgraph, dstate) if dgraph is not None else None
    queue = Queue(tokens, lengths, keys, count)
    pin = ((lambda s: jax.lax.with_sharding_constraint(s, loop_shardings)) if loop_shardings is not None
           else (lambda s: s))
    fill = functools.partial(_fill, target, modules, drafter, settings, plan.max_len, queue, pin=pin)
    st = _start(target, modules, drafter, settings, plan, queue, seed, pin)

    def body(s):
        return fill(pin(_step(target, modules, drafter, settings, s, s.next < queue.count)))

    st = jax.lax.while_loop(lambda s: (s.out.counts[0] < max_steps) & ~jnp.all(s.done), body, st)
    return st.out


class GenerateProgram(NamedTuple):
    """One generate program: `fn(tstate, dstate, tokens, lengths, keys, count, seed, max_steps)` (the queue's
    arrays, then the seed and the step budget) and, on a mesh, its in/out shardings. `jit` compiles it the one way
    both of its users do."""
    fn: Callable
    in_shardings: tuple | None
    out_shardings: Any

    def jit(self, fn: Callable | None = None):
        """`jax.jit` of `fn` (default `self.fn`; a caller may wrap it). keep_unused: the process holds every
        parameter it was given (the MTP layer too when only AR runs), so the compiled program takes them all and
        its argument bytes are what a device holds."""
        shardings = {} if self.in_shardings is None else {"in_shardings": self.in_shardings,
                                                           "out_shardings": self.out_shardings}
        return jax.jit(self.fn if fn is None else fn, keep_unused=True, **shardings)


def generate_program(tgraph, tstate, dgraph, dstate, drafter: Drafter, settings: DecodeSettings, plan: DecodePlan,
                     mesh=None) -> GenerateProgram:
    """The generate program of `plan`: what `Generator` runs and what the AOT planner compiles (one builder).
    `tstate`/`dstate` are read for shapes and shardings only, so abstract states (`jax.ShapeDtypeStruct` leaves with
    shardings) do as well as placed arrays."""
    extra = {} if mesh is None else {"loop_shardings": loop_shardings(tgraph, tstate, dgraph, dstate, drafter,
                                                                      settings, plan, mesh)}
    fn = functools.partial(_generate, tgraph, dgraph, drafter, settings, plan, **extra)

    if mesh is None:
        return GenerateProgram(fn, None, None)
    return GenerateProgram(fn, *io_shardings(tstate, dstate, mesh))


def loop_shardings(tgraph, tstate, dgraph, dstate, drafter: Drafter, settings: DecodeSettings, plan: DecodePlan,
                   mesh) -> LoopState:
    """The loop state's shardings: every leaf's batch-row dimension over the mesh's row axes (a drafter with
    `state_shardings` lays out its own state); the per-prompt outputs replicated."""
    target = nnx.merge(tgraph, tstate)
    modules = nnx.merge(dgraph, dstate) if dgraph is not None else None
    shardings = row_shardings(mesh, lambda b: _empty_state(target, modules, drafter, settings, plan, b, 0),
                              plan.batch)
    own = getattr(drafter, "state_shardings", None)
    if own is not None:
        abstract = jax.eval_shape(lambda: drafter.init_state(target, modules, plan.batch, plan.max_len))
        shardings = shardings._replace(drafter=own(mesh, abstract))
    return shardings


def io_shardings(tstate, dstate, mesh):
    """(in_shardings, out_shardings) of the program: parameters where they are; the queue, the seed, the budget
    and the per-prompt outputs replicated (a few integers per prompt; every process holds them all)."""
    params = lambda st: jax.tree.map(lambda x: x.sharding, st) if st is not None else None  # noqa: E731
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return (params(tstate), params(dstate), rep, rep, rep, rep, rep, rep), rep


class Generator:
    """Compiles one generate program per (prompt bucket, batch size, queue length) and runs it.

    target: a `DeepseekV4`; drafter: a `Drafter` (None → autoregressive); drafter_modules: the drafter's NNX
    module(s) whose parameters travel as explicit state (None for drafters without parameters of their own).
    mesh: run over a `jax.sharding.Mesh` (possibly spanning processes): parameters placed by the logical-axis
    rules of `hdflash_jax.sharding` (a target restored into its shardings stays where it is), the loop state — both
    caches — sharded over batch rows, the queue and the outputs replicated, the program compiled with these in/out
    shardings.
    """

    def __init__(self, target: DeepseekV4, drafter: Drafter | None = None, drafter_modules=None, *,
                 settings: DecodeSettings, mesh=None):
        self.cfg = target.cfg
        self.drafter = drafter if drafter is not None else NoDrafter()
        self.settings = settings
        self.mesh = mesh
        check = getattr(self.drafter, "check_target", None)
        if check is not None:
            check(target.cfg)
        if settings.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {settings.max_new_tokens}")
        if settings.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {settings.prefill_chunk}")
        check_verify_rule(settings.verify, where="DecodeSettings.verify")
        check_confidence_schedule(settings.confidence_schedule, self.drafter)
        if self.drafter.num_drafts < 0:
            raise ValueError("num_drafts must be >= 0")
        self.tgraph, self.tstate = nnx.split(target)
        if mesh is not None:
            from hdflash_jax.sharding import shard_state

            self.tstate = shard_state(self.tstate, mesh)
        self.dgraph, self.dstate = None, None
        if drafter_modules is not None:
            self.set_drafter_modules(drafter_modules)
        self._compiled = {}
        self._schedules = {}  # shape -> confidence schedule costs (`set_confidence_schedule`), else settings'
        self.compile_count = 0

    def set_confidence_schedule(self, shape: tuple[int, ...], costs: tuple[float, ...] | None) -> None:
        """The confidence schedule's costs for programs of `shape` (`DecodePlan.shape`), e.g. measured on that
        shape (`decode.verify_costs`); before that shape compiles."""
        check_confidence_schedule(costs, self.drafter)
        if shape in self._compiled and self._schedules.get(shape, self.settings.confidence_schedule) != costs:
            raise ValueError(f"set_confidence_schedule: the program of shape {shape} is already compiled")
        self._schedules[shape] = None if costs is None else tuple(float(c) for c in costs)

    def settings_for(self, plan: DecodePlan) -> DecodeSettings:
        """The settings a program of `plan`'s shape runs with (its own confidence schedule, when one was set)."""
        if plan.shape not in self._schedules:
            return self.settings
        return dataclasses.replace(self.settings, confidence_schedule=self._schedules[plan.shape])

    def set_drafter_modules(self, drafter_modules) -> None:
        """Use these drafter modules' state from the next call on (placed as in __init__). The same graph with
        arrays of the same shapes reuses the compiled programs (the replay ceiling's reference, set per queue); the
        compiled programs hold the graph, so another structure needs another Generator."""
        graph, state = nnx.split(drafter_modules)
        if self.dgraph is not None and graph != self.dgraph:
            raise ValueError("set_drafter_modules: these modules' structure differs from the Generator's drafter; "
                             "build a new Generator for them")
        if self.mesh is not None:
            from hdflash_jax.sharding import shard_state

            state = shard_state(state, self.mesh)
        self.dgraph, self.dstate = graph, state

    def plan(self, prompt_lengths, batch: int | None = None) -> DecodePlan:
        """Bucket, batch, cache length and queue of a generate call on prompts of these lengths (`plan_decode`)."""
        return plan_decode(self.settings, self.drafter.num_drafts, self.cfg.max_seq_len, prompt_lengths, batch)

    def _mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _loop_shardings(self, plan: DecodePlan) -> LoopState:
        return loop_shardings(self.tgraph, self.tstate, self.dgraph, self.dstate, self.drafter,
                              self.settings_for(plan), plan, self.mesh)

    def program(self, plan: DecodePlan) -> GenerateProgram:
        return generate_program(self.tgraph, self.tstate, self.dgraph, self.dstate, self.drafter,
                                self.settings_for(plan), plan, self.mesh)

    def _fn(self, plan: DecodePlan):
        if plan.shape not in self._compiled:
            prog = self.program(plan)

            def counted(*args):
                self.compile_count += 1  # runs once per trace, i.e. per compilation
                return prog.fn(*args)

            self._compiled[plan.shape] = prog.jit(counted)
        return self._compiled[plan.shape]

    def prepare(self, prompts, batch: int | None = None) -> tuple[Queue, DecodePlan]:
        """The queue of `prompts` (lists of ids) padded into the smallest bucket that fits, as host arrays, and the
        plan of a program with `batch` rows (default: one per prompt); clear errors before compiling."""
        plan = self.plan([len(p) for p in prompts], batch)
        tokens = np.zeros((plan.queue, plan.bucket), np.int32)
        lengths = np.zeros((plan.queue,), np.int32)
        keys = np.zeros((plan.queue,), np.int32)
        keys[: len(prompts)] = prompt_keys(prompts)
        for r, p in enumerate(prompts):
            ids = np.asarray(p, np.int64)
            if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
                raise ValueError(f"prompt row {r} has token ids outside [0, {self.cfg.vocab_size})")
            tokens[r, : len(p)], lengths[r] = ids, len(p)
        return Queue(tokens, lengths, keys, np.int32(len(prompts))), plan

    def _inputs(self, prompts, seed: int, max_steps: int | None, batch: int | None):
        """The program's arguments: parameters, the queue, the seed and the step budget (global arrays on a mesh).
        `max_steps` None: until every prompt is done."""
        queue, plan = self.prepare(prompts, batch)
        args = (*queue, np.int32(seed), np.int32(np.iinfo(np.int32).max if max_steps is None else max_steps))
        if self.mesh is not None:
            ins, _ = io_shardings(self.tstate, self.dstate, self.mesh)
            args = tuple(place(x, sh) for x, sh in zip(args, ins[2:]))
        return plan, (self.tstate, self.dstate, *args)

    def lower(self, prompts, seed: int = 0, batch: int | None = None):
        plan, args = self._inputs(prompts, seed, None, batch)
        with self._mesh_context():
            return self._fn(plan).lower(*args)

    def generate_host_loop(self, prompts, seed: int = 0, batch: int | None = None) -> GenerateResult:
        """The same steps driven from Python, one jitted step (and refill) per iteration (what the while_loop
        saves)."""
        queue, plan = self.prepare(prompts, batch)
        queue = Queue(*(jnp.asarray(x) for x in queue))
        settings = self.settings_for(plan)

        def parts(ts, ds):
            target = nnx.merge(self.tgraph, ts)
            modules = nnx.merge(self.dgraph, ds) if self.dgraph else None
            return target, modules, functools.partial(_fill, target, modules, self.drafter, settings, plan.max_len,
                                                      queue)

        def start(ts, ds, seed):
            target, modules, _ = parts(ts, ds)
            return _start(target, modules, self.drafter, settings, plan, queue, seed)

        def step(ts, ds, st):
            target, modules, fill = parts(ts, ds)
            return fill(_step(target, modules, self.drafter, settings, st, st.next < queue.count))

        start, step = jax.jit(start), jax.jit(step)
        with self._mesh_context():
            st = start(self.tstate, self.dstate, np.int32(seed))
            while not bool(jnp.all(st.done)):  # one device→host sync per step
                st = step(self.tstate, self.dstate, st)
        return self._result(st.out, len(prompts), plan)

    def generate(self, prompts, seed: int = 0, max_steps: int | None = None,
                 batch: int | None = None) -> GenerateResult:
        """Generate for every prompt with `batch` rows (default: one per prompt; fewer: each row takes the next
        prompt as it finishes one). `max_steps` caps the verify steps (0: the first rows' prefill and first token
        only, from the same compiled program — what eval times a prefill with)."""
        plan, args = self._inputs(prompts, seed, max_steps, batch)
        with self._mesh_context():
            return self._result(self._fn(plan)(*args), len(prompts), plan)

    def _result(self, out: Outputs, n: int, plan: DecodePlan) -> GenerateResult:
        out = Outputs(*to_host(tuple(out)))
        accepted = out.accepted[:, :n]
        loop_steps, idle, drain = (int(x) for x in out.counts)
        return GenerateResult(out.tokens[:n], out.lengths[:n], accepted, (accepted >= 0).sum(0),
                              self.drafter.num_drafts + 1, out.prefill_finite[:n], out.widths[:, :n], plan.batch,
                              loop_steps, idle, drain)
