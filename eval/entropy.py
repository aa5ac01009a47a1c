"""The target's per-token entropy at temperature T along its own sampled answers, per suite (issue 37: how much of
the T = 1 drop in τ the target's own uncertainty explains).

    python -m eval.entropy --target small --suite all --limit 24 --max-new-tokens 96 --temperature 1.0 --out F.json

AR samples each sample's first-turn answer at T (top-p 1, batches padded as eval.run pads them), then the target
reads prompt + answer in one pass and the entropy (nats) of softmax(logits / T) at each position that predicts an
answer token is taken; per suite: the mean over answer tokens (pooled) with its 95% bootstrap interval over prompts,
and the effective support exp(H).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def token_entropies(logits, temperature: float):
    """Entropy (nats) of softmax(logits / T) over the last axis."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def answer_entropies(target, prompts: list[list[int]], answers: list[list[int]],
                     temperature: float) -> list[list[float]]:
    """Per row, the entropy at each position that predicts one of its answer tokens (prompt + answer in one call)."""
    import jax.numpy as jnp

    from hdflash_jax.deepseek_v4.cache import init_cache

    seqs = [p + a for p, a in zip(prompts, answers)]
    width = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), width), np.int32)
    for r, s in enumerate(seqs):
        tokens[r, : len(s)] = s
    room = min(-(-width // 64) * 64, target.cfg.max_seq_len)  # whole compression blocks of cache past the tokens
    cache = init_cache(target.cfg, len(seqs), room, max_block=width)
    out = target(jnp.asarray(tokens), cache, jnp.asarray([len(s) for s in seqs], jnp.int32))
    ent = np.asarray(token_entropies(out.logits, temperature))
    return [ent[r, len(p) - 1: len(p) - 1 + len(a)].tolist() for r, (p, a) in enumerate(zip(prompts, answers))]


def _main(argv: list[str]) -> int:
    from eval.bootstrap import ratio_ci
    from eval.config import prompt_ids
    from eval.targets import resolve_target
    from hdflash_jax.decode.generate import DecodeSettings, Generator
    from hdflash_jax.errors import UsageError
    from hdflash_jax.fileio import JSON_REPORT, check_output, write_json_report
    from hdflash_jax.suites import expand_suites, load_suite

    ap = argparse.ArgumentParser(prog="python -m eval.entropy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="small")
    ap.add_argument("--suite", default="all")
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--prompt-buckets", default="128,512")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0 (the entropy of a sampled answer), got {args.temperature}")
    check_output(args.out, flag="--out", kind=JSON_REPORT, overwrite=True)  # before anything is read
    spec = resolve_target(args.target)
    target, tok = spec.load(args.seed), spec.tokenizer
    settings = DecodeSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              eos_token_id=tok.eos_id,
                              prompt_buckets=tuple(int(x) for x in args.prompt_buckets.split(",")))
    gen = Generator(target, settings=settings)
    out = {"argv": argv, "suites": {}}
    for su in expand_suites(args.suite):
        samples = load_suite(su, args.limit)
        prompts = [prompt_ids(tok, s, 0, []) for s in samples]
        sums, counts = [], []
        for i in range(0, len(prompts), args.batch_size):
            batch = prompts[i: i + args.batch_size]
            n = len(batch)
            res = gen.generate(batch + [batch[-1]] * (args.batch_size - n), seed=args.seed + i)
            answers = [res.row_tokens(j) for j in range(n)]
            for e in answer_entropies(target, batch, answers, args.temperature):
                sums.append(float(np.sum(e)))
                counts.append(len(e))
        ci = ratio_ci(sums, counts)
        out["suites"][su] = {"entropy_nats": ci.point, "entropy_ci": list(ci.bounds),
                             "support_exp_h": float(np.exp(ci.point)), "tokens": int(sum(counts)),
                             "prompts": len(samples)}
        print(f"{su}: H = {ci.point:.3f} [{ci.bounds[0]:.3f}, {ci.bounds[1]:.3f}] nats, "
              f"exp(H) = {np.exp(ci.point):.1f}, {sum(counts)} tokens", flush=True)
    write_json_report(args.out, out, flag="--out")
    return 0


def main(argv: list[str] | None = None) -> int:
    from hdflash_jax.cli import run_command

    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
