"""The measured cost of one decode step at each verify width 1..K+1: what DSpark's confidence schedule
(`DecodeSettings.confidence_schedule`, `verify.schedule_width`) weighs the expected committed tokens against.

`measure_step_costs` times, on one batch's shape (its prompt bucket, batch rows and cache), the parts of a step
that a verify width changes or that every step pays: the drafter's proposal with its confidences, the target's
verify call of width w (`generate.verify_width`, the branch the scheduled step runs) and the drafter's observe of
it. Each width is its own small jitted program, compiled and run once untimed, then timed `repeats` times, the
widths taken in turn (round robin); the fastest run counts (a machine shared with other work only ever adds
time, so the minimum is the step's own cost; on a loaded machine medians of a few runs were not even ordered by
width). The acceptance rule and the output bookkeeping are left out (a few elementwise ops over [B, K+1]).
The figures are wall seconds of this machine: relative costs are what the schedule reads.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx

from hdflash_jax.deepseek_v4.cache import init_cache, set_committed_length


def measure_step_costs(gen, prompts, repeats: int = 10, seed: int = 0, batch: int | None = None) -> tuple[float, ...]:
    """Seconds of a decode step at verify widths 1..K+1 on the shape `gen` (a `Generator` whose drafter has a
    confidence head) plans for `prompts` on `batch` rows (default one per prompt), the target's cache filled to the
    prompt bucket."""
    from hdflash_jax.decode.generate import verify_width

    drafter = gen.drafter
    if not getattr(drafter, "confidence_head", False):
        raise ValueError("measure_step_costs: this drafter has no confidence head")
    queue, plan = gen.prepare(prompts, batch)
    b, k1 = plan.batch, drafter.num_drafts + 1
    tgraph, dgraph = gen.tgraph, gen.dgraph

    def merged(ts, ds):
        return nnx.merge(tgraph, ts), (nnx.merge(dgraph, ds) if dgraph is not None else None)

    @jax.jit
    def states(ts, ds):
        target, modules = merged(ts, ds)
        cache = init_cache(target.cfg, b, plan.max_len, max_block=k1)
        return (set_committed_length(cache, jnp.full((b,), plan.bucket, jnp.int32)),
                drafter.init_state(target, modules, b, plan.max_len))

    def step(w):
        def run(ts, ds, cache, dst, anchor, key):
            target, modules = merged(ts, ds)
            drafts, _, confidence, dst = drafter.propose_with_confidence(target, modules, dst, anchor,
                                                                         cache["length"], key)
            block = jnp.concatenate([anchor[:, None], drafts.astype(jnp.int32)], axis=1)
            vout = verify_width(target, drafter, block, cache, jnp.zeros((b,), bool), w)
            n = jnp.full((b,), w, jnp.int32)
            return vout.logits, confidence, drafter.observe(target, modules, dst, vout, n, block)
        return jax.jit(run)

    with gen._mesh_context():
        cache, dst = states(gen.tstate, gen.dstate)
        args = (gen.tstate, gen.dstate, cache, dst, jnp.asarray(queue.tokens[:b, 0], jnp.int32), jax.random.key(seed))
        fns = [step(w) for w in range(1, k1 + 1)]
        for fn in fns:
            jax.block_until_ready(fn(*args))  # compile and the first run's one-off costs
        times = [[] for _ in fns]
        for _ in range(repeats):  # round robin: a load that comes and goes falls on every width alike
            for fn, ts in zip(fns, times):
                t = time.perf_counter()
                jax.block_until_ready(fn(*args))
                ts.append(time.perf_counter() - t)
    return tuple(min(ts) for ts in times)


def affine_costs(costs) -> tuple[float, ...]:
    """The least-squares line a + b·w through measured step costs at widths 1..K+1, its slope clipped at 0 and its
    values at least a millionth of the mean: what the schedule reads. A step's work grows linearly with the verify
    width (B·w tokens through the target; the drafter and the observe are the same at every width), while on a
    shared CPU the timing noise between neighbouring widths is as large as their difference (the small model at
    batch 12: 20-24 ms at every width, in no order), so read raw the schedule would follow the noise."""
    y = np.asarray(costs, np.float64)
    w = np.arange(1, len(y) + 1, dtype=np.float64)
    slope = max(float(np.polyfit(w, y, 1)[0]), 0.0) if len(y) > 1 else 0.0
    line = y.mean() + slope * (w - w.mean())
    return tuple(float(x) for x in np.maximum(line, 1e-6 * y.mean()))
