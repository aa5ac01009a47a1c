"""Pure views of NNX modules: a module's variables as a nested dict of arrays, and back (the NNX <-> dict bridge
of the jitted training steps)."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import NamedSharding

from hdflash_jax.checkpoint import dotted, flatten, nest
from hdflash_jax.sharding import logical_to_spec


class PureModule:
    """`tree()` → {'layers': {'0': {'wq': {'weight': array}}}, ...}; `merge(tree)` rebuilds the module (inside or
    outside jit); `shardings(mesh)` → the same tree of NamedShardings by the logical-axis rules.
    With `params_only`, only `nnx.Param`s are in the tree (anything else is kept as a constant).
    """

    def __init__(self, module, params_only: bool = False):
        if params_only:
            self.graphdef, state, self.rest = nnx.split(module, nnx.Param, ...)
        else:
            self.graphdef, state = nnx.split(module)
            self.rest = None
        flat = list(nnx.to_flat_state(state))
        self._values = {dotted(p): v.get_value() for p, v in flat}
        # templates hold shapes only (no second reference to the arrays)
        self.template = [(p, v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype))) for p, v in flat]
        self.keys = [dotted(p) for p, _ in flat]
        self.names = {dotted(p): v.get_metadata().get("out_sharding") for p, v in flat}

    def tree(self) -> dict:
        """The values, handed out once (the view keeps no reference to them afterwards)."""
        values, self._values = self._values, None
        if values is None:
            raise RuntimeError("PureModule.tree(): the values were already handed out")
        return nest(values)

    def shardings(self, mesh) -> dict:
        shapes = {k: v.shape for k, (_, v) in zip(self.keys, self.template)}
        return nest({k: NamedSharding(mesh, logical_to_spec(self.names[k], shapes[k], mesh)) for k in self.keys})

    def in_own_dtypes(self, tree: dict) -> dict:
        """`tree` with each leaf cast to the module's own dtype (fp32 master params -> the compute copy)."""
        flat = flatten(tree)
        dtypes = {k: v.dtype for k, (_, v) in zip(self.keys, self.template)}
        return nest({k: x if x.dtype == dtypes[k] else x.astype(dtypes[k]) for k, x in flat.items()})

    def merge(self, tree: dict):
        flat = flatten(tree)
        state = nnx.from_flat_state([(p, v.replace(flat[k])) for k, (p, v) in zip(self.keys, self.template)])
        if self.rest is not None:
            return nnx.merge(self.graphdef, state, self.rest)
        return nnx.merge(self.graphdef, state)
