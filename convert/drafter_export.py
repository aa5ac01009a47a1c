"""Drafters in and out of the serving formats other engines load: this project's drafter checkpoints ↔ each
family's formats (`hdflash_jax.formats`: z-lab's DFlash folder for block drafters, DeepSpec's V4 layout for DSpark).

    python -m convert.drafter_export --to zlab|dspark --src DRAFTER_CKPT --dst OUT_DIR [--target T] [--overwrite]
    python -m convert.drafter_export --to here --src FOLDER --dst DRAFTER_CKPT [--target T] [--stream-pooling mean]

--to FORMAT exports the checkpoint at --src (its family, from its files) in that format; --to here imports a
format folder (the format recognised from the folder) as a checkpoint of the format's family. --target (a
checkpoint folder or a preset) checks the drafter against its target; a DSpark drafter's shapes follow the target,
so it needs one. The formats, their tensor names and what engines can load: docs/converting.md. Prints a JSON
summary; `note:` lines on stderr say what an engine cannot load (e.g. HyperDFlash's gate in z-lab's class).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hdflash_jax.cli import run_command
from hdflash_jax.errors import UsageError
from hdflash_jax.families import checkpoint_family, families, format_of_folder
from hdflash_jax.fileio import OutputKind, check_output
from hdflash_jax.safetensors_io import CheckpointError

FORMATS = sorted({name for f in families() for name in f.formats})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert.drafter_export", description=__doc__.split("\n\n")[0])
    p.add_argument("--to", required=True, choices=(*FORMATS, "here"),
                   help="a format to export a drafter checkpoint to, or here: import a format folder")
    p.add_argument("--src", required=True, help="source folder")
    p.add_argument("--dst", required=True, help="destination folder (written atomically)")
    p.add_argument("--target", default=None,
                   help="a target checkpoint folder or preset the drafter is checked against (DSpark: required)")
    p.add_argument("--stream-pooling", default=None, choices=("flatten", "mean"),
                   help="--to here, z-lab folders: how the file's drafter saw a DeepSeek-V4 layer's streams: "
                        "flatten (fc takes K·n·D inputs; this project) or mean (fc takes K·D; vLLM's DeepSeek-V4 aux "
                        "hidden states); needs --target")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dst of the same kind")
    return p


def _target_cfg(name: str | None):
    if name is None:
        return None
    from hdflash_jax.checkpoint import is_checkpoint, load_config
    from hdflash_jax.config import get_preset

    return load_config(name) if is_checkpoint(name) else get_preset(name)


def _checkpoint_kind() -> OutputKind:
    return OutputKind("a drafter checkpoint (a family's config file + params/)",
                      lambda p: checkpoint_family(p) is not None)


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.to == "here":
        found = format_of_folder(args.src)
        if found is None:
            raise UsageError(f"--src {args.src}: not a folder of a known format ({', '.join(FORMATS)})")
        fam, fmt = found
        kind = _checkpoint_kind()
    else:
        fam = checkpoint_family(args.src)
        if fam is None:
            raise UsageError(f"--src {args.src}: not a drafter checkpoint (a family's config file + params/)")
        fmt = fam.formats.get(args.to)
        if fmt is None:
            raise UsageError(f"--to {args.to}: {fam.what} exports to {', '.join(fam.formats) or 'no format'}")
        kind = fmt.folder
        if args.stream_pooling is not None:
            raise UsageError("--stream-pooling: only used with --to here")
    target = args.target if args.target is not None and Path(args.target).exists() else None
    check_output(args.dst, flag="--dst", kind=kind, overwrite=args.overwrite,
                 inputs=[("the source --src", args.src), ("the --target", target)])
    options = {"stream_pooling": args.stream_pooling} if args.stream_pooling else {}
    if options and "stream_pooling" not in fmt.options:
        raise UsageError(f"--stream-pooling: not used by the {fmt.name} format")
    try:
        tcfg = _target_cfg(args.target)
        if args.to == "here":
            res = fam.import_folder(fmt.name, args.src, args.dst, target_cfg=tcfg, overwrite=args.overwrite,
                                    **options)
        else:
            res = fam.export(fmt.name, args.src, args.dst, target_cfg=tcfg, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, CheckpointError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(str(e)) from None  # a bad source folder: exit 2, before anything is written
    notes = res.pop("notes", [])
    print(json.dumps(res))
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
