"""On-device generation: one jitted program whose loop is `lax.while_loop`, for AR and every drafter.

Every method runs the same step: propose K drafts → verify [anchor, d_1..d_K] in one target call that extends
the cache by K + 1 → accept (`verify.py`) → emit d_1..d_a and the bonus → roll the target cache back to the
committed length → hand the verified positions' features to the drafter. Autoregressive decoding is this step
with K = 0. Rows accept independently; finished rows ride along with zero-length writes.

A drafter is a small object with three pure methods over its own state pytree (see `Drafter`):
`observe` takes the target's output for the positions just committed (prefill or verify) and the token that
follows each of them; `propose` returns K drafts for the positions after the anchor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hdflash_jax.decode.prefill import chunked_prefill
from hdflash_jax.decode.stats import AcceptanceStats
from hdflash_jax.decode.verify import (accept_block, accept_greedy, accept_sampled, check_verify_rule, sample,
                                      schedule_width, target_probs)
from hdflash_jax.deepseek_v4.cache import init_cache, set_committed_length
from hdflash_jax.decode.drafters import NoDrafter
from hdflash_jax.deepseek_v4.model import DeepseekV4, TargetOutput
from hdflash_jax.sharding import mesh_of, place, row_shardings, rows_sharding, to_host  # noqa: F401 (mesh_of: API)


class Drafter(Protocol):
    """Optionally also `state_shardings(mesh, abstract_state) -> shardings` (on a mesh: the layout its state keeps
    in the decode loop; without it every leaf's batch-row dimension is sharded over the mesh's row axes)."""
    num_drafts: int  # K = block size - 1
    return_layers: tuple[int, ...]  # target layers whose streams the drafter conditions on
    sampled: bool  # True: drafts are samples with probabilities (standard rejection sampling)

    def init_state(self, target: DeepseekV4, modules: Any, batch: int, max_len: int) -> Any: ...

    def observe(self, target: DeepseekV4, modules: Any, state: Any, out: TargetOutput, n_valid: jax.Array,
                next_tokens: jax.Array) -> Any: ...

    def propose(self, target: DeepseekV4, modules: Any, state: Any, anchor: jax.Array, position: jax.Array,
                key: jax.Array) -> tuple[jax.Array, jax.Array | None, Any]: ...


class GenerateResult(NamedTuple):
    tokens: np.ndarray  # [B, max_new_tokens], -1 past each row's end
    lengths: np.ndarray  # [B] generated tokens per row (EOS included)
    accepted: np.ndarray  # [max_steps, B] accepted drafts per step, -1 where the row was already done
    steps: np.ndarray  # [B] verify steps per row
    block_size: int
    prefill_finite: np.ndarray  # [B] bool: every prefill logit of the row's prompt positions is finite
    widths: np.ndarray | None = None  # [max_steps] verify width of each step (anchor + drafts judged), -1: no step

    def width_hist(self) -> list[int]:
        """Steps per verify width 1..block_size (a confidence schedule's choices; unscheduled: all the block)."""
        w = np.asarray(self.widths if self.widths is not None else [])
        return [int((w == i).sum()) for i in range(1, self.block_size + 1)]

    @property
    def stats(self) -> AcceptanceStats:
        """τ, per-position acceptance and the accepted-length histogram over every row's verify steps."""
        return AcceptanceStats.from_accepted(self.accepted, self.accepted >= 0, block_size=self.block_size)

    def row_tokens(self, row: int) -> list[int]:
        return self.tokens[row, : self.lengths[row]].tolist()

    def idle_row_steps(self, rows: int | None = None) -> int:
        """Row-steps spent riding along finished: the loop runs until its slowest row is done, so each of the
        first `rows` rows (default all) idles for (steps of the slowest row − its own steps)."""
        steps = self.steps[: rows if rows is not None else len(self.steps)]
        return int((steps.max() - steps).sum()) if len(steps) else 0


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
    """The shape of one generate program: prompts padded to `bucket`, `batch` rows, caches of `max_len` slots."""
    bucket: int
    batch: int
    max_len: int  # bucket + max_new_tokens + K + 1: the last verify block may run K + 1 slots past the budget

    @property
    def shape(self) -> tuple[int, int]:
        """What a compiled program is keyed by: (bucket, batch)."""
        return (self.bucket, self.batch)


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
    row per prompt) may exceed the number of prompts when a caller pads a batch to a fixed shape."""
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
    if batch < len(lengths):
        raise ValueError(f"batch {batch} is smaller than the {len(lengths)} prompts")
    return DecodePlan(bucket, batch, max_len)


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


class LoopState(NamedTuple):
    """Everything the decode loop carries (a pytree; the host never sees it until the end)."""
    step: jax.Array  # scalar: verify steps taken
    key: jax.Array
    cache: dict  # the target's cache, committed tokens only
    drafter: Any  # the drafter's own state
    anchor: jax.Array  # [B] the bonus token at position cache.length, emitted but not yet run through the target
    out: jax.Array  # [B, max_new_tokens] emitted tokens, -1 past the end
    n_out: jax.Array  # [B]
    done: jax.Array  # [B]
    accepted: jax.Array  # [max_steps, B] accepted drafts per step, -1 where the row was done
    prefill_finite: jax.Array  # [B] the prefill logits of the prompt positions are all finite
    widths: jax.Array  # [max_steps] the verify width of each step (K + 1 unless a confidence schedule cut it), -1


def _prefill(target, modules, drafter: Drafter, settings: DecodeSettings, max_len: int, prompt, prompt_len, key, *,
             loop_shardings: LoopState | None = None):
    """The prompt through the cache in chunks of `settings.prefill_chunk` (one call when the bucket fits one); the
    drafter observes each chunk's committed positions as they come, and only the last position's logits per row
    are kept (every prompt position's are checked finite per chunk). `loop_shardings` (on a mesh): both caches keep
    the decode loop's layout through the chunks too."""
    b, p = prompt.shape
    cache = init_cache(target.cfg, b, max_len, max_block=drafter.num_drafts + 1)
    key, k0 = jax.random.split(key)
    chunk = min(settings.prefill_chunk, p)
    # the token after each prompt position: the prompt shifted, then (per chunk) the first generated token
    after = jnp.concatenate([prompt[:, 1:], jnp.zeros((b, 1), prompt.dtype)], axis=1)
    after = jnp.pad(after, ((0, 0), (0, -(-p // chunk) * chunk - p)))
    pin = ((lambda d: jax.lax.with_sharding_constraint(d, loop_shardings.drafter)) if loop_shardings is not None
           else (lambda d: d))

    def observe(carry, out, n_valid, i, last_logits):
        dst, _ = carry
        # right for every row whose prompt has ended by this chunk (the rest are chosen again in a later chunk):
        # a row's sample depends on its own logits only, so every row gets the token a one-shot prefill gives it
        first = sample(k0, last_logits, settings.temperature, settings.top_p)
        nxt = jax.lax.dynamic_slice_in_dim(after, i * chunk, chunk, axis=1)
        nxt = jnp.where(jnp.arange(chunk)[None, :] == (prompt_len - 1 - i * chunk)[:, None], first[:, None], nxt)
        return pin(drafter.observe(target, modules, dst, out, n_valid, nxt)), first

    carry = (pin(drafter.init_state(target, modules, b, max_len)), jnp.zeros((b,), jnp.int32))
    r = chunked_prefill(target, prompt, prompt_len, cache, chunk, return_layers=drafter.return_layers,
                        on_chunk=observe, carry=carry, check_finite=True,
                        cache_sharding=loop_shardings.cache if loop_shardings is not None else None)
    dst, first = r.carry
    out_buf, n_out, done = _emit(jnp.full((b, settings.max_new_tokens), -1, jnp.int32), jnp.zeros((b,), jnp.int32),
                                 jnp.zeros((b,), bool), first[:, None], jnp.ones((b,), jnp.int32), settings)
    accepted = jnp.full((settings.max_new_tokens, b), -1, jnp.int32)
    return LoopState(jnp.int32(0), key, r.cache, dst, first, out_buf, n_out, done, accepted, r.finite,
                     jnp.full((settings.max_new_tokens,), -1, jnp.int32))


def _step(target, modules, drafter: Drafter, settings: DecodeSettings, st: LoopState) -> LoopState:
    """Draft → verify → accept → emit → commit (roll back) → observe: one speculative step for every row."""
    b, k = st.anchor.shape[0], drafter.num_drafts
    key, k_draft, k_acc = jax.random.split(st.key, 3)
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
    out_buf, n_out, done = _emit(st.out, st.n_out, st.done, emitted, a + 1, settings)
    committed = jnp.where(st.done, 0, a + 1)  # the anchor and the accepted drafts enter the cache
    cache = set_committed_length(vout.cache, start + committed)
    dst = drafter.observe(target, modules, dst, vout, committed, emitted)
    return LoopState(st.step + 1, key, cache, dst, jnp.where(st.done, st.anchor, acc.bonus), out_buf, n_out, done,
                     st.accepted.at[st.step].set(jnp.where(st.done, -1, a)), st.prefill_finite,
                     st.widths.at[st.step].set(judged.get("n_verify", k) + 1))


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


def _running(st: LoopState, max_steps: int) -> jax.Array:
    return (st.step < max_steps) & ~jnp.all(st.done)


def _generate(tgraph, dgraph, drafter: Drafter, settings: DecodeSettings, max_len: int,
              tstate, dstate, prompt, prompt_len, key, max_steps, *, loop_shardings=None):
    """Prefill, then the while_loop for at most `max_steps` verify steps (a traced scalar, so a caller can run
    the same compiled program with 0 steps: its prefill alone). `loop_shardings` (a `LoopState` of shardings, on
    a mesh) pins the loop state's layout, so the carry — both caches included — keeps one sharding and is updated
    in place."""
    target = nnx.merge(tgraph, tstate)
    modules = nnx.merge(dgraph, dstate) if dgraph is not None else None
    pin = ((lambda s: jax.lax.with_sharding_constraint(s, loop_shardings)) if loop_shardings is not None
           else (lambda s: s))
    st = pin(_prefill(target, modules, drafter, settings, max_len, prompt, prompt_len, key,
                      loop_shardings=loop_shardings))
    limit = jnp.minimum(max_steps, settings.max_new_tokens)  # never past the accepted-length log's rows
    st = jax.lax.while_loop(lambda s: _running(s, limit), lambda s: pin(_step(target, modules, drafter, settings, s)),
                            st)
    return st.out, st.n_out, st.accepted, st.prefill_finite, st.widths


def _generate_seeded(tgraph, dgraph, drafter, settings, max_len, tstate, dstate, prompt, prompt_len, seed,
                     max_steps, *, loop_shardings=None):
    """`_generate` with the PRNG key made inside from an int32 seed (a plain array places on any mesh and
    process; `jax.random.key(seed)` inside equals it outside)."""
    return _generate(tgraph, dgraph, drafter, settings, max_len, tstate, dstate, prompt, prompt_len,
                     jax.random.key(seed), max_steps, loop_shardings=loop_shardings)


class GenerateProgram(NamedTuple):
    """One generate program: `fn(tstate, dstate, prompt, prompt_len, seed, max_steps)` and, on a mesh, its in/out
    shardings. `jit` compiles it the one way both of its users do."""
    fn: Callable
    in_shardings: tuple | None
    out_shardings: tuple | None

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
    fn = functools.partial(_generate_seeded, tgraph, dgraph, drafter, settings, plan.max_len, **extra)
    if mesh is None:
        return GenerateProgram(fn, None, None)
    return GenerateProgram(fn, *io_shardings(tstate, dstate, plan, mesh))


def loop_shardings(tgraph, tstate, dgraph, dstate, drafter: Drafter, settings: DecodeSettings, plan: DecodePlan,
                   mesh) -> LoopState:
    """The loop state's shardings: every leaf's batch-row dimension over the mesh's row axes (a drafter with
    `state_shardings` lays out its own state)."""
    target = nnx.merge(tgraph, tstate)
    modules = nnx.merge(dgraph, dstate) if dgraph is not None else None
    k, n = drafter.num_drafts, settings.max_new_tokens

    def empty(b):
        rows = lambda dt, *shape: jnp.zeros(shape, dt)  # noqa: E731
        return LoopState(jnp.int32(0), jax.random.key(0), init_cache(target.cfg, b, plan.max_len, max_block=k + 1),
                         drafter.init_state(target, modules, b, plan.max_len), rows(jnp.int32, b),
                         rows(jnp.int32, b, n), rows(jnp.int32, b), rows(bool, b), rows(jnp.int32, n, b),
                         rows(bool, b), rows(jnp.int32, n))

    shardings = row_shardings(mesh, empty, plan.batch)
    own = getattr(drafter, "state_shardings", None)
    if own is not None:
        abstract = jax.eval_shape(lambda: drafter.init_state(target, modules, plan.batch, plan.max_len))
        shardings = shardings._replace(drafter=own(mesh, abstract))
    return shardings


def io_shardings(tstate, dstate, plan: DecodePlan, mesh):
    """(in_shardings, out_shardings) of the program: parameters where they are, rows of prompts/outputs."""
    b = plan.batch
    params = lambda st: jax.tree.map(lambda x: x.sharding, st) if st is not None else None  # noqa: E731
    rep = rows_sharding(mesh, 1, 0)
    ins = (params(tstate), params(dstate), rows_sharding(mesh, b, 2), rows_sharding(mesh, b, 1), rep, rep)
    outs = (rows_sharding(mesh, b, 2), rows_sharding(mesh, b, 1), rows_sharding(mesh, b, 2, dim=1),
            rows_sharding(mesh, b, 1), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None)))
    return ins, outs


class Generator:
    """Compiles one generate program per (prompt bucket, batch size) and runs it.

    target: a `DeepseekV4`; drafter: a `Drafter` (None → autoregressive); drafter_modules: the drafter's NNX
    module(s) whose parameters travel as explicit state (None for drafters without parameters of their own).
    mesh: run over a `jax.sharding.Mesh` (possibly spanning processes): parameters placed by the logical-axis
    rules of `hdflash_jax.sharding` (a target restored into its shardings stays where it is), prompts, outputs
    and the loop state — both caches — sharded over batch rows, the program compiled with these in/out shardings.
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

    def set_confidence_schedule(self, shape: tuple[int, int], costs: tuple[float, ...] | None) -> None:
        """The confidence schedule's costs for programs of `shape` (bucket, batch), e.g. measured on that shape
        (`decode.verify_costs`); before that shape compiles."""
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
        arrays of the same shapes reuses the compiled programs (the replay ceiling's reference, set per batch); the
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
        """Bucket, batch and cache length of a generate call on prompts of these lengths (see `plan_decode`)."""
        return plan_decode(self.settings, self.drafter.num_drafts, self.cfg.max_seq_len, prompt_lengths, batch)

    def _mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _loop_shardings(self, plan: DecodePlan) -> LoopState:
        return loop_shardings(self.tgraph, self.tstate, self.dgraph, self.dstate, self.drafter, self.settings, plan,
                              self.mesh)

    def _io_shardings(self, plan: DecodePlan):
        return io_shardings(self.tstate, self.dstate, plan, self.mesh)

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

    def prepare(self, prompts) -> tuple[np.ndarray, np.ndarray, DecodePlan]:
        """Pad prompts (lists of ids) into the smallest bucket that fits; clear errors before compiling."""
        plan = self.plan([len(p) for p in prompts])
        lengths = np.array([len(p) for p in prompts], np.int32)
        padded = np.zeros((plan.batch, plan.bucket), np.int32)
        for r, p in enumerate(prompts):
            ids = np.asarray(p, np.int64)
            if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
                raise ValueError(f"prompt row {r} has token ids outside [0, {self.cfg.vocab_size})")
            padded[r, : len(p)] = ids
        return padded, lengths, plan

    def _inputs(self, prompts, seed: int, max_steps: int | None):
        """The program's arguments: parameters, then prompts, lengths, seed and the step budget (global arrays on
        a mesh). `max_steps` None: until every row is done (at most max_new_tokens steps)."""
        padded, lengths, plan = self.prepare(prompts)
        seed = np.int32(seed)
        steps = np.int32(self.settings.max_new_tokens if max_steps is None else max_steps)
        if self.mesh is not None:
            ins, _ = self._io_shardings(plan)
            padded, lengths, seed, steps = (place(x, sh) for x, sh in zip((padded, lengths, seed, steps), ins[2:]))
        return plan, (self.tstate, self.dstate, padded, lengths, seed, steps)

    def lower(self, prompts, seed: int = 0):
        plan, args = self._inputs(prompts, seed, None)
        with self._mesh_context():
            return self._fn(plan).lower(*args)

    def generate_host_loop(self, prompts, seed: int = 0) -> GenerateResult:
        """The same steps driven from Python, one jitted step per iteration (what the while_loop saves)."""
        padded, lengths, plan = self.prepare(prompts)
        if not hasattr(self, "_host_fns"):
            def merged(tstate, dstate):
                return nnx.merge(self.tgraph, tstate), (nnx.merge(self.dgraph, dstate) if self.dgraph else None)

            prefill = lambda ts, ds, p, n, k, max_len: _prefill(*merged(ts, ds), self.drafter, self.settings,
                                                                 max_len, p, n, k)
            step = lambda ts, ds, st: _step(*merged(ts, ds), self.drafter, self.settings, st)
            self._host_fns = (jax.jit(prefill, static_argnums=5), jax.jit(step))
        prefill, step = self._host_fns
        with self._mesh_context():
            st = prefill(self.tstate, self.dstate, jnp.asarray(padded), jnp.asarray(lengths), jax.random.key(seed),
                         plan.max_len)
            while bool(_running(st, self.settings.max_new_tokens)):  # one device→host sync per step
                st = step(self.tstate, self.dstate, st)
        return self._result(st.out, st.n_out, st.accepted, st.prefill_finite, st.widths)

    def generate(self, prompts, seed: int = 0, max_steps: int | None = None) -> GenerateResult:
        """Generate for every prompt. `max_steps` caps the verify steps (0: the prefill and first token only, from
        the same compiled program — what eval times a shape's prefill with)."""
        plan, args = self._inputs(prompts, seed, max_steps)
        with self._mesh_context():
            return self._result(*self._fn(plan)(*args))

    def _result(self, out_buf, n_out, acc_log, prefill_finite, widths) -> GenerateResult:
        out_buf, n_out, acc_log, prefill_finite, widths = to_host((out_buf, n_out, acc_log, prefill_finite, widths))
        return GenerateResult(out_buf, n_out, acc_log, (acc_log >= 0).sum(0), self.drafter.num_drafts + 1,
                              prefill_finite, widths)
