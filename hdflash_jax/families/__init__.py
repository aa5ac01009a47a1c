"""Drafter families: one object per family owns its config, checkpoint files, decode adapter, what a block size
means in drafts, its training step and loss config, and its serving formats (`registry.DrafterFamily`). Callers
ask the registry; nothing else tests which family a drafter is.

    from hdflash_jax.families import family, family_of, checkpoint_family
    fam = checkpoint_family(path)            # the family of a checkpoint folder (or None)
    cfg, drafter = fam.load(path, target.cfg)
    adapter = fam.adapter(cfg, fam.num_drafts(cfg, None), temperature=0.0)

Registered here: `ar`, `replay`, `self-sample`, `mtp`, `block` (HyperDFlash / DFlash), `dflash2` (DFlash 2 /
HyperDFlash-2), `dspark`. A new family is
one module and one `@register` (docs/adding_a_drafter_family.md).
"""

from hdflash_jax.families.registry import (DrafterFamily, check_block_size, checkpoint_family, families, family,
                                           family_of, format_of_folder, register, section_fields, training_section,
                                           unregister)
from hdflash_jax.families import ar, replay, self_sample, mtp, block, dflash2, dspark  # noqa: E402,F401,I001 — each registers

__all__ = ["DrafterFamily", "check_block_size", "checkpoint_family", "families", "family", "family_of",
           "format_of_folder", "register", "section_fields", "training_section", "unregister"]
