"""
Saving and loading text models: ``save_model`` (optionally with the base LM bundled) and ``load_model`` (the saved
``policy_kwargs`` with ``lm=`` overridden, the LM found next to the file or in it).

``model.save`` and ``PPO.load`` work as they are; these two add what SB3 has no argument for. See the "Checkpoints"
section of ``docs/configuration.md``.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import json_to_data

from sb3_textrl.models.assets import EMBEDDED_LM_NAME
from sb3_textrl.models.loading import resolve_lm_path

BUNDLE_FOLDER = "lm/"  # the base LM's files inside a bundled model.zip (SB3 reads only "data" and the .pth files)
_CACHE = Path(os.environ.get("SB3_TEXTRL_CACHE", Path.home() / ".cache" / "sb3_textrl")) / "bundled_lms"

PathLike = str | os.PathLike


def _zip_path(path: PathLike) -> Path:
    # SB3 adds ".zip" to a path without it, on save and on load.
    path = Path(path)
    return path if path.suffix == ".zip" or path.exists() else path.with_name(path.name + ".zip")


def save_model(model: BaseAlgorithm, path: PathLike, bundle_lm: bool = False, **save_kwargs: Any) -> Path:
    """
    ``model.save(path)``; with ``bundle_lm`` the base LM's directory (weights, config, tokenizer) goes into the zip too,
    so that the file loads on a machine without it (with :func:`load_model`).

    :param model: an algorithm with a :class:`~sb3_textrl.TransformerLMPolicy` (or subclass)
    :param path: where to write ``model.zip``
    :param bundle_lm: also store the base LM's files under ``lm/`` in the zip (its size: the LM's)
    :param save_kwargs: passed to ``model.save`` (``exclude``, ``include``)
    :return: the path of the zip written
    """
    model.save(Path(path), **save_kwargs)
    written = _zip_path(path)
    if not bundle_lm:
        return written
    lm = getattr(model.policy, "lm_name", "") or EMBEDDED_LM_NAME
    source = Path(resolve_lm_path(lm)).expanduser()
    if not source.is_dir():
        raise ValueError(
            f"bundle_lm=True copies the base LM's directory into the zip, but lm={lm!r} is not a local directory: save "
            "the LM with save_pretrained(DIR) and train with policy_kwargs=dict(lm=DIR), or save without bundle_lm."
        )
    with zipfile.ZipFile(written, "a") as archive:
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            archive.write(file, BUNDLE_FOLDER + file.relative_to(source).as_posix())
    return written


def load_model(
    path: PathLike,
    algorithm: type[BaseAlgorithm] | None = None,
    lm: PathLike | None = None,
    policy_kwargs: dict[str, Any] | None = None,
    **load_kwargs: Any,
) -> BaseAlgorithm:
    """
    ``algorithm.load(path, **load_kwargs)`` with the saved ``policy_kwargs`` updated, not replaced (SB3's
    ``custom_objects={"policy_kwargs": ...}`` replaces them all).

    The base LM is ``lm`` when given. Otherwise, when the saved LM directory does not exist: the LM bundled in the zip
    (:func:`save_model` with ``bundle_lm=True``, extracted once to ``~/.cache/sb3_textrl/bundled_lms``), else a
    directory of the same name next to the zip or in its parent directory. The policy checks the LM's weights against
    the hash saved with the checkpoint either way.

    :param path: the ``model.zip``
    :param algorithm: the algorithm class (default ``stable_baselines3.PPO``; e.g. ``MaskablePPO``)
    :param lm: the base LM (a directory or hub name) instead of the saved one
    :param policy_kwargs: other saved policy arguments to override (e.g. ``dict(use_kv_cache=False)``)
    :param load_kwargs: passed to ``algorithm.load`` (``env``, ``device``, ``custom_objects``...)
    :return: the loaded model
    """
    if algorithm is None:
        from stable_baselines3 import PPO

        algorithm = PPO
    zip_path = _zip_path(path)
    custom_objects = dict(load_kwargs.pop("custom_objects", None) or {})
    saved = dict(_saved_data(zip_path, custom_objects).get("policy_kwargs") or {})
    merged = {**saved, **custom_objects.get("policy_kwargs", {}), **(policy_kwargs or {})}
    found = os.fspath(lm) if lm is not None else _find_lm(zip_path, merged.get("lm"))
    if found is not None:
        merged["lm"] = str(Path(found).expanduser().resolve()) if Path(found).expanduser().is_dir() else found
    custom_objects["policy_kwargs"] = merged
    return algorithm.load(zip_path, custom_objects=custom_objects, **load_kwargs)


def _saved_data(path: Path, custom_objects: dict[str, Any]) -> dict[str, Any]:
    with zipfile.ZipFile(path) as archive:
        return json_to_data(archive.read("data").decode(), custom_objects=custom_objects)


def _find_lm(path: Path, saved: str | None) -> str | None:
    """A replacement for a saved LM directory that does not exist (None: keep the saved one)."""
    if saved is None or Path(resolve_lm_path(saved)).expanduser().exists():
        return None
    bundled = _extract_bundled_lm(path)
    if bundled is not None:
        return str(bundled)
    name = Path(saved).name
    for candidate in (path.parent / name, path.parent.parent / name):
        if (candidate / "config.json").is_file():
            return str(candidate)
    return None  # the policy raises the error that names lm=


def _extract_bundled_lm(path: Path) -> Path | None:
    """The LM bundled in the zip, extracted once into the cache (keyed by the entries' names, sizes and CRCs)."""
    with zipfile.ZipFile(path) as archive:
        entries = [
            info
            for info in archive.infolist()
            if info.filename.startswith(BUNDLE_FOLDER) and not info.is_dir() and ".." not in Path(info.filename).parts
        ]
        if not entries:
            return None
        key = hashlib.sha256("".join(f"{e.filename} {e.file_size} {e.CRC}\n" for e in entries).encode()).hexdigest()
        target = _CACHE / key[:24]
        if (target / "config.json").is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
        try:
            for entry in entries:
                destination = staging / entry.filename[len(BUNDLE_FOLDER) :]
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(entry) as source, open(destination, "wb") as out:
                    shutil.copyfileobj(source, out, length=io.DEFAULT_BUFFER_SIZE * 256)
            os.replace(staging, target)  # whole or not at all (a concurrent extraction may have won: same files)
        except OSError:
            if not (target / "config.json").is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
