"""The target's programs for the AOT planner: prefill, verify and generate, over abstract sharded parameters."""

from __future__ import annotations

from hdflash_jax.aot_plan.programs import Program, abstract, abstract_target, batch_ways


def build(name, cfg, args, mesh) -> Program:
    """The function, abstract arguments and donated argument numbers of one target program."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hdflash_jax.deepseek_v4.cache import init_cache
    from hdflash_jax.sharding import batch_sharding, row_shardings

    graph, state, n_active = abstract_target(cfg, mesh)
    active = 2.0 * n_active * args.batch * args.seq / mesh.size
    b, s = args.batch, args.seq
    tok_sh = batch_sharding(mesh, 2) if b % batch_ways(mesh) == 0 else None
    tokens = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=tok_sh)
    if name in ("prefill", "verify"):
        max_len = args.context or (s if name == "prefill" else 2 * s)
        if name == "verify":
            max_len = max_len + s if args.context else max_len
        mb = s if name == "verify" else 1
        cache = jax.eval_shape(lambda: init_cache(cfg, b, max_len, max_block=mb))
        # rows sharded wherever they sit (under scan a cache leaf leads with the unit axis, not the rows)
        cache = abstract(cache, row_shardings(mesh, lambda bb: init_cache(cfg, bb, max_len, max_block=mb), b))

        chunk = getattr(args, "chunk", None)
        if name == "prefill" and chunk:  # the chunked program: one fori_loop of chunk-token cache extensions
            from hdflash_jax.decode.prefill import chunked_prefill

            lengths = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding(mesh, 1) if tok_sh else None)

            def run_chunked(state, tokens, lengths, cache):
                r = chunked_prefill(nnx.merge(graph, state), tokens, lengths, cache, chunk)
                return r.logits, r.cache

            return Program(run_chunked, (state, tokens, lengths, cache), (3,), active)

        def run(state, tokens, cache):
            out = nnx.merge(graph, state)(tokens, cache, last_logits=name == "prefill")
            return out.logits[:, -1], out.cache

        return Program(run, (state, tokens, cache), (2,), active)
    if name == "generate":
        import functools

        from hdflash_jax.decode.drafters import NoDrafter
        from hdflash_jax.decode.generate import DecodeSettings, _generate

        new = max((args.context or 2 * s) - s, 1)
        settings = DecodeSettings(max_new_tokens=new, prompt_buckets=(s,))
        fn = functools.partial(_generate, graph, None, NoDrafter(), settings, s + new + 1)
        lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
        key = jax.eval_shape(lambda: jax.random.key(0))
        return Program(lambda st, p, n, k: fn(st, None, p, n, k, new), (state, tokens, lengths, key), (), 0.0)
    raise ValueError(f"not a target program: {name!r}")
