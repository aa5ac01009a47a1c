"""The target's programs for the AOT planner: prefill, verify and generate, over abstract sharded parameters.

Every program takes the whole target the process holds, the MTP layer included: compiled with `keep_unused`, so a
parameter the program does not read (the MTP layer in all three) still counts in its argument bytes, as it stays
allocated on the device. `generate` is `decode.generate.generate_program`, the program `Generator` (`eval.run`)
compiles, with the autoregressive drafter.
"""

from __future__ import annotations

from hdflash_jax.aot_plan.programs import Program, abstract, abstract_target, batch_ways, per_device_bytes
from hdflash_jax.errors import UsageError


def build(name, cfg, args, mesh) -> Program:
    """The function, abstract arguments and donated argument numbers of one target program."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hdflash_jax.deepseek_v4.cache import init_cache
    from hdflash_jax.sharding import batch_sharding, row_shardings

    graph, state, n_active = abstract_target(cfg, mesh)
    mtp = per_device_bytes(state["mtp"]) if "mtp" in state else 0
    active = 2.0 * n_active * args.batch * args.seq / mesh.size
    b, s = args.batch, args.seq
    keep_all = functools.partial(jax.jit, keep_unused=True)
    if name in ("prefill", "verify"):
        tok_sh = batch_sharding(mesh, 2) if b % batch_ways(mesh) == 0 else None
        tokens = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=tok_sh)
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

            return Program(run_chunked, (state, tokens, lengths, cache), (3,), active,
                           functools.partial(keep_all, donate_argnums=(3,)), mtp)

        def run(state, tokens, cache):
            out = nnx.merge(graph, state)(tokens, cache, last_logits=name == "prefill")
            return out.logits[:, -1], out.cache

        return Program(run, (state, tokens, cache), (2,), active, functools.partial(keep_all, donate_argnums=(2,)),
                       mtp)
    if name == "generate":
        from hdflash_jax.decode.drafters import NoDrafter
        from hdflash_jax.decode.generate import DecodeSettings, generate_program, plan_decode

        new = max((args.context or 2 * s) - s, 1)
        settings = DecodeSettings(max_new_tokens=new, prompt_buckets=(s,),
                                  **({"prefill_chunk": args.chunk} if getattr(args, "chunk", None) else {}))
        drafter = NoDrafter()
        try:  # the Generator's own rule for bucket and cache length
            plan = plan_decode(settings, drafter.num_drafts, cfg.max_seq_len, [s], batch=b)
        except ValueError as e:
            raise UsageError(f"--seq/--context: {e}") from None
        prog = generate_program(graph, state, None, None, drafter, settings, plan, mesh)
        ins = prog.in_shardings
        tokens = jax.ShapeDtypeStruct((plan.queue, plan.bucket), jnp.int32, sharding=ins[2])
        lengths, keys = (jax.ShapeDtypeStruct((plan.queue,), jnp.int32, sharding=sh) for sh in ins[3:5])
        count, seed, steps = (jax.ShapeDtypeStruct((), jnp.int32, sharding=sh) for sh in ins[5:])
        return Program(prog.fn, (state, None, tokens, lengths, keys, count, seed, steps), (), 0.0, prog.jit, mtp,
                       settings.prefill_chunk)
    raise ValueError(f"not a target program: {name!r}")
