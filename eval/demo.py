"""A first look, in seconds: the `tiny` DeepSeek-V4 target with random weights, decoded autoregressively and
with an (untrained) HyperDFlash drafter in one on-device loop each; prints tokens, τ and timings.

    python -m eval.demo [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from hdflash_jax.cli import run_command
from hdflash_jax.config import DrafterConfig, get_preset
from hdflash_jax.decode.drafters import BlockDrafterAdapter
from hdflash_jax.decode.generate import DecodeSettings, Generator
from hdflash_jax.deepseek_v4.model import init_target
from hdflash_jax.drafter.model import init_drafter_from_target


def run(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    cfg = get_preset("tiny")
    t = time.perf_counter()
    target = init_target(cfg, seed=0)
    print(f"tiny target: {cfg.n_layers} layers, ratios {cfg.layer_ratios}, hc_mult {cfg.hc_mult} "
          f"({time.perf_counter() - t:.1f}s to build)")
    dcfg = DrafterConfig.for_target(cfg, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, inter_dim=128)
    prompts = [np.random.RandomState(0).randint(2, cfg.vocab_size, 12).tolist()]
    settings = DecodeSettings(max_new_tokens=args.new_tokens)
    outputs = {}
    for name, gen in (("autoregressive", Generator(target, settings=settings)),
                      ("hyperdflash", Generator(target, BlockDrafterAdapter(dcfg, dcfg.block_size - 1),
                                                init_drafter_from_target(target, dcfg), settings=settings))):
        t = time.perf_counter()
        gen.generate(prompts)
        first = time.perf_counter() - t
        t = time.perf_counter()
        res = gen.generate(prompts)
        wall = time.perf_counter() - t
        outputs[name] = res.tokens[0].tolist()
        print(f"{name:15s} compile+run {first:6.1f}s  run {wall * 1e3:7.1f} ms  "
              f"{args.new_tokens / wall:8.1f} tok/s  tau {res.stats.tau:.2f}")
    print("tokens:", outputs["autoregressive"][:16], "...")
    print("greedy outputs identical:", outputs["autoregressive"] == outputs["hyperdflash"])


def main(argv=None) -> int:
    return run_command(lambda a: (run(a), 0)[1], argv)


if __name__ == "__main__":
    sys.exit(main())
