"""``sb3-textrl export``: a saved model's LM as a plain Hugging Face model directory (LoRA merged), for from_pretrained."""

from __future__ import annotations

import argparse

from sb3_textrl.cli.common import add_command, non_negative_int


def add_parser(commands: argparse._SubParsersAction) -> None:
    """
    Add the ``export`` subcommand to the ``sb3-textrl`` parser.

    :param commands: the parser's subparsers (``parser.add_subparsers()``)
    """
    parser = add_command(
        commands,
        "export",
        help="write a saved model's LM as a plain Hugging Face model directory (LoRA merged)",
        description="Write the LM of a saved model (.zip) as a Hugging Face model directory that "
        "AutoModelForCausalLM.from_pretrained (AutoModelForSeq2SeqLM for encoder-decoders) loads without peft: the "
        "weights with the LoRA adapters merged, the tokenizer, and a generation config with the policy's decoding "
        "(temperature, top-k, top-p, max_new_tokens, stop tokens). The value head stays in the .zip.",
    )
    parser.add_argument("model", metavar="MODEL", help="saved model .zip from model.save() (e.g. runs/news_demo/model.zip)")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="directory to write (must be new or empty, see --overwrite)")
    parser.add_argument(
        "--tokenizer", help="tokenizer name or directory to save with it (default: the env's, as the model records it)"
    )
    parser.add_argument(
        "--stop-token-id",
        type=non_negative_int,
        action="append",
        metavar="ID",
        help="a token that ends a completion, repeatable (default: the tokenizer's EOS, as the env picks it)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists and is not empty")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl export`` with the parsed arguments (the implementation is imported here)."""
    from sb3_textrl.export import export_lm

    output = export_lm(
        args.model, args.output_dir, tokenizer=args.tokenizer, overwrite=args.overwrite, stop_token_ids=args.stop_token_id
    )
    print(f"wrote {output}: load it with AutoModelForCausalLM.from_pretrained({str(output)!r}) (LoRA merged)")
    return 0
