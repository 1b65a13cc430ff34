"""export_lm and ``sb3-textrl export``: a tuned tiny LoRA policy written as a plain Hugging Face model (LoRA merged)
that transformers loads without peft and that decodes the policy's greedy tokens."""

from __future__ import annotations

import base64
import json
import shutil
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from helpers import PROMPTS, greedy_episode, register_toy_task, shout, toy_ppo, toy_vec_env
from peft import PeftModel
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GPT2LMHeadModel

from sb3_textrl import Seq2SeqLMPolicy, TextGenerationEnv, TextRolloutBuffer, TransformerLMPolicy, export_lm
from sb3_textrl.cli import main
from sb3_textrl.common.output_dir import check_output_dir, write_dir_atomically
from sb3_textrl.envs.news_data import generate_news_examples
from sb3_textrl.export import EXPORT_INFO_FILE
from sb3_textrl.models import load_tokenizer, tiny_gpt2, tiny_t5, train_small_tokenizer

TASK = "ExportShout-v0"
V0_1_0 = Path(__file__).resolve().parent / "data" / "v0_1_0"


@pytest.fixture(scope="module")
def task(tiny_lm) -> str:
    if TASK not in gym.registry:
        register_toy_task(TASK, tiny_lm, max_new_tokens=6)
    return TASK


def train_tiny(task: str, lm: str) -> PPO:
    """A LoRA policy after one PPO update at a high learning rate: its adapters are far from 0."""
    model = toy_ppo(toy_vec_env(task, n_envs=2), lm, n_steps=8, batch_size=16, learning_rate=0.05)
    model.learn(16)
    return model


@pytest.fixture(scope="module")
def trained(task, tiny_lm) -> PPO:
    return train_tiny(task, tiny_lm)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    return export_lm(trained, tmp_path_factory.mktemp("export") / "hf")


def policy_greedy(model: PPO, env: TextGenerationEnv) -> list[tuple[np.ndarray, list[int]]]:
    """(prompt tokens, greedy completion) of every prompt, by the policy's own path: predict(deterministic=True)."""
    runs = []
    for index in range(len(env.prompts)):
        obs, _ = env.reset(options={"prompt_index": index})
        prompt = obs["input_ids"][: env.max_prompt_tokens][obs["attention_mask"][: env.max_prompt_tokens].astype(bool)]
        tokens = greedy_episode(model, env, obs)
        runs.append((prompt, tokens))
    return runs


def hf_greedy(lm, prompt: np.ndarray, **kwargs) -> list[int]:
    """Greedy ``generate()`` with the model's own generation config (length, stop tokens); the prompt's tokens cut."""
    ids = th.as_tensor(prompt).reshape(1, -1)
    with th.no_grad():
        out = lm.generate(ids, attention_mask=th.ones_like(ids), do_sample=False, **kwargs)
    return out[0, 1 if lm.config.is_encoder_decoder else ids.shape[1] :].tolist()


def test_export_is_a_plain_hf_model_with_the_lora_merged(trained, exported, tiny_lm):
    files = {path.name for path in exported.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", EXPORT_INFO_FILE} <= files
    assert "adapter_config.json" not in files
    lm = AutoModelForCausalLM.from_pretrained(exported)
    assert type(lm) is GPT2LMHeadModel
    assert not any("lora" in name for name in lm.state_dict())
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    attention = lm.transformer.h[0].attn.c_attn.weight  # LoRA's default target in GPT-2
    assert (attention - base.transformer.h[0].attn.c_attn.weight).abs().max() > 1e-3
    config = lm.generation_config
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (True, 1.0, 0, 1.0)
    assert (config.eos_token_id, config.pad_token_id, config.max_new_tokens) == (50256, 50256, 6)
    info = json.loads((exported / EXPORT_INFO_FILE).read_text())
    assert info["lora_merged"] and info["load_with"] == "AutoModelForCausalLM" and info["base_lm"] == tiny_lm
    assert len(load_tokenizer(str(exported))) == trained.action_space.n


def test_export_decodes_the_policy_greedy_tokens_and_distribution(trained, exported, task, tiny_lm):
    lm = AutoModelForCausalLM.from_pretrained(exported)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    env = gym.make(task).unwrapped
    runs = policy_greedy(trained, env)
    assert [hf_greedy(lm, prompt) for prompt, _ in runs] == [tokens for _, tokens in runs]
    assert [hf_greedy(base, prompt, max_new_tokens=6) for prompt, _ in runs] != [tokens for _, tokens in runs]
    # Not only the argmax: the exported next-token distribution is the policy's.
    obs, _ = env.reset(options={"prompt_index": 0})
    obs_tensor, _ = trained.policy.obs_to_tensor(obs)
    with th.no_grad():
        policy_log_probs = trained.policy.get_distribution(obs_tensor).distribution.logits
        exported_logits = lm(th.as_tensor(runs[0][0]).reshape(1, -1)).logits[:, -1]
    th.testing.assert_close(th.log_softmax(exported_logits, dim=-1), policy_log_probs, atol=1e-4, rtol=0)


def test_export_without_lora_saves_the_tuned_weights(task, tiny_lm, tmp_path):
    model = toy_ppo(
        toy_vec_env(task, n_envs=2),
        tiny_lm,
        n_steps=8,
        batch_size=16,
        learning_rate=1e-3,
        policy_kwargs=dict(use_lora=False, trainable_layers=1),  # the top block, the final norm (the head is tied)
    )
    model.learn(16)
    lm = AutoModelForCausalLM.from_pretrained(export_lm(model, tmp_path / "hf"))
    tuned = model.policy.lm.state_dict()
    assert all(th.equal(tensor, tuned[name]) for name, tensor in lm.state_dict().items())
    base = AutoModelForCausalLM.from_pretrained(tiny_lm).transformer
    assert th.equal(lm.transformer.h[0].mlp.c_fc.weight, base.h[0].mlp.c_fc.weight)  # frozen lower block
    assert not th.equal(lm.transformer.h[1].mlp.c_fc.weight, base.h[1].mlp.c_fc.weight)
    runs = policy_greedy(model, gym.make(task).unwrapped)
    assert [hf_greedy(lm, prompt) for prompt, _ in runs] == [tokens for _, tokens in runs]


def test_export_leaves_the_live_policy_training(task, tiny_lm, tmp_path):
    model = train_tiny(task, tiny_lm)
    before = {name: tensor.clone() for name, tensor in model.policy.state_dict().items()}
    export_lm(model, tmp_path / "hf")
    after = model.policy.state_dict()
    assert before.keys() == after.keys() and all(th.equal(before[name], after[name]) for name in before)
    assert isinstance(model.policy.lm, PeftModel)
    lora = {name: p for name, p in model.policy.named_parameters() if "lora_" in name}
    assert lora and all(p.requires_grad for p in lora.values())
    model.learn(16, reset_num_timesteps=False)
    assert any(not th.equal(before[name], p) for name, p in lora.items())


def test_export_of_a_saved_model_zip(trained, exported, tmp_path):
    trained.save(tmp_path / "model")  # no env in the file: the tokenizer comes from the observation space's name
    from_zip = export_lm(tmp_path / "model", tmp_path / "hf")  # the .zip suffix is optional, as for PPO.load
    ours, theirs = (AutoModelForCausalLM.from_pretrained(path).state_dict() for path in (from_zip, exported))
    assert ours.keys() == theirs.keys() and all(th.equal(ours[name], theirs[name]) for name in ours)
    assert json.loads((from_zip / EXPORT_INFO_FILE).read_text())["source"] == str(tmp_path / "model.zip")


def test_export_of_a_v0_1_0_model_zip(tmp_path, monkeypatch):
    shutil.copytree(V0_1_0, tmp_path / "v0_1_0")
    monkeypatch.chdir(tmp_path / "v0_1_0")  # the zip names its LM by the relative path 'tiny-lm'
    expected = json.loads(Path("expected.json").read_text())
    lm = AutoModelForCausalLM.from_pretrained(export_lm("model.zip", "hf"))
    env = TextGenerationEnv(expected["prompts"], shout, load_tokenizer("tiny-lm"), max_new_tokens=4, max_prompt_tokens=8)
    for index, tokens in enumerate(expected["greedy_tokens"]):
        obs, _ = env.reset(options={"prompt_index": index})
        assert hf_greedy(lm, obs["input_ids"][:8][obs["attention_mask"][:8].astype(bool)]) == tokens


def test_export_refuses_what_it_cannot_write_or_read(trained, tiny_lm, tmp_path):
    output = tmp_path / "hf"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_lm(trained, output)
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    export_lm(trained, output, overwrite=True)
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary sibling left
    with pytest.raises(ValueError, match="holds the base LM the policy loads"):
        export_lm(trained, tiny_lm, overwrite=True)
    with pytest.raises(ValueError, match="is a directory"):
        export_lm(output, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not found"):
        export_lm(tmp_path / "missing.zip", tmp_path / "out")
    with pytest.raises(TypeError, match="text policy"):
        export_lm(PPO("MlpPolicy", "CartPole-v1", device="cpu"), tmp_path / "out")
    trained.save(tmp_path / "model.zip")
    for serialized in (None, base64.b64encode(b"cno_such_module_xyz\nPolicy\n.").decode()):
        broken = tmp_path / "broken.zip"
        with zipfile.ZipFile(tmp_path / "model.zip") as source, zipfile.ZipFile(broken, "w") as target:
            for item in source.namelist():
                content = source.read(item)
                if item == "data":
                    data = json.loads(content)
                    if serialized is None:
                        del data["policy_class"]
                    else:
                        data["policy_class"] = {":serialized:": serialized}
                    content = json.dumps(data).encode()
                target.writestr(item, content)
        with pytest.raises(ValueError, match="Cannot determine the policy class"):
            export_lm(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_finds_the_tokenizer_or_asks_for_it(tmp_path):
    tokenizer = train_small_tokenizer([r["article"] for r in generate_news_examples(20)], vocab_size=300)
    lm_dir = tmp_path / "lm"  # an LM directory without tokenizer files, and an env built from a tokenizer object
    tiny_gpt2(len(tokenizer), eos_token_id=0).save_pretrained(lm_dir)
    env = DummyVecEnv([lambda: TextGenerationEnv(PROMPTS, shout, tokenizer, max_new_tokens=3, max_prompt_tokens=16)])
    model = PPO(
        TransformerLMPolicy,
        env,
        n_steps=4,
        batch_size=4,
        device="cpu",
        rollout_buffer_class=TextRolloutBuffer,
        policy_kwargs=dict(lm=str(lm_dir), check_tokenizer=False),
    )
    with pytest.raises(ValueError, match=r"No tokenizer found .* tokenizer=NAME_OR_PATH \(CLI: --tokenizer\)"):
        export_lm(model.policy, tmp_path / "out")  # the policy alone: no env, no name, no tokenizer in the LM dir
    with pytest.raises(ValueError, match="does not fit the policy"):
        export_lm(model.policy, tmp_path / "out", tokenizer=load_tokenizer(V0_1_0 / "tiny-lm"))
    assert not (tmp_path / "out").exists()
    assert len(load_tokenizer(export_lm(model, tmp_path / "from_env"))) == len(tokenizer)  # the env's tokenizer object
    assert len(load_tokenizer(export_lm(model.policy, tmp_path / "given", tokenizer=tokenizer))) == len(tokenizer)


def test_export_of_a_seq2seq_policy(tmp_path):
    tokenizer = train_small_tokenizer([r["article"] for r in generate_news_examples(20)], vocab_size=300)
    lm_dir = tmp_path / "t5"
    tiny_t5(len(tokenizer)).save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    task = register_toy_task("ExportT5-v0", str(lm_dir), max_new_tokens=5)
    model = PPO(
        Seq2SeqLMPolicy,
        toy_vec_env(task, n_envs=1),
        n_steps=4,
        batch_size=4,
        device="cpu",
        rollout_buffer_class=TextRolloutBuffer,
        policy_kwargs=dict(lm=str(lm_dir), temperature=0.7, top_k=20, top_p=0.9),
    )
    generator = th.Generator().manual_seed(0)
    with th.no_grad():  # LoRA B starts at 0: random adapters make the policy differ from the base T5
        for name, param in model.policy.named_parameters():
            if "lora_B" in name:
                param.copy_(th.randn(param.shape, generator=generator) * 0.5)
    lm = AutoModelForSeq2SeqLM.from_pretrained(export_lm(model, tmp_path / "hf"))
    config = lm.generation_config
    assert (config.do_sample, config.temperature, config.top_k, config.top_p, config.max_new_tokens) == (True, 0.7, 20, 0.9, 5)
    runs = policy_greedy(model, gym.make(task).unwrapped)
    assert [hf_greedy(lm, prompt) for prompt, _ in runs] == [tokens for _, tokens in runs]
    base = AutoModelForSeq2SeqLM.from_pretrained(lm_dir)
    assert [hf_greedy(base, prompt, max_new_tokens=5) for prompt, _ in runs] != [tokens for _, tokens in runs]


def test_cli_export(trained, tmp_path, capsys):
    trained.save(tmp_path / "model.zip")
    model, output = str(tmp_path / "model.zip"), str(tmp_path / "hf")
    assert main(["export", model, output]) == 0
    assert output in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(output).config.model_type == "gpt2"
    capsys.readouterr()  # transformers' loading progress bar
    assert main(["export", model, output]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sb3-textrl export: error: ") and "--overwrite" in error and error.count("\n") == 1
    assert main(["export", model, output, "--overwrite", "--tokenizer", str(V0_1_0 / "tiny-lm")]) == 2
    assert "does not fit the policy" in capsys.readouterr().err
    assert main(["export", model, output, "--overwrite"]) == 0


def test_an_interrupted_export_leaves_no_half_directory(tmp_path):
    def write_then_fail(directory: Path) -> None:
        (directory / "model.safetensors").write_text("half")
        raise KeyboardInterrupt  # as a Ctrl-C in the middle of save_pretrained

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(check_output_dir(tmp_path / "new", overwrite=False), write_then_fail)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(check_output_dir(tmp_path / "old", overwrite=True), write_then_fail)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]  # no temporary sibling
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["config.json"]  # the old directory as it was
