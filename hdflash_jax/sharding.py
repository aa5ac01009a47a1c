"""Logical axis names → mesh axes, in one table; mesh construction; shardings for params and activations.

Parameters carry logical names (`out_sharding` metadata, e.g. ("expert", "mlp", "embed")). `RULES` maps each
name to the mesh axes that shard it. A mesh axis that the mesh lacks, or that does not divide the dimension, is
dropped for that dimension (it stays replicated) so one rule table serves every mesh shape and model size.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hdflash_jax.mesh_spec import MESH_AXES, parse_mesh  # noqa: E402,F401 — the one mesh-string parser

RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    # rows of decode state (both caches, activations): the expert axis too. A decode step's attention and caches
    # have no expert dimension, so without it every expert group would hold a full copy of every row's cache ("DP
    # attention + EP MoE"); the MoE's all-to-all takes the tokens from there.
    "decode_batch": ("data", "fsdp", "expert"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "embed_out": ("tensor",),
    "heads": ("tensor",),
    "heads_only": ("tensor",),
    "o_groups": ("tensor",),
    "mlp": ("tensor",),
    "expert": ("expert",),
    # the low-rank query and the grouped output's per-group input: over fsdp, so that on a mesh without "tensor"
    # (fsdp x expert training) wq_b and wo_a are not whole on every device (5.7 GiB of V4-Flash's 43 layers)
    "q_lora": ("fsdp",),
    "o_group_in": ("fsdp",),
    "kv": (),
    "norm": (),
    "hc": (),
    "hc_in": ("fsdp",),
    "layers": (),  # the stacked axis of scanned layers: never sharded (the scan slices it)
    # the draft cache's rows follow "decode_batch"; its features and KV heads:
    "draft_embed": ("tensor",),
    "draft_kv": ("tensor",),
}


def make_mesh(shape: dict[str, int], devices=None) -> Mesh:
    """A mesh with the named axes (Auto axis types, GSPMD style), e.g. {"data": 2, "expert": 2, "tensor": 2}."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    names = tuple(a for a in MESH_AXES if a in shape)
    sizes = tuple(int(shape[a]) for a in names)
    devices = jax.devices() if devices is None else devices
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}")
    return jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names), devices=devices)


def mesh_from_spec(spec: str | dict | None, devices=None, *, use_first: bool = False) -> Mesh:
    """The mesh of a --mesh string or {axis: size} (None: every device on 'data'). With `use_first`, a mesh smaller
    than `devices` takes the first of them (one process trying a mesh on its simulated devices); otherwise the
    mesh must use every device."""
    devices = jax.devices() if devices is None else list(devices)
    shape = parse_mesh(spec) if isinstance(spec, str) else (dict(spec) if spec else {"data": len(devices)})
    n = int(np.prod(list(shape.values())))
    if use_first and n < len(devices):
        devices = devices[:n]
    return make_mesh(shape, devices=devices)


def logical_to_spec(names, shape, mesh: Mesh) -> P:
    """PartitionSpec for one array with logical axis names, dropping mesh axes that do not fit."""
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, names or (None,) * len(shape)):
        axes = []
        size = 1
        for axis in RULES.get(name, ()) if name else ():
            n = mesh.shape.get(axis, 1)
            if n > 1 and axis not in used and dim % (size * n) == 0:
                axes.append(axis)
                used.add(axis)
                size *= n
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return P(*spec)


def state_shardings(state, mesh: Mesh):
    """NamedSharding for every leaf of an NNX state (from each variable's logical names)."""
    def one(var):
        names = var.get_metadata().get("out_sharding")
        return NamedSharding(mesh, logical_to_spec(names, var.shape, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state, mesh: Mesh):
    """Place an NNX state onto the mesh by the logical rules (multi-process safe: see `place`)."""
    shardings = state_shardings(state, mesh)
    return jax.tree.map(lambda v, s: v.replace(place(v.get_value(), s)), state, shardings,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def place(x, sharding):
    """A host (or single-device) array as a global array of `sharding`; already there: unchanged. With several
    processes every process must pass the same value (same seed / same file); each puts only its own shards."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    a = np.asarray(x)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def to_host(tree):
    """Numpy copies of global arrays, gathered from every process when some shards live elsewhere."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def mesh_of(module) -> Mesh | None:
    """The mesh a module's parameters live on (a `NamedSharding` over more than one device), else None."""
    for x in jax.tree.leaves(nnx.state(module)):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding) and sh.mesh.size > 1:
            return sh.mesh
    return None


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard the leading (batch) dimension over the data-parallel axes present in the mesh."""
    axes = tuple(a for a in RULES["batch"] if mesh.shape.get(a, 1) > 1)
    lead = axes if len(axes) > 1 else (axes[0] if axes else None)
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def _greedy_axes(sizes, rule: str, dim: int) -> tuple[str, ...]:
    """The rule's axes present in the mesh, each kept while the product still divides `dim`."""
    axes, size = [], 1
    for a in RULES[rule]:
        n = sizes.get(a, 1)
        if n > 1 and dim % (size * n) == 0:
            axes.append(a)
            size *= n
    return tuple(axes)


def _spec(axes):
    """A PartitionSpec entry for these mesh axes: None, one name, or the tuple."""
    return None if not axes else (axes if len(axes) > 1 else axes[0])


def row_axes(mesh: Mesh, batch: int) -> tuple[str, ...]:
    """The mesh axes that shard `batch` rows of decode state (caches, tokens, outputs): the decode batch rule's
    axes, each kept while the product still divides `batch` (rows that do not split stay whole)."""
    return _greedy_axes(dict(mesh.shape), "decode_batch", batch)


def rows_sharding(mesh: Mesh, batch: int, ndim: int, dim: int = 0) -> NamedSharding:
    """Dimension `dim` (of `ndim`) holds `batch` rows: shard it by `row_axes`, everything else replicated."""
    axes = row_axes(mesh, batch)
    spec = [None] * ndim
    if axes:  # none for a scalar (ndim 0)
        spec[dim] = _spec(axes)
    return NamedSharding(mesh, P(*spec))


def row_shardings(mesh: Mesh, make, batch: int):
    """Shardings of the pytree `make(batch)` (e.g. an empty decode cache) with rows over `row_axes`: a leaf's
    row dimension is the one that changes when the batch does (found from abstract shapes at `batch` and
    `batch + 1`, so stacked layer axes or any layout need no rule of their own); leaves without one (scalars, a
    PRNG key) are replicated. Heads are not sharded: the target's cache holds one shared latent K/V per position
    (no head axis), so rows are the only axis that splits it without a gather in every attention call."""
    at = jax.eval_shape(lambda: make(batch))
    more = jax.eval_shape(lambda: make(batch + 1))

    def one(a, b):
        dims = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        if len(dims) == 1 and a.shape[dims[0]] == batch:
            return rows_sharding(mesh, batch, len(a.shape), dims[0])
        return NamedSharding(mesh, P())

    return jax.tree.map(one, at, more)


# activations [B, T, ...]: rows over the decode batch axes; positions over the expert axis when the rows did not
# take it (at batch 1 the expert axis would otherwise hold a full copy of every token's streams; the MoE gathers
# tokens for its experts anyway)
SEQUENCE_AXES = ("expert",)


def constrain_tokens(x: jax.Array) -> jax.Array:
    """Shard an activation [B, T, ...] over the current mesh's row axes (`decode_batch`, greedy) and the sequence
    axes the rows left free, where they divide it; unchanged outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    sizes = dict(mesh.shape)
    rows = _greedy_axes(sizes, "decode_batch", x.shape[0])
    seq = _free_sequence_axes(sizes, rows)
    n = int(np.prod([sizes[a] for a in seq])) if seq else 1
    spec = P(_spec(rows), _spec(seq) if seq and x.shape[1] % n == 0 else None, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, spec)


def _free_sequence_axes(sizes, rows) -> tuple[str, ...]:
    return tuple(a for a in SEQUENCE_AXES if sizes.get(a, 1) > 1 and a not in rows)


def _sequence_axes_size(batch: int) -> tuple[tuple[str, ...], int]:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    sizes = dict(mesh.shape)
    axes = _free_sequence_axes(sizes, _greedy_axes(sizes, "decode_batch", batch))
    return axes, int(np.prod([sizes[a] for a in axes])) if axes else 1


def sequence_groups(n: int, batch: int) -> int:
    """How many groups of `n` sequence chunks of `batch` rows run side by side: the size of the sequence axes the
    rows left free (`constrain_tokens`' rule) if it divides n, else 1."""
    _, size = _sequence_axes_size(batch)
    return size if size > 1 and n % size == 0 else 1


def constrain_groups(x: jax.Array, batch: int, *, free_rest: bool = False) -> jax.Array:
    """Shard the leading (chunk group) dimension over the sequence axes that `batch` rows left free; the other
    dimensions replicated, or with `free_rest` left to propagation (rows already sharded stay so: no gather)."""
    axes, size = _sequence_axes_size(batch)
    if size == 1 or x.shape[0] % size:
        return x
    lead = _spec(axes)
    rest = P.UNCONSTRAINED if free_rest else None
    return jax.lax.with_sharding_constraint(x, P(lead, *([rest] * (x.ndim - 1))))
