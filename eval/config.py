"""Everything an evaluation decides before any compute, typed: the command line parsed once into a frozen
`RunConfig` (every value checked, errors name the flag), then `make_plan` checks the checkpoints and selection
(configs and tokenizers only: no weights, no compilation) and returns a `Plan`. Nothing past `RunConfig.from_args`
sees argparse."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
from pathlib import Path
from typing import TYPE_CHECKING

from eval.errors import UsageError
from eval.methods import METHOD_NAME, expand_methods, is_builtin, num_drafts, warn_on_design
from eval.targets import DrafterSource, TargetSpec, drafter_sources, on_mesh, resolve_target
from hdflash_jax.fileio import check_output
from hdflash_jax.suites import SUITES, Sample, expand_suites, load_suite

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from hdflash_jax.decode.generate import DecodeSettings


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """`python -m eval.run`'s flags, typed and checked (`from_args`)."""
    suites: tuple[str, ...]
    method: str  # the --method list as given ('all' and drafter names resolve against the target: `make_plan`)
    target: str
    drafters: tuple[tuple[str, Path], ...]  # --drafter NAME=CKPT
    tokenizer: str | None
    thinking: bool
    limit: int | None
    first_turn_only: bool  # MT-Bench's second turns left out (DeepSpec's protocol)
    max_new_tokens: int
    temperature: float
    top_p: float
    verify: str  # the acceptance rule at T > 0: "token" or "block" (hdflash_jax.decode.verify)
    # DSpark's verify schedule: "off", "auto" (step costs measured per shape) or the costs at widths 1..K+1
    confidence_schedule: str | tuple[float, ...]
    block_size: int | None
    mtp_k: int
    batch_size: int
    refill: bool  # rows take the next prompt of their bucket as they finish (continuous refill)
    prompt_buckets: tuple[int, ...] | None  # None: the decoder's defaults
    prefill_chunk: int | None  # None: the decoder's default
    seed: int
    out: Path | None  # None: runs/eval/<suites>-<time>
    overwrite: bool
    score: bool
    score_timeout: float
    allow_unisolated: bool
    allow_mismatch: bool
    compilation_cache: str | None
    mesh: str | None
    distributed: str
    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    cpu_devices: int | None
    quiet: bool

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "RunConfig":
        """The parsed flags, each checked; UsageError naming the flag otherwise."""
        from hdflash_jax.decode.verify import check_verify_rule
        from hdflash_jax.families import check_block_size
        from hdflash_jax.mesh_spec import parse_mesh

        if ns.limit is not None and ns.limit <= 0:
            raise UsageError(f"--limit {ns.limit}: empty selection (no samples to run)")
        for flag, v in (("--max-new-tokens", ns.max_new_tokens), ("--batch-size", ns.batch_size),
                        ("--mtp-k", ns.mtp_k)):
            if v < 1:
                raise UsageError(f"{flag} must be >= 1, got {v}")
        try:
            check_block_size(ns.block_size)
            suites = expand_suites(ns.suite)
        except ValueError as e:
            raise UsageError(str(e) if str(e).startswith("--") else f"--suite: {e}") from None
        if not (ns.temperature >= 0 and math.isfinite(ns.temperature)):
            raise UsageError(f"--temperature must be >= 0, got {ns.temperature}")
        if not 0 < ns.top_p <= 1:
            raise UsageError(f"--top-p must lie in (0, 1], got {ns.top_p}")
        if ns.prefill_chunk is not None and ns.prefill_chunk < 1:
            raise UsageError(f"--prefill-chunk must be >= 1, got {ns.prefill_chunk}")
        try:
            check_verify_rule(ns.verify)
        except ValueError as e:
            raise UsageError(str(e)) from None
        schedule = _confidence_schedule(ns.confidence_schedule)
        if not ns.score_timeout > 0:
            raise UsageError(f"--score-timeout must be > 0, got {ns.score_timeout}")
        if ns.mesh:
            try:
                parse_mesh(ns.mesh)
            except ValueError as e:
                raise UsageError(f"--mesh {ns.mesh}: {e}") from None
        return cls(
            suites=suites, method=ns.method, target=ns.target, drafters=_drafter_pairs(ns.drafter),
            tokenizer=ns.tokenizer, thinking=ns.thinking, limit=ns.limit,
            first_turn_only=ns.first_turn_only, max_new_tokens=ns.max_new_tokens,
            temperature=float(ns.temperature), top_p=float(ns.top_p), verify=ns.verify,
            confidence_schedule=schedule, block_size=ns.block_size,
            mtp_k=ns.mtp_k, batch_size=ns.batch_size, refill=ns.refill, prompt_buckets=_buckets(ns.prompt_buckets),
            prefill_chunk=ns.prefill_chunk, seed=ns.seed,
            out=Path(ns.out) if ns.out is not None else None, overwrite=ns.overwrite, score=ns.score,
            score_timeout=float(ns.score_timeout), allow_unisolated=ns.allow_unisolated,
            allow_mismatch=ns.allow_mismatch, compilation_cache=ns.compilation_cache, mesh=ns.mesh,
            distributed=ns.distributed, coordinator=ns.coordinator, num_processes=ns.num_processes,
            process_id=ns.process_id, cpu_devices=ns.cpu_devices, quiet=ns.quiet)


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


def _confidence_schedule(arg: str) -> str | tuple[float, ...]:
    """--confidence-schedule off|auto|C1,C2,... → "off", "auto" or the costs (each > 0)."""
    if arg in ("off", "auto"):
        return arg
    try:
        costs = tuple(float(x) for x in arg.split(","))
    except ValueError:
        raise UsageError(f"--confidence-schedule {arg!r}: expected off, auto or a comma list of costs") from None
    if not all(math.isfinite(c) and c > 0 for c in costs):
        raise UsageError(f"--confidence-schedule {arg!r}: costs must be finite and > 0")
    return costs


def check_confidence_schedule(cfg: RunConfig, methods: list[str], drafters: dict[str, DrafterSource]) -> None:
    """Every method but AR must have a confidence head (a DSpark drafter with one), and explicit costs one per
    verify width 1..K+1 of each."""
    from eval.methods import method_family

    if cfg.confidence_schedule == "off":
        return
    for m in methods:
        if m == "ar":
            continue
        _, dcfg = method_family(m, drafters, cfg.mtp_k)
        if not getattr(dcfg, "confidence_head", False):
            raise UsageError(f"--confidence-schedule: method {m} has no confidence head to schedule its verify with "
                             f"(only DSpark drafters with one; run it without the flag)")
        k = num_drafts(m, drafters, cfg.mtp_k, cfg.block_size)
        if cfg.confidence_schedule != "auto" and len(cfg.confidence_schedule) != k + 1:
            raise UsageError(f"--confidence-schedule: method {m} verifies widths 1..{k + 1}: give {k + 1} costs, "
                             f"got {len(cfg.confidence_schedule)}")


def _drafter_pairs(items: list[str] | None) -> tuple[tuple[str, Path], ...]:
    """--drafter NAME=CHECKPOINT_FOLDER items → (name, path) pairs, the syntax checked."""
    out = []
    for item in items or []:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UsageError(f"--drafter {item!r}: expected NAME=CHECKPOINT_FOLDER")
        if not METHOD_NAME.match(name):
            raise UsageError(f"--drafter {item!r}: method names use letters, digits, '_', '-', '.'")
        if is_builtin(name):
            raise UsageError(f"--drafter {item!r}: {name!r} is a built-in method and takes no drafter checkpoint")
        out.append((name, Path(path)))
    return tuple(out)


@dataclasses.dataclass
class Plan:
    """Everything checked and decided before any compute."""
    config: RunConfig
    samples: dict[str, list[Sample]]
    spec: TargetSpec
    drafters: dict[str, DrafterSource]  # the drafter of every method that has one (target's or --drafter)
    methods: list[str]
    ar_added: bool
    settings: DecodeSettings  # shared by every method
    out: Path
    argv: list[str] | None = None
    mesh: Mesh | None = None  # --mesh (None: one device)

    @property
    def suites(self) -> tuple[str, ...]:
        return self.config.suites


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


def _out_dir(cfg: RunConfig, spec: TargetSpec, drafters: dict[str, DrafterSource]) -> Path:
    """--out (default runs/eval/<suites>-<time>), checked by the one output rule (`fileio.check_output`): never an
    input of this run, the checkout, home or the current folder; an existing non-empty folder only if it is an
    earlier results folder, replaced with --overwrite."""
    from eval.report import RESULTS_FOLDER
    from hdflash_jax.suites import DATA_DIR

    out = cfg.out if cfg.out is not None else Path("runs") / "eval" / (
        "-".join(cfg.suites if len(cfg.suites) < len(SUITES) else ("all",)) + "-"
        + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    inputs = [("the input --target", p) for p in spec.paths]
    inputs += [(f"the drafter {name}", src.path) for name, src in drafters.items()]
    inputs += [("the --tokenizer", cfg.tokenizer if cfg.tokenizer and Path(cfg.tokenizer).exists() else None),
               ("the suites' data", DATA_DIR), ("the --compilation-cache", cfg.compilation_cache)]
    check_output(out, flag="--out", kind=RESULTS_FOLDER, inputs=inputs, overwrite=cfg.overwrite)
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

    cfg, tok = plan.config, plan.spec.tokenizer
    max_k = max(num_drafts(m, plan.drafters, cfg.mtp_k, cfg.block_size) for m in plan.methods)
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

    from hdflash_jax.sharding import mesh_from_spec

    try:
        return mesh_from_spec(spec, jax.devices(), use_first=jax.process_count() == 1)
    except ValueError as e:
        raise UsageError(f"--mesh {spec}: {e}") from None


def make_plan(cfg: RunConfig) -> Plan:
    """Check the checkpoints and selection of a run; read configs only (no weights, no compilation)."""
    from hdflash_jax.decode.generate import DecodeSettings

    template = "deepseek_v4_thinking" if cfg.thinking else None  # None: the tokenizer's own
    try:
        spec = resolve_target(cfg.target, cfg.tokenizer, template)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    cli_drafters = drafter_sources(cfg.drafters, spec.config)
    methods, ar_added = expand_methods(cfg.method, spec, cli_drafters, greedy=cfg.greedy)
    known = {**spec.drafters, **cli_drafters}
    drafters = {m: known[m] for m in methods if m in known}
    check_confidence_schedule(cfg, methods, drafters)
    out = _out_dir(cfg, spec, known)
    warn_on_design(methods, drafters)
    samples = _load_samples(cfg.suites, cfg.limit)
    settings = DecodeSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              verify=cfg.verify, eos_token_id=spec.tokenizer.eos_id,
                              **({"prompt_buckets": cfg.prompt_buckets} if cfg.prompt_buckets else {}),
                              **({"prefill_chunk": cfg.prefill_chunk} if cfg.prefill_chunk else {}))
    mesh = make_mesh_arg(cfg.mesh)
    plan = Plan(cfg, samples, on_mesh(spec, mesh), drafters, methods, ar_added, settings, out, mesh=mesh)
    _check_first_turns(plan)
    return plan
