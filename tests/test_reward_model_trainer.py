"""Reward-model training on transformers.Trainer: resume from a checkpoint, logs where SB3 logs them."""

from __future__ import annotations

import pytest
from test_reward_model import city_backbone, city_pairs  # noqa: F401 (city_backbone: the fixture)
from test_sft_trainer import StopAt
from transformers import AutoModelForSequenceClassification

from sb3_textrl.common import metric_keys as keys
from sb3_textrl.plotting import read_csv_log
from sb3_textrl.reward_model import train_reward_model

# 60 pairs, 12 held out: 48 in batches of 8, 6 optimizer steps per epoch, 2 epochs. The stop at step 8 falls in the
# second epoch, so the resume skips the batches already trained on and keeps the first epoch's metrics.
RUN = dict(epochs=2, batch_size=8, learning_rate=1e-3, eval_fraction=0.2, seed=0, device="cpu", progress_bar=False,
           save_steps=4, logging_steps=2)


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path, city_backbone):  # noqa: F811
    pairs = city_pairs(60, seed=3)
    whole = train_reward_model(pairs, tmp_path / "whole", backbone=city_backbone, **RUN)
    train_reward_model(pairs, tmp_path / "resumed", backbone=city_backbone, callbacks=[StopAt(8)], **RUN)
    assert (tmp_path / "resumed" / "checkpoint-8").is_dir()
    resumed = train_reward_model(pairs, tmp_path / "resumed", backbone=city_backbone, resume_from_checkpoint=True, **RUN)
    # Same tolerance and reason as SFT's resume test: deterministic CPU kernels, exact saved states (measured: equal).
    assert [row["epoch"] for row in resumed.metrics["history"]] == [1, 2]
    for a, b in zip(whole.metrics["history"], resumed.metrics["history"]):
        assert a == pytest.approx(b, abs=1e-5)
    load = AutoModelForSequenceClassification.from_pretrained
    wa, wb = load(tmp_path / "whole").state_dict(), load(tmp_path / "resumed").state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6

    log = read_csv_log(tmp_path / "resumed" / "progress.csv")
    assert log.series[keys.TRAIN + keys.LOSS][0] == [2, 4, 6, 8, 10, 12]
    # held-out accuracy at each epoch's end, and where the stopped run ended (its csv rows up to the checkpoint stay)
    steps, accuracies = log.series[keys.EVAL + keys.ACCURACY]
    assert steps == [6, 8, 12]
    expected = [row["eval_accuracy"] for row in whole.metrics["history"]]
    assert [accuracies[0], accuracies[2]] == pytest.approx(expected, abs=1e-5)


def test_resume_needs_a_checkpoint(tmp_path, city_backbone):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="holds no checkpoint-"):
        train_reward_model(city_pairs(20, 0), tmp_path / "rm", backbone=city_backbone, resume_from_checkpoint=True, **RUN)
