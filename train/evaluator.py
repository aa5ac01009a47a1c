"""Held-out τ during drafter training, through the real speculative decoder (`Generator` + `Trainer.drafter_adapter`)
with the drafter params of the moment; τ and the per-position acceptance are `hdflash_jax.decode.stats`'s."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from hdflash_jax.decode.generate import DecodeSettings, Generator
from hdflash_jax.decode.stats import AcceptanceStats
from hdflash_jax.distributed import host_tree
from train import data as D


class Evaluator:
    """One `Generator` is built once; each call swaps its drafter state (same tree: no recompilation). Prompts run
    in fixed-size batches (the last one padded with repeats that are left out of τ). With several processes each
    one decodes a host-local copy (small models; a real-size target goes through the eval application)."""

    def __init__(self, trainer, target_params, params, prompts: list[list[int]], *, batch_size: int,
                 max_new_tokens: int, temperature: float = 0.0):
        self.trainer, self.prompts = trainer, prompts
        self.batch_size = max(1, min(batch_size, len(prompts)))
        if jax.process_count() > 1:
            target_params = host_tree(target_params)
        target = trainer.tpure.merge(target_params)
        self.gen = Generator(target, trainer.drafter_adapter(temperature), trainer.drafter_module(params),
                             settings=DecodeSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                                     eos_token_id=trainer.tokenizer.eos_id))

    def __call__(self, params, seed: int = 0) -> dict:
        self.gen.dstate = nnx.split(self.trainer.drafter_module(params))[1]
        parts = []
        for i in range(0, len(self.prompts), self.batch_size):
            chunk = self.prompts[i:i + self.batch_size]
            n = len(chunk)
            res = self.gen.generate(chunk + [chunk[0]] * (self.batch_size - n), seed=seed + i)
            acc = np.asarray(res.accepted)[:, :n]  # the padding rows are not counted
            parts.append(AcceptanceStats.from_accepted(acc, acc >= 0, block_size=res.block_size))
        st = AcceptanceStats.pooled(parts)
        return {"eval_tau": st.tau, "eval_accept_rate": list(st.accept_rate_by_position), "eval_steps": st.steps}


def eval_prompts(path, tokenizer, limit: int) -> list[list[int]]:
    """The first `limit` prompts of a JSONL (prompt_ids, prompt or messages) as ids."""
    src = D.JsonlSource(path)
    out = []
    for i in range(min(limit, len(src))):
        rec = src[i]
        if "prompt_ids" in rec:
            out.append([int(t) for t in rec["prompt_ids"]])
        else:
            out.append(D.prompt_ids(tokenizer, D.prompt_messages(rec, src.where(i))))
    return out
