"""DSpark checkpoint names (`mtp.<i>.*` in the V4 DSpark checkpoints) ↔ the `DSparkDrafter` tree.

Block i's tensors are named like a trunk layer's under `mtp.<i>.` (`attn.wq_a.weight`, `hc_attn_fn`,
`ffn.experts.E.w1.weight`, ...); the first block also holds the feature projection (`main_proj`, `main_norm`), the
last one the output and the heads (`hc_head_*`, `norm`, `markov_head.markov_w{1,2}`, `confidence_head.proj`).
The gated pooling's gates (this project's `dspark-gated`, in no released checkpoint) are `dspark_pool.<k>.hc_head_*`.
Each name is first rewritten into the trunk's naming (`layers.<i>.…`, `hc_head_fn`, …) so that the trunk's one map
(`hdflash_jax.keymap`) does the rest, experts' stacking included.
"""

from __future__ import annotations

import re

import numpy as np

from hdflash_jax import keymap

FIRST_OWN = ("main_proj", "main_norm")
LAST_OWN = ("hc_head_fn", "hc_head_base", "hc_head_scale", "norm", "markov_head", "confidence_head")
# the keys only a native MTP block has: a DSpark block never does
NATIVE_MTP_OWN = ("e_proj", "h_proj", "enorm", "hnorm")
DSPARK_OWN = FIRST_OWN + ("markov_head", "confidence_head")

_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")
_POOL = re.compile(r"^dspark_pool\.(\d+)\.hc_head_(fn|base|scale)$")


def own_key(rest: str) -> str:
    """The first component of a block-relative name (`markov_head.markov_w1.weight` → `markov_head`)."""
    return rest.split(".")[0]


def to_trunk_name(name: str, n_blocks: int) -> str:
    """A DSpark checkpoint name → the trunk-style name whose tree path is the drafter's parameter."""
    m = _POOL.match(name)
    if m:
        return f"pool_gates.{m.group(1)}.hc_head_{m.group(2)}"
    m = _MTP.match(name)
    if not m:
        raise KeyError(f"not a DSpark tensor name: {name!r}")
    i, rest = int(m.group(1)), m.group(2)
    first = own_key(rest)
    if first in FIRST_OWN:
        if i != 0:
            raise KeyError(f"{name!r}: {first} belongs to the first DSpark block (mtp.0)")
        return rest
    if first in LAST_OWN:
        if i != n_blocks - 1:
            raise KeyError(f"{name!r}: {first} belongs to the last DSpark block (mtp.{n_blocks - 1})")
        return rest
    return f"layers.{i}.{rest}"


def from_trunk_name(name: str, n_blocks: int) -> str:
    """Inverse of `to_trunk_name`."""
    m = re.match(r"^pool_gates\.(\d+)\.hc_head_(fn|base|scale)$", name)
    if m:
        return f"dspark_pool.{m.group(1)}.hc_head_{m.group(2)}"
    m = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if m:
        return f"mtp.{m.group(1)}.{m.group(2)}"
    first = name.split(".")[0]
    if first in FIRST_OWN:
        return f"mtp.0.{name}"
    return f"mtp.{n_blocks - 1}.{name}"


def tree_to_dspark_names(path: str, n_blocks: int, n_experts: int | None = None) -> list[str]:
    return [from_trunk_name(n, n_blocks) for n in keymap.tree_to_official(path, n_experts)]


def assemble_dspark(flat: dict[str, np.ndarray], abstract_state, n_blocks: int, source: str = "checkpoint"
                    ) -> dict[str, np.ndarray]:
    """DSpark-named tensors → {tree path: array} for every leaf of the drafter, strictly (errors name the
    checkpoint's key)."""
    renamed = {}
    for name, value in flat.items():
        renamed[to_trunk_name(name, n_blocks)] = value
    try:
        out = keymap.assemble_tree(renamed, abstract_state, source=source)
    except KeyError as e:
        raise KeyError(_restore_names(str(e.args[0]), n_blocks)) from None
    except ValueError as e:
        raise ValueError(_restore_names(str(e), n_blocks)) from None
    return out


def _restore_names(msg: str, n_blocks: int) -> str:
    def sub(m):
        n = m.group(1)
        try:
            return repr(from_trunk_name(n, n_blocks))
        except KeyError:
            return m.group(0)
    return re.sub(r"tensor '([^']+)'", lambda m: "tensor " + sub(m), msg)
