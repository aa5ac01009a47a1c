"""Methods of an evaluation: their names, the expansion of `--method`, and one `Generator` per method.

Names: `ar`, `mtp` (the target's MTP layer chained --mtp-k times), `mtp<k>` (chained k times, so `mtp3,mtp7`
compare depths in one run), `replay` (AR's own greedy answer proposed at no cost: the ceiling that the verify step
alone allows, greedy runs only), `self-sample` (the target's own sample at the run's temperature as point-mass
drafts: the ceiling the target's entropy allows at T > 0; it runs the target K times a step), and the drafters
by name (a target's own or `--drafter NAME=CKPT`, of any family).
Each name resolves to a drafter family and its config (`method_family`); the family says what a block size means
in drafts and builds the decode adapter.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

from eval.errors import UsageError, log

if TYPE_CHECKING:
    from eval.targets import DrafterSource, TargetSpec

# plus "mtp<k>" (the MTP layer chained k times, e.g. mtp3): see mtp_depth
BUILTIN_METHODS = ("ar", "mtp", "replay", "self-sample")
MTP_K = re.compile(r"^mtp([1-9][0-9]*)$")
METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# the design a method name promises (`DrafterFamily.describe` of its drafter)
EXPECTED_DESIGN = {"hyperdflash": "final_streams/gated", "dflash": "layers/linear"}


def is_builtin(method: str) -> bool:
    return method in BUILTIN_METHODS or MTP_K.match(method) is not None


def mtp_depth(method: str, default_k: int) -> int | None:
    """Drafts per step of an MTP method ("mtp" → --mtp-k, "mtp<k>" → k), None for any other method."""
    if method == "mtp":
        return default_k
    m = MTP_K.match(method)
    return int(m.group(1)) if m else None


def method_family(method: str, sources: dict[str, DrafterSource], mtp_k: int) -> tuple[Any, Any]:
    """(family, config) of a method: the built-in ones' families, else its drafter source's."""
    from hdflash_jax.families import family
    from hdflash_jax.families.mtp import MTPConfig
    from hdflash_jax.families.replay import ReplayConfig
    from hdflash_jax.families.self_sample import SelfSampleConfig

    if method == "ar":
        return family("ar"), None
    if method == "replay":
        return family("replay"), ReplayConfig()
    if method == "self-sample":
        return family("self-sample"), SelfSampleConfig()
    depth = mtp_depth(method, mtp_k)
    if depth is not None:
        return family("mtp"), MTPConfig(depth)
    src = sources[method]
    return src.family, src.config


def expand_methods(spec: str, target: TargetSpec, drafters: dict[str, DrafterSource],
                   greedy: bool = True) -> tuple[list[str], bool]:
    """'ar,mtp,...' or 'all' → method names (AR first, added if missing); returns (methods, ar_added). `greedy`:
    the run's temperature is 0 (`replay` needs it)."""
    known = {**target.drafters, **drafters}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UsageError("--method: no method given")
    out: list[str] = []
    for n in names:
        expanded = (["ar"] + (["mtp"] if target.config.n_mtp_layers > 0 else []) + list(known)) if n == "all" else [n]
        for m in expanded:
            if not is_builtin(m) and m not in known:
                valid = ", ".join(list(BUILTIN_METHODS) + list(known) + ["all"])
                if m in EXPECTED_DESIGN:
                    raise UsageError(f"--method {m}: the target {target.name!r} has no built-in {m} drafter; "
                                     f"pass --drafter {m}=CHECKPOINT (valid methods now: {valid})")
                raise UsageError(f"unknown method {m!r}; valid methods: {valid} (more with --drafter NAME=CKPT)")
            if m not in out:
                out.append(m)
    for m in out:
        if m == "replay" and not greedy:
            raise UsageError("--method replay: the replay ceiling proposes AR's greedy answer, so it is defined for "
                             "greedy runs only (--temperature 0)")
        if is_builtin(m):  # a drafter source was checked against the target when it was made
            fam, cfg = method_family(m, known, 1)
            try:
                fam.check_target(cfg, target.config, where=f"--method {m}")
            except ValueError as e:
                raise UsageError(str(e)) from None
    ar_added = "ar" not in out
    out = ["ar"] + [m for m in out if m != "ar"]
    return out, ar_added


def warn_on_design(methods: list[str], sources: dict[str, DrafterSource]) -> None:
    """A drafter named hyperdflash / dflash whose design is another is allowed, but said."""
    for m in methods:
        expect, src = EXPECTED_DESIGN.get(m), sources.get(m)
        if expect and src is not None and src.family.describe(src.config) != expect:
            log(f"warning: method {m!r} runs a drafter {src.family.describe(src.config)}, not {expect}")


def num_drafts(method: str, sources: dict[str, DrafterSource], mtp_k: int, block_size: int | None) -> int:
    """K of a method before any model exists (`DrafterFamily.num_drafts`: --block-size, when given, is the verify
    width of every method but MTP's chain)."""
    fam, cfg = method_family(method, sources, mtp_k)
    return fam.num_drafts(cfg, block_size)


@dataclasses.dataclass
class Method:
    """One method of a run: its generator (one per method, reused over suites) and the shapes it compiled."""
    name: str
    generator: Any  # hdflash_jax.decode.generate.Generator
    block_size: int
    origin: str
    compiled: set = dataclasses.field(default_factory=set)
    compile_s: float = 0.0
    replays_ar: bool = False  # the replay ceiling: its drafter's reference is AR's output, set per batch
    seeds: tuple[int, ...] = ()  # the training seed of its drafter checkpoint, when known
    confidence_schedule: str | None = None  # "auto": costs measured per shape as it compiles (eval.runner)

    @property
    def scheduled(self) -> bool:
        """Its verify width follows DSpark's confidence schedule (measured or given costs)."""
        return self.confidence_schedule == "auto" or self.generator.settings.confidence_schedule is not None


def build_methods(names: list[str], sources: dict[str, DrafterSource], target, settings, *, mtp_k: int,
                  block_size: int | None, seed: int, confidence_schedule="off") -> dict[str, Method]:
    """One `Generator` per method over the loaded target (drafters' weights are loaded here).
    `confidence_schedule` ("off", "auto" or costs; eval.config checked it) applies to every method but AR."""
    from hdflash_jax.decode.generate import Generator, mesh_of

    out = {}
    for m in names:
        fam, cfg = method_family(m, sources, mtp_k)
        k = fam.num_drafts(cfg, block_size)
        src = sources.get(m)
        if src is not None:
            modules, origin, seeds = src.load(target, seed), src.origin, src.seeds
        else:
            modules, origin, seeds = fam.decode_modules(cfg), fam.describe(cfg), ()
        drafter = fam.adapter(cfg, k, settings.temperature, settings.top_p)
        scheduled = confidence_schedule != "off" and m != "ar"
        own = (dataclasses.replace(settings, confidence_schedule=confidence_schedule)
               if scheduled and confidence_schedule != "auto" else settings)
        out[m] = Method(m, Generator(target, drafter, modules, settings=own, mesh=mesh_of(target)),
                        drafter.num_drafts + 1, origin, replays_ar=fam.replays_reference, seeds=seeds,
                        confidence_schedule="auto" if scheduled and confidence_schedule == "auto" else None)
    return out
