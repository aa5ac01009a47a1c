"""Typed results of an evaluation, and their JSON form (results.json, outputs.jsonl).

results.json:

    {
      "config":   {...},   # free-form: CLI arguments, checkpoint paths, block size, batch, dtype... (eval.provenance)
      "versions": {...},   # free-form: jax/flax/numpy versions, git commit, device... (eval.provenance)
      "suites": {
        <suite>: {                         # e.g. "gsm8k"; columns of the tables, in this order
          <method>: {                      # e.g. "ar", "mtp", "dflash", "hyperdflash"; rows
            "tau": float,                  # pooled over verify steps (DeepSpec): Σ(accepted + 1) / Σ steps; AR: 1.0
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
            # warmup_s, drafter, greedy_mismatched (only when some output differs), and the statistics:
            "tau_ci": [lo, hi],            # 95% bootstrap interval of tau over prompts (eval.bootstrap)
            "tau_per_request": float,      # mean over requests (each turn of each prompt) of the request's own τ
            "tau_per_request_ci": [lo, hi],#   (ModelOpt specdec_bench's Average_AL; requests with no verify step
                                           #   left out), its 95% bootstrap interval over prompts
            "output_sha256": str,          # sha256 of the method's output token ids on this suite (`outputs_sha256`):
                                           #   greedy speculative methods have AR's
            "speedup_ci": [lo, hi],        # the same for the end-to-end speedup (prompts paired with AR's)
            "decode_speedup": float,       # AR / this method in seconds per output token after the first
            "decode_speedup_ci": [lo, hi], #   (each queue's wall minus its prompts' prefill, timed apart per shape)
            "prefill_s": float,            # prefill seconds of every prompt, summed (part of wall_s)
            "seeds": [int],                # training seeds of the drafter(s) behind the cell; [] for AR / MTP
            "per_prompt": [{"id", "tokens", "steps", "accepted_tokens", "wall_s", "decode_s",
                            "request_tau": [float]}, ...]   # request_tau: τ of each turn with a verify step
            "rows": {"row_steps", "work", "idle", "drain"},  # in `extra`: loop steps × rows, the prompts' own
                                           #   verify steps, row-steps free while prompts were queued / after
            # --confidence-schedule (DSpark's scheduled verify) only, in `extra`:
            "verify_width_hist": [int],    # verify steps per width 1..B (anchor + drafts judged), prompts' steps
            "verify_costs": {"<bucket>x<batch>": {"measured": [float], "used": [float]}},  # auto: step seconds
                                           #   per width measured per shape and their affine fit, which the
                                           #   schedule reads; explicit costs: {"given": [...]}
          }, ...
        }, ...
      },
      "seed_groups": {<variant>: {<suite>: {"seeds", "methods", "tau", "tau_ci", "tau_by_seed",
                                             "speedup", "speedup_ci", "speedup_by_seed"}}},  # eval.report
      "greedy_mismatches": [...]           # only when some greedy output differs from AR's
    }

τ, r_j and the histogram are defined in hdflash_jax.decode.stats. Unknown keys of a file read back are kept
(`extra`) and written again. In the file, numpy values become JSON numbers/lists and non-finite floats (NaN, inf)
become null (strict JSON); reading maps a null float back to NaN.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import numpy as np

from hdflash_jax.decode.stats import AcceptanceStats

SEED_SUFFIX = re.compile(r"^(?P<variant>.+)-s(?P<seed>[0-9]+)$")  # a drafter method named <variant>-s<seed>
REQUIRED_CELL_KEYS = ("tau", "accept_rate_by_pos", "accepted_hist", "tokens", "tokens_per_s", "wall_s",
                      "compile_s", "speedup", "greedy_match_ar", "score")
_FLOAT_KEYS = ("tokens_per_s", "wall_s", "compile_s", "speedup")
_OPTIONAL_KEYS = ("steps", "block_size", "samples", "compiled_shapes", "warmup_s", "drafter", "greedy_mismatched",
                  "tau_ci", "speedup_ci", "decode_speedup", "decode_speedup_ci", "prefill_s", "seeds", "per_prompt",
                  "tau_per_request", "tau_per_request_ci", "output_sha256")
# the two τ averages in use (anchors: DeepSpec pools verify cycles, ModelOpt's specdec_bench averages requests)
TAU_AVERAGES = {
    "tau": "pooled over every verify step of the suite: sum(accepted + 1) / steps (DeepSpec's average)",
    "tau_per_request": "mean over requests (each turn of each prompt) of the request's sum(accepted + 1) / steps, "
                       "requests without a verify step left out (ModelOpt specdec_bench's Average_AL)",
}


def outputs_sha256(outputs) -> str:
    """sha256 of output token ids: `outputs` = per sample, its turns' id lists (JSON, no spaces), so two methods
    that generated the same tokens for the same prompts have the same hash."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps([[list(map(int, t)) for t in turns] for turns in outputs],
                                     separators=(",", ":")).encode()).hexdigest()


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


@dataclasses.dataclass(frozen=True)
class PromptFigures:
    """One sample under one method (all its turns): what the bootstrap resamples. accepted_tokens = Σ (accepted
    + 1) over its verify steps, so τ of a set of prompts = Σ accepted_tokens / Σ steps. wall_s is the prompt's
    share of its batches' generation time (exact at batch 1), decode_s the same minus the prefill. request_tau: τ of
    each of its requests (turns) that took a verify step, for the mean over requests."""
    id: str
    tokens: int
    steps: int
    accepted_tokens: int
    wall_s: float
    decode_s: float
    request_tau: tuple[float, ...] = ()

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["request_tau"] = list(self.request_tau)
        if not self.request_tau:
            del out["request_tau"]
        return out

    @classmethod
    def from_json(cls, d: Mapping) -> PromptFigures:
        return cls(str(d["id"]), int(d["tokens"]), int(d["steps"]), int(d["accepted_tokens"]), _float(d["wall_s"]),
                   _float(d["decode_s"]), tuple(float(x) for x in d.get("request_tau") or ()))


def _interval(v) -> tuple[float, float] | None:
    return None if v is None else (_float(v[0]), _float(v[1]))


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
    tau_ci: tuple[float, float] | None = None  # 95% bootstrap intervals over prompts (eval.bootstrap)
    speedup_ci: tuple[float, float] | None = None
    decode_speedup: float | None = None  # per output token after the first, prefill excluded
    decode_speedup_ci: tuple[float, float] | None = None
    prefill_s: float | None = None
    seeds: tuple[int, ...] | None = None  # training seeds of the drafter behind the cell; () for AR / MTP
    per_prompt: tuple[PromptFigures, ...] = ()
    tau_per_request: float | None = None  # mean over requests of each request's τ (TAU_AVERAGES)
    tau_per_request_ci: tuple[float, float] | None = None
    output_sha256: str | None = None  # `outputs_sha256` of the method's outputs on the suite
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # unknown keys of a file read back

    @property
    def tau(self) -> float:
        return self.stats.tau

    @property
    def decode_s(self) -> float | None:
        return self.wall_s - self.prefill_s if self.prefill_s is not None else None

    def to_json(self) -> dict:
        out = {**self.stats.to_json(), "tokens": self.tokens, "tokens_per_s": self.tokens_per_s,
               "wall_s": self.wall_s, "compile_s": self.compile_s, "speedup": self.speedup,
               "greedy_match_ar": self.greedy_match_ar, "score": self.score, "block_size": self.stats.block_size}
        for k in ("samples", "warmup_s", "drafter", "decode_speedup", "prefill_s", "tau_per_request", "output_sha256"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        for k in ("tau_ci", "speedup_ci", "decode_speedup_ci", "seeds", "tau_per_request_ci"):
            if getattr(self, k) is not None:
                out[k] = list(getattr(self, k))
        if self.per_prompt:
            out["per_prompt"] = [p.to_json() for p in self.per_prompt]
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
                   tau_ci=_interval(d.get("tau_ci")), speedup_ci=_interval(d.get("speedup_ci")),
                   decode_speedup=None if d.get("decode_speedup") is None else float(d["decode_speedup"]),
                   decode_speedup_ci=_interval(d.get("decode_speedup_ci")),
                   prefill_s=None if d.get("prefill_s") is None else float(d["prefill_s"]),
                   seeds=None if d.get("seeds") is None else tuple(int(x) for x in d["seeds"]),
                   per_prompt=tuple(PromptFigures.from_json(p) for p in d.get("per_prompt") or ()),
                   tau_per_request=None if d.get("tau_per_request") is None else float(d["tau_per_request"]),
                   tau_per_request_ci=_interval(d.get("tau_per_request_ci")), output_sha256=d.get("output_sha256"),
                   extra={k: v for k, v in d.items() if k not in REQUIRED_CELL_KEYS + _OPTIONAL_KEYS})


@dataclasses.dataclass(frozen=True)
class SeedGroup:
    """One drafter variant trained with several seeds (methods `<variant>-s<seed>`) on one suite: each seed's
    τ and speedup, their means over seeds, and two-stage bootstrap intervals (seeds, then prompts)."""
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    tau_by_seed: tuple[float, ...]
    tau: float
    tau_ci: tuple[float, float]
    speedup_by_seed: tuple[float, ...]
    speedup: float
    speedup_ci: tuple[float, float] | None

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, d: Mapping) -> SeedGroup:
        t = lambda k, f=float: tuple(f(x) for x in d[k])  # noqa: E731
        return cls(t("seeds", int), t("methods", str), t("tau_by_seed"), float(d["tau"]), t("tau_ci"),
                   t("speedup_by_seed"), _float(d["speedup"]),
                   None if d.get("speedup_ci") is None else t("speedup_ci"))


@dataclasses.dataclass(frozen=True)
class Results:
    """A whole run: config and versions (free-form), then suites → methods → cells, in table order."""
    config: dict
    versions: dict
    suites: dict[str, dict[str, CellResult]]
    greedy_mismatches: tuple[SuiteMismatches, ...] = ()
    seed_groups: Mapping[str, Mapping[str, SeedGroup]] = dataclasses.field(default_factory=dict)  # variant→suite
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
        if self.seed_groups:
            out["seed_groups"] = {v: {s: g.to_json() for s, g in by.items()} for v, by in self.seed_groups.items()}
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
        groups = {v: {s: SeedGroup.from_json(g) for s, g in by.items()}
                  for v, by in (d.get("seed_groups") or {}).items()}
        return cls(dict(d["config"]), dict(d["versions"]), suites, mism, groups,
                   {k: v for k, v in d.items()
                    if k not in ("config", "versions", "suites", "greedy_mismatches", "seed_groups")})


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
