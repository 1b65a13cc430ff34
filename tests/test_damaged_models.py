"""A damaged model.zip (cut short, empty, not a zip, an entry missing or corrupt) is refused with one clear error."""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import pytest
from helpers import register_toy_task, toy_ppo, toy_vec_env

from sb3_textrl import DamagedModelError, check_saved_model, export_lm, load_model, save_model
from sb3_textrl.sampling import load_generator


@pytest.fixture(scope="module")
def saved(tiny_lm, tmp_path_factory) -> Path:
    """A whole model.zip of a tiny PPO (read only: each test damages a copy)."""
    register_toy_task("DamagedToy-v0", tiny_lm, max_new_tokens=3)
    model = toy_ppo(toy_vec_env("DamagedToy-v0", n_envs=2), tiny_lm, n_steps=4, batch_size=8)
    return save_model(model, tmp_path_factory.mktemp("saved") / "model.zip")


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _empty(_data: bytes) -> bytes:
    return b""


def _random(_data: bytes) -> bytes:
    return os.urandom(4096)


def _without_policy(data: bytes, path: Path) -> bytes:
    source = path.with_name("source.zip")
    source.write_bytes(data)
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(path, "w") as new:
        for info in old.infolist():
            if info.filename != "policy.pth":
                new.writestr(info, old.read(info))
    return path.read_bytes()


def _corrupt_policy(data: bytes, path: Path) -> bytes:
    """One byte of policy.pth's stored data flipped; the zip's directory is intact, so only the CRC check tells."""
    path.write_bytes(data)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("policy.pth")
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    broken = bytearray(data)
    broken[start + info.compress_size // 2] ^= 0xFF
    return bytes(broken)


DAMAGES = {
    "truncated": (lambda data, _path: _truncated(data), "not a complete zip archive"),
    "empty": (lambda data, _path: _empty(data), r"empty \(0 bytes\)"),
    "random bytes": (lambda data, _path: _random(data), "not a complete zip archive"),
    "no policy.pth": (_without_policy, "no policy.pth entry"),
    "corrupt policy.pth": (_corrupt_policy, "entry policy.pth is corrupt"),
}


@pytest.fixture(params=list(DAMAGES), ids=list(DAMAGES))
def damaged(request, saved, tmp_path) -> tuple[Path, str]:
    damage, problem = DAMAGES[request.param]
    path = tmp_path / "damaged" / "rl_model_800_steps.zip"
    path.parent.mkdir()
    path.write_bytes(damage(saved.read_bytes(), path))
    return path, problem


def _assert_clear(error: pytest.ExceptionInfo[DamagedModelError], path: Path, problem: str) -> None:
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert str(path) in message and "damaged or incomplete" in message and "previous checkpoint" in message
    assert "weights_only" not in message
    assert error.match(problem)
    assert error.value.path == path


def test_load_model_names_the_file_and_the_damage(damaged):
    path, problem = damaged
    with pytest.raises(DamagedModelError) as error:
        load_model(path, device="cpu")
    _assert_clear(error, path, problem)


def test_the_other_loaders_raise_the_same_error(damaged, tmp_path):
    path, problem = damaged
    with pytest.raises(DamagedModelError) as error:
        export_lm(path, tmp_path / "export")
    _assert_clear(error, path, problem)
    assert not (tmp_path / "export").exists()
    with pytest.raises(DamagedModelError) as error:
        load_generator(str(path), env=None)  # type: ignore[arg-type]  # refused before the env is used
    _assert_clear(error, path, problem)


def test_a_whole_model_passes_the_check_and_a_missing_one_is_not_damaged(saved, tmp_path):
    assert check_saved_model(saved) == saved
    assert check_saved_model(saved.with_suffix("")) == saved  # SB3 adds ".zip" to a path without it
    with pytest.raises(FileNotFoundError, match="not found"):
        check_saved_model(tmp_path / "nothing.zip")
