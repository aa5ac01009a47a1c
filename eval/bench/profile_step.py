"""What one decode step costs, part by part, on the built-in small model: the prefill of a bucket, the target's
verify of K + 1 tokens (K = 0 is an AR step), each drafter's propose and observe, and whole steps, each its own
compiled program (XLA `cost_analysis`: FLOPs and bytes accessed) timed alone (median of --repeats runs).

    python -m eval.bench.profile_step [--bucket 256] [--repeats 20] [--json out.json]

Every program runs on the state a real prefill of one GSM8K prompt left (the state is not advanced between runs,
so each run repeats the same step). The parts add up to a step less XLA's fusion across them; the table says
which part of a method's step is the target's verify and which is its drafter's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hdflash_jax.cli import run_command
from hdflash_jax.decode.drafters import BlockDrafterAdapter, MTPDrafter, NoDrafter, ReplayDrafter, ReplayTokens
from hdflash_jax import row_keys
from hdflash_jax.decode.generate import DecodePlan, DecodeSettings, Queue, _start, _step
from hdflash_jax.fileio import write_json_report


def _measure(fn, args, repeats: int) -> dict:
    """Compile `fn` on `args`, read its cost analysis, time `repeats` runs (the first untimed)."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return {"ms": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times),
            "gflop": float(cost.get("flops", float("nan"))) / 1e9,
            "mbytes": float(cost.get("bytes accessed", float("nan"))) / 2 ** 20}


def _drafters(spec, target, seed: int, reference_len: int) -> dict:
    """AR, a free drafter (replay of known tokens: its step is the verify-8 ceiling), MTP k = 3 / 7, and the
    target's block drafters."""
    out = {"ar": (NoDrafter(), None), "replay": (ReplayDrafter(7), ReplayTokens(np.zeros((1, reference_len)))),
           "mtp3": (MTPDrafter(3), None), "mtp7": (MTPDrafter(7), None)}
    for name, src in spec.drafters.items():
        if hasattr(src.config, "conditioning"):  # the block drafters (HyperDFlash / DFlash designs)
            out[name] = (BlockDrafterAdapter(src.config, src.config.block_size - 1), src.load(target, seed))
    return out


def profile(bucket: int, max_new_tokens: int, repeats: int) -> dict:
    from eval.config import prompt_ids
    from eval.targets import TARGETS
    from hdflash_jax.suites import load_suite

    spec = TARGETS["small"](None, None)
    target = spec.load(0)
    tgraph, tstate = nnx.split(target)
    settings = DecodeSettings(max_new_tokens=max_new_tokens)
    sample = load_suite("gsm8k")[0]
    ids = prompt_ids(spec.tokenizer, sample, 0, [])
    prompt = np.zeros((1, bucket), np.int32)
    prompt[0, : len(ids)] = ids
    prompt, plen = jnp.asarray(prompt), jnp.asarray([len(ids)], jnp.int32)
    rows: dict = {}
    for name, (drafter, modules) in _drafters(spec, target, 0, bucket + max_new_tokens + 8).items():
        k = drafter.num_drafts
        max_len = bucket + max_new_tokens + k + 1
        dgraph, dstate = nnx.split(modules) if modules is not None else (None, None)

        def merged(ts, ds):
            return nnx.merge(tgraph, ts), (nnx.merge(dgraph, ds) if dgraph is not None else None)

        plan = DecodePlan(bucket, 1, max_len, 1)

        def prefill(ts, ds, p, n, seed):  # the loop's first state: the one row started (prefill, first token)
            queue = Queue(p, n, jnp.zeros((1,), jnp.int32), jnp.int32(1))
            return _start(*merged(ts, ds), drafter, settings, plan, queue, seed)

        def verify(ts, ds, st):
            t, _ = merged(ts, ds)
            block = jnp.broadcast_to(st.anchor[:, None], (st.anchor.shape[0], k + 1))
            return t(block, st.cache, jnp.full(st.anchor.shape, k + 1, jnp.int32),
                     return_layers=drafter.return_layers).logits

        def propose(ts, ds, st):
            t, m = merged(ts, ds)
            keys = row_keys.prompt_row_keys(st.seed, st.prompt_key, st.row_step + 1)
            return drafter.propose(t, m, st.drafter, st.anchor, st.cache["length"], keys)[0]

        def step(ts, ds, st):
            return _step(*merged(ts, ds), drafter, settings, st, False)

        seed = jnp.int32(0)
        row = {"prefill": _measure(prefill, (tstate, dstate, prompt, plen, seed), max(3, repeats // 4))}
        st = jax.jit(prefill)(tstate, dstate, prompt, plen, seed)
        row["verify"] = _measure(verify, (tstate, dstate, st), repeats)
        if k:
            row["propose"] = _measure(propose, (tstate, dstate, st), repeats)
        row["step"] = _measure(step, (tstate, dstate, st), repeats)
        row["block"] = k + 1
        rows[name] = row
        print(f"{name:12s} K+1={k + 1}  " + "  ".join(
            f"{part} {r['ms']:.2f} ms ({r['gflop']:.3f} GFLOP, {r['mbytes']:.1f} MiB)"
            for part, r in row.items() if isinstance(r, dict)), flush=True)
    ar_step = rows["ar"]["step"]["ms"]
    print(f"\nin AR steps ({ar_step:.2f} ms); 'speedup per τ' = AR step / the method's step, what a step's τ "
          f"is worth in decode speedup (replay: the ceiling of any drafter of block 8):")
    for name, row in rows.items():
        row["speedup_per_tau"] = ar_step / row["step"]["ms"]
        print(f"  {name:12s} step {row['step']['ms'] / ar_step:.2f}  speedup per τ {row['speedup_per_tau']:.2f}  "
              f"verify {row['verify']['ms'] / ar_step:.2f}"
              + (f"  propose {row['propose']['ms'] / ar_step:.2f}" if "propose" in row else "")
              + f"  prefill {row['prefill']['ms'] / ar_step:.1f}")
    return {"bucket": bucket, "prompt_tokens": len(ids), "device": str(jax.devices()[0]), "rows": rows}


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.bench.profile_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bucket", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = profile(args.bucket, args.max_new_tokens, args.repeats)
    if args.json:
        write_json_report(args.json, out, indent=1)
    return 0


def main(argv=None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
