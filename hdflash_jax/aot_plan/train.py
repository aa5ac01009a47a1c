"""The train program of the AOT planner: one drafter training step (`hdflash_jax.training.step`, the pure function
`train.trainer.Trainer` jits) over abstract sharded target params, drafter state and batch; nothing allocated.

    python -m hdflash_jax.aot_plan --program train --preset v4-flash --layers 2 --mesh fsdp=8,expert=8 --batch 8 \
        --seq 3072 --anchors 512 [--drafter v4-flash-hyperdflash] [--train-override train.attention=dense] \
        [--drafter-only]

The training options are the drafter trainer's defaults (`hdflash_jax.train_config`); `--train-override` sets
others in the trainer's own syntax. `--drafter-only` plans the step of a run on offline features
(`features.mode: offline`): the same pure step, whose batch carries the target's features and teacher hidden
states (`training.features.offline_batch_spec`, as the trainer's) and whose target params are the embedding and
head alone (`drafter.model.target_io_tree`, as the trainer's); it also prints the features' disk cost per token.

The planner traces the step under the mesh's abstract axes, as `Trainer._step` does: the activation constraints
(`sharding.constrain_tokens`, the drafter's grouped attention) see the mesh's axes only in such a context.
"""

from __future__ import annotations

import functools
import sys

from hdflash_jax.aot_plan.programs import Program, abstract, batch_ways, per_device_bytes
from hdflash_jax.errors import UsageError

STEPS = 1000  # the LR schedule's length (it changes nothing the compile measures)


def _drafter_config(cfg, args):
    """--drafter (`draft.drafter_config`), a preset for the whole target planned over its first --layers layers."""
    from hdflash_jax.aot_plan.draft import drafter_config

    dcfg = drafter_config(cfg, args.drafter)
    dcfg = dcfg.replace(target_n_layers=cfg.n_layers) if dcfg.conditioning == "final_streams" else dcfg
    dcfg.check_target(cfg, where="--drafter")
    return dcfg


def _abstract_state(tx, params, param_sh, mesh):
    import jax
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rep = NamedSharding(mesh, P())
    opt = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt, param_sh, transform_non_params=lambda _: rep)
    shapes = {"params": params, "opt_state": opt, "step": jax.ShapeDtypeStruct((), np.int32),
              "rng": jax.ShapeDtypeStruct((2,), np.uint32)}
    shardings = {"params": param_sh, "opt_state": opt_sh, "step": rep, "rng": rep}
    return abstract(shapes, shardings), shardings, rep


def build(name, cfg, args, mesh) -> Program:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hdflash_jax.deepseek_v4.model import abstract_target
    from hdflash_jax.deepseek_v4.scan import stacks_as_words
    from hdflash_jax.drafter.model import count_params, target_io_tree
    from hdflash_jax.families import family_of
    from hdflash_jax.params import active_params
    from hdflash_jax.sharding import batch_sharding
    from hdflash_jax.train_config import load_config
    from hdflash_jax.training.flops import drafter_step_flops
    from hdflash_jax.training.optim import make_optimizer
    from hdflash_jax.training.pure import PureModule
    from hdflash_jax.training.step import StepParts, master_params

    if name != "train":
        raise ValueError(f"not a train program: {name!r}")
    run = load_config(data={}, overrides=args.train_override)
    dcfg = _drafter_config(cfg, args)
    fam = family_of(dcfg)
    lcfg, attention = fam.loss_for(run.drafter.loss, dcfg), run.train.attention_options()
    tmodel = abstract_target(cfg)
    # the forward's active parameters: the MTP layer is held (the trainer builds the whole target) but not run
    n_target = active_params(cfg, nnx.state(tmodel, nnx.Param)) - (
        active_params(cfg, nnx.state(tmodel.mtp, nnx.Param)) if cfg.n_mtp_layers else 0)
    tpure, dpure = PureModule(tmodel), PureModule(fam.abstract(dcfg, cfg), params_only=True)
    target_params = abstract(tpure.tree(), tpure.shardings(mesh))
    # as `Trainer` holds them: the embedding and head alone offline, else the scanned stacks as 16-bit words
    target_params = target_io_tree(target_params) if args.drafter_only else stacks_as_words(target_params)
    params = master_params(dpure.tree(), run.train.master_dtype)
    tx, schedule, _ = make_optimizer(run.optim, STEPS, params)
    state, state_sh, rep = _abstract_state(tx, params, dpure.shardings(mesh), mesh)
    parts = StepParts(tpure, dpure, dcfg, lcfg, tx, schedule, attention)

    b, s, n = args.batch, args.seq, args.anchors
    if b % batch_ways(mesh):
        raise UsageError(f"--batch {b}: the train step shards rows over data x fsdp ({batch_ways(mesh)})")
    row = batch_sharding(mesh, 2)
    batch = {"tokens": jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=row),
             "loss_mask": jax.ShapeDtypeStruct((b, s), jnp.bool_, sharding=row),
             "anchors": jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=row),
             "keep": jax.ShapeDtypeStruct((b, n), jnp.bool_, sharding=row)}
    if args.drafter_only:
        from hdflash_jax.training.features import Layout, offline_batch_spec

        layout = Layout.of(fam, dcfg, lcfg, cfg)
        batch.update(offline_batch_spec(layout, b, s, n, lambda ndim: batch_sharding(mesh, ndim)))
        per = layout.bytes_per_token()
        print(f"  offline features: {sum(per.values()):,} bytes/token ("
              + ", ".join(f"{k} {v:,}" for k, v in per.items()) + "), computed from the layout's shapes",
              file=sys.stderr)

    def step(state, target_params, batch):
        new_state, metrics = fam.train_step(parts, state, target_params, batch)
        # the trainer's out_shardings: the state keeps its layout, metrics replicated
        new_state = jax.lax.with_sharding_constraint(new_state, state_sh)
        return new_state, jax.lax.with_sharding_constraint(metrics, rep)

    n_drafter = count_params(nnx.state(fam.abstract(dcfg, cfg), nnx.Param))
    flops = drafter_step_flops(n_target, n_drafter, fam.draft_shape(dcfg, cfg), b, s, n, online=not args.drafter_only)
    print(f"  train: drafter {n_drafter:,} params (master {run.train.master_dtype}), attention {attention.impl}, "
          f"remat {attention.remat}, loss vocab_chunk {lcfg.vocab_chunk}", file=sys.stderr)
    # compiled with keep_unused: parameters the step does not read (the MTP layer, online) stay allocated, so they
    # count in its argument bytes
    mtp = per_device_bytes(target_params["mtp"]) if "mtp" in target_params else 0
    return Program(step, (state, target_params, batch), (0,), flops / mesh.size,
                   functools.partial(jax.jit, donate_argnums=(0,), keep_unused=True), mtp)

