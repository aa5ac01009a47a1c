"""What results.json records about how a run was made: the run's config and the software / machine versions."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import numpy as np

from eval.config import Plan
from eval.methods import Method, is_builtin
from eval.results import TAU_AVERAGES

TIMING_NOTE = ("wall_s = generation only; compile_s = lower + compile + one untimed warm-up run per new "
               "(bucket, batch, queue) shape, counted in the suite where the shape first appeared; prompts padded "
               "to their bucket; with refill a row takes the next prompt of its bucket as it finishes; prefill_s = "
               "each prompt's prefill at its shape's per-row prefill time (timed apart); a prompt's decode_s = its "
               "queue's wall minus prefill, shared in proportion to verify steps")


def versions() -> dict:
    """Python, jax, jaxlib, flax, numpy, platform, backend, devices and the git commit (+dirty) of this tree."""
    import flax
    import jax
    import jaxlib

    v = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
         "flax": flax.__version__, "numpy": np.__version__, "platform": platform.platform(),
         "backend": jax.default_backend(),
         "devices": [f"{d.platform}:{getattr(d, 'device_kind', '?')}" for d in jax.devices()][:8],
         "n_devices": jax.device_count()}
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit:
            v["git_commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return v


def run_config(plan: Plan, methods: dict[str, Method], load_s: float) -> dict:
    """The `config` record: arguments, selection, target, drafters, tokenizer, decoding settings, timings."""
    args, spec, cfg, tok = plan.config, plan.spec, plan.spec.config, plan.spec.tokenizer
    config = {
        "argv": plan.argv,
        "suites": list(plan.suites), "samples": {s: len(v) for s, v in plan.samples.items()},
        "methods": plan.methods, "ar_added_as_baseline": plan.ar_added,
        "target": {"name": spec.name, "origin": spec.origin, "trained": spec.trained, "dtype": cfg.dtype,
                   "dim": cfg.dim, "n_layers": cfg.n_layers, "vocab_size": cfg.vocab_size},
        "drafters": {m: {"origin": meth.origin, "block_size": meth.block_size,
                         **({"config": plan.drafters[m].config.to_dict()} if m in plan.drafters else {})}
                     for m, meth in methods.items()},
        "tokenizer": repr(tok), "chat_template": str(getattr(tok, "chat_template", None)),
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "verify": args.verify,
        "confidence_schedule": (args.confidence_schedule if isinstance(args.confidence_schedule, str)
                                else list(args.confidence_schedule)),
        "greedy": args.temperature == 0, "block_size": args.block_size, "mtp_k": args.mtp_k,
        "batch_size": args.batch_size, "refill": args.refill, "prompt_buckets": list(plan.settings.prompt_buckets),
        "prefill_chunk": plan.settings.prefill_chunk, "seed": args.seed,
        "limit": args.limit, "first_turn_only": args.first_turn_only, "score": args.score,
        "tau_averages": TAU_AVERAGES,
        "target_load_s": load_s, "compile_s_total": {m: meth.compile_s for m, meth in methods.items()},
        "timing": TIMING_NOTE,
    }
    untrained = [m for m in plan.methods if not is_builtin(m) and not plan.drafters[m].trained]
    if not spec.trained or untrained:
        config["note"] = ("random weights (" + ", ".join((["target"] if not spec.trained else []) + untrained)
                          + "): the pipeline is exercised, tau and speedups mean nothing")
    return config
