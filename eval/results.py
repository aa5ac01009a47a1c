"""Typed results of an evaluation, and their JSON form (results.json, outputs.jsonl).

results.json:

    {
      "config":   {...},   # free-form: CLI arguments, checkpoint paths, block size, batch, dtype... (eval.provenance)
      "versions": {...},   # free-form: jax/flax/numpy versions, git commit, device... (eval.provenance)
      "suites": {
        <suite>: {                         # e.g. "gsm8k"; columns of the tables, in this order
          <method>: {                      # e.g. "ar", "mtp", "dflash", "hyperdflash"; rows
            "tau": float,                  # mean(accepted + 1) over valid steps; AR: 1.0
            "accept_rate_by_pos": [float], # r_j = P(accepted >= j), j = 1..B-1; AR: []
            "accepted_hist": [int],        # step counts of accepted = 0..B-1; AR: [steps]
            "tokens": int,                 # generated tokens, all prompts
            "tokens_per_s": float,         # tokens / wall_s
            "wall_s": float,               # generation wall clock, compilation excluded
            "compile_s": float,            # compilation / warm-up time, reported apart
            "speedup": float,              # AR wall_s / this wall_s, same prompts, same run; AR: 1.0
            "greedy_match_ar": bool|None,  # outputs identical to AR's (greedy); None if not checked
            "score": float|None,           # accuracy in [0, 1]; None if not scored (e.g. MT-Bench)
            # written by eval.run, optional when read: steps, block_size, samples, compiled_shapes,
            # warmup_s, drafter, greedy_mismatched (only when some output differs)
          }, ...
        }, ...
      },
      "greedy_mismatches": [...]           # only when some greedy output differs from AR's
    }

τ, r_j and the histogram are defined in hdflash_jax.decode.stats. Unknown keys of a file read back are kept
(`extra`) and written again. In the file, numpy values become JSON numbers/lists and non-finite floats (NaN, inf)
become null (strict JSON); reading maps a null float back to NaN.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from hdflash_jax.decode.stats import AcceptanceStats

REQUIRED_CELL_KEYS = ("tau", "accept_rate_by_pos", "accepted_hist", "tokens", "tokens_per_s", "wall_s",
                      "compile_s", "speedup", "greedy_match_ar", "score")
_FLOAT_KEYS = ("tokens_per_s", "wall_s", "compile_s", "speedup")
_OPTIONAL_KEYS = ("steps", "block_size", "samples", "compiled_shapes", "warmup_s", "drafter", "greedy_mismatched")


def jsonable(x):
    """numpy -> Python, non-finite floats -> None, recursively."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """A sample whose greedy output differs from AR's: the first differing turn (1-based) and token."""
    id: str
    turn: int
    first_diff_token: int
    ar_tokens: int
    method_tokens: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SuiteMismatches:
    suite: str
    method: str
    n_samples: int
    mismatched: tuple[Mismatch, ...]

    def to_json(self) -> dict:
        return {"suite": self.suite, "method": self.method, "n_samples": self.n_samples,
                "mismatched": [m.to_json() for m in self.mismatched]}


def _float(v) -> float:
    return float("nan") if v is None else float(v)


@dataclasses.dataclass(frozen=True)
class CellResult:
    """One (suite, method): acceptance statistics, throughput, the greedy check and the score."""
    stats: AcceptanceStats
    tokens: int
    tokens_per_s: float
    wall_s: float
    compile_s: float
    speedup: float
    greedy_match_ar: bool | None
    score: float | None
    samples: int | None = None
    compiled_shapes: tuple[tuple[int, int], ...] | None = None  # (bucket, batch) first compiled in this cell
    warmup_s: float | None = None  # the untimed first runs alone (part of compile_s)
    drafter: str | None = None  # where the method's drafter came from
    greedy_mismatched: tuple[Mismatch, ...] = ()
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # unknown keys of a file read back

    @property
    def tau(self) -> float:
        return self.stats.tau

    def to_json(self) -> dict:
        out = {**self.stats.to_json(), "tokens": self.tokens, "tokens_per_s": self.tokens_per_s,
               "wall_s": self.wall_s, "compile_s": self.compile_s, "speedup": self.speedup,
               "greedy_match_ar": self.greedy_match_ar, "score": self.score, "block_size": self.stats.block_size}
        for k in ("samples", "warmup_s", "drafter"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.compiled_shapes is not None:
            out["compiled_shapes"] = [list(s) for s in self.compiled_shapes]
        if self.greedy_mismatched:
            out["greedy_mismatched"] = [m.to_json() for m in self.greedy_mismatched]
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, d: Mapping, where: str = "cell") -> CellResult:
        """Checks the keys of a results.json cell; ValueError names the entry."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{where} must be a dict")
        d = jsonable(dict(d))
        missing = [k for k in REQUIRED_CELL_KEYS if k not in d]
        if missing:
            raise ValueError(f"{where} lacks {missing}")
        for k in ("accept_rate_by_pos", "accepted_hist", "tokens"):
            if d[k] is None:
                raise ValueError(f"{where}[{k!r}] is None")
        hist = tuple(int(x) for x in d["accepted_hist"])
        stats = AcceptanceStats(_float(d["tau"]), tuple(_float(x) for x in d["accept_rate_by_pos"]), hist,
                                int(d["steps"]) if d.get("steps") is not None else sum(hist))
        shapes = d.get("compiled_shapes")
        return cls(stats, int(d["tokens"]), *(_float(d[k]) for k in _FLOAT_KEYS),
                   None if d["greedy_match_ar"] is None else bool(d["greedy_match_ar"]),
                   None if d["score"] is None else float(d["score"]),
                   samples=d.get("samples"), warmup_s=d.get("warmup_s"), drafter=d.get("drafter"),
                   compiled_shapes=None if shapes is None else tuple(tuple(s) for s in shapes),
                   greedy_mismatched=tuple(Mismatch(**m) for m in d.get("greedy_mismatched") or ()),
                   extra={k: v for k, v in d.items() if k not in REQUIRED_CELL_KEYS + _OPTIONAL_KEYS})


@dataclasses.dataclass(frozen=True)
class Results:
    """A whole run: config and versions (free-form), then suites → methods → cells, in table order."""
    config: dict
    versions: dict
    suites: dict[str, dict[str, CellResult]]
    greedy_mismatches: tuple[SuiteMismatches, ...] = ()
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.suites:
            raise ValueError("results['suites'] is empty")
        for suite, methods in self.suites.items():
            if not methods:
                raise ValueError(f"results['suites'][{suite!r}] must be a non-empty dict of methods")

    def to_json(self) -> dict:
        out = {"config": self.config, "versions": self.versions,
               "suites": {s: {m: c.to_json() for m, c in cells.items()} for s, cells in self.suites.items()}}
        if self.greedy_mismatches:
            out["greedy_mismatches"] = [m.to_json() for m in self.greedy_mismatches]
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, d: Mapping) -> Results:
        """A results.json (or the dict of one) → `Results`; ValueError names the first bad entry."""
        if not isinstance(d, Mapping):
            raise ValueError("results must be a dict")
        for key in ("config", "versions", "suites"):
            if not isinstance(d.get(key), Mapping):
                raise ValueError(f"results[{key!r}] must be a dict")
        suites = {}
        for suite, methods in d["suites"].items():
            if not isinstance(methods, Mapping) or not methods:
                raise ValueError(f"results['suites'][{suite!r}] must be a non-empty dict of methods")
            suites[suite] = {m: CellResult.from_json(c, f"results['suites'][{suite!r}][{m!r}]")
                             for m, c in methods.items()}
        mism = tuple(SuiteMismatches(x["suite"], x["method"], x["n_samples"],
                                     tuple(Mismatch(**m) for m in x["mismatched"]))
                     for x in d.get("greedy_mismatches") or ())
        return cls(dict(d["config"]), dict(d["versions"]), suites, mism,
                   {k: v for k, v in d.items() if k not in ("config", "versions", "suites", "greedy_mismatches")})


def as_results(results: Results | Mapping) -> Results:
    """`Results` as they are; a results.json dict is read (and checked) first."""
    return results if isinstance(results, Results) else Results.from_json(results)


@dataclasses.dataclass(frozen=True)
class Turn:
    text: str
    tokens: int


@dataclasses.dataclass(frozen=True)
class OutputRecord:
    """One line of outputs.jsonl: a sample's generated turns under one method, and its score."""
    suite: str
    id: str
    method: str
    turns: tuple[Turn, ...]
    score: float | None

    def to_json(self) -> dict:
        return {"suite": self.suite, "id": self.id, "method": self.method,
                "turns": [dataclasses.asdict(t) for t in self.turns], "score": self.score}
