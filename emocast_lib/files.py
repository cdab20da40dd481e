"""Writing files without ever losing a user's data: every output appears complete or not at all.

One home for the rule that the CLI, `make-tiny-models`, the converter and the stream-to-video node share:
a file is written to a hidden temporary name in its own folder (`.NAME.PID.partial`) and renamed over the
final name only once complete, so an interrupted run (Ctrl-C, SIGKILL, a full disk) never leaves a half
file under the final name. An existing file is replaced only when the caller says so. A temporary file
left by a killed process (its PID is gone) is removed by the next write to the same name.
"""
from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PARTIAL = ".partial"


class OutputError(ValueError):
    """An output path that cannot be written; the message names the path and what to do."""


def partial_path(dst: Path) -> Path:
    """The hidden temporary name of `dst` for this process."""
    return dst.with_name(f".{dst.name}.{os.getpid()}{PARTIAL}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_partials(dst: Path) -> list[Path]:
    """Delete the temporary files of `dst` left by processes that no longer run; returns them."""
    removed = []
    prefix = f".{dst.name}."
    try:
        entries = list(dst.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        pid = p.name[len(prefix):-len(PARTIAL)] if p.name.startswith(prefix) and p.name.endswith(PARTIAL) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def output_problem(dst: Path, overwrite: bool = False, what: str = "output") -> str | None:
    """Why `dst` cannot be written (one line naming it and the fix), or None.

    Checks that it is not a folder, that it does not exist unless `overwrite`, that no parent is a file
    and that the nearest existing folder accepts a new file (tried with a probe file, removed at once:
    permission bits alone do not tell, e.g. for root or on a read-only mount). Missing folders are fine:
    the writer creates them."""
    dst = Path(dst)
    if dst.is_dir():
        return f"{what} {dst} is a folder; give a file name, e.g. {dst / 'out.mp4'}"
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            return f"{what} {dst} already exists; choose another name, or allow replacing it (--overwrite)"
        if not os.access(dst, os.W_OK):
            return f"{what} {dst} exists and is read-only; choose another name"
    folder = dst.parent
    while not folder.exists():
        if folder.is_symlink():
            return f"{what} {dst}: {folder} is a broken link; choose another folder"
        folder = folder.parent
    if not folder.is_dir():
        return f"{what} {dst}: {folder} is a file, not a folder; choose another output path"
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".emocast-probe-"):
            pass
    except OSError as e:
        return f"{what} {dst}: cannot write in {folder} ({e.strerror or e}); choose a writable folder"
    return None


def check_output(dst: Path, overwrite: bool = False, what: str = "output") -> None:
    problem = output_problem(dst, overwrite, what)
    if problem:
        raise OutputError(problem)


def publish(tmp: Path, dst: Path, overwrite: bool = False) -> None:
    """Move the complete file `tmp` to `dst` in one step; without `overwrite` an existing `dst` (even one
    that appeared while we were writing) is kept and OutputError raised."""
    if overwrite:
        os.replace(tmp, dst)
        return
    try:
        os.link(tmp, dst)  # fails if dst exists: no window in which another file could be replaced
    except FileExistsError:
        raise OutputError(f"{dst} appeared while it was being written; the new file was not saved over it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if dst.exists():  # a file system without hard links: check, then rename
            raise OutputError(f"{dst} appeared while it was being written; the new file was not saved over it") from e
        os.replace(tmp, dst)
        return
    tmp.unlink()


@contextmanager
def atomic_path(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """`with atomic_path(dst) as tmp:` write `tmp`; on success it becomes `dst`, on any exception it is
    removed and `dst` is untouched. Creates missing parent folders."""
    dst = Path(dst)
    check_output(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(dst)
    tmp = partial_path(dst)
    try:
        yield tmp
        publish(tmp, dst, overwrite)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(dst: str | os.PathLike, data: bytes, overwrite: bool = False) -> Path:
    with atomic_path(dst, overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(dst)
