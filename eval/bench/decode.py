"""Decode benchmark on one set of weights, in one run: transformers' greedy `generate` (eager, CPU), this
project's AR loop, the speculative methods, a Python-driven loop against the on-device `while_loop`, and the
ceiling of speculation here (a replay drafter proposing the known AR continuation at no cost).

    python -m eval.bench.decode [--batch 1] [--prompt-len 32] [--new-tokens 64] [--block-size 8] [--json out.json]

Untrained drafters on random weights accept little; what they show is the cost of drafting. Trained drafters
approach the replay ceiling (docs/results.md: the built-in small model).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np
import torch

from hdflash_jax.cli import run_command
from hdflash_jax.config import DrafterConfig, get_preset
from hdflash_jax.decode.drafters import BlockDrafterAdapter, MTPDrafter, ReplayDrafter, ReplayTokens
from hdflash_jax.decode.generate import DecodeSettings, Generator, plan_decode
from hdflash_jax.deepseek_v4.model import init_target
from hdflash_jax.drafter.model import init_drafter_from_target
from hdflash_jax.fileio import write_json_report


def _timed(fn, repeats):
    t = time.perf_counter()
    fn()  # compile + first run
    first_s = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best, max(first_s - best, 0.0)


def _row(res, wall, compile_s, n_tokens, ar) -> dict:
    return dict(tok_s=n_tokens / wall, tau=res.stats.tau, wall_s=wall, compile_s=compile_s,
                same_as_ar=bool((res.tokens == ar.tokens).all()))


def _speculative(cfg, target, prompts, ar, settings, args) -> dict:
    """name -> (drafter, modules): MTP, the two untrained block drafters and the replay ceiling."""
    k = args.block_size - 1
    # the replay reference: each prompt, then AR's continuation, as long as the decoder's cache for K drafts
    ref = ReplayTokens.of_answers(prompts, [ar.tokens[r] for r in range(len(prompts))],
                                  plan_decode(settings, k, cfg.max_seq_len, [len(p) for p in prompts]).max_len)
    small = dict(n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, inter_dim=128, block_size=args.block_size)
    hyper = DrafterConfig.for_target(cfg, **small)
    vanilla = DrafterConfig.for_target(cfg, conditioning="layers", reducer="linear", **small)
    return {
        f"mtp (k={args.mtp_k})": (MTPDrafter(args.mtp_k), None),
        "hyperdflash (untrained)": (BlockDrafterAdapter(hyper, k), init_drafter_from_target(target, hyper)),
        "dflash (untrained)": (BlockDrafterAdapter(vanilla, k), init_drafter_from_target(target, vanilla)),
        "replay ceiling": (ReplayDrafter(k), ref),
    }


def _transformers_row(cfg, prompts, settings, args, n_tokens) -> dict:
    """transformers' eager greedy `generate` on the same weights, checked against this project's AR."""
    from tests.hf_reference import load_hf_into, make_hf_model

    hcfg = cfg.replace(n_mtp_layers=0, compress_ratios=cfg.layer_ratios)
    hf = make_hf_model(hcfg, seed=0)
    t2 = init_target(hcfg)
    load_hf_into(t2, hf)  # the same weights in both
    ours = Generator(t2, settings=settings).generate(prompts)
    with torch.no_grad():
        toks = torch.as_tensor(np.asarray(prompts))
        t = time.perf_counter()
        out = hf.generate(toks, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                          do_sample=False, pad_token_id=0)
        hf_s = time.perf_counter() - t
    same = bool((out[:, args.prompt_len:].numpy() == ours.tokens).all())
    return dict(tok_s=n_tokens / hf_s, tau=1.0, wall_s=hf_s, compile_s=0.0, same_as_ar=same)


def _print(rows: dict) -> None:
    print(f"{'method':32s} {'tok/s':>9s} {'tau':>6s} {'speedup':>8s} {'compile s':>10s} {'== AR':>6s}")
    for name, r in rows.items():
        print(f"{name:32s} {r['tok_s']:9.1f} {r['tau']:6.2f} {r['speedup_vs_ar']:7.2f}x {r['compile_s']:10.1f} "
              f"{str(r['same_as_ar']):>6s}")
    print(f"while_loop vs python loop (AR): {rows['ar (python loop)']['wall_s'] / rows['ar']['wall_s']:.2f}x")


def run(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--mtp-k", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    cfg = get_preset("tiny")
    target = init_target(cfg, seed=0)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(2, cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.batch)]
    settings = DecodeSettings(max_new_tokens=args.new_tokens)
    n_tokens = args.batch * args.new_tokens
    rows = {}

    ar_gen = Generator(target, settings=settings)
    ar, ar_s, ar_compile = _timed(lambda: ar_gen.generate(prompts), args.repeats)
    rows["ar"] = _row(ar, ar_s, ar_compile, n_tokens, ar)
    rows["ar (python loop)"] = _row(*_timed(lambda: ar_gen.generate_host_loop(prompts), args.repeats), n_tokens, ar)
    for name, (drafter, modules) in _speculative(cfg, target, prompts, ar, settings, args).items():
        g = Generator(target, drafter, modules, settings=settings)
        rows[name] = _row(*_timed(lambda: g.generate(prompts), args.repeats), n_tokens, ar)
        if name == "replay ceiling":
            rows["replay ceiling (python loop)"] = _row(*_timed(lambda: g.generate_host_loop(prompts), args.repeats),
                                                        n_tokens, ar)
    if not args.skip_transformers:
        rows["transformers generate (eager)"] = _transformers_row(cfg, prompts, settings, args, n_tokens)
    for r in rows.values():
        r["speedup_vs_ar"] = rows["ar"]["wall_s"] / r["wall_s"]
    _print(rows)
    if args.json:
        write_json_report(args.json, {"args": vars(args), "device": str(jax.devices()[0]), "rows": rows})
    return rows


def main(argv=None) -> int:
    return run_command(lambda a: (run(a), 0)[1], argv)


if __name__ == "__main__":
    sys.exit(main())
