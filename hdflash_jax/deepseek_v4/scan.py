"""Layers under scan: which layers repeat, their parameters stacked along a leading layer axis, and the scan.

`layer_plan(cfg)` splits the decoder layers into an unrolled prefix (the hash-routed layers and whatever precedes
the repeating part of `compress_ratios`), `n_units` repeats of a unit of `period` layers (e.g. one [HCA, CSA]
pair at V4-Flash), and an unrolled tail. Unit position j of every unit has the same layer kind, so its parameters
stack into one `Block` whose arrays carry a leading axis of size `n_units` (logical axis "layers", never sharded),
and its caches stack the same way. The compiled program then holds one unit's layers whatever the depth.

A frozen target may hand its stacks in as 16-bit words (`stacks_as_words`: the bits of each bf16 stack as uint16,
what the drafter trainer and its AOT plan pass): the scan then slices words and bitcasts each unit's slice back, so
the weights stay 16-bit per unit on every backend. It exists for XLA:CPU, which has no bf16 dynamic-slice: its
float normalisation widens the whole stacked operand to fp32 and moves that copy out of the loop (an fp32 copy of
every scanned weight, 0.68 GiB per V4-Flash layer and device on fsdp=8,expert=8); sliced as words there is
nothing to widen. On TPU/GPU the words slice like bf16 and the bitcasts are free.

Layer i of the canonical (unrolled) numbering is unit (i - prefix) // period, position (i - prefix) % period.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hdflash_jax.sharding import constrain_tokens

LAYER_AXIS = "layers"


class LayerPlan(NamedTuple):
    prefix: int  # layers [0, prefix) unrolled
    period: int  # layers per scanned unit (0: nothing scanned)
    n_units: int  # scanned units

    @property
    def tail_start(self) -> int:
        return self.prefix + self.period * self.n_units

    def layer(self, unit: int, pos: int) -> int:
        return self.prefix + unit * self.period + pos

    def locate(self, layer: int) -> tuple[str, int, int | None]:
        """('layers', i, None) | ('scan', position, unit) | ('tail', k, None) for canonical layer `layer`."""
        if layer < self.prefix:
            return "layers", layer, None
        if layer < self.tail_start:
            unit, pos = divmod(layer - self.prefix, self.period)
            return "scan", pos, unit
        return "tail", layer - self.tail_start, None


def find_repeats(ratios: tuple[int, ...], first: int) -> LayerPlan:
    """The unit covering the most layers of `ratios[first:]` in >= 2 back-to-back repeats (ties: the shorter unit,
    then the earlier start); LayerPlan(len, 0, 0) when nothing repeats."""
    n = len(ratios)
    best, plan = (0, 0, 0), LayerPlan(n, 0, 0)
    for start in range(first, n):
        for period in range(1, (n - start) // 2 + 1):
            unit = ratios[start:start + period]
            reps = 1
            while start + (reps + 1) * period <= n and ratios[start + reps * period:start + (reps + 1) * period] == unit:
                reps += 1
            score = (reps * period, -period, -start)
            if reps >= 2 and score > best:
                best, plan = score, LayerPlan(start, period, reps)
    return plan


def layer_plan(cfg) -> LayerPlan:
    """The plan for a target config: nothing scanned unless `cfg.scan_layers`; hash layers always unrolled (their
    gate holds a token → expert table instead of a bias, so they do not stack with score-routed layers)."""
    if not cfg.scan_layers:
        return LayerPlan(cfg.n_layers, 0, 0)
    return find_repeats(tuple(cfg.layer_ratios), min(cfg.n_hash_layers, cfg.n_layers))


# ---- stacking ------------------------------------------------------------------------------------------------

def _stacked_variable(variables):
    first = variables[0]
    names = first.get_metadata().get("out_sharding")
    value = jnp.stack([v.get_value() for v in variables])
    updates = {"out_sharding": (LAYER_AXIS,) + tuple(names)} if names is not None else {}
    return first.replace(value, **updates)


def stack_modules(modules):
    """Modules of one structure → one module whose every variable stacks theirs along a new leading axis."""
    graphdef, first = nnx.split(modules[0])
    states = [first] + [nnx.split(m)[1] for m in modules[1:]]
    with nnx.use_eager_sharding(False):
        stacked = jax.tree.map(lambda *vs: _stacked_variable(vs), *states,
                               is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)


def unstack_module(stacked, unit: int):
    """Unit `unit` of a stacked module, as a module of the unstacked structure (a view for tests and tools)."""
    graphdef, state = nnx.split(stacked)

    def one(v):
        names = v.get_metadata().get("out_sharding")
        updates = {"out_sharding": tuple(names)[1:]} if names is not None else {}
        return v.replace(v.get_value()[unit], **updates)

    with nnx.use_eager_sharding(False):
        return nnx.merge(graphdef, jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def stack_caches(caches: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *caches)


def unstack_caches(stacked: dict, n_units: int) -> list[dict]:
    return [jax.tree.map(lambda x: x[u], stacked) for u in range(n_units)]


def layer_caches(cache: dict, plan: LayerPlan) -> list[dict]:
    """Every decoder layer's cache in canonical order (scanned units unstacked: a copy, for tests and tools)."""
    out = list(cache["layers"])
    units = [unstack_caches(c, plan.n_units) for c in cache.get("scan", [])]
    out += [units[j][u] for u in range(plan.n_units) for j in range(plan.period)]
    return out + list(cache.get("tail", []))


# ---- 16-bit words ---------------------------------------------------------------------------------------------

WORD_DTYPES = {jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.uint16)}  # a stacked dtype -> the words that carry it


def stacks_as_words(tree: dict) -> dict:
    """A target's pure tree (`training.pure.PureModule.tree()`, arrays or ShapeDtypeStructs) with every bf16 leaf
    under "scan" replaced by its bits as uint16 (same shape; a numpy view or a bitcast, no arithmetic)."""
    def words(x):
        dt = WORD_DTYPES.get(jnp.dtype(x.dtype))
        if dt is None:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dt, sharding=x.sharding)
        return jax.lax.bitcast_convert_type(x, dt)
    return {k: jax.tree.map(words, v) if k == "scan" else v for k, v in tree.items()}


def _from_words(x):
    dt = {w: d for d, w in WORD_DTYPES.items()}.get(jnp.dtype(x.dtype))
    return x if dt is None else jax.lax.bitcast_convert_type(x, dt)


# ---- the scan ------------------------------------------------------------------------------------------------

def run_units(blocks, plan: LayerPlan, streams, tokens, positions, start, n_new, caches, taps: tuple[int, ...]):
    """Scan the stacked unit blocks over their units.

    blocks: one stacked `Block` per unit position; caches: one stacked cache dict per position. `taps`: canonical
    layer indices (inside the scanned range) whose output streams are wanted; they are kept in a carried buffer,
    each written at its own unit, so the cost is one select per tap and layer, never a stream per unit.
    The stacked caches ride in the carry, each unit's slice read and written back in place: as scan outputs they
    would be a second stacked copy of every cache (the loop cannot write its outputs into the donated inputs).
    Stacks held as 16-bit words (`stacks_as_words`) are bitcast back one unit at a time.
    Returns (streams, new stacked caches, dropped expert assignments, tapped streams in the order of `taps`).
    """
    graphdefs, states = zip(*(nnx.split(b) for b in blocks))
    where = [plan.locate(i)[1:] for i in taps]  # (position, unit) per tap

    def body(carry, xs):
        streams, dropped, kept, caches = carry
        unit, unit_states = xs
        unit_states = jax.tree.map(_from_words, unit_states)
        new_caches = []
        for pos in range(plan.period):
            block = nnx.merge(graphdefs[pos], unit_states[pos])
            mine = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, unit, 0, keepdims=False), caches[pos])
            streams, c, d = block(constrain_tokens(streams), tokens, positions, start, n_new, mine)
            new_caches.append(jax.tree.map(lambda a, x: jax.lax.dynamic_update_index_in_dim(a, x, unit, 0),
                                           caches[pos], c))
            dropped = dropped + d
            kept = tuple(jnp.where(unit == u, streams, k) if p == pos else k for k, (p, u) in zip(kept, where))
        return (streams, dropped, kept, tuple(new_caches)), None

    kept0 = tuple(jnp.zeros_like(streams) for _ in taps)
    init = (streams, jnp.zeros((), jnp.int32), kept0, tuple(caches))
    (streams, dropped, kept, new_caches), _ = jax.lax.scan(body, init, (jnp.arange(plan.n_units), tuple(states)))
    return streams, list(new_caches), dropped, kept
