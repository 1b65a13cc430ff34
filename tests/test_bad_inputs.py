"""Bad inputs refused where they are given, with a message naming the problem and the fix (issue #15).

Each case asserts the exception type and the words of the message. The CLI's own cases (flag ranges, one-line
errors) are in tests/test_cli.py; NaN/inf settings of the policy in tests/test_bad_numbers.py.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from helpers import PROMPTS, register_toy_task
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import SubprocVecEnv
from transformers import GPT2Config, GPT2ForSequenceClassification

from sb3_textrl import TextSubprocVecEnv, make_text_vec_env, register_text_task
from sb3_textrl.envs.arguments import check_env_kwargs
from sb3_textrl.envs.subproc import WorkerError
from sb3_textrl.feedback import FeedbackStorageError, FeedbackStore, FeedbackStoreError
from sb3_textrl.feedback.store import storage_error
from sb3_textrl.feedback.webapp import create_app, rating_server
from sb3_textrl.models import load_causal_lm, load_tokenizer
from sb3_textrl.models import loading as model_loading
from sb3_textrl.reward_model.data import load_preferences
from sb3_textrl.reward_model.train import FORMAT_NAME, REWARD_MODEL_FILE
from sb3_textrl.rewards.learned import LearnedRewardModel
from sb3_textrl.sampling import CandidateSource, DecodingSettings, sample_for_rating

# --- decoding specs (point 1): refused where they are parsed, not in torch later -----------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sample:temperature=-1", "temperature must be > 0"),
        ("sample:temperature=0", "temperature must be > 0"),
        ("sample:temperature=nan", "temperature must be > 0"),
        ("sample:top_p=0", r"top_p must be in \(0, 1\]"),
        ("sample:top_p=1.5", r"top_p must be in \(0, 1\]"),
        ("sample:top_k=0", "top_k must be >= 1"),
        ("sample:top_k=2.5", "top_k must be a whole number"),
        ("sample:temperature=hot", "temperature must be a number"),
        ("sample:beam=4", "unknown option 'beam=4'"),
        ("greedy:temperature=0.7", "greedy decoding takes no options"),
        ("beam", "expected 'greedy', 'sample'"),
    ],
)
def test_decoding_specs_out_of_range_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        DecodingSettings.parse(spec)


def test_decoding_settings_built_in_python_are_checked_too():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DecodingSettings(greedy=False, temperature=0.0)


# --- context length (point 3) ------------------------------------------------------------------------------------


def test_env_refuses_budgets_past_the_tokenizer_positions(tiny_lm):
    task = register_toy_task("BadInputsContext-v0", tiny_lm)
    with pytest.raises(ValueError, match=r"16 \+ 1100 = 1116 is more than the 1024 positions.*max_new_tokens must be below"):
        gym.make(task, max_new_tokens=1100)
    with pytest.raises(ValueError, match=r"1000 \+ 30 = 1030 is more than the 1024 positions.*max_prompt_tokens=994"):
        gym.make(task, max_prompt_tokens=1000, max_new_tokens=30)  # 1030 > 1024
    gym.make(task, max_prompt_tokens=1000, max_new_tokens=24)  # 1024: fits


# --- env arguments (point 10) ------------------------------------------------------------------------------------


def test_unknown_env_arguments_are_named_with_the_known_ones(tiny_lm):
    task = register_toy_task("BadInputsKwargs-v0", tiny_lm)
    with pytest.raises(ValueError, match=r"BadInputsKwargs-v0 takes no argument 'max_new_token'.*max_new_tokens"):
        check_env_kwargs(task, {"max_new_token": 3})
    with pytest.raises(ValueError, match=r"NewsSummary-v0 takes no argument 'n_article', 'seed'"):
        check_env_kwargs("NewsSummary-v0", {"n_article": 3, "seed": 1, "data_seed": 2})
    check_env_kwargs("NewsSummary-v0", {"data_seed": 2, "render_mode": None})  # its own and gym.make's pass


# --- LM names and paths (point 6): fail at once, not after a minute of hub retries ----------------------------------


def test_a_path_whose_first_folder_exists_is_not_taken_for_a_hub_name(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    with pytest.raises(OSError, match=r"no directory 'runs/sft' here \(though runs/ is: it reads as a local path"):
        load_causal_lm("runs/sft")
    with pytest.raises(OSError, match="no directory 'runs/sft' here"):
        load_tokenizer("runs/sft")
    assert time.perf_counter() - started < 5


def test_a_hub_name_offline_fails_at_once(monkeypatch):
    monkeypatch.setattr(model_loading, "hub_reachable", lambda: False)
    started = time.perf_counter()
    with pytest.raises(OSError, match=r"'no-such-org/no-such-lm' is not a local directory .*not in the Hugging Face "
                                      r"cache, and the hub cannot be reached.*`None` uses the embedded default LM"):
        load_causal_lm("no-such-org/no-such-lm")
    assert time.perf_counter() - started < 5


def test_hub_offline_variable_counts_as_unreachable(monkeypatch):
    model_loading.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        assert model_loading.hub_reachable() is False
    finally:
        model_loading.hub_reachable.cache_clear()


# --- reward-model directories (point 5) ----------------------------------------------------------------------------


@pytest.fixture
def scorer_dir(tmp_path) -> Path:
    """A one-output GPT-2 classifier saved without a tokenizer (what a hand-made directory often is)."""
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50257, n_positions=64, num_labels=1, pad_token_id=0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    return tmp_path / "rm"


def test_reward_model_directory_without_tokenizer_files_is_refused(scorer_dir, gpt2_tokenizer):
    with pytest.raises(FileNotFoundError, match=r"holds no tokenizer files.*save_pretrained"):
        LearnedRewardModel(scorer_dir, normalize=False, device="cpu")
    gpt2_tokenizer.save_pretrained(scorer_dir)
    reward = LearnedRewardModel(scorer_dir, normalize=False, device="cpu")  # now complete: it loads and scores
    assert reward.score(["a prompt"], ["a completion"], [None]).shape == (1,)


def test_reward_model_directory_without_a_model_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json: it is not a saved model"):
        LearnedRewardModel(tmp_path / "empty", normalize=False)


@pytest.mark.parametrize(
    "info, message",
    [
        ({"format": "someone.else", "format_version": 1}, "is not a reward-model file of sb3_textrl"),
        ({"format": FORMAT_NAME, "format_version": 99, "sb3_textrl_version": "9.0"}, "format version 99, newer than"),
        ({"format": FORMAT_NAME, "format_version": "one"}, "format version 'one'"),
        (["not", "an", "object"], "is not a reward-model file"),
    ],
)
def test_reward_model_file_format_and_version_are_checked(scorer_dir, gpt2_tokenizer, info, message):
    gpt2_tokenizer.save_pretrained(scorer_dir)
    (scorer_dir / REWARD_MODEL_FILE).write_text(json.dumps(info), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        LearnedRewardModel(scorer_dir, normalize=False, device="cpu")


# --- sample (point 7): each pair stored whole, a rerun completes the set -------------------------------------------


def _counts(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as connection:
        return {table: connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in ("prompts", "candidates", "items")}


def test_sample_stores_pairs_whole_and_a_rerun_resumes_without_duplicates(tiny_lm, tmp_path, monkeypatch):
    task = register_toy_task("BadInputsSample-v0", tiny_lm, max_new_tokens=2)
    db = tmp_path / "feedback.db"
    run = dict(task=task, n_prompts=3, source_a=CandidateSource(tiny_lm), n_envs=3, device="cpu", progress_bar=False)
    calls = {"n": 0}
    add_pair = FeedbackStore.add_pair

    def dies_at_the_second_pair(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a stop between a pair's candidates and the pair itself
        return add_pair(self, *args, **kwargs)

    monkeypatch.setattr(FeedbackStore, "add_pair", dies_at_the_second_pair)
    with pytest.raises(KeyboardInterrupt):
        sample_for_rating(db, **run)
    assert _counts(db) == {"prompts": 1, "candidates": 2, "items": 1}  # the second prompt left nothing half-stored
    monkeypatch.setattr(FeedbackStore, "add_pair", add_pair)
    assert len(sample_for_rating(db, **run)) == 2  # the rerun stores the two missing pairs only
    assert _counts(db) == {"prompts": 3, "candidates": 6, "items": 3}
    assert sample_for_rating(db, **run) == []  # nothing left to do
    other = sample_for_rating(db, **(run | {"seed": 1}))  # other settings: their own pairs
    assert len(other) == 3 and _counts(db)["items"] == 6


# --- storage faults (point 9): said as what they are, nothing half-stored --------------------------------------------


def _store_with_a_pair(path: Path) -> None:
    with FeedbackStore(path) as store:
        prompt = store.add_prompt("Summarise: the council met.", task="T")
        a = store.add_candidate(prompt, "The council met.", model="m")
        b = store.add_candidate(prompt, "Nothing happened.", model="m")
        store.record_preference(store.add_pair(prompt, a, b), "ann", "A")


def test_a_full_disk_is_reported_as_such_and_the_page_answers_507(tmp_path):
    db = tmp_path / "feedback.db"
    _store_with_a_pair(db)
    with FeedbackStore(db) as store:
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own SQLITE_FULL, as on a full disk
        with pytest.raises(FeedbackStorageError, match=r"the disk is full .*nothing of this write was stored") as error:
            store.add_prompt("x" * 100_000, task="T")
        assert error.value.http_status == 507
        assert len(store.prompt_metadata()) == 1  # what was stored before is intact
    client = create_app(db, "t" * 32).test_client()  # the page's answer to the same fault
    original = FeedbackStore.record_preference

    def full(self, *args, **kwargs):
        raise storage_error(db, sqlite3.OperationalError("database or disk is full"), 30)

    FeedbackStore.record_preference = full  # type: ignore[method-assign]
    try:
        response = client.post("/api/judge", json={"kind": "pair", "pair_id": 1, "choice": "A", "rater": "ann"},
                               headers={"X-Token": "t" * 32})
    finally:
        FeedbackStore.record_preference = original  # type: ignore[method-assign]
    assert response.status_code == 507 and "the disk is full" in response.get_json()["error"]


def test_a_held_lock_names_the_process_that_holds_it(tmp_path):
    db = tmp_path / "feedback.db"
    _store_with_a_pair(db)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sqlite3, time; c = sqlite3.connect({str(db)!r}, isolation_level=None); "
                               "c.execute('BEGIN IMMEDIATE'); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        locked = rf"is locked by another writer \(open in process {holder.pid} .*more than 0.2 s; nothing of this write"
        with FeedbackStore(db, timeout_s=0.2) as store, pytest.raises(FeedbackStorageError, match=locked) as error:
            store.add_prompt("another", task="T")
        assert error.value.http_status == 503  # what the rating page answers
    finally:
        holder.kill()
        holder.wait()


def test_a_store_is_read_without_writing_anything(tmp_path):
    db = tmp_path / "feedback.db"
    _store_with_a_pair(db)
    before = db.read_bytes()
    with FeedbackStore(db, read_only=True) as store:
        assert len(store.preference_pairs()) == 1
        with pytest.raises(FeedbackStoreError, match=r"open read-only \(read_only=True\)"):
            store.add_prompt("x", task="T")
    assert db.read_bytes() == before  # no migration, no journal switch: the database is as it was
    with pytest.raises(FeedbackStoreError, match="does not exist"):
        FeedbackStore(tmp_path / "missing.db", read_only=True)


def test_sqlite_read_only_errors_say_read_only(tmp_path):
    error = storage_error(tmp_path / "f.db", sqlite3.OperationalError("attempt to write a readonly database"), 30)
    assert error is not None and error.http_status == 503
    assert "read-only" in str(error) and "read_only=True" in str(error)
    assert storage_error(tmp_path / "f.db", sqlite3.OperationalError("no such table: x"), 30) is None


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder on a read-only file system (a tmpfs remounted read-only: needs root, skipped without)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # not left mounted either way
            pytest.fail("the read-only folder could not be unmounted: a file there is still open (a leaked connection)")


def test_a_store_on_a_read_only_disk_is_read_by_train_rm_and_refused_for_writing(tmp_path, read_only_folder):
    _store_with_a_pair(read_only_folder / "feedback.db")
    assert subprocess.run(["mount", "-o", "remount,ro", str(read_only_folder)]).returncode == 0
    with pytest.raises(FeedbackStorageError, match="cannot be written .*read-only.*read_only=True"):
        FeedbackStore(read_only_folder / "feedback.db")
    pairs = load_preferences(read_only_folder / "feedback.db")  # what train-rm reads: no write needed
    assert [(p.chosen, p.rejected) for p in pairs] == [("The council met.", "Nothing happened.")]


# --- subprocess envs (point 10): a worker's error arrives as it was raised ------------------------------------------


def _broken_reward(prompts, completions, references):
    raise ValueError("the judge is offline")


def test_a_worker_error_reaches_the_main_process_with_its_message(tiny_lm):
    task = "BadInputsSubproc-v0"
    register_text_task(task, prompts=PROMPTS, reward=_broken_reward, tokenizer=tiny_lm, max_new_tokens=2, max_prompt_tokens=16)
    fork = dict(start_method="fork")  # the workers inherit this process's task registry
    stock = make_vec_env(task, n_envs=2, vec_env_cls=SubprocVecEnv, vec_env_kwargs=fork)
    stock.reset()
    with pytest.raises((EOFError, ConnectionError)):  # SB3's own: the worker died, its message stayed on stderr
        for _ in range(2):
            stock.step(np.array([1, 1]))
    venv = make_text_vec_env(task, n_envs=2, vec_env_cls=SubprocVecEnv, vec_env_kwargs=fork, batched_rewards=False)
    try:
        assert isinstance(venv, TextSubprocVecEnv)
        venv.reset()
        message = r"Reward '_broken_reward' .* raised ValueError .*: the judge is offline"
        with pytest.raises(ValueError, match=message) as error:
            for _ in range(2):
                venv.step(np.array([1, 1]))
        assert isinstance(error.value.__cause__, WorkerError)
        assert "raise ValueError(\"the judge is offline\")" in str(error.value.__cause__)  # the worker's traceback
    finally:
        venv.close()


# --- the rating server (point 8) -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(threads=0), "threads must be a whole number >= 1"),
        (dict(threads=2.5), "threads must be a whole number >= 1"),
        (dict(port=99999), r"port must be 0 \(any free port\) to 65535, got 99999"),
        (dict(port=-1), "port must be 0"),
    ],
)
def test_the_rating_server_refuses_threads_and_ports_out_of_range(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        rating_server(tmp_path / "feedback.db", **kwargs)
    assert not (tmp_path / "feedback.db").exists()  # refused before the store was made
