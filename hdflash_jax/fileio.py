"""Atomic writes: the one owner of "a reader sees the old file/folder or the new one, never half of either".

Everything this project writes that a later run reads (checkpoints, converted models, reports, configs, prompt
files) goes through these: write into `<path>.tmp-<pid>` beside the destination, then rename over it.
A killed writer leaves only a `.tmp-<pid>` that `clean_stale_tmp` removes once the process is gone.

It is also the one owner of "may this output path be written or replaced" (`check_output`): every command asks
before it writes anything, so nothing a command did not create is ever deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from hdflash_jax.errors import OutputRefused


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


# ---- may this output be written? ----------------------------------------------------------------------------

CHECKOUT = Path(__file__).resolve().parents[1]  # the project checkout, when the package runs from one


def project_checkout() -> Path | None:
    """The checkout this package runs from (None for an installed, non-editable package)."""
    return CHECKOUT if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "hdflash_jax").is_dir() else None


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """What a command writes at its output path, and how it recognises an earlier output of its own kind (the
    only existing thing it may replace or continue)."""
    what: str  # e.g. "an eval.run results folder (results.json)"
    is_own: Callable[[Path], bool]
    folder: bool = True


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _relation(out: Path, other: Path) -> str | None:
    if out == other:
        return "is"
    if other in out.parents:
        return "lies inside"
    if out in other.parents:
        return "contains"
    return None


def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


def check_output(path: str | os.PathLike, *, flag: str, kind: OutputKind,
                 inputs: Iterable[tuple[str, str | os.PathLike | None]] = (), overwrite: bool = False,
                 reuse: bool = False) -> Path:
    """The one rule for an output path, checked before anything is read or written; returns the path resolved.

    Refused (`OutputRefused`, one line naming `flag`), whatever `overwrite` says: an output that is, lies inside
    or contains one of `inputs` (pairs of a label such as "the input --target" and a path; symlinks resolved),
    that is or contains the project checkout, the home folder or the current folder, or lies inside the
    checkout's .git; an existing output that is not `kind`'s own (an empty folder counts as free). An existing
    output of its own kind needs `overwrite` to be replaced, or `reuse` for commands that continue it (a resumed
    training run, an appended file). The nearest existing ancestor must be a writable folder.
    """
    if str(path) == "":
        raise OutputRefused(f"{flag} '': an empty path")
    out = _real(path)
    checkout = project_checkout()
    protected = [("the project checkout", checkout), ("the home folder", Path.home()),
                 ("the current folder", Path.cwd()), ("the filesystem root", Path("/"))]
    for label, p in protected:
        if p is not None and _relation(out, _real(p)) in ("is", "contains"):
            raise OutputRefused(f"{flag} {path}: {'is' if out == _real(p) else 'contains'} {label} {p}; an "
                                f"output there would replace it, choose a new folder")
    if checkout is not None and _relation(out, _real(checkout / ".git")):
        raise OutputRefused(f"{flag} {path}: lies inside the checkout's .git; choose a folder outside it")
    for label, p in inputs:
        if p is None or str(p) == "":
            continue
        how = _relation(out, _real(p))
        if how:
            raise OutputRefused(f"{flag} {path}: {how} {label} {p}; writing there would replace it, choose a "
                                f"destination outside it")
    if os.path.lexists(path):
        if kind.folder and out.exists() and not out.is_dir():
            raise OutputRefused(f"{flag} {path}: exists and is a file, not {kind.what}; refusing to replace it "
                                f"even with --overwrite")
        if not kind.folder and out.is_dir():
            raise OutputRefused(f"{flag} {path}: exists and is a folder, not {kind.what}; refusing to replace it "
                                f"even with --overwrite")
        free = _is_empty_dir(out) or not out.exists()  # an empty folder or a dangling link holds nothing
        if not free and not kind.is_own(out):
            raise OutputRefused(f"{flag} {path}: exists and is not {kind.what}; refusing to replace it even with "
                                f"--overwrite (choose a new path, or remove it yourself)")
        if not (free or overwrite or reuse):
            raise OutputRefused(f"{flag} {path}: destination exists (pass --overwrite to replace it)")
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputRefused(f"{flag} {path}: cannot be created: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputRefused(f"{flag} {path}: cannot be created: the folder {anc} is not writable")
    return out


def has_files(*names: str) -> Callable[[Path], bool]:
    """An `OutputKind.is_own` test: the folder holds each of `names` (files or folders)."""
    return lambda p: all((p / n).exists() for n in names)


# ---- reading JSON with the file named ------------------------------------------------------------------------

def read_json(path: str | os.PathLike):
    """The JSON value in `path`; a corrupt file is a ValueError naming it (json's own message names no file)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: str | os.PathLike) -> list:
    """One JSON value per non-empty line of `path`; a bad line is a ValueError naming the file and line."""
    path = Path(path)
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i} is not valid JSON ({e})") from None
    return out


def _is_json_file(path: Path) -> bool:
    try:
        read_json(path)
        return True
    except (OSError, ValueError):
        return False


JSON_REPORT = OutputKind("a JSON report (a file holding valid JSON)", _is_json_file, folder=False)


def write_json_report(path: str | os.PathLike, value, *, flag: str = "--json", indent: int = 2) -> Path:
    """A command's `--json` figures: written in one rename, replacing only an earlier JSON file (never a file of
    another kind the flag happens to name)."""
    check_output(path, flag=flag, kind=JSON_REPORT, overwrite=True)
    return atomic_write_text(path, json.dumps(value, indent=indent))
