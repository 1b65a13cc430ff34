"""SFT on transformers.Trainer: exact resume from a checkpoint, logs where SB3 logs them, TRL prompt/completion data."""

from __future__ import annotations

import csv
import json

import pytest
import torch as th
from test_sft import FAST, market_rows
from transformers import TrainerCallback

from sb3_textrl.common import metric_keys as keys
from sb3_textrl.models import load_causal_lm
from sb3_textrl.plotting import read_csv_log, read_tensorboard_log
from sb3_textrl.sft import train_sft


class StopAt(TrainerCallback):
    """Stops training after ``step`` optimizer steps, as a Ctrl-C or a killed job would (after its checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


# 24 examples, batches of 3 with 2 accumulated: 4 optimizer steps per epoch, 3 epochs = 12 steps. The stop at step 6
# falls in the middle of the second epoch, so the resume skips the batches already trained on.
RESUME = dict(eval_fraction=0.0, epochs=3, batch_size=3, gradient_accumulation_steps=2, learning_rate=3e-3,
              save_steps=3, report_to="csv", logging_steps=1, **FAST)


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tiny_lm, tmp_path):
    rows = market_rows(24, 0)
    whole = train_sft(tiny_lm, rows, tmp_path / "whole", **RESUME)
    assert whole.optimizer_steps == 12 and len(whole.train_losses) == 12

    stopped = train_sft(tiny_lm, rows, tmp_path / "resumed", callbacks=[StopAt(6)], **RESUME)
    assert stopped.optimizer_steps == 6
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    resumed = train_sft(tiny_lm, rows, tmp_path / "resumed", resume_from_checkpoint=True, **RESUME)

    assert resumed.optimizer_steps == 12
    # The per-step losses of the first 6 steps come from the checkpoint, the last 6 were trained again from it.
    # Tolerance: CPU kernels are deterministic and the checkpoint keeps the weights, AdamW moments, scheduler and RNG
    # states exactly (float32 safetensors / torch.save), so the runs agree to float32 rounding (measured: bit-equal).
    assert resumed.train_losses == pytest.approx(whole.train_losses, rel=1e-6, abs=1e-7)
    a, b = load_causal_lm(tmp_path / "whole").state_dict(), load_causal_lm(tmp_path / "resumed").state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    # and training moved the weights at all
    key = "transformer.h.0.mlp.c_fc.weight"
    assert not th.equal(a[key], load_causal_lm(tiny_lm).state_dict()[key])
    # progress.csv holds every step once, the ones before the checkpoint kept from the first run
    with open(tmp_path / "resumed" / "progress.csv", newline="") as file:
        steps = [int(float(r[keys.TOTAL_TIMESTEPS])) for r in csv.DictReader(file) if r.get(keys.TRAIN + keys.LOSS)]
    assert steps == list(range(1, 13))


def test_resume_needs_a_checkpoint(tiny_lm, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint-"):
        train_sft(tiny_lm, market_rows(8, 0), tmp_path / "new", resume_from_checkpoint=True, **FAST)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        train_sft(tiny_lm, market_rows(8, 0), tmp_path / "new", resume_from_checkpoint=tmp_path, **FAST)
    with pytest.raises(ValueError, match="unknown log format"):
        train_sft(tiny_lm, market_rows(8, 0), tmp_path / "new", report_to="wandb", **FAST)
    with pytest.raises(ValueError, match="save_steps must be a positive"):
        train_sft(tiny_lm, market_rows(8, 0), tmp_path / "new", save_steps=0, **FAST)
    assert not (tmp_path / "new").exists()


def test_logs_go_to_progress_csv_and_tensorboard_with_sb3_keys(tiny_lm, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    result = train_sft(tiny_lm, market_rows(32, 0), out, eval_data=market_rows(8, 1), batch_size=4, epochs=1,
                       learning_rate=3e-3, logging_steps=2, report_to="csv,tensorboard", **FAST)
    assert result.optimizer_steps == 8
    csv_log = read_csv_log(out / "progress.csv")
    steps, losses = csv_log.series[keys.TRAIN + keys.LOSS]
    assert steps == [2, 4, 6, 8]
    # each logged loss is the mean of the optimizer steps since the one before
    expected = [sum(result.train_losses[i : i + 2]) / 2 for i in range(0, 8, 2)]
    assert losses == pytest.approx(expected, rel=1e-5)
    lr_steps, rates = csv_log.series[keys.TRAIN + keys.LEARNING_RATE]
    assert lr_steps == steps and rates[0] > rates[-1] > 0  # linear decay after the warmup
    assert keys.TRAIN + keys.GRAD_NORM in csv_log.series
    eval_steps, eval_losses = csv_log.series[keys.EVAL + keys.LOSS]
    assert eval_steps == [0, 8] and eval_losses == pytest.approx([result.eval_loss_before, result.eval_loss_after])
    # the same scalars in the tensorboard event file, at the same steps
    assert list(out.glob("events.out.tfevents*"))
    tb_log = read_tensorboard_log(out)
    assert tb_log.series[keys.TRAIN + keys.LOSS][0] == [2, 4, 6, 8]
    assert tb_log.series[keys.TRAIN + keys.LOSS][1] == pytest.approx(losses, rel=1e-5)
    # the model directory is still a plain one, the logs beside it
    assert (out / "config.json").is_file() and json.loads((out / "sft_result.json").read_text())["config"]["report_to"] == [
        "csv", "tensorboard"]


# -- TRL's prompt/completion data ------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def sums(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"Q: what is {i % 5} plus {i % 3}? A:", "completion": f" {i % 5 + i % 3}"} for i in range(n)]


def test_trl_prompt_completion_jsonl_trains_on_the_completion_only(tiny_lm, gpt2_tokenizer, tmp_path):
    from test_sft import write_jsonl

    from sb3_textrl.sft import IGNORE_INDEX, collate_sft, load_sft_examples

    data = write_jsonl(tmp_path / "sums.jsonl", [dict(row, id=i) for i, row in enumerate(sums(30))])
    examples, counts = load_sft_examples(data, gpt2_tokenizer)
    assert len(examples) == 30 and counts == {"prompts_truncated": 0, "targets_truncated": 0}
    batch = collate_sft(examples[:4], gpt2_tokenizer.pad_token_id)
    for row, (example, source) in enumerate(zip(examples[:4], sums(4))):
        # the prompt as the tokenizer encodes it (no chat template on GPT-2's), the labels the completion and EOS only
        assert example.prompt_ids == gpt2_tokenizer(source["prompt"])["input_ids"]
        labels = batch["labels"][row]
        expected = gpt2_tokenizer(source["completion"], add_special_tokens=False)["input_ids"] + [gpt2_tokenizer.eos_token_id]
        assert labels[labels != IGNORE_INDEX].tolist() == expected
        assert (labels[: batch["prompt_width"]] == IGNORE_INDEX).all()
    result = train_sft(tiny_lm, data, tmp_path / "out", eval_fraction=0.2, learning_rate=3e-3, epochs=3, batch_size=4,
                       **FAST)
    assert (result.n_examples, result.n_eval_examples) == (24, 6)
    assert result.eval_loss_after < result.eval_loss_before


def test_a_custom_tasks_chat_template_and_system_prompt_format_the_prompts(gpt2_tokenizer, tmp_path):
    from sb3_textrl import register_text_task
    from sb3_textrl.sft import load_sft_examples

    tokenizer = copy_with_chat_template(gpt2_tokenizer)
    register_text_task("SftChatSums-v0", prompts=["placeholder"], reward=lambda p, c, r: [0.0] * len(c),
                       tokenizer=tokenizer, system_prompt="Answer with a number.", max_prompt_tokens=48)
    rows = [{"prompt": [{"role": "user", "content": "2 plus 3?"}], "completion": [{"role": "assistant", "content": "5"}]}]
    examples, _ = load_sft_examples(rows, tokenizer, task="SftChatSums-v0")
    expected_prompt = "<|system|>Answer with a number.\n<|user|>2 plus 3?\n<|assistant|>\n"
    assert examples[0].prompt_ids == tokenizer(expected_prompt, add_special_tokens=False)["input_ids"]
    # the completion follows the template's newline directly, then EOS
    assert examples[0].target_ids == tokenizer("5", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # without the task: the default template, no system prompt
    plain, _ = load_sft_examples(rows, tokenizer)
    assert plain[0].prompt_ids == tokenizer("<|user|>2 plus 3?\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    # a string prompt is a user message of the same template
    strings, _ = load_sft_examples([{"prompt": "2 plus 3?", "completion": "5"}], tokenizer, task="SftChatSums-v0")
    assert strings[0].prompt_ids == examples[0].prompt_ids
    with pytest.raises(ValueError, match="registered with register_text_task.*NewsSummary-v0 takes"):
        load_sft_examples(rows, tokenizer, task="NewsSummary-v0")


def copy_with_chat_template(tokenizer):
    import copy

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    return chat


def test_data_of_neither_format_is_refused_naming_the_fields(tiny_lm, gpt2_tokenizer, tmp_path):
    from test_sft import write_jsonl

    from sb3_textrl.sft import load_sft_examples

    data = write_jsonl(tmp_path / "odd.jsonl", [{"question": "2+3?", "answer": "5"}])
    with pytest.raises(ValueError, match=r"fields \['answer', 'question'\].*'prompt' and 'completion'.*article field"):
        train_sft(tiny_lm, data, tmp_path / "o", **FAST)
    with pytest.raises(ValueError, match="row 1: needs 'prompt' and 'completion'"):
        load_sft_examples([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], gpt2_tokenizer)
    assert not (tmp_path / "o").exists()


def test_cli_saves_checkpoints_and_resumes(tiny_lm, tmp_path, capsys):
    from test_sft import write_jsonl

    from sb3_textrl.cli import main

    data = write_jsonl(tmp_path / "sums.jsonl", sums(12))
    out = tmp_path / "cli"
    args = ["sft", "--data", data, "--lm", tiny_lm, "--output", str(out), "--max-prompt-tokens", "64", "--eval-fraction",
            "0", "--batch-size", "4", "--device", "cpu", "--save-steps", "2", "--logging-steps", "1"]
    assert main(args) == 0
    assert (out / "checkpoint-2").is_dir() and (out / "progress.csv").is_file()
    assert main([*args, "--resume", "--epochs", "2"]) == 0
    assert "6 optimizer steps" in capsys.readouterr().out
    assert main([*args, "--resume", str(tmp_path / "nope")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
