"""Merge the cells of several `eval.run` results into one report, so that a variant's training seeds evaluated in
different runs (trained at different times) form one seed group:

    python -m eval.merge_runs OUT RUN [RUN ...]

RUN is a run folder or its results.json; `FILE#NAME` picks run NAME of a pipeline's merged results.json
(`{"runs": {NAME: results}}`). Runs must agree on what τ depends on: the same prompts per suite (the per-prompt ids)
and the same settings (--max-new-tokens, --temperature, --block-size, --verify, --first-turn-only). A method in two
runs must have the same per-prompt τ (greedy decoding is deterministic), else the merge stops. Cells keep their own
wall-clock figures (speedup and its interval against their own run's AR), which are not comparable across runs; the
merged report pairs per-prompt seconds with the first run's AR, so a later run's cells lose theirs (NaN) and get no
re-drawn speedup interval. The seed tables read τ.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

from eval.report import RESULTS_FOLDER, seed_groups, write_results
from eval.results import Results
from hdflash_jax.cli import run_command
from hdflash_jax.errors import UsageError
from hdflash_jax.fileio import check_output, read_json

_SETTINGS = ("--max-new-tokens", "--temperature", "--block-size", "--verify")
_FLAGS = ("--first-turn-only",)  # settings without a value: given or not
_DEFAULTS = {"--verify": "token"}  # a run made before the flag existed used this


def read_run(spec: str) -> Results:
    path, _, name = spec.partition("#")
    p = Path(path)
    f = p / "results.json" if p.is_dir() else p
    if not f.is_file():
        raise UsageError(f"{spec}: no results.json there")
    d = read_json(f)
    if name:
        if name not in d.get("runs", {}):
            raise UsageError(f"{spec}: no run {name!r}; runs: {sorted(d.get('runs', {}))}")
        d = d["runs"][name]
    try:
        return Results.from_json(d)
    except ValueError as e:
        raise UsageError(f"{f}: {e}") from None


def _settings(r: Results) -> dict:
    argv = list(r.config.get("argv") or [])
    out = {k: argv[argv.index(k) + 1] if k in argv[:-1] else _DEFAULTS.get(k) for k in _SETTINGS}
    return {**out, **{k: k in argv for k in _FLAGS}}


def _ids(cell) -> tuple:
    return tuple(p.id for p in cell.per_prompt or ())


def _taus(cell) -> tuple:
    """What a prompt's τ is made of: its verify steps and accepted tokens."""
    return tuple((p.steps, p.accepted_tokens) for p in cell.per_prompt or ())


def _without_seconds(cell):
    """The cell without per-prompt seconds: they were timed against another run's AR."""
    nan = math.nan
    return dataclasses.replace(cell, per_prompt=tuple(dataclasses.replace(p, wall_s=nan, decode_s=nan)
                                                      for p in cell.per_prompt))


def merge_runs(runs: list[Results], names: list[str]) -> Results:
    """One `Results`: the union of the runs' cells per suite (first run's order), seed groups recomputed."""
    first = runs[0]
    suites = {su: dict(cells) for su, cells in first.suites.items()}
    for r, name in zip(runs[1:], names[1:]):
        if _settings(r) != _settings(first):
            raise UsageError(f"{name}: settings {_settings(r)} differ from {names[0]}'s {_settings(first)}")
        for su, cells in r.suites.items():
            if su not in suites:
                raise UsageError(f"{name}: suite {su!r} is not in {names[0]}")
            ref = next(iter(suites[su].values()))
            for m, c in cells.items():
                if _ids(c) != _ids(ref):
                    raise UsageError(f"{name}: {su}/{m} ran other prompts than {names[0]}")
                if m in suites[su]:
                    if _taus(c) != _taus(suites[su][m]):
                        raise UsageError(f"{name}: {su}/{m} differs from the same method in an earlier run")
                    continue
                suites[su][m] = _without_seconds(c)
    config = {**first.config, "merged_from": names}
    return Results(config, first.versions, suites, seed_groups=seed_groups(suites))


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.merge_runs", description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args(argv)
    # OUT is replaced whole: never a run being merged (or a folder holding one), never anything but a results folder
    inputs = [("the run", s.partition("#")[0]) for s in args.runs]
    check_output(args.out, flag="--out", kind=RESULTS_FOLDER, inputs=inputs, overwrite=True)
    merged = merge_runs([read_run(s) for s in args.runs], args.runs)
    write_results(args.out, merged, overwrite=True, inputs=inputs)
    print(f"wrote {args.out}: {sum(len(c) for c in merged.suites.values())} cells, "
          f"seed groups {sorted(merged.seed_groups)}")
    return 0


def main(argv=None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
