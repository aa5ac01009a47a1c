"""Drafter variants over their training seeds, on the suites' average τ, with the paired differences:

    python -m eval.seed_compare RUN [RUN ...] --variants A,B[,...] [--json OUT.json]

RUN as in `eval.merge_runs` (several are merged first, with its checks: the same prompts and settings). A variant's
seeds are its methods named `<variant>-s<seed>`. Printed: each variant's τ per suite (mean over seeds), the
suites' average with its 95% interval, each seed's average, and every pair's difference (the earlier-named minus
the later-named) with its interval — `eval.bootstrap.seed_suite_ci`: prompts resampled once per suite and shared by
every variant and seed (paired), then seeds with replacement.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np

from eval.bootstrap import seed_suite_ci
from eval.merge_runs import merge_runs, read_run
from eval.results import SEED_SUFFIX, Results
from hdflash_jax.cli import run_command
from hdflash_jax.errors import UsageError
from hdflash_jax.fileio import JSON_REPORT, check_output, write_json_report


def seed_arrays(results: Results, variant: str) -> tuple[list[int], list[list[np.ndarray]]]:
    """The seeds of `variant` and, per seed and suite, its [prompts, 2] (accepted tokens, steps), prompts by id
    (every seed and variant must have run the same prompts: they are paired)."""
    seeds = sorted(int(h.group("seed")) for m in next(iter(results.suites.values()))
                   if (h := SEED_SUFFIX.match(m)) and h.group("variant") == variant)
    if not seeds:
        raise UsageError(f"no method named {variant}-s<seed> in the runs")
    out = []
    for s in seeds:
        per_suite = []
        for su, cells in results.suites.items():
            c = cells.get(f"{variant}-s{s}")
            if c is None or not c.per_prompt:
                raise UsageError(f"{su}: {variant}-s{s} is missing or has no per-prompt figures")
            rows = sorted(c.per_prompt, key=lambda p: p.id)
            ids = [p.id for p in sorted(next(iter(cells.values())).per_prompt, key=lambda p: p.id)]
            if [p.id for p in rows] != ids:
                raise UsageError(f"{su}: {variant}-s{s} ran other prompts than {next(iter(cells))}")
            per_suite.append(np.array([[p.accepted_tokens, p.steps] for p in rows], np.float64))
        out.append(per_suite)
    return seeds, out


def compare(results: Results, variants: list[str], n_boot: int = 2000) -> dict:
    """{"variants": {v: {seeds, suites: {suite: τ}, avg, avg_ci, avg_by_seed}}, "differences": {"A - B": ...}}."""
    data = {v: seed_arrays(results, v) for v in variants}
    suites = list(results.suites)
    cis, _ = seed_suite_ci([data[v][1] for v in variants], n_boot=n_boot)
    out: dict = {"suites": suites, "variants": {}, "differences": {}}
    for v, ci in zip(variants, cis):
        seeds, arrs = data[v]
        taus = np.array([[x[:, 0].sum() / x[:, 1].sum() for x in s] for s in arrs])  # [seed, suite]
        out["variants"][v] = {"seeds": seeds, "suites": dict(zip(suites, taus.mean(0).tolist())),
                              "avg": ci.point, "avg_ci": [ci.lo, ci.hi], "avg_by_seed": taus.mean(1).tolist()}
    for a, b in itertools.combinations(variants, 2):
        _, d = seed_suite_ci([data[a][1], data[b][1]], n_boot=n_boot)
        out["differences"][f"{a} - {b}"] = {"diff": d.point, "ci": [d.lo, d.hi]}
    return out


def render(cmp: dict) -> str:
    suites = cmp["suites"]
    lines = ["| variant | seeds | " + " | ".join(suites) + " | avg τ [95%] | avg τ per seed |",
             "|---|---|" + "---|" * (len(suites) + 2)]
    for v, r in cmp["variants"].items():
        lo, hi = r["avg_ci"]
        lines.append(f"| {v} | {','.join(map(str, r['seeds']))} | "
                     + " | ".join(f"{r['suites'][s]:.2f}" for s in suites)
                     + f" | {r['avg']:.3f} [{lo:.3f}, {hi:.3f}] | " + " / ".join(f"{t:.3f}" for t in r["avg_by_seed"])
                     + " |")
    lines += ["", "| difference | avg τ [95%] |", "|---|---|"]
    lines += [f"| {k} | {d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |"
              for k, d in cmp["differences"].items()]
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.seed_compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--variants", required=True, help="comma list of variants (methods <variant>-s<seed>)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.json:  # the output rule, before anything is read
        check_output(args.json, flag="--json", kind=JSON_REPORT, overwrite=True,
                     inputs=[("the input run", s.partition("#")[0]) for s in args.runs])
    runs = [read_run(s) for s in args.runs]
    results = merge_runs(runs, args.runs) if len(runs) > 1 else runs[0]
    cmp = compare(results, args.variants.split(","))
    cmp["runs"] = args.runs
    print(render(cmp))
    if args.json:
        write_json_report(args.json, cmp, indent=1)
    return 0


def main(argv=None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
