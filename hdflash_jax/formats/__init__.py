"""Serving formats of drafters: the folders other engines load, exported from and imported into this project's
drafter checkpoints (z-lab's DFlash folder, speculators' DFlash folder, DeepSpec's DSpark layout). Each format
belongs to one drafter family, which lists it (`DrafterFamily.formats`); the CLI is
`python -m convert.drafter_export --to FORMAT|here`.

A format is a `DrafterFormat`: its output kind (how an export folder is recognised), `export(cfg, module, dst, *,
target_cfg, overwrite) -> summary` and `read(src, *, target_cfg, **options) -> (cfg, {tree path: array})`; the family
loads and saves its own checkpoints around them (`DrafterFamily.export`, `DrafterFamily.import_folder`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from hdflash_jax.fileio import OutputKind
from hdflash_jax.formats import dspark, speculators, speculators_dflash2, zlab, zlab_read


@dataclasses.dataclass(frozen=True)
class DrafterFormat:
    name: str
    folder: OutputKind  # an export folder of this format (recognised by `folder.is_own`)
    export: Callable[..., dict]
    read: Callable[..., tuple]
    needs_target: bool = False  # exporting needs the target (the drafter's shapes follow it)
    options: tuple[str, ...] = ()  # keyword options `read` takes beyond target_cfg
    # whether `read` takes a folder (None: any folder of the output kind; formats sharing a kind tell theirs apart)
    takes: Callable[..., bool] | None = None

    def recognises(self, path) -> bool:
        return self.folder.is_own(path) and (self.takes is None or self.takes(path))


ZLAB = DrafterFormat("zlab", zlab.ZLAB_FOLDER, zlab.export, zlab_read.read_zlab, options=("stream_pooling",))
DSPARK = DrafterFormat("dspark", dspark.DSPARK_FOLDER, dspark.export, dspark.read_dspark, needs_target=True)
SPECULATORS = DrafterFormat("speculators", speculators.SPECULATORS_FOLDER, speculators.export,
                            speculators.read_speculators, takes=speculators.model_type_is("dflash"))
SPECULATORS_DFLASH2 = DrafterFormat("speculators", speculators.SPECULATORS_FOLDER, speculators_dflash2.export,
                                    speculators_dflash2.read, takes=speculators.model_type_is("dflash2"))
