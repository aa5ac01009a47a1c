"""What every the AOT planner program builder shares: the `Program` record and abstract sharded state."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple


class Program(NamedTuple):
    fn: Callable  # jitted by the planner
    args: tuple  # abstract arguments (ShapeDtypeStruct with shardings, or pytrees of them)
    donate: tuple[int, ...]  # donated argument numbers
    active_flops: float  # 2 · active parameters · tokens / devices (0 where it means nothing)
    # how to jit fn (None: jax.jit with donate_argnums=donate); the generate program's is the Generator's own
    jit: Callable | None = None
    mtp_bytes: int = 0  # per device: the MTP layer's parameters among the arguments (counted, not read)
    chunk: int = 0  # prompt tokens per prefill call (0: one call over the whole prompt)


def abstract_target(cfg, mesh) -> tuple[Any, Any, int]:
    """(graphdef, abstract state with mesh shardings, active parameter count of the forward) of the target (the MTP
    layer included in the state); nothing allocated."""
    import jax
    from flax import nnx

    from hdflash_jax.deepseek_v4.layers import KeyGen
    from hdflash_jax.deepseek_v4.model import DeepseekV4
    from hdflash_jax.params import active_params
    from hdflash_jax.sharding import state_shardings

    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=KeyGen(0)))
    graph, state = nnx.split(model)
    # the forward's active parameters: the MTP layer is held (an argument) but not run by these programs
    n_active = active_params(cfg, nnx.state(model, nnx.Param)) - (
        active_params(cfg, nnx.state(model.mtp, nnx.Param)) if cfg.n_mtp_layers else 0)
    shardings = state_shardings(state, mesh)
    state = jax.tree.map(lambda v, sh: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh)), state,
                         shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graph, state, n_active


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded `ShapeDtypeStruct`s (the largest shard of each leaf)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def batch_ways(mesh) -> int:
    return mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)


def abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
