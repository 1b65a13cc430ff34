"""Renamed keywords and fields: the old name still works, warns with the new name, and is honoured; both is an error."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from sb3_textrl.common.deprecation import renamed_kwargs
from sb3_textrl.models import assets
from sb3_textrl.reward_model import REWARD_MODEL_FILE, RewardModelConfig, load_backbone, train_reward_model
from sb3_textrl.reward_model import train as rm_train
from sb3_textrl.sft import RESULT_FILE, evaluate_sft_loss, load_sft_examples, train_sft

PAIRS = [{"prompt": f"article {i}", "chosen": "the council approved the budget", "rejected": "zzz qqq"} for i in range(8)]
ROWS = [{"article": f"In Oslo {n} kites were sold at the market on Monday.", "summary": f"{n} kites sold."} for n in range(8)]


def deprecated(old: str, new: str) -> pytest.WarningsChecker:
    """Expect one DeprecationWarning that names the old and the new keyword."""
    return pytest.warns(DeprecationWarning, match=rf"'{old}' is deprecated, use '{new}'")


# -- the helper ------------------------------------------------------------------------------------------------


def test_the_warning_points_at_the_caller_and_both_names_fail():
    @renamed_kwargs(old="new")
    def f(new: int = 0) -> int:
        return new

    with deprecated("old", "new") as record:
        assert f(old=3) == 3
    assert [Path(w.filename).name for w in record] == [Path(__file__).name]  # the user's line, not the wrapper's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f(new=4) == 4 and f(5) == 5  # the new name (or a positional argument) does not warn
    with pytest.raises(TypeError, match=r"f\(\) got both 'old' and 'new'; pass only 'new'"):
        f(old=1, new=2)


# -- the reward model ------------------------------------------------------------------------------------------


def test_reward_model_config_old_field_names():
    with deprecated("lr", "learning_rate"):
        config = RewardModelConfig(lr=1e-3)
    assert config.learning_rate == 1e-3
    with deprecated("progress", "progress_bar"):
        config = RewardModelConfig(progress=False)
    assert config.progress_bar is False and config.learning_rate == RewardModelConfig().learning_rate
    config = RewardModelConfig(learning_rate=2e-3)
    with deprecated("lr", "learning_rate"):
        assert config.lr == 2e-3
    with deprecated("lr", "learning_rate"):
        config.lr = 3e-3
    assert config.learning_rate == 3e-3
    with pytest.raises(TypeError, match=r"RewardModelConfig\(\) got both 'lr' and 'learning_rate'"):
        RewardModelConfig(lr=1e-3, learning_rate=1e-3)
    with pytest.raises(TypeError, match="got both 'progress' and 'progress_bar'"):
        RewardModelConfig(progress=True, progress_bar=False)


def test_reward_model_config_checks_the_value_given_under_the_old_name():
    with deprecated("lr", "learning_rate"):
        config = RewardModelConfig(lr=-1.0)
    with pytest.raises(ValueError, match=r"learning_rate=-1\.0"):  # the value given under the old name is the one used
        config.check()


def test_train_reward_model_old_keywords(tmp_path, tiny_lm, capsys):
    with deprecated("lr", "learning_rate"), deprecated("progress", "progress_bar"):
        result = train_reward_model(PAIRS, tmp_path / "rm", backbone=tiny_lm, epochs=1, lr=1e-3, progress=False, device="cpu")
    saved = json.loads((result.output_dir / REWARD_MODEL_FILE).read_text())
    assert saved["config"]["lr"] == 1e-3  # reward_model.json keeps its key
    assert "train-rm" not in capsys.readouterr().err  # progress=False: no bar
    with pytest.raises(TypeError, match="got both 'lr' and 'learning_rate'"):
        train_reward_model(PAIRS, tmp_path / "rm2", backbone=tiny_lm, lr=1e-3, learning_rate=1e-3)
    assert not (tmp_path / "rm2").exists()


def test_load_backbone_and_quiet_transformers_old_keyword(monkeypatch, tiny_lm):
    from transformers.utils import logging as hf_logging

    with deprecated("progress", "progress_bar"), rm_train.quiet_transformers(progress=True):
        assert hf_logging.is_progress_bar_enabled()
    with deprecated("progress", "progress_bar"), rm_train.quiet_transformers(progress=False):
        assert not hf_logging.is_progress_bar_enabled()

    seen = []
    quiet = rm_train.quiet_transformers

    def recording(progress_bar: bool = False):
        seen.append(progress_bar)
        return quiet(progress_bar)

    monkeypatch.setattr(rm_train, "quiet_transformers", recording)
    with deprecated("progress", "progress_bar"):
        model, tokenizer = load_backbone(tiny_lm, progress=True)
    assert seen == [True] and model.config.num_labels == 1
    with pytest.raises(TypeError, match=r"load_backbone\(\) got both 'progress' and 'progress_bar'"):
        load_backbone(tiny_lm, progress=True, progress_bar=True)


# -- SFT -------------------------------------------------------------------------------------------------------


def test_train_sft_old_progress_keyword(tmp_path, tiny_lm, capsys):
    common = dict(max_prompt_tokens=64, eval_fraction=0.25, batch_size=4, device="cpu")
    with deprecated("progress", "progress_bar"):
        result = train_sft(tiny_lm, ROWS, tmp_path / "sft", progress=False, **common)
    assert "SFT" not in capsys.readouterr().err  # progress=False: no bars
    assert json.loads((result.output_dir / RESULT_FILE).read_text())["config"]["progress"] is False  # the file's key
    with pytest.raises(TypeError, match=r"train_sft\(\) got both 'progress' and 'progress_bar'"):
        train_sft(tiny_lm, ROWS, tmp_path / "both", progress=False, progress_bar=False, **common)
    assert not (tmp_path / "both").exists()


def test_evaluate_sft_loss_old_progress_keyword(tiny_lm, gpt2_tokenizer, capsys):
    from sb3_textrl.models import load_causal_lm

    model = load_causal_lm(tiny_lm)
    examples, _ = load_sft_examples(ROWS, gpt2_tokenizer, max_prompt_tokens=64)
    pad = gpt2_tokenizer.pad_token_id
    expected = evaluate_sft_loss(model, examples, pad, progress_bar=False)
    capsys.readouterr()
    with deprecated("progress", "progress_bar"):
        assert evaluate_sft_loss(model, examples, pad, progress=True) == expected
    assert "SFT eval" in capsys.readouterr().err  # progress=True: the bar was shown
    with pytest.raises(TypeError, match="got both 'progress' and 'progress_bar'"):
        evaluate_sft_loss(model, examples, pad, progress=True, progress_bar=True)


# -- the embedded LM -------------------------------------------------------------------------------------------


def test_embedded_lm_dir_old_progress_keyword(tmp_path, monkeypatch, capsys):
    def fake_convert(out_dir: Path, gguf_path: Path) -> dict:
        (out_dir / "config.json").write_text("{}")
        return {}

    monkeypatch.setattr(assets, "embedded_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(assets, "_convert_embedded_lm", fake_convert)
    for progress in (False, True):
        monkeypatch.setenv("SB3_TEXTRL_CACHE", str(tmp_path / f"cache-{progress}"))  # converts again
        with deprecated("progress", "progress_bar"):
            directory = assets.embedded_lm_dir(progress=progress)
        assert (directory / "config.json").is_file()
        assert ("converting the embedded" in capsys.readouterr().err) is progress  # the value is honoured
    with pytest.raises(TypeError, match=r"embedded_lm_dir\(\) got both 'progress' and 'progress_bar'"):
        assets.embedded_lm_dir(progress=True, progress_bar=True)


def test_kl_controller_current_beta_is_beta_and_old_state_dicts_load():
    # kl_coef names the initial β (the policy's argument); the controller's current β is now `beta`.
    from sb3_textrl.common.kl import KLController

    controller = KLController(kl_coef=0.1, kl_target=1.0, horizon=100)
    controller.update(2.0, 50)
    assert controller.beta.item() == pytest.approx(0.1 * (1 + 0.2 * 50 / 100)) == controller.value
    with pytest.warns(DeprecationWarning, match="use KLController.beta"):
        assert controller.kl_coef is controller.beta
    assert set(controller.state_dict()) == {"beta"}
    restored = KLController(kl_coef=0.1, kl_target=1.0, horizon=100)
    restored.load_state_dict({"kl_coef": controller.beta.clone()})  # a state dict saved before the rename
    assert restored.value == controller.value
