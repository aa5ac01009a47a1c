"""What the `mtp.*` tensors of a V4 checkpoint are: DeepSeek's native MTP block or a DSpark drafter.

Decided by the config AND the keys, never by the prefix alone (serving engines that remapped `mtp.{i}.*` by
prefix half-loaded DSpark blocks as MTP): a DSpark checkpoint declares `dspark_*` keys and its blocks carry
`main_proj`/`main_norm` (first block), `markov_head`/`confidence_head` (last) and none of the native block's input
fusion (`enorm`, `hnorm`, `e_proj`, `h_proj`). Anything half-matching is refused naming the offending keys.
"""

from __future__ import annotations

import re

from hdflash_jax.dspark.config import is_dspark_config
from hdflash_jax.dspark.keymap import DSPARK_OWN, NATIVE_MTP_OWN
from hdflash_jax.safetensors_io import CheckpointError

_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")


def _own(names, kinds) -> list[str]:
    out = []
    for n in names:
        m = _MTP.match(n)
        if m and m.group(2).split(".")[0] in kinds and not n.endswith(".scale"):  # scales go with their weight
            out.append(n)
    return sorted(out)


def _some(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:4])
    return shown + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def mtp_layout(config: dict, official_names, where: str) -> str:
    """'dspark' | 'native' | 'none' for a checkpoint's config dict and official tensor names; CheckpointError for
    a mix (both kinds of block-own keys), a DSpark config over native MTP tensors, DSpark tensors under a config
    without `dspark_*` keys, or a DSpark config without any `mtp.*` tensor."""
    names = [n for n in official_names if n.startswith("mtp.")]
    native, dspark = _own(names, NATIVE_MTP_OWN), _own(names, DSPARK_OWN)
    declared = is_dspark_config(config)
    if native and dspark:
        raise CheckpointError(f"{where}: the mtp.* tensors mix a native MTP block ({_some(native)}) and a DSpark "
                              f"drafter ({_some(dspark)}); refusing a half-matching layout")
    if declared and native:
        raise CheckpointError(f"{where}: the config declares a DSpark drafter (dspark_* keys) but the mtp.* tensors "
                              f"are a native MTP block ({_some(native)})")
    if dspark and not declared:
        raise CheckpointError(f"{where}: the mtp.* tensors are a DSpark drafter ({_some(dspark)}) but the config "
                              f"has no dspark_* keys (dspark_block_size, dspark_noise_token_id, "
                              f"dspark_target_layer_ids, dspark_markov_rank)")
    if declared and names and not dspark:
        raise CheckpointError(f"{where}: the config declares a DSpark drafter but the mtp.* tensors have none of "
                              f"its keys (main_proj, main_norm, markov_head, confidence_head): {_some(sorted(names))}")
    if declared:
        if not names:
            raise CheckpointError(f"{where}: the config declares a DSpark drafter but the checkpoint holds no mtp.* "
                                  f"tensors; pass --no-mtp to convert the target alone")
        return "dspark"
    return "native" if names else "none"
