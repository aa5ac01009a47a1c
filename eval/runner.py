"""Running an evaluation: batching prompts, compiling apart from timing, generating every (suite, turn, method),
then the statistics, the greedy check against AR and the scores, as typed `eval.results` records.

Per suite (and per MT-Bench turn), per method:
  * each sample's user turn(s) are rendered with the tokenizer's chat template (MT-Bench's second turn follows
    the method's OWN first answer) and tokenized;
  * prompts are grouped into batches of --batch-size that share one length bucket (`plan_batches`, the bucket and
    context rule being `Generator.plan`'s); a partial last batch is padded with copies of its last prompt, whose
    outputs and statistics are dropped; so every method compiles one program per bucket for all suites;
  * each new (bucket, batch) shape is compiled apart (`Generator.lower(...).compile()`) and run once untimed (the
    first execution of an XLA program has one-off costs); both are reported as compile_s. Then the real runs
    are timed (wall_s: generation only);
  * each compiled shape's prefill (the target's prompt pass, the drafter's observe of it and the first token) is
    timed with the same program run for 0 verify steps (median of a few runs): its cost depends on the padded
    shape only, so a batch's decode time is its wall time minus its shape's prefill time;
  * per sample (all its turns): tokens, verify steps, accepted tokens, its share of its batches' wall and decode
    seconds (exact at batch 1) — what eval.bootstrap resamples for the intervals.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

from eval.config import Plan, prompt_ids
from eval.errors import BadCheckpointError, RunError, log
from eval.methods import Method, build_methods
from eval.provenance import run_config, versions
from eval.results import (SEED_SUFFIX, CellResult, Mismatch, OutputRecord, PromptFigures, Results, SuiteMismatches,
                          Turn, outputs_sha256)
from hdflash_jax.decode.stats import AcceptanceStats
from hdflash_jax.suites import Sample

SEED_STRIDE = 100_003  # seeds of different (suite, turn) phases never overlap within a run
PREFILL_REPEATS = 3


def plan_batches(lengths: list[int], batch_size: int, plan: Callable[..., Any],
                 refill: bool = True) -> list[tuple[list[int], Any]]:
    """Row indices grouped by length bucket (buckets in increasing size, input order within each), each group with
    its `DecodePlan` for `batch_size` rows: with `refill`, one queue per bucket (rows take the next prompt as they
    finish); without, queues of at most `batch_size` prompts (each batch runs until its slowest row). `plan` is
    `Generator.plan` (or `plan_decode` bound to settings): the decoder owns the bucket, context and queue rule."""
    by_bucket: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_bucket.setdefault(plan([n]).bucket, []).append(i)
    batches = []
    for b in sorted(by_bucket):
        rows = by_bucket[b]
        step = len(rows) if refill else batch_size
        for i in range(0, len(rows), step):
            chunk = rows[i: i + step]
            batches.append((chunk, plan([lengths[r] for r in chunk], batch_size)))
    return batches


@dataclasses.dataclass
class Cell:
    """What one (suite, method) accumulates over batches and turns."""
    wall_s: float = 0.0
    compile_s: float = 0.0  # lower + compile + the warm-up run of each new shape
    warmup_s: float = 0.0  # the warm-up runs alone (part of compile_s)
    tokens: int = 0
    stats: list = dataclasses.field(default_factory=list)  # AcceptanceStats of each batch's real rows
    outputs: dict = dataclasses.field(default_factory=dict)  # sample index -> [ids of turn 1, ids of turn 2, ...]
    compiled_shapes: list = dataclasses.field(default_factory=list)
    prefill_s: float = 0.0  # the prefill time of every prompt (its shape's per-row prefill), summed
    # row-steps of the batches: loop steps × rows, the prompts' own steps, idle (free with prompts queued), drain
    rows: dict = dataclasses.field(default_factory=lambda: {"row_steps": 0, "work": 0, "idle": 0, "drain": 0})
    # sample index -> [tokens, steps, accepted tokens, wall seconds, decode seconds], summed over turns
    per_sample: dict = dataclasses.field(default_factory=dict)
    request_tau: dict = dataclasses.field(default_factory=dict)  # sample index -> τ of each turn with a verify step
    width_hist: list = dataclasses.field(default_factory=list)  # verify steps per width 1..B (confidence schedule)
    verify_costs: dict = dataclasses.field(default_factory=dict)  # shape -> measured step seconds per width


def prefill_seconds(gen, prompts: list[list[int]], batch: int, seed: int, repeats: int = PREFILL_REPEATS) -> float:
    """Seconds to prefill one prompt in a program of this shape: the median wall time of the compiled generate
    program itself run with a budget of 0 verify steps (it starts its first rows — prefill, the drafter's observe
    of it, the first token, the row written into the batch — and stops; no second program to compile), divided by
    the rows it started."""
    rows = min(batch, len(prompts))
    gen.generate(prompts, seed=seed, max_steps=0, batch=batch)  # untimed: the first execution's one-off costs
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        gen.generate(prompts, seed=seed, max_steps=0, batch=batch)
        times.append(time.perf_counter() - t)
    return statistics.median(times) / rows


def _compile(method: Method, prompts: list[list[int]], batch: int, seed: int, cell: Cell) -> None:
    """Compile apart, then one untimed warm-up run: XLA's first execution of a program carries one-off costs that
    must not land in wall_s."""
    gen = method.generator
    t = time.perf_counter()
    gen.lower(prompts, seed, batch=batch).compile()
    t_compiled = time.perf_counter()
    gen.generate(prompts, seed=seed, batch=batch)
    t_warm = time.perf_counter()
    method.compile_s += t_warm - t
    cell.compile_s += t_warm - t
    cell.warmup_s += t_warm - t_compiled


def run_prompts(method: Method, prompts: list[list[int]], batches: list[tuple[list[int], Any]], cell: Cell,
                seed: int, bar, prefill_by_shape: dict | None = None,
                ar_answers: list[list[int]] | None = None) -> tuple[dict[int, list[int]], dict[int, tuple]]:
    """Generate every prompt (queued as planned, every queue with the same seed: a prompt's output does not depend
    on its queue or row); returns {row: generated ids (EOS included)} and {row: (tokens, steps, accepted tokens,
    wall seconds, decode seconds)}: each prompt's own prefill (its shape's per-row prefill time), then its share of
    its queue's decode time in proportion to its verify steps. `prefill_by_shape` (shape -> seconds per prompt) is
    the method's, filled as shapes compile. `ar_answers` (per row, the replay ceiling only): AR's output for each
    prompt, the replay's reference."""
    prefill_by_shape = {} if prefill_by_shape is None else prefill_by_shape
    outs: dict[int, list[int]] = {}
    figs: dict[int, tuple] = {}
    for rows, plan in batches:
        queue = [prompts[r] for r in rows]
        if ar_answers is not None:  # the replay ceiling: this queue's prompts, then AR's answers to them
            from hdflash_jax.decode.drafters import ReplayTokens

            answers = [ar_answers[r] for r in rows]
            pad = plan.queue - len(queue)
            method.generator.set_drafter_modules(
                ReplayTokens.of_answers(queue + [queue[-1]] * pad, answers + [answers[-1]] * pad, plan.max_len))
        if plan.shape not in method.compiled:
            bar.set_postfix_str(f"compiling {method.name} {plan.shape}")
            if method.confidence_schedule == "auto":  # measured on this shape, before its program compiles
                from hdflash_jax.decode.verify_costs import affine_costs, measure_step_costs

                t = time.perf_counter()
                measured = measure_step_costs(method.generator, queue[: plan.batch], seed=seed, batch=plan.batch)
                method.generator.set_confidence_schedule(plan.shape, affine_costs(measured))
                cell.verify_costs[plan.shape] = measured
                cell.compile_s += time.perf_counter() - t
            _compile(method, queue, plan.batch, seed, cell)
            t = time.perf_counter()
            prefill_by_shape[plan.shape] = prefill_seconds(method.generator, queue, plan.batch, seed)
            cell.compile_s += time.perf_counter() - t
            method.compiled.add(plan.shape)
            cell.compiled_shapes.append(plan.shape)
            bar.set_postfix_str("")
        t = time.perf_counter()
        res = method.generator.generate(queue, seed=seed, batch=plan.batch)
        wall = time.perf_counter() - t
        n = len(rows)
        prefill = min(prefill_by_shape[plan.shape] * n, wall)
        cell.wall_s += wall
        cell.prefill_s += prefill
        if not res.prefill_finite.all():  # computed on device; a broken checkpoint fails its first queue
            raise BadCheckpointError(f"the target's prefill logits are not finite (NaN or inf) for "
                                     f"{int((~res.prefill_finite).sum())}/{n} prompts of the first batch "
                                     f"({method.name})")
        cell.stats.append(res.stats)
        cell.tokens += int(res.lengths.sum())
        if method.scheduled:
            hist = res.width_hist()
            cell.width_hist = [a + b for a, b in zip(cell.width_hist, hist)] if cell.width_hist else hist
        valid = res.accepted >= 0
        steps, acc_tokens = valid.sum(0), np.where(valid, res.accepted + 1, 0).sum(0)
        for k, v in (("row_steps", res.loop_steps * res.batch), ("work", int(steps.sum())),
                     ("idle", res.idle_row_steps), ("drain", res.drain_row_steps)):
            cell.rows[k] += v
        decode = wall - prefill
        share = steps / steps.sum() if steps.sum() > 0 else np.full(n, 1.0 / n)
        for j, r in enumerate(rows):
            outs[r] = res.row_tokens(j)
            figs[r] = (int(res.lengths[j]), int(steps[j]), int(acc_tokens[j]), prefill / n + decode * share[j],
                       decode * share[j])
        bar.update(n)
    return outs, figs


def _run_turn(plan: Plan, su: str, turn: int, methods: dict[str, Method], cells: dict[str, Cell], phase: int,
              bar, prefill: dict[str, dict]) -> None:
    """Every method on the `turn`-th user turn of suite `su` (samples that have one)."""
    samples, tok = plan.samples[su], plan.spec.tokenizer
    rows = [i for i, s in enumerate(samples) if len(s.turns) > turn]
    for m, meth in methods.items():
        bar.set_description(f"{su} t{turn + 1} {m}")
        cell = cells[m]
        prompts = [prompt_ids(tok, samples[i], turn, [tok.decode(ids) for ids in cell.outputs.get(i, [])])
                   for i in rows]
        try:
            batches = plan_batches([len(p) for p in prompts], plan.config.batch_size, meth.generator.plan,
                                   plan.config.refill)
        except ValueError as e:
            raise RunError(f"{su} turn {turn + 1} ({m}): {e}") from None
        answers = [cells["ar"].outputs[i][turn] for i in rows] if meth.replays_ar else None  # AR ran first
        outs, figs = run_prompts(meth, prompts, batches, cell, plan.config.seed + SEED_STRIDE * phase, bar,
                                 prefill.setdefault(m, {}), answers)
        for r, i in enumerate(rows):
            cell.outputs.setdefault(i, []).append(outs[r])
            acc = cell.per_sample.setdefault(i, [0, 0, 0, 0.0, 0.0])
            for k, v in enumerate(figs[r]):
                acc[k] += v
            steps, accepted_tokens = figs[r][1], figs[r][2]
            if steps > 0:  # a request is a turn: the mean over requests weighs each turn's τ alike
                cell.request_tau.setdefault(i, []).append(accepted_tokens / steps)


def plan_turns(plan: Plan, suite: str) -> int:
    """User turns run on `suite`: all (MT-Bench has two), or the first only with --first-turn-only (DeepSpec's
    protocol)."""
    return 1 if plan.config.first_turn_only else max(len(s.turns) for s in plan.samples[suite])


def generate_all(plan: Plan, methods: dict[str, Method]) -> dict[str, dict[str, Cell]]:
    """suite → method → Cell, every turn (or the first, --first-turn-only) of every sample by every method."""
    from tqdm import tqdm

    turns = sum(min(len(s.turns), plan_turns(plan, su)) for su, lst in plan.samples.items() for s in lst)
    total = turns * len(methods)  # prompts to generate
    cells = {su: {m: Cell() for m in methods} for su in plan.suites}
    phase = 0
    prefill: dict[str, dict] = {}  # method -> shape -> prefill seconds
    with tqdm(total=total, desc="eval", unit="prompt", disable=plan.config.quiet, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for su in plan.suites:
            for turn in range(plan_turns(plan, su)):
                _run_turn(plan, su, turn, methods, cells[su], phase, bar, prefill)
                phase += 1
    return cells


def _first_diff(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def compare_to_ar(samples: list[Sample], ar_outputs: dict, outputs: dict) -> list[Mismatch]:
    """Samples whose generated ids differ from AR's in some turn, each at its first differing turn (later turns of
    MT-Bench follow different answers anyway)."""
    bad = []
    for i, smp in enumerate(samples):
        for t, (a, b) in enumerate(zip(ar_outputs[i], outputs[i])):
            if list(a) != list(b):
                bad.append(Mismatch(smp.id, t + 1, _first_diff(a, b), len(a), len(b)))
                break
    return bad


def _scores(samples: list[Sample], texts: dict[int, list[str]], timeout_s: float,
            allow_unisolated: bool) -> list[float | None]:
    """Per-sample scores of the last turn's text (eval.scoring; code runs in the sandbox)."""
    from eval.scoring import score_output

    return [score_output(samples[i], texts[i][-1], timeout_s, allow_unisolated=allow_unisolated)
            for i in range(len(samples))]


def _greedy_check(su: str, m: str, samples: list[Sample], ar: Cell, c: Cell) -> tuple[Mismatch, ...]:
    bad = tuple(compare_to_ar(samples, ar.outputs, c.outputs))
    if bad:
        print(f"\n*** GREEDY MISMATCH: {m} on {su}: {len(bad)}/{len(samples)} outputs differ from AR "
              f"(first: {bad[0].id} turn {bad[0].turn} at token {bad[0].first_diff_token}) ***",
              file=sys.stderr, flush=True)
    return bad


def training_seeds(meth: Method) -> tuple[int, ...]:
    """The training seed behind a method's drafter: `<variant>-s<seed>` names say it; otherwise what its checkpoint
    says (`eval.targets.training_seeds`). AR / MTP / replay and drafters built in memory: () (no training run)."""
    m = SEED_SUFFIX.match(meth.name)  # never a built-in method's name
    return (int(m.group("seed")),) if m else meth.seeds


def interval_figures(c: Cell, ar: Cell, n_samples: int) -> dict:
    """tau_ci, tau_per_request(_ci), speedup_ci and decode_speedup(_ci) of a cell, resampled over its samples."""
    from eval.bootstrap import paired_rate_ci, ratio_ci

    idx = [i for i in range(n_samples) if i in c.per_sample and i in ar.per_sample]
    fig = np.array([c.per_sample[i] for i in idx], np.float64)  # tokens, steps, accepted, wall, decode
    base = np.array([ar.per_sample[i] for i in idx], np.float64)
    out: dict = {}
    if not idx:
        return out
    if fig[:, 1].sum() > 0:
        out["tau_ci"] = ratio_ci(fig[:, 2], fig[:, 1]).bounds
    if base[:, 3].sum() > 0 and fig[:, 3].sum() > 0:
        out["speedup_ci"] = paired_rate_ci(base[:, 3], fig[:, 3]).bounds
    requests = [c.request_tau.get(i, []) for i in idx]
    if any(requests):
        ci = ratio_ci([sum(t) for t in requests], [len(t) for t in requests])
        out["tau_per_request"], out["tau_per_request_ci"] = ci.point, ci.bounds
    after_first = lambda f: np.maximum(f[:, 0] - 1, 0)  # noqa: E731  output tokens after the first
    if base[:, 4].sum() > 0 and fig[:, 4].sum() > 0 and after_first(base).sum() > 0 and after_first(fig).sum() > 0:
        ci = paired_rate_ci(base[:, 4], fig[:, 4], after_first(base), after_first(fig))
        out["decode_speedup"], out["decode_speedup_ci"] = ci.point, ci.bounds
    return out


def row_figures(c: Cell) -> dict:
    """The batches' row-steps (`rows`): loop steps × rows, the prompts' own verify steps, the steps rows sat free
    while prompts were still queued (idle; refill keeps it 0) and after the queue emptied (drain)."""
    return {"rows": dict(c.rows)}


def schedule_figures(meth: Method, c: Cell) -> dict:
    """A scheduled method's verify_width_hist (prompt steps per verify width 1..B, summed over queues: the schedule
    chooses one width per batch step) and verify_costs: per compiled shape first measured in this cell
    (--confidence-schedule auto) the measured step seconds per width and the affine fit the schedule read
    (`verify_costs.affine_costs`); the given costs otherwise."""
    from hdflash_jax.decode.verify_costs import affine_costs

    if not meth.scheduled:
        return {}
    costs = ({"x".join(map(str, shape)): {"measured": list(v), "used": list(affine_costs(v))}
              for shape, v in c.verify_costs.items()}
             if meth.confidence_schedule == "auto"
             else {"given": list(meth.generator.settings.confidence_schedule or [])})
    return {"verify_width_hist": list(c.width_hist), "verify_costs": costs}


def cell_result(plan: Plan, su: str, meth: Method, c: Cell, ar: Cell) -> tuple[CellResult, list[OutputRecord]]:
    """Statistics, intervals, greedy check and scores of one (suite, method), and its outputs.jsonl records."""
    from eval.metrics import speedup, tokens_per_second

    samples, tok, args = plan.samples[su], plan.spec.tokenizer, plan.config
    texts = {i: [tok.decode(ids) for ids in c.outputs[i]] for i in range(len(samples))}
    bad = _greedy_check(su, meth.name, samples, ar, c) if args.temperature == 0 and meth.name != "ar" else None
    per_sample = (_scores(samples, texts, args.score_timeout, args.allow_unisolated) if args.score
                  else [None] * len(samples))
    scored = [x for x in per_sample if x is not None]
    stats = AcceptanceStats.pooled(c.stats) if c.stats else AcceptanceStats.from_hist([0] * meth.block_size)
    ci = interval_figures(c, ar, len(samples))
    prompts = tuple(PromptFigures(samples[i].id, *c.per_sample[i], request_tau=tuple(c.request_tau.get(i, ())))
                    for i in range(len(samples)) if i in c.per_sample)
    result = CellResult(
        stats, c.tokens, tokens_per_second(c.tokens, c.wall_s), c.wall_s, c.compile_s, speedup(ar.wall_s, c.wall_s),
        greedy_match_ar=None if bad is None else not bad, score=sum(scored) / len(scored) if scored else None,
        samples=len(samples), compiled_shapes=tuple(c.compiled_shapes), warmup_s=c.warmup_s, drafter=meth.origin,
        greedy_mismatched=bad or (), tau_ci=ci.get("tau_ci"), speedup_ci=ci.get("speedup_ci"),
        decode_speedup=ci.get("decode_speedup"), decode_speedup_ci=ci.get("decode_speedup_ci"),
        prefill_s=c.prefill_s, seeds=training_seeds(meth), per_prompt=prompts,
        tau_per_request=ci.get("tau_per_request"), tau_per_request_ci=ci.get("tau_per_request_ci"),
        output_sha256=outputs_sha256([c.outputs[i] for i in range(len(samples))]),
        extra={**row_figures(c), **schedule_figures(meth, c)})
    records = [OutputRecord(su, smp.id, meth.name,
                            tuple(Turn(x, len(ids)) for x, ids in zip(texts[i], c.outputs[i])), per_sample[i])
               for i, smp in enumerate(samples)]
    return result, records


def execute(plan: Plan) -> tuple[Results, list[OutputRecord]]:
    """Load the target, run every suite and method, and gather the results and the output records."""
    import jax

    args, spec = plan.config, plan.spec
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(args.compilation_cache))
    log(f"target {spec.name} ({spec.origin}); loading")
    t = time.perf_counter()
    try:  # a checkpoint that fails to load (e.g. NaN/Inf parameters) is one line naming it, not a traceback
        target = spec.load(args.seed)
        load_s = time.perf_counter() - t
        methods = build_methods(plan.methods, plan.drafters, target, plan.settings, mtp_k=args.mtp_k,
                                block_size=args.block_size, seed=args.seed,
                                confidence_schedule=args.confidence_schedule)
    except (OSError, ValueError) as e:
        raise BadCheckpointError(str(e)) from None
    log(f"loaded in {load_s:.1f}s; methods: " + ", ".join(f"{m.name} (B={m.block_size})" for m in methods.values()))
    try:
        cells = generate_all(plan, methods)
    except BadCheckpointError as e:
        raise BadCheckpointError(f"target {spec.name} ({spec.origin}): {e}; its weights are broken") from None
    suites: dict[str, dict[str, CellResult]] = {}
    records: list[OutputRecord] = []
    mismatches: list[SuiteMismatches] = []
    for su in plan.suites:
        suites[su] = {}
        for m, meth in methods.items():
            suites[su][m], recs = cell_result(plan, su, meth, cells[su][m], cells[su]["ar"])
            records += recs
            if suites[su][m].greedy_mismatched:
                mismatches.append(SuiteMismatches(su, m, len(plan.samples[su]), suites[su][m].greedy_mismatched))
    from eval.report import seed_groups

    return (Results(run_config(plan, methods, load_s), versions(), suites, tuple(mismatches),
                    seed_groups=seed_groups(suites)), records)
