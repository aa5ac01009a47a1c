"""The draft program for the AOT planner: one drafting step (append the verified block's features to the draft
cache, then draft one block) at the target's width, with the preset drafter (`--drafter`).

The cache holds `--context` committed tokens (default `--seq`) plus room for the step's block; it is donated and
pinned to its own sharding (rows over data/fsdp/expert, features over tensor), so the compiled step updates it in
place. Also printed: the draft cache's bytes per token per row beside the target cache's.
"""

from __future__ import annotations

from hdflash_jax.aot_plan.programs import Program
from hdflash_jax.errors import UsageError


def drafter_config(cfg, name: str | None):
    """The block drafter of `--drafter` (a preset name or a block drafter's config file), else the default one for
    `cfg`: the one reader of the flag for the draft and train programs."""
    import os

    from hdflash_jax.config import DRAFTER_PRESETS, DrafterConfig, get_drafter_preset
    from hdflash_jax.drafter.dflash2 import DFLASH2_PRESETS
    from hdflash_jax.fileio import read_json

    if name is None:
        return DrafterConfig.for_target(cfg)
    if name in DRAFTER_PRESETS:
        return get_drafter_preset(name)
    if name in DFLASH2_PRESETS:
        return DFLASH2_PRESETS[name]()
    if os.path.isfile(name):
        try:
            return DrafterConfig.from_dict(read_json(name))
        except (TypeError, ValueError) as e:
            raise UsageError(f"--drafter {name}: {e}") from None
    presets = sorted(DRAFTER_PRESETS) + sorted(DFLASH2_PRESETS)
    raise UsageError(f"--drafter: {name!r} is neither a drafter preset ({presets}) nor a file")


def target_cache_bytes_per_token(cfg) -> float:
    """The target cache's bytes per token per row: the growth between two sizes (rings and buffers cancel)."""
    import jax
    import numpy as np

    from hdflash_jax.deepseek_v4.cache import init_cache

    def size(n):
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize
                   for x in jax.tree.leaves(jax.eval_shape(lambda: init_cache(cfg, 1, n))))

    lo = min(cfg.max_seq_len // 2, 1 << 14)
    return (size(2 * lo) - size(lo)) / lo


def _abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build(name, cfg, args, mesh) -> Program:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from hdflash_jax.drafter.cache import draft_cache_bytes_per_token, draft_cache_shardings
    from hdflash_jax.drafter.model import count_params, init_draft_cache
    from hdflash_jax.families import family_of
    from hdflash_jax.drafter.reducer import feature_shape
    from hdflash_jax.sharding import logical_to_spec, state_shardings

    if name != "draft":
        raise ValueError(f"not a draft program: {name!r}")
    dcfg = drafter_config(cfg, args.drafter)
    for field in ("dim", "hc_mult", "vocab_size"):
        if getattr(dcfg, field) != getattr(cfg, field):
            raise UsageError(f"--drafter: {field}={getattr(dcfg, field)}, the target has {getattr(cfg, field)}")
    fam = family_of(dcfg)
    graph, state = nnx.split(fam.abstract(dcfg, cfg))
    state = jax.tree.map(lambda v, sh: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh)), state,
                         state_shardings(state, mesh), is_leaf=lambda x: isinstance(x, nnx.Variable))
    b, bs = args.batch, dcfg.block_size
    context = args.context or args.seq

    def named(names, shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, logical_to_spec(names, shape, mesh)))

    dt = jnp.dtype(cfg.dtype)
    embed = named(("vocab", "embed"), (cfg.vocab_size, cfg.dim), dt)
    head = named(("vocab", "embed"), (cfg.vocab_size, cfg.dim), dt)
    fshape = (b, bs) + feature_shape(dcfg)
    feats = named(("decode_batch",) + (None,) * (len(fshape) - 2) + ("draft_embed",), fshape, dt)
    n_new = named(("decode_batch",), (b,), jnp.int32)
    anchors = named(("decode_batch",), (b,), jnp.int32)
    cache = jax.eval_shape(lambda: init_draft_cache(dcfg, b, context + bs))
    cache = _abstract(cache, draft_cache_shardings(cache, mesh))
    per_tok, target_tok = draft_cache_bytes_per_token(dcfg), target_cache_bytes_per_token(cfg)
    print(f"  draft cache ({dcfg.draft_cache}): {per_tok:,} bytes per token per row; target cache "
          f"{target_tok:,.0f} -> {'<=' if per_tok <= target_tok else '>'} the target's; "
          f"{per_tok * b * (context + bs) / 2**30:.3f} GiB at batch {b} over {context + bs} slots", flush=True)
    fn = fam.draft_step(graph)
    active = 2.0 * count_params(state) * b * bs / mesh.size
    return Program(fn, (state, embed, head, feats, n_new, anchors, cache), (6,), active)
