"""The ``sb3-textrl`` command's one style (issue #14, point 5): one name per concept with the earlier names as hidden
aliases, a description for every subcommand, docs/cli.md in step with the parser, ``--tokenizer``/``--env-kwarg``/
``--import``/``--task MODULE:ID`` where a task is built, and every user error one line (exit status 2, no traceback)
before any work is done."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from helpers import PROMPTS, register_toy_task, toy_ppo, toy_vec_env

from sb3_textrl.cli import build_parser, common, main
from sb3_textrl.cli import tasks as tasks_command
from sb3_textrl.common.text_files import read_text_file
from sb3_textrl.feedback import FeedbackStore

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def visible_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [
        action.option_strings[0] if action.option_strings else (action.metavar or action.dest)
        for action in parser._actions
        if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)
    ]


def one_line_error(capsys, command: str) -> str:
    """The error a command printed: exactly one line on stderr, ``sb3-textrl CMD: error: ...``, no traceback."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith(f"sb3-textrl {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- the parser and its docs ------------------------------------------------------------------------------------


def test_every_subcommand_has_help_and_a_description():
    parsers = subcommands()
    assert set(parsers) == {"install-assets", "demo", "tasks", "sample", "sft", "rate", "train-rm", "eval", "export", "plot"}
    help_lines = build_parser().format_help()
    for name, parser in parsers.items():
        assert parser.description and len(parser.description) > 60, name
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", help_lines, re.M) or f"{name}\n" in help_lines, name


def test_docs_have_a_section_per_subcommand_naming_each_flag_and_old_name():
    text = DOCS.read_text(encoding="utf-8")
    sections = dict(re.findall(r"^### `([a-z-]+)`\n(.*?)(?=^### |\Z)", text, re.M | re.S))
    for name, parser in subcommands().items():
        assert name in sections, f"docs/cli.md has no ### `{name}` section"
        for flag in visible_flags(parser):
            assert f"`{flag}" in sections[name], f"docs/cli.md, {name}: flag {flag} is not documented"
        for old, new in common.old_names(parser).items():
            assert f"`{old}` → `{new}`" in sections[name], f"docs/cli.md, {name}: earlier name {old} is not listed"
            assert re.search(rf"^\| `{re.escape(old)}` \| `{re.escape(new)}` \|.*\b{re.escape(name)}\b", text, re.M)


# The same command in the earlier names and in today's: they must parse to the same arguments.
RENAMED = [
    (
        ["sft", "--data", "d.jsonl", "--lm", "m", "--output", "o", "--lr", "1e-4", "--grad-accum", "2", "--eval-data", "e",
         "--no-progress"],
        ["sft", "--dataset", "d.jsonl", "--model", "m", "--output-dir", "o", "--learning-rate", "1e-4",
         "--gradient-accumulation-steps", "2", "--eval-dataset", "e", "--quiet"],
    ),
    (
        ["train-rm", "--data", "f.db", "--output", "o", "--backbone", "b", "--lr", "1e-4", "--no-progress"],
        ["train-rm", "--dataset", "f.db", "--output-dir", "o", "--model", "b", "--learning-rate", "1e-4", "-q"],
    ),
    (["eval", "--n", "4", "--output", "o", "--data", "d"], ["eval", "--n-prompts", "4", "-o", "o", "--dataset", "d"]),
    (["demo", "--lm", "m", "--n-epochs", "3", "--output", "o"], ["demo", "--model", "m", "--epochs", "3", "-o", "o"]),
    (["sample", "--db", "x", "--data", "d"], ["sample", "--db", "x", "--dataset", "d"]),
    (["plot", "run", "--output", "p"], ["plot", "run", "-o", "p"]),
]


@pytest.mark.parametrize("old, new", RENAMED, ids=[old[0] for old, _ in RENAMED])
def test_earlier_flag_names_are_hidden_aliases(old, new):
    parser = build_parser()
    parsed_old, parsed_new = vars(parser.parse_args(old)), vars(parser.parse_args(new))
    for parsed in (parsed_old, parsed_new):
        del parsed["_parser"]
    assert parsed_old == parsed_new
    command_help = subcommands()[old[0]].format_help()
    for flag in old:
        if flag in common.old_names(subcommands()[old[0]]):
            assert re.search(rf"{re.escape(flag)}\b(?!-)", command_help) is None, f"{flag} shows in --help"


def test_a_required_flag_given_by_its_earlier_name_counts(tmp_path, capsys):
    assert main(["train-rm", "--data", str(tmp_path / "missing.db"), "--output", str(tmp_path / "rm")]) == 2
    assert "does not exist" in one_line_error(capsys, "train-rm")
    with pytest.raises(SystemExit) as stop:
        main(["train-rm", "--data", str(tmp_path / "missing.db")])
    assert stop.value.code == 2
    assert "the following arguments are required: --output-dir" in capsys.readouterr().err


# --- numbers refused while parsing ------------------------------------------------------------------------------

BAD_NUMBERS = [
    (["sample", "--db", "x.db", "--n-envs", "0"], "--n-envs: must be >= 1, got 0"),
    (["sample", "--db", "x.db", "--n-prompts", "-3"], "--n-prompts: must be >= 1"),
    (["sample", "--db", "x.db", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
    (["eval", "--n-envs", "two"], "--n-envs: expected a whole number >= 1, got 'two'"),
    (["eval", "--report-samples", "-1"], "--report-samples: must be >= 0"),
    (["rate", "--db", "x.db", "--threads", "0"], "--threads: must be >= 1, got 0"),
    (["rate", "--db", "x.db", "--port", "99999"], "--port: a port is 0 (any free port) to 65535, got 99999"),
    (["sft", "-o", "o", "--warmup-ratio", "2.0"], r"--warmup-ratio: must be a number in [0, 1), got 2.0"),
    (["sft", "-o", "o", "--max-grad-norm", "nan"], "--max-grad-norm: must be a number in [0, inf), got nan"),
    (["sft", "-o", "o", "--eval-fraction", "1"], "--eval-fraction: must be a number in [0, 1), got 1"),
    (["sft", "-o", "o", "--learning-rate", "0"], "--learning-rate: must be a number in (0, inf), got 0"),
    (["train-rm", "--dataset", "d", "-o", "o", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["demo", "--kl-coef", "-0.1"], "--kl-coef: must be a number in [0, inf), got -0.1"),
    (["demo", "--temperature", "inf"], "--temperature: must be a number in (0, inf), got inf"),
    (["demo", "--trainable-layers", "0"], "--trainable-layers: must be >= 1, got 0"),
    (["eval", "--device", "gpu"], "--device: expected auto (CUDA when present), cpu, cuda or cuda:N, got 'gpu'"),
    (["export", "m.zip", "out", "--stop-token-id", "-1"], "--stop-token-id: must be >= 0"),
]


@pytest.mark.parametrize("argv, message", BAD_NUMBERS, ids=[" ".join(argv[:1] + argv[-2:-1]) for argv, _ in BAD_NUMBERS])
def test_numbers_out_of_range_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


# --- errors when the command starts: one line, exit 2, before any work ----------------------------------------------


@pytest.fixture
def latin1_dataset(tmp_path) -> Path:
    path = tmp_path / "articles.csv"
    path.write_bytes("article,summary\nLe café ouvre.,Café.\n".encode("latin-1"))
    return path


def test_runtime_user_errors_are_one_line(tmp_path, tiny_lm, latin1_dataset, capsys):
    cases = [
        (["plot", str(tmp_path / "no_run")], "is not a folder"),
        (["eval", "--model", tiny_lm, "--env-kwarg", "no_such_kw=1"], "NewsSummary-v0 takes no argument 'no_such_kw'"),
        (["eval", "--env-kwarg", "data_seed"], "expected KEY=VALUE"),
        (["eval", "--dataset", "a.jsonl", "--env-kwarg", "dataset=b.jsonl"], "dataset is already given (by --dataset)"),
        (["eval", "--task", "NoSuchTask-v9"], "no such task is registered"),
        (["eval", "--task", "no_such_module_here:Foo-v0"], "cannot import 'no_such_module_here'"),
        (["sample", "--db", str(tmp_path / "no" / "dir" / "f.db"), "--model-a", tiny_lm], "does not exist; create"),
        (["sample", "--db", str(tmp_path / "f.db"), "--decoding-b", "sample:temperature=0"], "temperature must be > 0"),
        (["sample", "--db", str(tmp_path / "f.db"), "--decoding-a", "sample:top_p=1.5"], "top_p must be in (0, 1]"),
        (["sample", "--db", str(tmp_path / "f.db"), "--decoding-a", "greedy:top_k=3"], "greedy decoding takes no options"),
        (["eval", "--model", tiny_lm, "--dataset", str(latin1_dataset)], "articles.csv: the dataset must be UTF-8 text"),
        (["eval", "--model", tiny_lm, "--max-new-tokens", str(10**10)], "max_new_tokens must be below 1024"),
        (["eval", "--model", tiny_lm, "--max-new-tokens", "300", "--n-prompts", "1"], "more than the 512 positions of the LM"),
        (["demo", "--env-kwarg", "max_new_tokens=3"], "the demo sets these from its own settings"),
    ]
    if not torch.cuda.is_available():
        cases.append((["eval", "--model", tiny_lm, "--device", "cuda"], "use --device cpu or auto"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        line = one_line_error(capsys, argv[0])
        assert message in line, (argv, line)
    assert not (tmp_path / "f.db").exists()  # the decoding specs were refused before the store was made


def test_traceback_variable_shows_the_exception(monkeypatch, tmp_path):
    monkeypatch.setenv(common.TRACEBACK_VARIABLE, "1")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        main(["plot", str(tmp_path / "no_run")])


def test_ctrl_c_ends_with_status_130_and_no_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tasks_command, "run", interrupted)
    assert main(["tasks"]) == 130
    assert capsys.readouterr().err.strip() == "sb3-textrl tasks: interrupted"


# --- a custom task from the command line ------------------------------------------------------------------------


@pytest.fixture
def task_module(tmp_path, monkeypatch) -> str:
    """A module in the current folder that registers Shout-v0 (prompts of the toy task, no tokenizer: the embedded)."""
    (tmp_path / "cli_tasks_for_test.py").write_text(
        "import sb3_textrl\n"
        "from helpers import PROMPTS, shout\n"
        "sb3_textrl.register_text_task('CliShout-v0', prompts=PROMPTS, reward=shout, max_new_tokens=3, "
        "max_prompt_tokens=16)\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "cli_tasks_for_test", raising=False)  # each test imports it afresh
    yield "cli_tasks_for_test"
    sys.modules.pop("cli_tasks_for_test", None)  # the task stays registered, as other tests' tasks do


def test_import_from_the_current_folder_registers_the_task(task_module, capsys):
    assert main(["tasks", "--import", task_module]) == 0
    assert "CliShout-v0" in capsys.readouterr().out.split()


def test_sample_with_a_module_task_and_another_lm(task_module, tiny_lm, tmp_path):
    """--task MODULE:ID imports the module; the env takes model A's tokenizer (it took the embedded one before, so
    an LM with another vocabulary failed); the pairs are stored."""
    db = tmp_path / "feedback.db"
    argv = ["sample", "--db", str(db), "--task", f"{task_module}:CliShout-v0", "--model-a", tiny_lm, "--n-prompts", "2",
            "--n-envs", "2", "--max-new-tokens", "2", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    with FeedbackStore(db) as store:
        assert store.progress("anyone") == (0, 2)  # two pairs to judge
        item = store.next_item("anyone")
    assert item is not None and item["prompt"] in PROMPTS and item["kind"] == "pair"


def test_sft_takes_tokenizer_and_env_kwargs(tiny_lm, tmp_path, capsys):
    out = tmp_path / "sft"
    argv = ["sft", "--model", tiny_lm, "--tokenizer", tiny_lm, "--env-kwarg", "n_articles=6", "-o", str(out),
            "--max-prompt-tokens", "64", "--max-target-tokens", "8", "--eval-fraction", "0", "--batch-size", "3",
            "--device", "cpu", "--quiet", "--report-to", "none"]
    assert main(argv) == 0
    result = json.loads((out / "sft_result.json").read_text())
    assert result["n_examples"] == 6  # n_articles reached the task
    assert result["config"]["tokenizer"] == tiny_lm
    assert (out / "tokenizer_config.json").is_file()
    assert main([*argv[:-2], "--env-kwarg", "n_article=6", "--overwrite"]) == 2
    assert "takes no argument 'n_article'" in one_line_error(capsys, "sft")


# --- the checks behind the messages -----------------------------------------------------------------------------


def test_context_budget_past_the_lm_positions_is_refused_when_ppo_is_built(tiny_lm):
    task = register_toy_task("CliLongContext-v0", tiny_lm, max_new_tokens=8)
    env = gym.make(task, max_prompt_tokens=510).unwrapped  # the env alone is fine: GPT-2's tokenizer takes 1024
    assert env.observation_space["input_ids"].shape == (518,)
    with pytest.raises(ValueError, match=r"510 \+ 8 = 518 is more than the 512 positions of the LM.*max_prompt_tokens=504"):
        toy_ppo(toy_vec_env(task, n_envs=1, max_prompt_tokens=510), tiny_lm)
    with pytest.raises(ValueError, match="max_new_tokens must be below 1024"):
        gym.make(task, max_new_tokens=10**10)  # refused before the env allocates 10**10 tokens


def test_text_files_name_the_file_drop_a_bom_and_keep_json_line_separators(tmp_path):
    latin = tmp_path / "prompts.txt"
    latin.write_bytes(b"first\nsecond caf\xe9\n")
    with pytest.raises(ValueError, match=r"prompts.txt: the prompt file must be UTF-8 text, but byte 0xe9 on line 2"):
        read_text_file(latin, "the prompt file")
    bom = tmp_path / "data.csv"
    bom.write_bytes("\ufeffarticle,summary\nA,B\n".encode("utf-8"))
    assert read_text_file(bom).startswith("article,")
    from sb3_textrl.envs.news_data import load_summary_dataset

    rows = load_summary_dataset(bom)
    assert rows[0]["article"] == "A"
    separated = tmp_path / "pairs.jsonl"
    separated.write_text(json.dumps({"article": "one\u2028two", "summary": "s"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_summary_dataset(separated)[0]["article"] == "one\u2028two"
