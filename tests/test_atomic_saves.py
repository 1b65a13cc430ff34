"""Saves are whole or not at all: a crash or a SIGKILL mid-write leaves the previous file (or directory), complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import register_toy_task, toy_ppo, toy_vec_env
from stable_baselines3.common import save_util

from sb3_textrl import DamagedModelError, TextCheckpointCallback, check_saved_model, load_model, save_model
from sb3_textrl.common import atomic
from sb3_textrl.common.atomic import atomic_dir, atomic_file

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _fail_replace(monkeypatch) -> None:
    def crash(*_args, **_kwargs):
        raise OSError("simulated crash at the rename")

    monkeypatch.setattr(atomic.os, "replace", crash)


# -- the primitives ----------------------------------------------------------------------------------------------


def test_atomic_file_replaces_whole_and_leaves_the_old_file_on_any_failure(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "state.json"
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".json" and tmp.name.startswith(".state.tmp-")
        tmp.write_text("old")
    assert target.read_text() == "old"

    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer died")
    assert target.read_text() == "old" and _leftovers(target.parent) == []

    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_file(target):
        pass
    assert target.read_text() == "old"

    _fail_replace(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"), atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "old" and _leftovers(target.parent) == []


def test_atomic_dir_replaces_a_directory_whole(tmp_path, monkeypatch):
    target = tmp_path / "export"
    with atomic_dir(target) as tmp:
        (tmp / "nested").mkdir()
        (tmp / "nested" / "weights.bin").write_bytes(b"old")
        (tmp / "weights.bin").write_bytes(b"old")
        (tmp / "weights.bin").chmod(0o600)  # as safetensors writes it: made readable like any new file
    assert (target / "nested" / "weights.bin").read_bytes() == b"old"
    (tmp_path / "probe").touch()
    assert (target / "weights.bin").stat().st_mode & 0o777 == (tmp_path / "probe").stat().st_mode & 0o777

    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"ha")
        raise RuntimeError("killed")
    assert (target / "weights.bin").read_bytes() == b"old" and _leftovers(tmp_path) == []

    with atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"new")
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"] and _leftovers(tmp_path) == []


# -- models -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_model(tiny_lm):
    register_toy_task("AtomicToy-v0", tiny_lm, max_new_tokens=3)
    return toy_ppo(toy_vec_env("AtomicToy-v0", n_envs=2), tiny_lm, n_steps=4, batch_size=8)


def _break_torch_save_mid_write(monkeypatch) -> None:
    """``th.save`` inside SB3's zip writer writes a few bytes, then fails: a crash in the middle of the file."""

    def half_save(obj, file, *args, **kwargs):
        file.write(b"\0" * 1000)
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(save_util.th, "save", half_save)


def test_a_save_that_fails_mid_write_leaves_the_previous_model_whole(toy_model, tmp_path, monkeypatch):
    path = save_model(toy_model, tmp_path / "model")
    assert path == tmp_path / "model.zip"
    before = path.read_bytes()

    with monkeypatch.context() as patch:
        _break_torch_save_mid_write(patch)
        with pytest.raises(OSError, match="simulated"):
            save_model(toy_model, path)
    assert path.read_bytes() == before and _leftovers(tmp_path) == []
    check_saved_model(path)

    # Stock model.save writes in place: the same failure leaves a damaged file, which the loader names as such.
    stock = tmp_path / "stock.zip"
    stock.write_bytes(before)
    with monkeypatch.context() as patch:
        _break_torch_save_mid_write(patch)
        with pytest.raises(OSError, match="simulated"):
            toy_model.save(stock)
    with pytest.raises(DamagedModelError, match="damaged or incomplete"):
        load_model(stock, device="cpu")


def test_a_failed_rename_leaves_the_previous_model_whole(toy_model, tmp_path, monkeypatch):
    path = save_model(toy_model, tmp_path / "model.zip")
    before = path.read_bytes()
    _fail_replace(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        save_model(toy_model, path)
    assert path.read_bytes() == before and _leftovers(tmp_path) == []


_KILLED_SAVER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers import register_toy_task, toy_ppo, toy_vec_env
from stable_baselines3.common import save_util
from sb3_textrl import save_model

register_toy_task("KilledToy-v0", {lm!r}, max_new_tokens=3)
model = toy_ppo(toy_vec_env("KilledToy-v0", n_envs=2), {lm!r}, n_steps=4, batch_size=8)
save_model(model, {path!r})  # the previous checkpoint, whole

def stuck_save(obj, file, *args, **kwargs):
    file.write(b"\\0" * 100000)
    Path({marker!r}).touch()
    time.sleep(60)  # the parent SIGKILLs us here, in the middle of the zip

save_util.th.save = stuck_save
save_model(model, {path!r})
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX")
def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tiny_lm, tmp_path):
    path, marker = tmp_path / "ckpt" / "model.zip", tmp_path / "writing"
    script = _KILLED_SAVER.format(tests=str(TESTS), lm=tiny_lm, path=str(path), marker=str(marker))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else "the saver exited"
        assert time.monotonic() < deadline, "the saver never reached its second save"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    check_saved_model(path)  # the first save, whole; the half-written one is a hidden temporary sibling
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == ["model.zip"]


def test_text_checkpoint_callback_writes_sb3s_files_atomically(toy_model, tmp_path, monkeypatch):
    callback = TextCheckpointCallback(save_freq=2, save_path=str(tmp_path), name_prefix="ppo")
    toy_model.learn(8, callback=callback, reset_num_timesteps=True)  # 4 calls of 2 envs: saves at 4 and 8 steps
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["ppo_4_steps.zip", "ppo_8_steps.zip"]  # CheckpointCallback's names
    for name in saved:
        check_saved_model(tmp_path / name)

    before = (tmp_path / "ppo_8_steps.zip").read_bytes()
    _fail_replace(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        toy_model.learn(8, callback=TextCheckpointCallback(save_freq=4, save_path=str(tmp_path), name_prefix="ppo"))
    assert (tmp_path / "ppo_8_steps.zip").read_bytes() == before and _leftovers(tmp_path) == []


class _Saves:
    """A stand-in for a model or tokenizer: ``save_pretrained`` writes one file, or fails (a crash mid-save)."""

    def __init__(self, name: str, content: str, fail: bool = False):
        self.name, self.content, self.fail = name, content, fail

    def save_pretrained(self, directory: str) -> None:
        (Path(directory) / self.name).write_text(self.content)
        if self.fail:
            raise OSError("killed while saving (simulated)")


def test_a_trainer_output_dir_is_replaced_whole_with_its_checkpoints(tmp_path):
    from sb3_textrl.common.hf_trainer import save_trained_dir

    output = tmp_path / "rm"
    save_trained_dir(output, _Saves("model.safetensors", "old"), _Saves("tokenizer.json", "old"), "result.json", {})
    (output / "checkpoint-10").mkdir()  # written by the next run while it trains
    (output / "checkpoint-10" / "trainer_state.json").write_text("{}")

    with pytest.raises(OSError, match="simulated"):
        save_trained_dir(output, _Saves("model.safetensors", "new"), _Saves("tokenizer.json", "n", fail=True),
                         "result.json", {"run": 2})
    assert (output / "model.safetensors").read_text() == "old" and (output / "checkpoint-10").is_dir()
    assert _leftovers(tmp_path) == []

    save_trained_dir(output, _Saves("model.safetensors", "new"), _Saves("tokenizer.json", "new"), "result.json",
                     {"run": 2})
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-10", "model.safetensors", "result.json",
                                                        "tokenizer.json"]
    assert (output / "model.safetensors").read_text() == "new"
