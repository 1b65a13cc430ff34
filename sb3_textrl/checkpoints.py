"""
Saving and loading text models: ``save_model`` (atomic, optionally with the base LM bundled), ``load_model`` (the
saved ``policy_kwargs`` with ``lm=`` overridden, the LM found next to the file or in it, a damaged file refused with
:class:`DamagedModelError`) and ``TextCheckpointCallback`` (SB3's ``CheckpointCallback``, atomic).

``model.save`` and ``PPO.load`` work as they are; these add what SB3 has no argument for. SB3's ``model.save`` writes
the zip in place (``save_to_zip_file`` opens the final path), and nothing SB3 calls on the policy can redirect that
without patching SB3, so stock ``model.save`` and ``CheckpointCallback`` are not atomic; ``save_model`` and
``TextCheckpointCallback`` are. Likewise only the loaders here check a file before SB3 reads it. See the
"Checkpoints" section of ``docs/configuration.md``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import CheckpointCallback
from stable_baselines3.common.save_util import json_to_data

from sb3_textrl.common.atomic import atomic_file
from sb3_textrl.common.resume import RESUME_ENTRY, capture_resume_state, restore_resume_state
from sb3_textrl.models.assets import EMBEDDED_LM_NAME
from sb3_textrl.models.loading import resolve_lm_path

BUNDLE_FOLDER = "lm/"  # the base LM's files inside a bundled model.zip (SB3 reads only "data" and the .pth files)
_CACHE = Path(os.environ.get("SB3_TEXTRL_CACHE", Path.home() / ".cache" / "sb3_textrl")) / "bundled_lms"

PathLike = str | os.PathLike


def _zip_path(path: PathLike) -> Path:
    # SB3 adds ".zip" to a path without it, on save and on load.
    path = Path(path)
    return path if path.suffix == ".zip" or path.exists() else path.with_name(path.name + ".zip")


def _save_path(path: PathLike) -> Path:
    # Where model.save(path) writes: SB3 adds ".zip" to a path without a suffix.
    path = Path(path)
    return path if path.suffix else path.with_name(path.name + ".zip")


def save_model(
    model: BaseAlgorithm, path: PathLike, bundle_lm: bool = False, resume_state: bool = True, **save_kwargs: Any
) -> Path:
    """
    ``model.save(path)``, atomically: the zip is written whole to a temporary sibling, synced, then renamed over
    ``path`` (:func:`~sb3_textrl.common.atomic.atomic_file`), so a kill or a full disk leaves the old file or the new
    one, never a truncated zip. With ``bundle_lm`` the base LM's directory (weights, config, tokenizer) goes into the
    zip too, so that the file loads on a machine without it (with :func:`load_model`).

    :param model: an algorithm with a :class:`~sb3_textrl.TransformerLMPolicy` (or subclass)
    :param path: where to write ``model.zip`` (``.zip`` is added to a path without a suffix, as SB3 does)
    :param bundle_lm: also store the base LM's files under ``lm/`` in the zip (its size: the LM's)
    :param resume_state: also store what SB3 does not save and an exact resume needs: the Python/NumPy/torch random
        generators and the text envs' prompt order and episode in flight (:mod:`sb3_textrl.common.resume`; a few kB
        per env); :func:`load_model` puts them back
    :param save_kwargs: passed to ``model.save`` (``exclude``, ``include``)
    :return: the path of the zip written
    """
    written = _save_path(path)
    source = _bundle_source(model) if bundle_lm else None  # refused before anything is written
    state = capture_resume_state(model) if resume_state else None
    with atomic_file(written) as tmp:
        model.save(tmp, **save_kwargs)
        with zipfile.ZipFile(tmp, "a") as archive:
            if state is not None:
                buffer = io.BytesIO()
                th.save(state, buffer)
                archive.writestr(RESUME_ENTRY, buffer.getvalue())
            if source is not None:
                for file in sorted(p for p in source.rglob("*") if p.is_file()):
                    archive.write(file, BUNDLE_FOLDER + file.relative_to(source).as_posix())
    return written


def _bundle_source(model: BaseAlgorithm) -> Path:
    """The base LM's local directory, which ``bundle_lm=True`` copies into the zip."""
    lm = getattr(model.policy, "lm_name", "") or EMBEDDED_LM_NAME
    source = Path(resolve_lm_path(lm)).expanduser()
    if not source.is_dir():
        raise ValueError(
            f"bundle_lm=True copies the base LM's directory into the zip, but lm={lm!r} is not a local directory: save "
            "the LM with save_pretrained(DIR) and train with policy_kwargs=dict(lm=DIR), or save without bundle_lm."
        )
    return source


class DamagedModelError(ValueError):
    """
    A saved model file that is not a whole ``model.zip``: empty, cut short (a save or a copy killed part-way, a full
    disk), an entry whose bytes fail the zip's CRC check, or not a zip at all.

    :param path: the file
    :param problem: what is wrong with it
    """

    def __init__(self, path: PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(
            f"The saved model {self.path} is damaged or incomplete: {problem}. A save or copy cut short (a killed run, "
            "a full disk, an interrupted transfer) leaves such a file; it cannot be repaired. Load the previous "
            "checkpoint, or copy or save the model again (sb3_textrl.save_model and TextCheckpointCallback write "
            "atomically, so they leave the previous file or the new one, whole)."
        )


_REQUIRED_ENTRIES = ("data", "policy.pth")  # what model.save always writes (SB3's class data, the policy's weights)


def check_saved_model(path: PathLike) -> Path:
    """
    Check that ``path`` is a whole ``model.zip`` before SB3 reads it: a zip archive holding ``data`` (SB3's JSON)
    and ``policy.pth``, whose entries pass their CRC check (a bundled LM, ``lm/``, is checked when extracted).

    :param path: the ``model.zip`` (``.zip`` is tried when ``path`` does not exist, as SB3 does)
    :return: the path checked
    :raises FileNotFoundError: when there is no such file
    :raises DamagedModelError: when the file is empty, cut short, corrupt, or lacks an entry ``model.save`` writes
    """
    zip_path = _zip_path(path)
    if not zip_path.is_file():
        raise FileNotFoundError(f"saved model {zip_path} not found: pass a .zip written by model.save()")
    size = zip_path.stat().st_size
    if size == 0:
        raise DamagedModelError(zip_path, "the file is empty (0 bytes)")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            names = set(archive.namelist())
            missing = [name for name in _REQUIRED_ENTRIES if name not in names]
            if len(missing) == len(_REQUIRED_ENTRIES):
                # A file cut short can end inside a .pth (itself a zip), which zipfile then opens as the archive.
                raise zipfile.BadZipFile(f"none of the entries {', '.join(_REQUIRED_ENTRIES)} that model.save writes")
            if missing:
                raise DamagedModelError(
                    zip_path, f"it has no {' and no '.join(missing)} entry (model.save writes {', '.join(_REQUIRED_ENTRIES)})"
                )
            for info in archive.infolist():
                if not info.filename.startswith(BUNDLE_FOLDER):
                    _read_entry(zip_path, archive, info)
            json.loads(archive.read("data"))
    except DamagedModelError:
        raise
    except zipfile.BadZipFile as error:
        raise DamagedModelError(zip_path, f"it is not a complete zip archive ({size} bytes; {error})") from error
    except ValueError as error:  # json's errors, a bad UTF-8 byte included
        raise DamagedModelError(zip_path, f"its data entry is not the JSON that model.save writes ({error})") from error
    return zip_path


def _read_entry(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Read one entry to its end, where zipfile checks its CRC (in chunks: a .pth may be large)."""
    try:
        with archive.open(info) as entry:
            while entry.read(1 << 24):
                pass
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as error:
        raise DamagedModelError(path, f"its entry {info.filename} is corrupt or cut short ({error})") from error


def load_model(
    path: PathLike,
    algorithm: type[BaseAlgorithm] | None = None,
    lm: PathLike | None = None,
    policy_kwargs: dict[str, Any] | None = None,
    resume: bool = True,
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
    :param resume: put back the random generators and, with ``env``, the envs' states saved by :func:`save_model`,
        so that ``model.learn(n, reset_num_timesteps=False)`` goes on exactly as the saved run would have (a zip
        without them loads as SB3 loads it)
    :param load_kwargs: passed to ``algorithm.load`` (``env``, ``device``, ``custom_objects``...)
    :return: the loaded model
    :raises DamagedModelError: when the file is not a whole ``model.zip`` (:func:`check_saved_model`)
    """
    if algorithm is None:
        from stable_baselines3 import PPO

        algorithm = PPO
    zip_path = check_saved_model(path)
    custom_objects = dict(load_kwargs.pop("custom_objects", None) or {})
    saved = dict(_saved_data(zip_path, custom_objects).get("policy_kwargs") or {})
    merged = {**saved, **custom_objects.get("policy_kwargs", {}), **(policy_kwargs or {})}
    found = os.fspath(lm) if lm is not None else _find_lm(zip_path, merged.get("lm"))
    if found is not None:
        merged["lm"] = str(Path(found).expanduser().resolve()) if Path(found).expanduser().is_dir() else found
    custom_objects["policy_kwargs"] = merged
    state = _resume_state(zip_path) if resume else None
    if state is not None and state.get("envs") is not None and load_kwargs.get("env") is not None:
        # The envs get their saved states back, so SB3 keeps the saved observation instead of resetting them.
        load_kwargs.setdefault("force_reset", False)
    model = algorithm.load(zip_path, custom_objects=custom_objects, **load_kwargs)
    if state is not None:
        restore_resume_state(model, state)
    return model


def _resume_state(path: Path) -> dict[str, Any] | None:
    """The resume state :func:`save_model` stored in the zip, or None (a zip of ``model.save``)."""
    with zipfile.ZipFile(path) as archive:
        if RESUME_ENTRY not in archive.namelist():
            return None
        # Our own entry of plain Python, NumPy and torch objects (the generators' states, the envs' arrays and counters)
        return th.load(io.BytesIO(archive.read(RESUME_ENTRY)), weights_only=False)


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
        except zipfile.BadZipFile as error:  # an entry's CRC (check_saved_model leaves the bundle to this read)
            raise DamagedModelError(path, f"its bundled LM ({BUNDLE_FOLDER}) is corrupt ({error})") from error
        except OSError:
            if not (target / "config.json").is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


class TextCheckpointCallback(CheckpointCallback):
    """
    SB3's ``CheckpointCallback`` (same arguments, same file names), with every file written atomically: the model
    with :func:`save_model`, the ``VecNormalize`` statistics and a replay buffer through
    :func:`~sb3_textrl.common.atomic.atomic_file`. A run killed while it saves leaves the previous checkpoints whole
    and no truncated ``rl_model_N_steps.zip``.
    """

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq != 0:
            return True
        model_path = save_model(self.model, self._checkpoint_path(extension="zip"))
        if self.verbose >= 2:
            print(f"Saving model checkpoint to {model_path}")
        if self.save_replay_buffer and getattr(self.model, "replay_buffer", None) is not None:
            replay_buffer_path = self._checkpoint_path("replay_buffer_", extension="pkl")
            with atomic_file(replay_buffer_path) as tmp:
                self.model.save_replay_buffer(tmp)  # type: ignore[attr-defined]  # off-policy algorithms only
            if self.verbose >= 2:
                print(f"Saving model replay buffer checkpoint to {replay_buffer_path}")
        vec_normalize = self.model.get_vec_normalize_env()
        if self.save_vecnormalize and vec_normalize is not None:
            vec_normalize_path = self._checkpoint_path("vecnormalize_", extension="pkl")
            with atomic_file(vec_normalize_path) as tmp:
                vec_normalize.save(str(tmp))
            if self.verbose >= 2:
                print(f"Saving model VecNormalize to {vec_normalize_path}")
        return True
