"""What the subcommands share: one name per concept, the flag groups, checked numbers, and one-line errors.

Every subcommand is added with :func:`add_command` (a help line and a description) and its flags come from the groups
here, so that ``--model``, ``--dataset``, ``--output-dir``, ``--epochs``, ``--learning-rate`` mean the same in every
command. Names that earlier versions used stay accepted as hidden aliases (:func:`add_flag`'s ``old``), so scripts
keep working. Numbers are checked while parsing (a bad one is a usage error before anything loads). :func:`run`
turns the user errors the library raises (``ValueError``, ``TypeError``, ``OSError``, ``ImportError``, each with a
message naming the fix) into one line ``sb3-textrl CMD: error: ...`` and exit status 2; ``SB3_TEXTRL_TRACEBACK=1``
shows the traceback instead.

This module imports no torch: building the parser must stay instant (tests/test_cli_lazy.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sb3_textrl.common.names import DEFAULT_TASK

TRACEBACK_VARIABLE = "SB3_TEXTRL_TRACEBACK"
DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"
DECODING_HELP = "greedy | sample[:temperature=T,top_k=K,top_p=P]"  # DecodingSettings.parse (sample, eval)
_TASK_FLAG_KWARGS = ("dataset", "tokenizer", "max_new_tokens")  # env arguments with a flag of their own
_OLD_NAMES = "_old_names"  # parser default: {old flag: new flag}, for the docs and the tests
_REQUIRED = "_required_flags"  # parser default: [(dest, flag)] checked after parsing (an alias may set them)


# --- numbers, checked while parsing ---------------------------------------------------------------------------------


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def float_in(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in ``[low, high]`` (``low_open``/``high_open``: that end excluded)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low) or (
            high_open and value == high
        ):
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


positive_float = float_in(0.0, math.inf, low_open=True, high_open=True)
non_negative_float = float_in(0.0, math.inf, high_open=True)
fraction = float_in(0.0, 1.0)


def port_number(text: str) -> int:
    """An argparse ``type``: a TCP port, 0 (any free port) to 65535."""
    value = int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 (any free port) to 65535, got {value}")
    return value


def device_name(text: str) -> str:
    """An argparse ``type``: a torch device name (whether it exists is checked when the command runs)."""
    kind, _, index = text.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and (kind in ("auto", "cpu") or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"expected {DEVICE_HELP}, got {text!r}")
    return text


# --- one name per concept ---------------------------------------------------------------------------------------


def add_command(
    commands: argparse._SubParsersAction, name: str, help: str, description: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    """
    Add a subcommand with its one-line ``help`` (in ``sb3-textrl --help``) and ``description`` (in its own ``--help``).

    :param commands: the subparsers of the ``sb3-textrl`` parser
    :param name: the subcommand
    :param help: one line for the list of subcommands
    :param description: what the command does, for its ``--help``
    :param epilog: further text after the flags (examples)
    :return: the subcommand's parser
    """
    parser = commands.add_parser(name, help=help, description=description, epilog=epilog)
    parser.set_defaults(**{_OLD_NAMES: {}, _REQUIRED: [], "_parser": parser})
    return parser


def add_flag(parser: argparse.ArgumentParser, *flags: str, old: Sequence[str] = (), **kwargs: Any) -> None:
    """
    ``parser.add_argument(*flags, **kwargs)``, with the names of earlier versions (``old``) accepted but not shown.

    :param parser: the subcommand's parser
    :param flags: the flag and its short form
    :param old: earlier names of the flag: they set the same value, and are left out of ``--help``
    :param kwargs: ``add_argument``'s arguments; ``required=True`` is checked after parsing, so an old name counts
    """
    required = kwargs.pop("required", False)
    if required:  # argparse would refuse the old name as missing the new one: run() checks it instead
        kwargs["help"] = f"{kwargs.get('help', '')} (required)".strip()
    action = parser.add_argument(*flags, **kwargs)
    if required:
        parser.get_default(_REQUIRED).append((action.dest, flags[0]))
    hidden = {key: value for key, value in kwargs.items() if key not in ("help", "default", "dest")}
    for name in old:
        parser.add_argument(name, dest=action.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **hidden)
        parser.get_default(_OLD_NAMES)[name] = flags[0]


def old_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The hidden earlier names of a subcommand's flags: ``{old: new}``."""
    return dict(parser.get_default(_OLD_NAMES) or {})


def add_model(parser: argparse.ArgumentParser, help: str, old: Sequence[str] = ("--lm",), **kwargs: Any) -> None:
    """``--model``: the LM (a hub name or directory) or saved model a command starts from or uses."""
    add_flag(parser, "--model", old=old, help=help, **kwargs)


def add_output_dir(parser: argparse.ArgumentParser, help: str, required: bool = False) -> None:
    """``--output-dir``/``-o``: where a command writes (``--output``: its earlier name)."""
    add_flag(parser, "--output-dir", "-o", old=("--output",), help=help, required=required)


def add_task_flags(
    parser: argparse.ArgumentParser,
    dataset_help: str,
    *,
    task: bool = True,
    default_task: str | None = DEFAULT_TASK,
    default_task_help: str | None = None,
    max_new_tokens: bool = True,
) -> None:
    """
    The flags of every command that builds a task's env: ``--task`` and ``--import`` (for a command that takes any
    task), ``--dataset``, ``--tokenizer``, ``--max-new-tokens``, ``--env-kwarg``.

    :param parser: the subcommand's parser
    :param dataset_help: what ``--dataset`` holds for this command
    :param task: add ``--task`` and ``--import`` (False: the command has a task of its own)
    :param default_task: the task when ``--task`` is not given
    :param default_task_help: what the help says the default is (default: ``default_task``)
    :param max_new_tokens: add ``--max-new-tokens`` (a command with its own length flag has none)
    """
    if task:
        parser.add_argument(
            "--task",
            default=default_task,
            help="registered text task, or MODULE:ID to import MODULE first "
            f"(default {default_task_help or default_task})",
        )
        parser.add_argument(
            "--import",
            dest="imports",
            action="append",
            metavar="MODULE",
            help="import MODULE (from the current folder or PYTHONPATH) before the task is made, e.g. the module whose "
            "register_text_task(...) call defines your task; repeatable",
        )
    add_flag(parser, "--dataset", old=("--data",), help=dataset_help)
    parser.add_argument("--tokenizer", help="the env's tokenizer, a name or directory (default: the model's LM's)")
    if max_new_tokens:
        parser.add_argument(
            "--max-new-tokens", type=positive_int, help="length limit of a completion (default: the model's or the task's)"
        )
    parser.add_argument(
        "--env-kwarg",
        action="append",
        metavar="KEY=VALUE",
        help="further argument of the task's env, repeatable; VALUE is read as JSON when it parses (numbers, "
        "true/false, lists), else as text: e.g. --env-kwarg data_seed=1000 --env-kwarg max_prompt_tokens=256",
    )


def add_run_flags(
    parser: argparse.ArgumentParser, seed: int | None = 0, device: str | None = "auto", quiet: bool = True
) -> None:
    """``--seed``, ``--device`` and ``--quiet`` (``--no-progress``: its earlier name); None or False: not added."""
    if seed is not None:
        parser.add_argument("--seed", type=int, default=seed, help=f"random seed (default {seed})")
    if device is not None:
        parser.add_argument("--device", type=device_name, default=device, help=f"{DEVICE_HELP} (default {device})")
    if quiet:
        add_flag(parser, "--quiet", "-q", old=("--no-progress",), action="store_true", help="no progress bars")


def add_trainer_flags(parser: argparse.ArgumentParser) -> None:
    """The checkpoint and log flags of ``sft`` and ``train-rm`` (both train on transformers.Trainer)."""
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from a checkpoint: the latest in --output-dir without a path",
    )
    parser.add_argument(
        "--save-steps", type=positive_int, help="save a checkpoint every N optimizer steps (default: none)"
    )
    parser.add_argument(
        "--logging-steps", type=positive_int, default=10, help="log the loss every N optimizer steps (default 10)"
    )
    parser.add_argument(
        "--report-to",
        default="csv",
        help="log formats in the output directory: csv, tensorboard, json, log, stdout, comma-separated, or none "
        "(default csv: progress.csv, which sb3-textrl plot reads)",
    )


# --- what the flags mean ----------------------------------------------------------------------------------------


def parse_json_or_text(text: str) -> Any:
    """``--env-kwarg`` values: JSON when it parses (numbers, true/false/null, lists), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def env_kwargs(args: argparse.Namespace, task: str | None) -> dict[str, Any]:
    """
    The env arguments that :func:`add_task_flags`' flags give (``--dataset``, ``--tokenizer``, ``--max-new-tokens``,
    then each ``--env-kwarg``), checked against what ``task``'s env takes.

    :param args: the parsed arguments
    :param task: the task the env is made for (None: the library picks it, and checks the arguments itself)
    :return: keyword arguments for the task's env
    """
    kwargs: dict[str, Any] = {}
    for key in _TASK_FLAG_KWARGS:
        if getattr(args, key, None) is not None:
            kwargs[key] = getattr(args, key)
    for item in getattr(args, "env_kwarg", None) or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--env-kwarg {item!r}: expected KEY=VALUE, e.g. --env-kwarg data_seed=1000")
        if key in kwargs:
            flag = f"--{key.replace('_', '-')}" if key in _TASK_FLAG_KWARGS else "--env-kwarg"
            raise ValueError(f"--env-kwarg {item!r}: {key} is already given (by {flag}); give it once")
        kwargs[key] = parse_json_or_text(value)
    if task is not None:
        from sb3_textrl.envs.arguments import check_env_kwargs

        check_env_kwargs(task, kwargs, "--env-kwarg")
    return kwargs


def import_modules(modules: Sequence[str]) -> None:
    """
    Import the ``--import`` modules (and the MODULE of ``--task MODULE:ID``), the current folder first on the path as
    ``python -m`` has it (a console script's path has only its own folder).

    :param modules: module names
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ImportError(
                f"cannot import {module!r} ({error}); run from the folder holding {module.replace('.', '/')}.py or put "
                "that folder on PYTHONPATH"
            ) from error


def resolve_task(args: argparse.Namespace) -> str | None:
    """
    Import what ``--import`` and ``--task MODULE:ID`` name, and check that the task is registered.

    :param args: the parsed arguments (``args.task`` becomes the plain id)
    :return: the task id, or None for a command without ``--task``
    """
    task = getattr(args, "task", None)
    modules = list(getattr(args, "imports", None) or [])
    if task and ":" in task:
        module, _, task = task.partition(":")
        modules.append(module)
        args.task = task
    if modules:
        import_modules(modules)
    if task:
        import gymnasium as gym

        import sb3_textrl

        if task not in gym.registry:
            known = ", ".join(sb3_textrl.list_text_tasks())
            raise ValueError(
                f"--task {task}: no such task is registered (registered text tasks: {known}); register yours with "
                "sb3_textrl.register_text_task in a module and pass --import MODULE, or --task MODULE:ID"
            )
    return task


def check_device(device: str) -> None:
    """
    Refuse a device this torch cannot use, before any model loads (torch's own error comes later, and is an
    ``AssertionError: Torch not compiled with CUDA enabled``).

    :param device: the ``--device`` value
    """
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) is {build}; use --device cpu or auto")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} GPU(s), numbered from 0")


# --- running a command ------------------------------------------------------------------------------------------


def show_progress_logs() -> None:
    """Print sb3_textrl's INFO log lines (progress: epochs, truncation counts, skipped prompts) as plain messages;
    other libraries stay at warnings."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("sb3_textrl").setLevel(logging.INFO)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions whose message is for the user: the library raises them for bad input, naming the fix."""
    # MissingAssetError and FeedbackStoreError are among these; TypeError: a value of the wrong kind (a prompt
    # file's row, a saved model that holds another policy)
    return (ValueError, TypeError, OSError, ImportError)


def run(args: argparse.Namespace) -> int:
    """
    Run the parsed subcommand: the checks every command shares, then its ``run``; a user error becomes one line.

    :param args: the parsed arguments (``args.run``: the subcommand's function)
    :return: the exit status (2: a user error, 130: interrupted)
    """
    parser: argparse.ArgumentParser = args._parser
    missing = [flag for dest, flag in parser.get_default(_REQUIRED) if getattr(args, dest, None) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    try:
        resolve_task(args)
        if getattr(args, "device", None):
            check_device(args.device)
        return int(args.run(args))
    except _user_errors() as error:
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        message = " ".join(str(error).split()) or type(error).__name__  # one line, whatever the library's message
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted", file=sys.stderr)
        return 130
