"""Output directories written whole or not at all: the refusal of a non-empty directory without ``overwrite``, and the
write into a temporary sibling that is renamed into place (a killed run leaves no half-written model directory)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from sb3_textrl.common.atomic import atomic_dir


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, flag: str = "overwrite=True (CLI: --overwrite)") -> Path:
    """
    Refuse an output directory that cannot be written, before any work is done.

    :param output_dir: the directory to write
    :param overwrite: whether an existing non-empty directory may be replaced
    :param flag: how the caller's users ask for ``overwrite`` (named in the error)
    :return: the directory as a ``Path``
    """
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"Output path {path} exists and is a file: choose a directory path.")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"Output directory {path} exists and is not empty. Choose a new directory, or pass {flag} to replace it."
            )
        # Replacing deletes the directory: never one that holds the working or the home directory.
        resolved = path.resolve()
        cwd = Path.cwd().resolve()
        if resolved in {cwd, *cwd.parents, Path.home().resolve()}:
            raise ValueError(f"Refusing to replace {resolved}: it holds the working or home directory. Choose a subdirectory.")
    return path


def write_dir_atomically(output_dir: Path, write: Callable[[Path], None]) -> Path:
    """
    Let ``write`` fill a temporary sibling of ``output_dir``, then rename it into place (replacing an old directory),
    with :func:`~sb3_textrl.common.atomic.atomic_dir`. On any error an old ``output_dir`` is left as it was. Call
    :func:`check_output_dir` first.

    :param output_dir: the final directory
    :param write: writes the directory's files into the path it is given
    :return: ``output_dir``
    """
    with atomic_dir(output_dir) as tmp:
        write(tmp)
    return output_dir
