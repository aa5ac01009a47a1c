"""Mesh strings ('data=2,expert=4'): the axis names and the one parser, jax-free (the AOT planner sizes its
simulated devices from a --mesh string before any backend exists). `hdflash_jax.sharding.mesh_from_spec` builds
the mesh."""

from __future__ import annotations

import math

MESH_AXES = ("data", "fsdp", "expert", "tensor")


def parse_mesh(spec: str) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' → {"data": 2, "fsdp": 2, "tensor": 2}: the one parser of a mesh string (known axes,
    positive sizes, each axis once); jax-free, so a planner can size its simulated devices before they exist."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, size = part.partition("=")
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"expected NAME=SIZE with SIZE >= 1, got {part!r}")
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r}; use {', '.join(MESH_AXES)}")
        if name in out:
            raise ValueError(f"axis {name!r} given twice")
        out[name] = int(size)
    if not out:
        raise ValueError(f"no axis in {spec!r}; e.g. data=2,expert=4")
    return out


def mesh_size(spec: str) -> int:
    """Devices a mesh string needs."""
    return math.prod(parse_mesh(spec).values())
