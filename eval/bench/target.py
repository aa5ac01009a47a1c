"""Target speed on CPU: transformers' eager DeepseekV4ForCausalLM vs this project's jitted prefill and one-token
step, on the same `tiny` weights; prints tokens/s of both and their ratio.

    python -m eval.bench.target [--prompt-len 64] [--new-tokens 32] [--batch 1]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from hdflash_jax.cli import run_command
from hdflash_jax.config import get_preset
from hdflash_jax.deepseek_v4.cache import init_cache
from hdflash_jax.deepseek_v4.model import init_target
from hdflash_jax.fileio import write_json_report


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--moe-dispatch", default=None, help="override the config's moe_dispatch (tiny: auto = dense)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    from tests.hf_reference import load_hf_into, make_hf_model  # the shared name map, one loader

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = get_preset("tiny").replace(n_mtp_layers=0, compress_ratios=get_preset("tiny").layer_ratios)
    if args.moe_dispatch:
        cfg = cfg.replace(moe_dispatch=args.moe_dispatch)
    hf = make_hf_model(cfg, seed=0)
    model = init_target(cfg)
    load_hf_into(model, hf)
    graph, state = nnx.split(model)
    b, p, n = args.batch, args.prompt_len, args.new_tokens
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (b, p))

    # transformers, eager
    with torch.no_grad():
        t_tokens = torch.as_tensor(tokens)
        hf_prefill = _best(lambda: hf(t_tokens), args.repeats)
        hf_gen = _best(lambda: hf.generate(t_tokens, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                           pad_token_id=0), 1)
    hf_decode_tok_s = b * n / max(hf_gen - hf_prefill, 1e-9)

    # this project: jitted prefill and one-token step over the cache
    def _extend(state, tok, cache):
        out = nnx.merge(graph, state)(tok, cache)
        return jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32), out.cache

    extend = jax.jit(_extend)
    cache0 = init_cache(cfg, b, p + n + 1, max_block=1)
    t = time.perf_counter()
    extend.lower(state, jnp.asarray(tokens), cache0).compile()
    extend.lower(state, jnp.zeros((b, 1), jnp.int32), cache0).compile()
    compile_s = time.perf_counter() - t

    def prefill():
        return jax.block_until_ready(extend(state, jnp.asarray(tokens), cache0))

    def decode():
        nxt, cache = prefill()
        for _ in range(n):
            nxt, cache = extend(state, nxt[:, None], cache)
        jax.block_until_ready(nxt)

    prefill()
    decode()
    jax_prefill = _best(prefill, args.repeats)
    jax_total = _best(decode, args.repeats)
    jax_decode_tok_s = b * n / max(jax_total - jax_prefill, 1e-9)
    figures = {
        "config": "tiny", "moe_dispatch": cfg.moe_dispatch, "batch": b, "prompt_len": p, "new_tokens": n,
        "transformers_prefill_tok_s": b * p / hf_prefill, "jax_prefill_tok_s": b * p / jax_prefill,
        "transformers_decode_tok_s": hf_decode_tok_s, "jax_decode_tok_s": jax_decode_tok_s,
        "decode_speedup": jax_decode_tok_s / hf_decode_tok_s, "prefill_speedup": hf_prefill / jax_prefill,
        "jax_compile_s": compile_s,
    }
    for k, v in figures.items():
        print(f"{k:28s} {v:.3f}" if isinstance(v, float) else f"{k:28s} {v}")
    if args.json:
        write_json_report(args.json, figures)
    return figures


def main(argv=None) -> int:
    return run_command(lambda a: (run(a), 0)[1], argv)


if __name__ == "__main__":
    sys.exit(main())
