"""Methods of an evaluation: their names, the expansion of `--method`, and one `Generator` per method.

Names: `ar`, `mtp` (the target's MTP layer chained --mtp-k times), `mtp<k>` (chained k times, so `mtp3,mtp7`
compare depths in one run), `replay` (AR's own greedy answer proposed at no cost: the ceiling that the verify step
alone allows, greedy runs only), and the block drafters by name (a target's own or `--drafter NAME=CKPT`):
HyperDFlash / DFlash (`DrafterConfig`) and DSpark (`DSparkConfig`: `dspark`, `dspark-gated`, a converted
checkpoint's `dspark`).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.errors import UsageError, log

if TYPE_CHECKING:
    from eval.targets import DrafterSource, TargetSpec

BUILTIN_METHODS = ("ar", "mtp", "replay")  # plus "mtp<k>" (the MTP layer chained k times, e.g. mtp3): see mtp_depth
MTP_K = re.compile(r"^mtp([1-9][0-9]*)$")
METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
REPLAY_DRAFTS = 7  # the replay ceiling's drafts per step without --block-size: B = 8, the built-in drafters' block
# the design a method name promises: (conditioning, reducer) of its DrafterConfig
EXPECTED_DESIGN = {"hyperdflash": ("final_streams", "gated"), "dflash": ("layers", "linear")}


def is_builtin(method: str) -> bool:
    return method in BUILTIN_METHODS or MTP_K.match(method) is not None


def mtp_depth(method: str, default_k: int) -> int | None:
    """Drafts per step of an MTP method ("mtp" → --mtp-k, "mtp<k>" → k), None for any other method."""
    if method == "mtp":
        return default_k
    m = MTP_K.match(method)
    return int(m.group(1)) if m else None


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
        if mtp_depth(m, 1) is not None and target.config.n_mtp_layers < 1:
            raise UsageError(f"--method {m}: the target {target.name!r} has no MTP layer (n_mtp_layers = 0)")
    ar_added = "ar" not in out
    out = ["ar"] + [m for m in out if m != "ar"]
    return out, ar_added


def is_dspark(src: DrafterSource) -> bool:
    from hdflash_jax.dspark.config import DSparkConfig

    return isinstance(src.config, DSparkConfig)


def dspark_checkpoint_source(method: str, path, target_cfg=None, trained: bool = True) -> DrafterSource:
    """A DSpark drafter checkpoint folder (dspark_config.json + params/) as the drafter of `method`."""
    from eval.targets import DrafterSource, training_seeds
    from hdflash_jax.dspark.checkpoint import load_dspark, load_dspark_config

    cfg = load_dspark_config(path)
    if target_cfg is not None:
        cfg.check_target(target_cfg, where=f"DSpark drafter {path}")
    path = Path(path)
    return DrafterSource(method, str(path), cfg, lambda target, seed: load_dspark(path, target.cfg)[1],
                         trained=trained, path=path, seeds=training_seeds(path))


def warn_on_design(methods: list[str], sources: dict[str, DrafterSource]) -> None:
    """A drafter named hyperdflash / dflash whose config is the other design is allowed, but said."""
    for m in methods:
        expect, src = EXPECTED_DESIGN.get(m), sources.get(m)
        if expect and src is not None and is_dspark(src):
            log(f"warning: method {m!r} runs a DSpark drafter")
        elif expect and src is not None and (src.config.conditioning, src.config.reducer) != expect:
            log(f"warning: method {m!r} runs a drafter with conditioning/reducer "
                f"{(src.config.conditioning, src.config.reducer)}, not {expect}")


def num_drafts(method: str, sources: dict[str, DrafterSource], mtp_k: int, block_size: int | None) -> int:
    """K of a method before any model exists: 0 for AR, the chain depth of MTP, block size − 1 of a drafter
    (--block-size, else the drafter's training block size). --block-size is the verify width for every method;
    a DSpark block of B slots drafts B tokens, so its own default is B drafts."""
    if method == "ar":
        return 0
    if method == "replay":
        return REPLAY_DRAFTS if block_size is None else block_size - 1
    depth = mtp_depth(method, mtp_k)
    if depth is not None:
        return depth
    from hdflash_jax.decode.drafters import default_num_drafts

    return default_num_drafts(sources[method].config) if block_size is None else block_size - 1


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


def build_methods(names: list[str], sources: dict[str, DrafterSource], target, settings, *, mtp_k: int,
                  block_size: int | None, seed: int) -> dict[str, Method]:
    """One `Generator` per method over the loaded target (block drafters' weights are loaded here)."""
    import numpy as np

    from hdflash_jax.decode.drafters import MTPDrafter, NoDrafter, ReplayDrafter, ReplayTokens, drafter_adapter
    from hdflash_jax.decode.generate import Generator, mesh_of

    sampled = settings.temperature > 0
    temp = settings.temperature if sampled else 1.0
    out = {}
    for m in names:
        k = num_drafts(m, sources, mtp_k, block_size)
        seeds = ()
        if m == "ar":
            drafter, modules, origin = NoDrafter(), None, "autoregressive"
        elif mtp_depth(m, mtp_k) is not None:
            drafter, modules = MTPDrafter(k, sampled=sampled, temperature=temp), None
            origin = f"the target's MTP layer chained {k}x"
        elif m == "replay":  # the reference is a placeholder until the runner sets each batch's AR output
            drafter, modules = ReplayDrafter(k), ReplayTokens(np.zeros((1, 1), np.int32))
            origin = f"AR's greedy output replayed {k} tokens a step (the verify step's ceiling)"
        else:
            src = sources[m]
            modules, origin, seeds = src.load(target, seed), src.origin, src.seeds
            drafter = drafter_adapter(src.config, k, settings.temperature)
        out[m] = Method(m, Generator(target, drafter, modules, settings=settings, mesh=mesh_of(target)),
                        drafter.num_drafts + 1, origin, replays_ar=m == "replay", seeds=seeds)
    return out
