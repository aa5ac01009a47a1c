"""The drafter-family registry: one object per family owns everything that differs between families.

A family is a subclass of `DrafterFamily` registered with `@register`; callers ask the registry (`family(name)`,
`family_of(cfg)`, `checkpoint_family(path)`) and never test a config's type, a kind string or a file name
themselves. What a family owns:

* its config class (`config_cls`) and how a config is made for a target (`config_for`, from its training
  section: `section_cls`) and checked against one (`check_target`, the one compatibility rule);
* its checkpoint files (`config_file` + `params/`): `is_checkpoint`, `save`, `load_config`, `load`;
* what a block size means in drafts (`num_drafts`) and its decode adapter (`adapter`, a `generate.Drafter`);
* its modules (`init`, `abstract`), its training step (`train_step`) and loss config (`loss_cls`, `loss_for`);
* what its step reads of the target when that ran once beforehand (`offline_layout`, `capture`, `teacher_slots`,
  `feature_fields`: hdflash_jax.training.features);
* its serving formats (`formats`: export and import, `hdflash_jax.formats`).

Families without checkpoints (AR, replay, MTP) implement only the decoding half. The guide to adding one is
docs/adding_a_drafter_family.md; tests/test_families.py runs every registered family through the same checks.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

from hdflash_jax.decode.verify import MIN_BLOCK, check_block_size  # noqa: F401 — the decoder owns the rule

PARAMS_DIR = "params"


class DrafterFamily:
    """The base of every family; the defaults say "not available for this family" in one line."""
    name: ClassVar[str]
    what: ClassVar[str]  # e.g. "a block drafter (HyperDFlash / DFlash)"
    config_cls: ClassVar[type | None] = None
    config_file: ClassVar[str | None] = None  # the checkpoint's config file; None: no checkpoints
    loss_cls: ClassVar[type | None] = None  # its training loss config; None: not trained here
    section_cls: ClassVar[type | None] = None  # its `drafter:` section of a training config
    formats: ClassVar[dict[str, Any]] = {}  # serving formats by name (hdflash_jax.formats.DrafterFormat)
    # its decode modules are a reference continuation the caller sets per batch (the replay ceiling)
    replays_reference: ClassVar[bool] = False

    # ---- decoding ----------------------------------------------------------------------------------------------
    def num_drafts(self, cfg, block_size: int | None) -> int:
        """Drafts per verify step: the family's own default, or `block_size − 1` when the user sets the verify
        width with --block-size."""
        raise NotImplementedError

    def adapter(self, cfg, num_drafts: int, temperature: float, top_p: float = 1.0):
        """The decoder's `Drafter` (hdflash_jax.decode.generate) drafting `num_drafts` per step, for a run at
        `temperature` and `top_p` (`DecodeSettings`): a family that samples its drafts at T > 0 samples them from
        that nucleus."""
        raise NotImplementedError

    def draft_step(self, graphdef):
        """The family's pure drafting step over its split module, for the AOT planner's draft program:
        fn(state, target_embed, target_head, ctx_feats_new, n_ctx_new, anchor_tokens, cache) -> (drafts…, cache)."""
        raise ValueError(f"{self.what} has no planned draft step")

    def decode_modules(self, cfg):
        """What the adapter reads besides the target when no checkpoint is loaded (None: nothing)."""
        return None

    def describe(self, cfg) -> str:
        """The drafter's design in a few words (reports, logs); `cfg` may be the family's section (fields or None)."""
        return self.name

    def describe_loss(self, loss) -> str:
        """The training loss in a few words (reports)."""
        return "–"

    # ---- configs -------------------------------------------------------------------------------------------------
    def check_target(self, cfg, target_cfg, where: str) -> None:
        """ValueError when a drafter of `cfg` cannot run on `target_cfg`."""

    def config_for(self, target_cfg, section, mask_id: int | None = None):
        """The family's config for `target_cfg` from its training section (`section_cls`)."""
        raise ValueError(f"{self.what} is not trained here")

    def example_config(self, target_cfg):
        """A small config for `target_cfg`: what the per-family tests (and a first look) build."""
        return None

    # ---- modules and checkpoints ---------------------------------------------------------------------------------
    def init(self, cfg, target, seed: int = 0, *, inherit: bool = True):
        raise ValueError(f"{self.what} has no trainable module")

    def abstract(self, cfg, target_cfg):
        """The module with ShapeDtypeStruct leaves (no memory): the restore target and the planner's drafter."""
        raise ValueError(f"{self.what} has no module")

    def is_checkpoint(self, path) -> bool:
        path = Path(path)
        return self.config_file is not None and (path / self.config_file).is_file() and (path / PARAMS_DIR).is_dir()

    def load_config(self, path):
        """The config of a checkpoint folder (no weights read); errors name the folder or file."""
        from hdflash_jax.checkpoint import read_typed_config

        self._needs_checkpoints()
        return read_typed_config(path, self.config_file, self.config_cls, self.what.removeprefix("a "))

    def save(self, path, module, cfg, *, overwrite: bool = False) -> Path:
        """A module (or its state / {dotted path: array}) and its config as a checkpoint folder, atomically."""
        import json

        from hdflash_jax.checkpoint import save_atomically

        self._needs_checkpoints()
        return save_atomically(Path(path), module, lambda folder: (folder / self.config_file).write_text(
            json.dumps(cfg.to_dict(), indent=1)), overwrite=overwrite)

    def load(self, path, target_cfg=None, *, checked: bool = False):
        """(cfg, module) of a checkpoint folder, restored strictly (every leaf, its shape, finite values) onto this
        process's first device, checked against `target_cfg` when given (`checked`: the caller already did, once,
        before reading any weights)."""
        import jax
        from flax import nnx

        from hdflash_jax.checkpoint import restore_strict

        path = Path(path)
        cfg = self.load_config(path)
        if target_cfg is not None and not checked:
            self.check_target(cfg, target_cfg, where=f"{self.what} {path}")
        if not (path / PARAMS_DIR).is_dir():
            raise FileNotFoundError(f"{path}: not {self.what} checkpoint (no {PARAMS_DIR}/)")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        graphdef, state = restore_strict(path / PARAMS_DIR, self.abstract(cfg, target_cfg), self.what,
                                         lambda key, var: device)
        return cfg, nnx.merge(graphdef, state)

    def _needs_checkpoints(self) -> None:
        if self.config_file is None:
            raise ValueError(f"{self.what} has no checkpoints")

    # ---- serving formats ----------------------------------------------------------------------------------------
    def export(self, fmt: str, src, dst, *, target_cfg=None, overwrite: bool = False) -> dict:
        """A checkpoint of this family written in serving format `fmt` → the format's summary."""
        f = self._format(fmt)
        if f.needs_target and target_cfg is None:
            raise ValueError(f"--target: {self.what}'s shapes follow its target; pass --target CKPT|PRESET")
        cfg, module = self.load(src, target_cfg)
        return f.export(cfg, module, dst, target_cfg=target_cfg, overwrite=overwrite)

    def import_folder(self, fmt: str, src, dst, *, target_cfg=None, overwrite: bool = False, **options) -> dict:
        """A serving-format folder saved as a checkpoint of this family (checked against `target_cfg` if given)."""
        f = self._format(fmt)
        cfg, tree = f.read(src, target_cfg=target_cfg, **options)
        if target_cfg is not None:
            self.check_target(cfg, target_cfg, where=str(Path(src) / "config.json"))
        path = self.save(dst, tree, cfg, overwrite=overwrite)
        return {"dst": str(path), "family": self.name, "design": self.describe(cfg), "tensors": len(tree),
                **({"block_size": cfg.block_size} if hasattr(cfg, "block_size") else {})}

    def _format(self, fmt: str):
        if fmt not in self.formats:
            raise ValueError(f"--to {fmt}: {self.what} exports to {', '.join(self.formats) or 'no format'}")
        return self.formats[fmt]

    # ---- training ---------------------------------------------------------------------------------------------------
    def loss_for(self, loss, cfg):
        """The loss config the step uses, resolved against the drafter (e.g. its block size) and checked."""
        return loss

    def train_step(self, parts, state, target_params, batch):
        """One optimizer step, pure: (state, target_params, batch) -> (state, metrics)."""
        raise ValueError(f"{self.what} is not trained here")

    def draft_shape(self, cfg, target_cfg):
        """What the step's FLOP count reads (hdflash_jax.training.flops.DraftShape)."""
        raise ValueError(f"{self.what} is not trained here")

    # ---- offline features (hdflash_jax.training.features) --------------------------------------------------------
    def offline_layout(self, cfg, loss, target_cfg) -> dict:
        """What a feature capture writes per position for this family's step: {name: (shape, dtype)} with
        `features` (what the step's batch carries instead of running the target) and, when the loss has a
        teacher, `hidden` (the target's normed hidden state [D])."""
        raise ValueError(f"features.mode: {self.what} has no offline features; train it online")

    def teacher_slots(self, cfg, loss) -> int:
        """Positions a, a + 1, ... per anchor a whose `hidden` the step's teacher reads (0: no teacher)."""
        raise ValueError(f"features.mode: {self.what} has no offline features; train it online")

    def feature_fields(self, cfg) -> dict:
        """The config fields that select the features (a capture records them; an offline run checks them)."""
        raise ValueError(f"features.mode: {self.what} has no offline features; train it online")

    def capture(self, cfg, loss, target, tokens) -> dict:
        """Pure: the arrays of `offline_layout` for rows tokens [b, S], [b, S, ...] each (the frozen target's
        forward; the same functions the online step calls)."""
        raise ValueError(f"features.mode: {self.what} has no offline features; train it online")


_FAMILIES: dict[str, DrafterFamily] = {}


def register(cls: type[DrafterFamily]) -> type[DrafterFamily]:
    """Class decorator: one instance of `cls` becomes the family `cls.name`."""
    if cls.name in _FAMILIES:
        raise ValueError(f"drafter family {cls.name!r} is registered twice")
    _FAMILIES[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a family (tests that register a toy family)."""
    _FAMILIES.pop(name, None)


def family(name: str) -> DrafterFamily:
    if name not in _FAMILIES:
        raise ValueError(f"unknown drafter family {name!r}; one of {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def families() -> tuple[DrafterFamily, ...]:
    return tuple(_FAMILIES.values())


def family_of(cfg) -> DrafterFamily:
    """The family whose config class `cfg` is (the one place a config's type is looked at)."""
    for f in _FAMILIES.values():
        if f.config_cls is not None and type(cfg) is f.config_cls:
            return f
    raise ValueError(f"no drafter family has config class {type(cfg).__name__}")


def checkpoint_family(path) -> DrafterFamily | None:
    """The family whose checkpoint folder `path` is, or None."""
    return next((f for f in _FAMILIES.values() if f.is_checkpoint(path)), None)


def format_of_folder(path):
    """(family, format) of a serving-format folder, or None."""
    for f in _FAMILIES.values():
        for fmt in f.formats.values():
            if fmt.recognises(path):
                return f, fmt
    return None


# ---- the `drafter:` section of a training config ----------------------------------------------------------------

def training_section(name: str, config_cls: type, loss_cls: type | None, **extra) -> type:
    """A family's `drafter:` section: `kind` (its tag in the union of sections), the section's own `extra` fields,
    every field of `config_cls` optional (None: from the target or a preset, `config_for`), and `loss` (the
    family's loss config itself)."""
    hints = typing.get_type_hints(config_cls)
    fields: list[tuple] = [("kind", Literal[name], dataclasses.field(default=name))]
    fields += [(k, tp, dataclasses.field(default=v)) for k, (tp, v) in extra.items()]
    fields += [(f.name, hints[f.name] | None, dataclasses.field(default=None)) for f in dataclasses.fields(config_cls)]
    if loss_cls is not None:
        fields.append(("loss", loss_cls, dataclasses.field(default_factory=loss_cls)))
    cls = dataclasses.make_dataclass(f"{config_cls.__name__}Section", fields, frozen=True)
    cls.__doc__ = (f"The `drafter:` section of a {name} drafter: `kind: {name}`, {', '.join(extra) or 'no'} section "
                   f"options, any {config_cls.__name__} field (null: the target's or the preset's) and `loss`.")
    return cls


def section_fields(section) -> dict:
    """The config fields a section sets (those not None), without kind, its options and loss."""
    config_cls = family(section.kind).config_cls
    names = {f.name for f in dataclasses.fields(config_cls)}
    return {k: v for k, v in dataclasses.asdict(section).items() if k in names and v is not None}
