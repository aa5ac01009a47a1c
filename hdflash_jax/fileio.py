"""Atomic writes: the one owner of "a reader sees the old file/folder or the new one, never half of either".

Everything this project writes that a later run reads (checkpoints, converted models, reports, configs, prompt
files) goes through these: write into `<path>.tmp-<pid>` beside the destination, then rename over it.
A killed writer leaves only a `.tmp-<pid>` that `clean_stale_tmp` removes once the process is gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def tmp_path_for(path: Path) -> Path:
    """The temp sibling a writer of `path` fills before renaming it into place."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def commit(tmp: Path, path: Path, *, overwrite: bool) -> None:
    """Rename a finished temp file or folder to `path`. An existing `path` (file or folder) is replaced only with
    `overwrite`; the old one is moved aside first and removed after the rename, so a crash in between leaves
    either the old or the new one at `path`."""
    if not (path.exists() or path.is_symlink()):
        tmp.rename(path)
        return
    if not overwrite:
        raise FileExistsError(f"{path}: destination exists (pass --overwrite / overwrite=True to replace it)")
    if tmp.is_file() and path.is_file():
        os.replace(tmp, path)  # one atomic step for files
        return
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        old.rename(path)  # put the previous one back
        raise
    _remove(old)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """`with atomic_dir(dst) as tmp:` fill `tmp`; on success it becomes `dst`, on any exception it is removed.
    The existence check happens before anything is written, so a refused write touches nothing."""
    path = Path(path).resolve()
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(f"{path}: destination exists (pass --overwrite / overwrite=True to replace it)")
    tmp = tmp_path_for(path)
    _remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        commit(tmp, path, overwrite=overwrite)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file in one rename (the parent folder is created). Replaces an existing file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def clean_stale_tmp(path: Path) -> list[Path]:
    """Remove `<path>.tmp-<pid>` leftovers whose writing process is gone (a killed save). Returns what went."""
    gone = []
    for p in path.parent.glob(f"{path.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _remove(p)
        gone.append(p)
    return gone
