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
from typing import Mapping

import numpy as np

from eval.results import Results, as_results, jsonable
from hdflash_jax.fileio import atomic_dir
from hdflash_jax.decode.stats import AcceptanceStats

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


def summary_table(results: Results | Mapping) -> str:
    """Markdown: rows = methods, columns = suites + avg, cells `speedup× / τ`."""
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
            cells.append(f"{_fmt(c.speedup, '.2f')}× / {_fmt(c.tau, '.2f')}")
            sp.append(c.speedup)
            ta.append(c.tau)
        avg = f"{np.mean(sp):.2f}× / {np.mean(ta):.2f}" if sp else DASH
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} |")
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
        "| suite | method | τ | speedup | tokens | tokens/s | wall s | compile s | = AR | score |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, cells in results.suites.items():
        for m in ordered_methods(results):
            c = cells.get(m)
            if c is None:
                continue
            match = DASH if c.greedy_match_ar is None else ("yes" if c.greedy_match_ar else "no")
            lines.append(
                f"| {s} | {m} | {_fmt(c.tau, '.2f')} | {_fmt(c.speedup, '.2f')}× | {c.tokens} | "
                f"{_fmt(c.tokens_per_s, '.1f')} | {_fmt(c.wall_s, '.2f')} | {_fmt(c.compile_s, '.2f')} | "
                f"{match} | {_fmt(c.score, '.3f')} |"
            )
    return "\n".join(lines)


def render_markdown(results: Results | Mapping) -> str:
    """The whole results.md."""
    results = as_results(results)
    return "\n\n".join([
        "# Results",
        "Cells: wall-clock speedup over AR (same prompts, same run, compilation excluded) / "
        "τ = mean accepted draft tokens + 1 per verification step.",
        summary_table(results),
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


def write_results(out_dir, results: Results | Mapping, overwrite: bool = False) -> Path:
    """Write results.json, results.md, acceptance_by_position.png, accepted_length_hist.png.

    Refuses (FileExistsError) an existing non-empty `out_dir` unless overwrite=True, and writes
    into a temporary sibling first, so a failure never leaves a half-written report behind.
    Returns the out dir.
    """
    out = Path(out_dir)
    results = as_results(results)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path exists and is not a directory: {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} exists and is not empty (pass overwrite=True)")
    with atomic_dir(out, overwrite=True) as tmp:  # an empty existing folder is replaced without asking
        (tmp / "results.json").write_text(
            json.dumps(jsonable(results.to_json()), indent=2, allow_nan=False) + "\n", encoding="utf-8"
        )
        (tmp / "results.md").write_text(render_markdown(results), encoding="utf-8")
        _plot_acceptance(results, tmp / "acceptance_by_position.png")
        _plot_hist(results, tmp / "accepted_length_hist.png")
    return out
