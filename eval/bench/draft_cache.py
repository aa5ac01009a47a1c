"""Time one draft step (extend by one block, draft one block) against the cache's size at a fixed live length:
the chunked step over a 'cond' or 'kv' cache vs the dense reference, which attends to every slot.

    python -m eval.bench.draft_cache [--drafter tiny-hyperdflash] [--batch 4] [--live 512] \
        [--max-lens 2048,32768] [--repeats 5]

Prints one line per (layout, max_len): median ms per step. The chunked step should not grow with max_len.
"""

from __future__ import annotations

import argparse
import sys
import time

from hdflash_jax.cli import run_command


def run(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default="tiny-hyperdflash", help="a drafter preset")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--live", type=int, default=512, help="committed tokens per row")
    ap.add_argument("--max-lens", default="2048,32768")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from hdflash_jax.config import get_drafter_preset
    from hdflash_jax.drafter.model import (
        draft_block,
        draft_block_dense,
        extend_draft_cache,
        init_draft_cache,
        init_drafter,
    )
    from hdflash_jax.drafter.reducer import feature_shape

    cfg = get_drafter_preset(args.drafter)
    d = init_drafter(cfg, seed=0)
    graph, state = nnx.split(d)
    k = jax.random.split(jax.random.key(0), 3)
    io = (jax.random.normal(k[0], (cfg.vocab_size, cfg.dim)), jax.random.normal(k[1], (cfg.vocab_size, cfg.dim)))
    b, bs = args.batch, cfg.block_size
    feats = jax.random.normal(k[2], (b, bs) + feature_shape(cfg))
    n = jnp.full((b,), bs, jnp.int32)
    anchors = jnp.zeros((b,), jnp.int32)

    def make(block_fn):
        def step(state, feats, cache):  # the cache donated: updated in place, as in the decode loop
            m = nnx.merge(graph, state)
            cache = extend_draft_cache(m, feats, n, cache)
            logits = block_fn(m, io, anchors, cache)[1]
            return logits, {**cache, "length": cache["length"] - n}  # back to `live` for the next repeat
        return jax.jit(step, donate_argnums=(2,))

    steps = {"chunked": make(draft_block), "dense": make(draft_block_dense)}
    for max_len in (int(x) for x in args.max_lens.split(",")):
        for name, layout in (("chunked", "cond"), ("chunked", "kv"), ("dense", "kv")):
            cache = init_draft_cache(cfg.replace(draft_cache=layout), b, max_len)
            cache = {**cache, "length": jnp.full((b,), args.live, jnp.int32)}
            fn = steps[name]
            _, cache = jax.block_until_ready(fn(state, feats, cache))  # compile
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                _, cache = jax.block_until_ready(fn(state, feats, cache))
                times.append(time.perf_counter() - t0)
            print(f"{name:8s} {layout:5s} max_len {max_len:7d} live {args.live}: {np.median(times) * 1e3:9.2f} ms",
                  flush=True)


def main(argv=None) -> int:
    return run_command(lambda a: (run(a), 0)[1], argv)


if __name__ == "__main__":
    sys.exit(main())
