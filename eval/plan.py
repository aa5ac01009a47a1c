"""Everything an evaluation decides before any compute: `make_plan` checks the arguments, checkpoints and selection
(configs and tokenizers only: no weights, no compilation) and returns a `Plan`."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
from pathlib import Path
from typing import Any

from eval.errors import UsageError
from hdflash_jax.fileio import check_output
from eval.methods import expand_methods, num_drafts, warn_on_design
from eval.suites import SUITES, Sample, expand_suites, load_suite
from eval.targets import DrafterSource, TargetSpec, on_mesh, parse_drafter_args, resolve_target


@dataclasses.dataclass
class Plan:
    """Everything checked and decided before any compute."""
    args: argparse.Namespace
    suites: tuple[str, ...]
    samples: dict[str, list[Sample]]
    spec: TargetSpec
    drafters: dict[str, DrafterSource]  # the block drafter of every method that has one (target's or --drafter)
    methods: list[str]
    ar_added: bool
    settings: Any  # DecodeSettings shared by every method
    out: Path
    argv: list[str] | None = None
    mesh: Any = None  # jax.sharding.Mesh of --mesh (None: one device)


def chat_messages(sample: Sample, turn: int, answers: list[str]) -> list[dict]:
    """The conversation up to user turn `turn` (0-based), earlier turns answered by `answers` (their final parts)."""
    from hdflash_jax.tokenizer import answer_content

    msgs = []
    for t in range(turn + 1):
        msgs.append({"role": "user", "content": sample.turns[t]})
        if t < turn:
            msgs.append({"role": "assistant", "content": answer_content(answers[t])})
    return msgs


def prompt_ids(tok, sample: Sample, turn: int, answers: list[str]) -> list[int]:
    """Token ids of the prompt for `turn`, rendered with the tokenizer's chat template."""
    return tok.encode(tok.apply_chat_template(chat_messages(sample, turn, answers)))


def _check_numbers(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit {args.limit}: empty selection (no samples to run)")
    for flag, v in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size),
                    ("--mtp-k", args.mtp_k)):
        if v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    if args.block_size is not None and args.block_size < 2:
        raise UsageError(f"--block-size must be >= 2 (anchor + at least one draft), got {args.block_size}")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must lie in (0, 1], got {args.top_p}")


def _buckets(arg: str | None) -> tuple[int, ...] | None:
    """--prompt-buckets → sorted sizes; None: the decoder's defaults."""
    if not arg:
        return None
    try:
        buckets = tuple(sorted({int(x) for x in arg.split(",") if x.strip()}))
    except ValueError:
        raise UsageError(f"--prompt-buckets {arg!r}: expected a comma list of integers") from None
    if not buckets or buckets[0] < 1:
        raise UsageError(f"--prompt-buckets {arg!r}: need positive sizes")
    return buckets


def _out_dir(args: argparse.Namespace, suites: tuple[str, ...], spec: TargetSpec,
             drafters: dict[str, DrafterSource]) -> Path:
    """--out (default runs/eval/<suites>-<time>), checked by the one output rule (`fileio.check_output`): never an
    input of this run, the checkout, home or the current folder; an existing non-empty folder only if it is an
    earlier results folder, replaced with --overwrite."""
    from eval.report import RESULTS_FOLDER
    from eval.suites import DATA_DIR

    out = Path(args.out) if args.out is not None else Path("runs") / "eval" / (
        "-".join(suites if len(suites) < len(SUITES) else ("all",)) + "-"
        + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    inputs = [("the input --target", p) for p in spec.paths]
    inputs += [(f"the drafter {name}", src.path) for name, src in drafters.items()]
    inputs += [("the --tokenizer", args.tokenizer if args.tokenizer and Path(args.tokenizer).exists() else None),
               ("the suites' data", DATA_DIR), ("the --compilation-cache", args.compilation_cache)]
    check_output(out, flag="--out", kind=RESULTS_FOLDER, inputs=inputs, overwrite=args.overwrite)
    return out


def _load_samples(suites: tuple[str, ...], limit: int | None) -> dict[str, list[Sample]]:
    try:
        samples = {s: load_suite(s, limit) for s in suites}
    except ValueError as e:
        raise UsageError(str(e)) from None
    for s, lst in samples.items():
        if not lst:
            raise UsageError(f"suite {s}: empty selection")
    return samples


def _check_first_turns(plan: Plan) -> None:
    """First-turn prompts must fit a bucket and the model's context with the most drafts of any method (later
    turns depend on the answers and are checked when built). The rule is the decoder's (`plan_decode`)."""
    from hdflash_jax.decode.generate import plan_decode

    args, tok = plan.args, plan.spec.tokenizer
    max_k = max(num_drafts(m, plan.drafters, args.mtp_k, args.block_size) for m in plan.methods)
    for lst in plan.samples.values():
        for smp in lst:
            try:
                plan_decode(plan.settings, max_k, plan.spec.config.max_seq_len, [len(prompt_ids(tok, smp, 0, []))])
            except ValueError as e:
                raise UsageError(f"{smp.id}: {e}") from None


def make_mesh_arg(spec: str | None):
    """--mesh data=..,fsdp=..,expert=..,tensor=.. → a Mesh over this run's devices (all processes' devices when
    there are several; one process may use the first N of its devices), None without --mesh."""
    if not spec:
        return None
    import jax

    from hdflash_jax.sharding import make_mesh, parse_mesh

    try:
        shape = parse_mesh(spec)
        n = math.prod(shape.values())
        devices = jax.devices()
        if n > len(devices) or (n < len(devices) and jax.process_count() > 1):
            raise ValueError(f"mesh {shape} needs {n} devices; this run has {len(devices)} "
                             f"over {jax.process_count()} process(es)")
        return make_mesh(shape, devices=devices[:n])
    except ValueError as e:
        raise UsageError(f"--mesh {spec}: {e}") from None


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate the arguments, checkpoints and selection; read configs only (no weights, no compilation)."""
    from hdflash_jax.decode.generate import DecodeSettings

    try:
        suites = expand_suites(args.suite)
    except ValueError as e:
        raise UsageError(f"--suite: {e}") from None
    _check_numbers(args)
    buckets = _buckets(args.prompt_buckets)
    template = "deepseek_v4_thinking" if args.thinking else None  # None: the tokenizer's own
    try:
        spec = resolve_target(args.target, args.tokenizer, template)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    cli_drafters = parse_drafter_args(args.drafter, spec.config)
    methods, ar_added = expand_methods(args.method, spec, cli_drafters, greedy=args.temperature == 0)
    known = {**spec.drafters, **cli_drafters}
    drafters = {m: known[m] for m in methods if m in known}
    out = _out_dir(args, suites, spec, known)
    warn_on_design(methods, drafters)
    samples = _load_samples(suites, args.limit)
    settings = DecodeSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              eos_token_id=spec.tokenizer.eos_id,
                              **({"prompt_buckets": buckets} if buckets else {}))
    mesh = make_mesh_arg(getattr(args, "mesh", None))
    plan = Plan(args, suites, samples, on_mesh(spec, mesh), drafters, methods, ar_added, settings, out, mesh=mesh)
    _check_first_turns(plan)
    return plan
