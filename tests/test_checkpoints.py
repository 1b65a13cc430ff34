"""Checkpoints hold what was trained and the base LM's identity: small LoRA zips, found or refused base LMs, bundles."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_lm
from helpers import PROMPTS, greedy_episode, register_toy_task, toy_ppo, toy_vec_env
from stable_baselines3 import PPO

import sb3_textrl
from sb3_textrl import TextGenerationEnv, checkpoints
from sb3_textrl.lm.checkpoint import BASE_LM_MARKER

# _predictions scores single steps (evaluate_actions outside a segment buffer), which warns: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:TransformerLMPolicy is trained with a per-step")


@pytest.fixture()
def workdir(tmp_path, monkeypatch, gpt2_tokenizer) -> Path:
    """A working directory holding a tiny LM at the relative path 'tiny-lm' (as a user would type it)."""
    save_tiny_lm(tmp_path / "tiny-lm", gpt2_tokenizer)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _trained(workdir: Path, task: str, **policy_kwargs) -> PPO:
    register_toy_task(task, str(workdir / "tiny-lm"), max_new_tokens=4)
    model = toy_ppo(toy_vec_env(task, n_envs=2), "tiny-lm", n_steps=8, batch_size=8, learning_rate=0.05,
                    policy_kwargs=policy_kwargs)
    model.learn(16)  # two updates: the LoRA B matrices (zero at init) and the value head move
    return model


def _predictions(model: PPO, tokenizer) -> list:
    """Greedy tokens, and the first action's value and log-prob, for every prompt."""
    env = TextGenerationEnv(PROMPTS, lambda p, c, r: [0.0] * len(c), tokenizer, max_new_tokens=4, max_prompt_tokens=16)
    out = []
    for index in range(len(PROMPTS)):
        obs, _ = env.reset(seed=0, options={"prompt_index": index})
        obs_tensor, _ = model.policy.obs_to_tensor(obs)
        tokens = greedy_episode(model, env, obs)
        with torch.no_grad():
            value, log_prob, _ = model.policy.evaluate_actions(obs_tensor, torch.tensor([tokens[0]]))
        out.append((tokens, round(float(value), 5), round(float(log_prob), 5)))
    return out


def _policy_keys(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as archive, archive.open("policy.pth") as f:
        return set(torch.load(f, weights_only=True))


def test_lora_zip_is_small_and_loads_the_same_from_another_directory(workdir, gpt2_tokenizer, tmp_path_factory,
                                                                     monkeypatch):
    model = _trained(workdir, "CkptLora-v0")
    expected = _predictions(model, gpt2_tokenizer)
    model.save(workdir / "small.zip")
    model.policy.save_base_lm = True  # today's behaviour: the whole LM in the zip
    model.save(workdir / "full.zip")
    model.policy.save_base_lm = False
    small, full = (workdir / "small.zip").stat().st_size, (workdir / "full.zip").stat().st_size
    assert small < full / 10, (small, full)
    keys = _policy_keys(workdir / "small.zip")
    assert BASE_LM_MARKER in keys and "kl_controller.beta" in keys and "n_rollouts" in keys
    assert any("lora_A" in key for key in keys) and any(key.startswith("value_net") for key in keys)
    assert not any("base_layer" in key or key.endswith("wte.weight") for key in keys)

    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # the relative lm='tiny-lm' was saved as absolute
    for name in ("small.zip", "full.zip"):
        loaded = PPO.load(workdir / name, device="cpu")
        assert _predictions(loaded, gpt2_tokenizer) == expected
    again = PPO.load(workdir / "small.zip", device="cpu")
    again.save(workdir / "again.zip")  # a loaded model saves small again
    assert _policy_keys(workdir / "again.zip") == keys


def test_a_moved_lm_gets_the_error_that_names_the_override_and_the_override_works(workdir, gpt2_tokenizer):
    model = _trained(workdir, "CkptMoved-v0")
    expected = _predictions(model, gpt2_tokenizer)
    model.save(workdir / "runs" / "model.zip")
    (workdir / "tiny-lm").rename(workdir / "moved-lm")
    with pytest.raises(OSError, match=r"is not found.*sb3_textrl\.load_model\(MODEL_ZIP, lm=NEW_PATH\)"):
        PPO.load(workdir / "runs" / "model.zip", device="cpu")
    loaded = sb3_textrl.load_model(workdir / "runs" / "model.zip", lm=workdir / "moved-lm", device="cpu")
    assert _predictions(loaded, gpt2_tokenizer) == expected
    assert loaded.policy.lm_name == str(workdir / "moved-lm")
    # Other saved policy_kwargs are kept (SB3's custom_objects would replace them all).
    assert loaded.policy.kl_coef == model.policy.kl_coef and loaded.policy.use_lora
    # Without lm=, a directory of the saved name next to the zip (or in its parent) is found.
    (workdir / "moved-lm").rename(workdir / "runs" / "tiny-lm")
    assert _predictions(sb3_textrl.load_model(workdir / "runs" / "model.zip", device="cpu"), gpt2_tokenizer) == expected


def test_another_base_lm_is_refused(workdir, gpt2_tokenizer):
    model = _trained(workdir, "CkptOther-v0")
    model.save(workdir / "model.zip")
    other = save_tiny_lm(workdir / "other-lm", gpt2_tokenizer, seed=1)  # same architecture, other weights
    with pytest.raises(ValueError, match=r"trained on a base LM whose weights hash to .*lm=THAT_LM"):
        sb3_textrl.load_model(workdir / "model.zip", lm=other, device="cpu")


@pytest.mark.parametrize("policy_kwargs", [dict(use_lora=False), dict(use_lora=False, trainable_layers=1)])
def test_full_fine_tuning_keeps_the_trained_weights(workdir, gpt2_tokenizer, policy_kwargs):
    model = _trained(workdir, f"CkptFull{len(policy_kwargs)}-v0", **policy_kwargs)
    expected = _predictions(model, gpt2_tokenizer)
    model.save(workdir / "model.zip")
    keys = _policy_keys(workdir / "model.zip")
    trained = {name for name, p in model.policy.named_parameters() if p.requires_grad}
    assert trained <= keys  # every trained weight is saved
    assert not any(key.startswith("ref_lm.") for key in keys)  # the frozen reference is the base LM: left out
    if "trainable_layers" in policy_kwargs:  # the frozen lower block too
        assert "lm.transformer.h.0.attn.c_attn.weight" not in keys and "lm.transformer.h.1.attn.c_attn.weight" in keys
    loaded = PPO.load(workdir / "model.zip", device="cpu")
    assert _predictions(loaded, gpt2_tokenizer) == expected
    for name, tensor in model.policy.state_dict(keep_vars=False).items():
        if name != BASE_LM_MARKER:
            assert torch.equal(tensor, loaded.policy.state_dict()[name]), name


def test_a_changed_frozen_weight_is_saved(workdir, gpt2_tokenizer):
    model = _trained(workdir, "CkptChanged-v0")
    model.save(workdir / "before.zip")  # the digests are taken
    wte = dict(model.policy.named_parameters())["lm.base_model.model.transformer.wte.weight"]
    with torch.no_grad():
        wte.mul_(2.0)  # frozen, but no longer the base LM's
    model.save(workdir / "after.zip")
    assert "lm.base_model.model.transformer.wte.weight" in _policy_keys(workdir / "after.zip")
    assert "lm.base_model.model.transformer.wte.weight" not in _policy_keys(workdir / "before.zip")
    loaded = PPO.load(workdir / "after.zip", device="cpu")
    assert _predictions(loaded, gpt2_tokenizer) == _predictions(model, gpt2_tokenizer)


def test_missing_weights_without_the_marker_are_still_refused(workdir):
    model = _trained(workdir, "CkptStrict-v0")
    state = model.policy.state_dict()
    del state[BASE_LM_MARKER]
    with pytest.raises(RuntimeError, match="Missing key"):
        model.policy.load_state_dict(state)
    full = torch.nn.Module.state_dict(model.policy)
    del full["value_net.weight"]  # a trained weight missing, marker or not
    full[BASE_LM_MARKER] = model.policy.state_dict()[BASE_LM_MARKER]
    with pytest.raises(RuntimeError, match="value_net.weight"):
        model.policy.load_state_dict(full)


def test_a_bundled_zip_loads_without_the_lm_directory(workdir, gpt2_tokenizer, monkeypatch, tmp_path_factory):
    monkeypatch.setattr(checkpoints, "_CACHE", tmp_path_factory.mktemp("cache"))
    model = _trained(workdir, "CkptBundle-v0")
    expected = _predictions(model, gpt2_tokenizer)
    path = sb3_textrl.save_model(model, workdir / "bundled", bundle_lm=True)
    assert path == workdir / "bundled.zip"
    shutil.rmtree(workdir / "tiny-lm")
    with zipfile.ZipFile(path) as archive:
        assert {"lm/config.json", "lm/model.safetensors", "lm/tokenizer.json"} <= set(archive.namelist())
    loaded = sb3_textrl.load_model(path, device="cpu")
    assert _predictions(loaded, gpt2_tokenizer) == expected
    assert sb3_textrl.load_model(path, device="cpu").policy.lm_name == loaded.policy.lm_name  # extracted once
