"""Write an evaluation's results: results.json, results.md and two PNG plots.

Input: `eval.results.Results` (a results.json dict is accepted and read into one first; the schema is described
there). results.md: table 1 has rows = methods, columns = suites + "avg", cells `speedup× / τ` (avg = arithmetic
mean over the suites the method ran, as in the paper). Table 2: per-position acceptance rates pooled over all
suites (from the summed histograms, i.e. every step weighs the same). Table 3: the raw numbers per suite and
method.

Plots (pooled over suites, one series per method, AR left out as it has no draft positions):
acceptance_by_position.png (the paper's Figure 1) and accepted_length_hist.png (frequencies).

Writing is all-or-nothing: files go to a temporary sibling directory that is renamed into place, and an existing
non-empty out dir is refused unless overwrite=True.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from eval.bootstrap import rate_ratio, ratio, seed_ci, suite_mean_ci
from eval.results import SEED_SUFFIX, CellResult, Results, SeedGroup, as_results, jsonable
from hdflash_jax.decode.stats import AcceptanceStats
from hdflash_jax.fileio import OutputKind, atomic_dir, check_output, has_files

METHOD_ORDER = ("ar", "mtp", "mtp3", "mtp7", "dflash", "hyperdflash")
DASH = "—"


def ordered_methods(results: Results) -> list[str]:
    """Methods over all suites: the known ones in paper order first, then others as they appear."""
    seen: list[str] = []
    for methods in results.suites.values():
        for m in methods:
            if m not in seen:
                seen.append(m)
    return [m for m in METHOD_ORDER if m in seen] + [m for m in seen if m not in METHOD_ORDER]


def _fmt(x, spec: str) -> str:
    return DASH if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def pooled_stats(results: Results, method: str) -> AcceptanceStats | None:
    """Acceptance statistics of `method` over every suite's steps; None for methods without draft positions or
    without steps."""
    st = AcceptanceStats.pooled(cells[method].stats for cells in results.suites.values() if method in cells)
    return st if st.block_size > 1 and st.steps > 0 else None


def _with_ci(x, ci, spec: str, unit: str = "") -> str:
    text = _fmt(x, spec)
    if text == DASH:
        return text
    return f"{text}{unit}" if ci is None else f"{text}{unit} [{_fmt(ci[0], spec)}, {_fmt(ci[1], spec)}]"


def _per_prompt(c: CellResult, ar: CellResult, cols: str) -> np.ndarray | None:
    """[prompts, k] figures of `c` paired by id with AR's: "tau" → (accepted, steps); "speedup" → (AR wall,
    wall); "decode" → (AR decode s, AR tokens after the first, decode s, tokens after the first)."""
    if not c.per_prompt:
        return None
    base = {p.id: p for p in ar.per_prompt}
    if cols == "tau":
        return np.array([[p.accepted_tokens, p.steps] for p in c.per_prompt], np.float64)
    pairs = [(base[p.id], p) for p in c.per_prompt if p.id in base]
    if not pairs or not all(math.isfinite(x) for b, p in pairs for x in (b.wall_s, p.wall_s)):
        return None  # no seconds to pair (eval.merge_runs drops a later run's: another AR timed them)
    if cols == "speedup":
        return np.array([[b.wall_s, p.wall_s] for b, p in pairs], np.float64)
    return np.array([[b.decode_s, max(b.tokens - 1, 0), p.decode_s, max(p.tokens - 1, 0)] for b, p in pairs])


def avg_interval(results: Results, method: str, cols: str):
    """Mean over suites of a method's τ / speedup / decode speedup with its stratified bootstrap interval, or
    None when a suite lacks per-prompt figures."""
    mats = []
    for cells in results.suites.values():
        if method not in cells:
            continue
        m = _per_prompt(cells[method], cells.get("ar", cells[method]), cols)
        if m is None:
            return None
        mats.append(m)
    if not mats:
        return None
    try:
        return suite_mean_ci(mats, rate_ratio if cols == "decode" else ratio)
    except ValueError:
        return None


def summary_table(results: Results | Mapping) -> str:
    """Markdown: rows = methods, columns = suites + avg, cells `speedup× / τ` (with 95% intervals when the
    results hold per-prompt figures)."""
    results = as_results(results)
    suites = list(results.suites)
    lines = [
        "| method | " + " | ".join(suites) + " | avg |",
        "|---|" + "---|" * (len(suites) + 1),
    ]
    for m in ordered_methods(results):
        cells, sp, ta = [], [], []
        for s in suites:
            c = results.suites[s].get(m)
            if c is None:
                cells.append(DASH)
                continue
            cells.append(f"{_with_ci(c.speedup, c.speedup_ci, '.2f', '×')} / {_with_ci(c.tau, c.tau_ci, '.2f')}")
            sp.append(c.speedup)
            ta.append(c.tau)
        if sp:
            isp, ita = avg_interval(results, m, "speedup"), avg_interval(results, m, "tau")
            avg = (f"{_with_ci(np.mean(sp), isp and isp.bounds, '.2f', '×')} / "
                   f"{_with_ci(np.mean(ta), ita and ita.bounds, '.2f')}")
        else:
            avg = DASH
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)


def wall_clock_table(results: Results | Mapping, ceiling: str = "replay") -> str:
    """Markdown: per method over the suites (avg): end-to-end speedup, decode speedup (seconds per output token
    after the first, prefill excluded), τ, and how much of τ becomes wall clock (decode speedup / τ), beside the
    `ceiling` method's when it ran (a free, always-right drafter: what the verify step alone allows)."""
    results = as_results(results)
    lines = ["| method | speedup (end to end) | decode speedup | τ | decode speedup / τ | prefill share of AR wall | "
             "row-steps idle (queued / drain) |", "|---|---|---|---|---|---|---|"]
    for m in ordered_methods(results):
        cs = [cells[m] for cells in results.suites.values() if m in cells]
        ars = [cells["ar"] for cells in results.suites.values() if m in cells and "ar" in cells]
        if not cs or any(c.decode_speedup is None for c in cs):
            continue
        isp, idec, ita = (avg_interval(results, m, k) for k in ("speedup", "decode", "tau"))
        sp, dec, ta = (float(np.mean([getattr(c, k) for c in cs])) for k in ("speedup", "decode_speedup", "tau"))
        share = (sum(a.prefill_s for a in ars if a.prefill_s is not None) / sum(a.wall_s for a in ars)) if ars else None
        lines.append(f"| {m}{' (ceiling)' if m == ceiling else ''} | {_with_ci(sp, isp and isp.bounds, '.2f', '×')} | "
                     f"{_with_ci(dec, idec and idec.bounds, '.2f', '×')} | {_with_ci(ta, ita and ita.bounds, '.2f')} | "
                     f"{_fmt(dec / ta, '.2f')} | {_fmt(share, '.0%')} | {_idle(cs)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _idle(cells) -> str:
    """Row-steps rows sat free, over the cells: while prompts were still queued / after the queue emptied."""
    rows = [c.extra["rows"] for c in cells if "rows" in c.extra]
    total = sum(r["row_steps"] for r in rows)
    if not total:
        return "–"
    return f"{sum(r['idle'] for r in rows) / total:.0%} / {sum(r['drain'] for r in rows) / total:.0%}"


def schedule_table(results: Results | Mapping) -> str:
    """Markdown: per method run with --confidence-schedule, the verify widths it chose (steps per width, all suites)
    and the step costs it read per compiled shape (ms, the affine fit of the measured ones with auto). Empty when no
    cell has them."""
    results = as_results(results)
    lines = ["| method | steps per verify width 1..B (all suites) | mean width | costs read per shape |",
             "|---|---|---|---|"]
    for m in ordered_methods(results):
        cs = [cells[m] for cells in results.suites.values() if m in cells and "verify_width_hist" in cells[m].extra]
        if not cs:
            continue
        hist = np.sum([c.extra["verify_width_hist"] for c in cs], axis=0)
        mean = float((hist * np.arange(1, len(hist) + 1)).sum() / max(hist.sum(), 1))
        costs = {}
        for c in cs:
            for shape, v in c.extra.get("verify_costs", {}).items():
                used = v["used"] if isinstance(v, Mapping) else v
                costs[shape] = " ".join(f"{1e3 * x:.1f}" if isinstance(v, Mapping) else f"{x:g}" for x in used)
        lines.append(f"| {m} | {' / '.join(str(int(x)) for x in hist)} | {mean:.2f} | "
                     + "; ".join(f"{k}: {v}" for k, v in costs.items()) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def tau_averages_table(results: Results | Mapping) -> str:
    """Markdown: per method and suite the two τ averages in use, `pooled / per request` (TAU_AVERAGES: pooled over
    verify steps as DeepSpec reports, and the mean over requests as ModelOpt's specdec_bench does); avg = the mean
    over suites of each. Empty when no cell has the per-request figure (results written before it existed)."""
    results = as_results(results)
    suites = list(results.suites)
    lines = ["| method | " + " | ".join(f"{s} pooled / per request" for s in suites) + " | avg pooled / per request |",
             "|---|" + "---|" * (len(suites) + 1)]
    any_request = False
    for m in ordered_methods(results):
        row, pooled, per_request = [], [], []
        for s in suites:
            c = results.suites[s].get(m)
            if c is None:
                row.append(DASH)
                continue
            any_request |= c.tau_per_request is not None
            row.append(f"{_fmt(c.tau, '.2f')} / {_fmt(c.tau_per_request, '.2f')}")
            pooled.append(c.tau)
            per_request.append(c.tau_per_request if c.tau_per_request is not None else math.nan)
        avg = f"{_fmt(float(np.mean(pooled)), '.2f')} / {_fmt(float(np.mean(per_request)), '.2f')}" if pooled else DASH
        lines.append(f"| {m} | " + " | ".join(row) + f" | {avg} |")
    return "\n".join(lines) if any_request else ""


def seed_groups(suites: Mapping[str, Mapping[str, CellResult]]) -> dict[str, dict[str, SeedGroup]]:
    """Methods named `<variant>-s<seed>` (two or more seeds of a variant) → variant → suite → `SeedGroup`."""
    out: dict[str, dict[str, SeedGroup]] = {}
    for su, cells in suites.items():
        by_variant: dict[str, list[tuple[int, str]]] = {}
        for m in cells:
            hit = SEED_SUFFIX.match(m)
            if hit:
                by_variant.setdefault(hit.group("variant"), []).append((int(hit.group("seed")), m))
        for v, members in by_variant.items():
            members.sort()
            if len(members) < 2:
                continue
            cs = [cells[m] for _, m in members]
            ar = cells.get("ar")
            taus = [_per_prompt(c, ar or c, "tau") for c in cs]
            if any(t is None for t in taus):
                continue
            speeds = [_per_prompt(c, ar, "speedup") for c in cs] if ar is not None else [None]
            t_ci = seed_ci([(t[:, 0], t[:, 1]) for t in taus])
            s_ci = seed_ci([(x[:, 0], x[:, 1]) for x in speeds]) if all(x is not None for x in speeds) else None
            out.setdefault(v, {})[su] = SeedGroup(
                tuple(s for s, _ in members), tuple(m for _, m in members), tuple(c.tau for c in cs), t_ci.point,
                t_ci.bounds, tuple(c.speedup for c in cs), float(np.mean([c.speedup for c in cs])),
                None if s_ci is None else s_ci.bounds)
    return out


def seeds_table(results: Results) -> str:
    """Markdown: per seeded variant and suite, τ per seed, mean over seeds with its two-stage interval."""
    if not results.seed_groups:
        return ""
    suites = list(results.suites)
    lines = ["| variant | seeds | " + " | ".join(suites) + " | avg τ |", "|---|---|" + "---|" * (len(suites) + 1)]
    for v, by in results.seed_groups.items():
        row, taus = [], []
        for su in suites:
            g = by.get(su)
            row.append(DASH if g is None else f"{_with_ci(g.tau, g.tau_ci, '.2f')} ("
                       + ", ".join(f"{t:.2f}" for t in g.tau_by_seed) + ")")
            if g is not None:
                taus.append(g.tau)
        seeds = next(iter(by.values())).seeds
        avg = _fmt(float(np.mean(taus)), '.2f')
        lines.append(f"| {v} | {','.join(map(str, seeds))} | " + " | ".join(row) + f" | {avg} |")
    return "\n".join(lines)


def acceptance_table(results: Results) -> str:
    """Markdown: rows = methods with draft positions, columns = positions, pooled over suites."""
    rows = [(m, st) for m in ordered_methods(results) if (st := pooled_stats(results, m)) is not None]
    if not rows:
        return "(no method with draft positions)"
    width = max(st.block_size - 1 for _, st in rows)
    lines = [
        "| method | steps | τ | " + " | ".join(f"r{j}" for j in range(1, width + 1)) + " |",
        "|---|---|---|" + "---|" * width,
    ]
    for m, st in rows:
        rates = st.accept_rate_by_position
        vals = [f"{r:.3f}" for r in rates] + [DASH] * (width - len(rates))
        lines.append(f"| {m} | {st.steps} | {st.tau:.2f} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def details_table(results: Results) -> str:
    """Markdown: every (suite, method) with tokens, throughput, times, AR match and score."""
    lines = [
        "| suite | method | τ pooled | τ per request | speedup | tokens | tokens/s | wall s | compile s | = AR | score "
        "| outputs sha256 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, cells in results.suites.items():
        for m in ordered_methods(results):
            c = cells.get(m)
            if c is None:
                continue
            match = DASH if c.greedy_match_ar is None else ("yes" if c.greedy_match_ar else "no")
            lines.append(
                f"| {s} | {m} | {_fmt(c.tau, '.2f')} | {_fmt(c.tau_per_request, '.2f')} | {_fmt(c.speedup, '.2f')}× | "
                f"{c.tokens} | {_fmt(c.tokens_per_s, '.1f')} | {_fmt(c.wall_s, '.2f')} | {_fmt(c.compile_s, '.2f')} | "
                f"{match} | {_fmt(c.score, '.3f')} | {(c.output_sha256 or DASH)[:12]} |"
            )
    return "\n".join(lines)


def render_markdown(results: Results | Mapping) -> str:
    """The whole results.md."""
    results = as_results(results)
    return "\n\n".join([
        "# Results",
        "Cells: wall-clock speedup over AR (same prompts, same run, compilation excluded) / "
        "τ = mean accepted draft tokens + 1 per verification step, pooled over every verify step (DeepSpec's "
        "average); [lo, hi] = 95% bootstrap interval over prompts (avg: prompts resampled within each suite).",
        summary_table(results),
        *(["## τ: pooled over verify steps / mean over requests",
           "Pooled: Σ(accepted + 1) / Σ steps over the suite (DeepSpec). Per request: the mean over requests (each "
           "turn of each prompt) of the request's own τ, requests without a verify step left out (ModelOpt "
           "specdec_bench's Average_AL). Long requests weigh more in the first.",
           t] if (t := tau_averages_table(results)) else []),
        *(["## Where the wall clock goes",
           "Decode speedup: AR's seconds per output token after the first over the method's, each prompt's prefill "
           "(timed apart for its shape) taken out. decode speedup / τ = the share of τ that becomes wall clock. "
           "Row-steps idle: the steps a batch row sat free while prompts were still queued (continuous refill keeps "
           "this at 0) / after its queue emptied (the last rows finishing), of all row-steps.",
           t] if (t := wall_clock_table(results)) else []),
        *(["## Confidence schedule (DSpark)",
           "The verify width each step chose (anchor + drafts judged; one width per batch step, counted once per "
           "prompt it verified) and the step costs the schedule weighed expected committed tokens against (ms per step: the affine fit of the measured "
           "costs with --confidence-schedule auto; else as given).",
           t] if (t := schedule_table(results)) else []),
        *(["## Training seeds",
           "τ: mean over seeds [two-stage bootstrap interval: seeds, then prompts] (each seed's τ).",
           t] if (t := seeds_table(results)) else []),
        "## Acceptance rate by draft position (all suites pooled)",
        "r_j = fraction of verification steps in which draft position j was accepted.",
        acceptance_table(results),
        "## Details",
        details_table(results),
        "## Config",
        "```json\n" + json.dumps(jsonable(results.config), indent=2, sort_keys=True) + "\n```",
        "## Versions",
        "```json\n" + json.dumps(jsonable(results.versions), indent=2, sort_keys=True) + "\n```",
    ]) + "\n"


def _plot_acceptance(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in ordered_methods(results):
        st = pooled_stats(results, m)
        if st is not None:
            r = st.accept_rate_by_position
            ax.plot(np.arange(1, len(r) + 1), r, marker="o", label=f"{m} (τ={st.tau:.2f})")
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1.02)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    ax.set_title("Acceptance rate by draft position (all suites)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_hist(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    for m in ordered_methods(results):
        st = pooled_stats(results, m)
        if st is not None:
            series.append((m, np.array(st.accepted_hist) / st.steps))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    width = 0.8 / max(1, len(series))
    for i, (m, freq) in enumerate(series):
        ax.bar(np.arange(freq.size) + (i - (len(series) - 1) / 2) * width, freq, width=width, label=m)
    ax.set_xlabel("accepted draft tokens per step")
    ax.set_ylabel("fraction of steps")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3, axis="y")
    if series:
        ax.legend()
    ax.set_title("Accepted length histogram (all suites)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


RESULTS_FOLDER = OutputKind("an eval.run results folder (results.json)", has_files("results.json"))


def write_results(out_dir, results: Results | Mapping, overwrite: bool = False,
                  inputs: Iterable[tuple[str, str | Path | None]] = ()) -> Path:
    """Write results.json, results.md, acceptance_by_position.png, accepted_length_hist.png.

    The output rule is `fileio.check_output`'s with `RESULTS_FOLDER`: an existing non-empty `out_dir` is replaced
    only if it is an earlier results folder and overwrite=True, never if it is or holds one of `inputs`. Writes
    into a temporary sibling first, so a failure never leaves a half-written report behind. Returns the out dir.
    """
    out = Path(out_dir)
    results = as_results(results)
    check_output(out, flag="--out", kind=RESULTS_FOLDER, inputs=inputs, overwrite=overwrite)
    with atomic_dir(out, overwrite=True) as tmp:  # an empty existing folder is replaced without asking
        (tmp / "results.json").write_text(
            json.dumps(jsonable(results.to_json()), indent=2, allow_nan=False) + "\n", encoding="utf-8"
        )
        (tmp / "results.md").write_text(render_markdown(results), encoding="utf-8")
        _plot_acceptance(results, tmp / "acceptance_by_position.png")
        _plot_hist(results, tmp / "accepted_length_hist.png")
    return out
