"""The train program for `eval.mesh_plan`: one drafter training step (`train.trainer.drafter_train_step`, the pure
function `Trainer` jits) over abstract sharded target params, drafter state and batch; nothing allocated.

    python -m eval.mesh_plan --program train --preset v4-flash --layers 2 --mesh fsdp=8,expert=8 --batch 8 \
        --seq 3072 --anchors 512 [--drafter v4-flash-hyperdflash]

The training options are the drafter trainer's defaults (`train/drafter_config.py`); to plan others, run through
this module with `--train-override key.path=value` (the trainer's own override syntax) before the planner's flags:

    python -m eval.plan_train --train-override train.attention=dense --train-override loss.vocab_chunk=0 \
        --program train ...

`--drafter-only` (also before the planner's flags) makes the target's features and KL-slot hidden states inputs of
the step instead of computing them: the drafter half alone (what offline features would train).

The planner traces the step under `jax.set_mesh(mesh)`: the activation constraints (`sharding.constrain_tokens`,
the drafter's grouped attention) see the mesh's axes only in such a context, so `Trainer._step` must trace under
the mesh too for these figures to be the trainer's.
"""

from __future__ import annotations

import sys

from eval.plan_common import Program, abstract, batch_ways

TRAIN_OVERRIDES: list[str] = []  # set by `python -m eval.plan_train --train-override ...`
DRAFTER_ONLY: list[bool] = [False]  # `--drafter-only`: the target's features are inputs (the drafter half alone)
STEPS = 1000  # the LR schedule's length (it changes nothing the compile measures)


def _drafter_config(cfg, args):
    from hdflash_jax.config import DrafterConfig, get_drafter_preset

    if not args.drafter:
        return DrafterConfig.for_target(cfg)
    if args.drafter.endswith(".json"):
        import json

        with open(args.drafter) as f:
            dcfg = DrafterConfig.from_dict(json.load(f))
    else:
        try:
            dcfg = get_drafter_preset(args.drafter)
        except ValueError as e:
            raise SystemExit(f"--drafter: {e}") from None
    # a preset for the whole target, planned over its first --layers layers
    dcfg = dcfg.replace(target_n_layers=cfg.n_layers) if dcfg.conditioning == "final_streams" else dcfg
    dcfg.check_target(cfg, where="--drafter")
    return dcfg


def _abstract_state(tx, params, param_sh, mesh):
    import jax
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

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

    from eval.mesh_plan import active_params
    from hdflash_jax.deepseek_v4.model import abstract_target
    from hdflash_jax.drafter.model import abstract_drafter, count_params
    from hdflash_jax.sharding import batch_sharding
    from train.drafter_config import load_config
    from train.metrics import drafter_step_flops
    from train.optim import make_optimizer
    from train.pure import PureModule
    from train.trainer import StepParts, drafter_train_step, master_params, train_options

    if name != "train":
        raise ValueError(f"not a train program: {name!r}")
    run = load_config(data={}, overrides=TRAIN_OVERRIDES)
    dcfg = _drafter_config(cfg, args)
    lcfg, attention = train_options(run, dcfg.block_size)
    tmodel = abstract_target(cfg)
    from flax import nnx

    n_target = active_params(cfg, nnx.state(tmodel, nnx.Param))
    tpure, dpure = PureModule(tmodel), PureModule(abstract_drafter(dcfg), params_only=True)
    target_params = abstract(tpure.tree(), tpure.shardings(mesh))
    params = master_params(dpure.tree(), run.train.master_dtype)
    tx, schedule, _ = make_optimizer(run.optim, STEPS, params)
    state, state_sh, rep = _abstract_state(tx, params, dpure.shardings(mesh), mesh)
    parts = StepParts(tpure, dpure, dcfg, lcfg, tx, schedule, attention)

    b, s, n = args.batch, args.seq, args.anchors
    if b % batch_ways(mesh):
        raise SystemExit(f"--batch {b}: the train step shards rows over data x fsdp ({batch_ways(mesh)})")
    row = batch_sharding(mesh, 2)
    batch = {"tokens": jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=row),
             "loss_mask": jax.ShapeDtypeStruct((b, s), jnp.bool_, sharding=row),
             "anchors": jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=row),
             "keep": jax.ShapeDtypeStruct((b, n), jnp.bool_, sharding=row)}
    if DRAFTER_ONLY[0]:
        from hdflash_jax.drafter.reducer import feature_shape
        from jax.sharding import NamedSharding, PartitionSpec as P

        rows = row.spec[0]
        dt = jnp.dtype(cfg.dtype)
        batch["features"] = jax.ShapeDtypeStruct((b, s) + tuple(feature_shape(dcfg)), dt,
                                                 sharding=NamedSharding(mesh, P(rows)))
        if lcfg.uses_teacher:
            batch["teacher_hidden"] = jax.ShapeDtypeStruct((b, n, lcfg.kl_slots, cfg.dim), dt,
                                                           sharding=NamedSharding(mesh, P(rows)))

    def step(state, target_params, batch):
        new_state, metrics = drafter_train_step(parts, state, target_params, batch)
        # the trainer's out_shardings: the state keeps its layout, metrics replicated
        new_state = jax.lax.with_sharding_constraint(new_state, state_sh)
        return new_state, jax.lax.with_sharding_constraint(metrics, rep)

    n_drafter = count_params(nnx.state(abstract_drafter(dcfg), nnx.Param))
    flops = drafter_step_flops(n_target, n_drafter, dcfg, b, s, n, online=not DRAFTER_ONLY[0])
    print(f"  train: drafter {n_drafter:,} params (master {run.train.master_dtype}), attention {attention.impl}, "
          f"remat {attention.remat}, loss vocab_chunk {lcfg.vocab_chunk}", file=sys.stderr)
    return Program(step, (state, target_params, batch), (0,), flops / mesh.size)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, drafter_only, rest = [], False, []
    while argv:
        a = argv.pop(0)
        if a == "--train-override":
            overrides.append(argv.pop(0))
        elif a.startswith("--train-override="):
            overrides.append(a.split("=", 1)[1])
        elif a == "--drafter-only":
            drafter_only = True
        else:
            rest.append(a)
    from eval import mesh_plan, plan_train  # run as __main__, this file is another module than the planner's

    plan_train.TRAIN_OVERRIDES[:] = overrides
    plan_train.DRAFTER_ONLY[:] = [drafter_only]
    return mesh_plan.main(rest)


if __name__ == "__main__":
    main()
