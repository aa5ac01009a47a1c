"""Parameter counts of the block drafters at real target dims, from shapes only (`nnx.eval_shape`, no allocation).

    python -m eval.bench.drafter_sizes                # V4-Flash: HyperDFlash, vanilla DFlash, the two ablations
    python -m eval.bench.drafter_sizes --target v4-pro --n-layers 3 --json sizes.json

Counts exclude the target's embedding and LM head (frozen, shared, never drafter parameters).
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from hdflash_jax.cli import run_command
from hdflash_jax.config import PRESETS, DrafterConfig, get_preset
from hdflash_jax.drafter.cache import draft_cache_bytes_per_token
from hdflash_jax.drafter.model import abstract_drafter, count_params
from hdflash_jax.errors import UsageError
from hdflash_jax.fileio import write_json_report

DESIGNS = {
    "hyperdflash": dict(conditioning="final_streams", reducer="gated"),
    "dflash": dict(conditioning="layers", reducer="linear"),
    "final_streams+linear": dict(conditioning="final_streams", reducer="linear"),
    "layers+gated": dict(conditioning="layers", reducer="gated"),
}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _bytes(state) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))


def sizes(cfg: DrafterConfig) -> dict:
    from flax import nnx

    m = abstract_drafter(cfg)
    red = nnx.state(m.reducer, nnx.Param)
    out = {
        "conditioning": cfg.conditioning, "reducer": cfg.reducer, "post_norm": cfg.post_norm,
        "target_layer_ids": list(cfg.layer_ids), "n_layers": cfg.n_layers, "block_size": cfg.block_size,
        "reducer_params": count_params(red),
        "reducer_core_params": count_params(red["fc"]) if cfg.reducer == "linear" else
        count_params(red) - (cfg.dim if cfg.post_norm else 0),
        "per_layer_params": count_params(m.layers[0]),
        "layers_params": count_params(nnx.state(m.layers, nnx.Param)),
        "final_norm_params": count_params(m.norm),
        "total_params": count_params(m),
        "total_bytes": _bytes(nnx.state(m, nnx.Param)),
        # what one committed context position costs
        "ctx_feature_bytes_per_token": cfg.n_feature_layers * cfg.hc_mult * cfg.dim * _BYTES[cfg.dtype],
        "draft_cache_bytes_per_token": draft_cache_bytes_per_token(cfg),  # cfg.draft_cache's layout
    }
    return out


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="v4-flash", choices=sorted(k for k in PRESETS if k != "tiny"))
    ap.add_argument("--n-layers", type=int, default=None, help="draft layers (default: DrafterConfig's 5)")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    tcfg = get_preset(args.target)
    kw = {k: v for k, v in (("n_layers", args.n_layers), ("block_size", args.block_size)) if v is not None}
    rows = {}
    for name, design in DESIGNS.items():
        try:
            cfg = DrafterConfig.for_target(tcfg, **design, **kw)
        except ValueError as e:
            hint = "" if args.n_layers else " (vanilla DFlash taps one target layer per draft layer: pass --n-layers N)"
            raise UsageError(f"{e}{hint}") from None
        rows[name] = sizes(cfg)
    print(f"drafter sizes at {args.target} dims (D={tcfg.dim}, n={tcfg.hc_mult}, L={tcfg.n_layers}); "
          f"target embedding/head excluded")
    cols = {"reducer_core_params": "reducer core", "reducer_params": "reducer+norm", "per_layer_params": "per layer",
            "total_params": "total params", "total_bytes": "total bytes", "ctx_feature_bytes_per_token": "feat B/tok",
            "draft_cache_bytes_per_token": "cache B/tok"}
    print(f"{'design':22s}" + "".join(f"{h:>15s}" for h in cols.values()))
    for name, r in rows.items():
        print(f"{name:22s}" + "".join(f"{r[c]:>15,d}" for c in cols))
    h, v = rows["hyperdflash"], rows["dflash"]
    print(f"reducer ratio (final_streams: linear / gated core): "
          f"{rows['final_streams+linear']['reducer_core_params'] / h['reducer_core_params']:.0f}x; "
          f"vanilla DFlash fc taps {v['target_layer_ids']}")
    if args.json:
        write_json_report(args.json, {"target": args.target, "designs": rows})
    return 0


def main(argv=None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
