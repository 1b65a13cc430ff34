"""
Files and directories written whole or not at all: the one home of atomic writing.

A writer fills a temporary sibling (same folder, so the same filesystem), which is flushed to disk (``fsync``) and then
renamed over the target with ``os.replace``; the folder's entry is synced too. A process killed at any moment leaves
either the old target or the new one, complete, never a truncated file. What a kill can leave is the temporary
sibling itself (``.NAME.tmp-PID-XXXXXXXX``, hidden), which nothing reads and which may be deleted.

:func:`atomic_file` is for one file (``model.save``, ``torch.save``, JSON); :func:`atomic_dir` for a directory of
files (``save_pretrained`` output). Replacing an existing *directory* takes two renames (the old one moved aside, the
new one moved in): a kill between them leaves no target but the complete new directory under its temporary name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PathLike = str | os.PathLike


def temporary_sibling(path: Path) -> Path:
    """
    A fresh hidden name next to ``path`` that keeps its suffix (SB3's ``save`` adds ``.zip`` to a path without it).

    :param path: the final path
    :return: ``DIR/.STEM.tmp-PID-XXXXXXXX.SUFFIX``
    """
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


def fsync_path(path: Path) -> None:
    """
    Flush a file, or a directory's entries, to disk. A directory that cannot be opened (Windows) is skipped: its
    renames are made durable by the filesystem there.
    """
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY
    try:
        descriptor = os.open(path, flags)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """
    Write a file whole or not at all: the body writes the path it is given, which then replaces ``path``.

    On an error in the body (or a failed sync or rename) the temporary file is removed and an old ``path`` is left as
    it was. The body must write the exact path it gets (a writer that appends a suffix would write elsewhere).

    :param path: the final file (its folder is created when missing)
    :return: (yielded) the temporary path to write
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written to {tmp} (the temporary file of {target})")
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _default_file_mode(folder: Path) -> int:
    """The permissions a new file gets in ``folder`` under the current umask."""
    marker = folder / f".mode-{uuid.uuid4().hex[:8]}"
    marker.touch()
    try:
        return marker.stat().st_mode & 0o777
    finally:
        marker.unlink()


@contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """
    Write a directory whole or not at all: the body fills the (empty) directory it is given, which then replaces
    ``path``, an old directory included.

    Every file is synced before the rename and given the umask's permissions (safetensors writes private, 0600,
    files). On an error in the body the temporary directory is removed and an old ``path`` is left as it was.

    :param path: the final directory (its parent is created when missing)
    :return: (yielded) the temporary directory to fill
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir (mkdtemp would make it private to this user): the directory gets the umask's permissions.
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        file_mode = _default_file_mode(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                file.chmod(file_mode)
                fsync_path(file)
        for folder in (*(p for p in tmp.rglob("*") if p.is_dir()), tmp):
            fsync_path(folder)
        if target.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, stale / target.name)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
