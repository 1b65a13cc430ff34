"""``sb3-textrl sft``: supervised fine-tuning on (article, summary) pairs, the warm start before PPO."""

from __future__ import annotations

import argparse
import sys

from sb3_textrl.common.names import DEFAULT_TASK


def add_parser(commands: argparse._SubParsersAction) -> None:
    """
    Add the ``sft`` subcommand to the ``sb3-textrl`` parser.

    :param commands: the parser's subparsers (``parser.add_subparsers()``)
    """
    sft = commands.add_parser(
        "sft",
        help="supervised fine-tuning on (article, summary) pairs: the warm start before PPO",
        description="Fine-tune a causal LM on (article, summary) pairs with the env's prompt template; the loss is on "
        "the summary tokens (and EOS) only. Writes a plain model directory usable as policy_kwargs=dict(lm=DIR).",
    )
    sft.add_argument("--data", help="JSONL/JSON/CSV of article/summary pairs (default: the task's own data)")
    sft.add_argument("--task", help=f"registered text task whose prompts and references to use (default: {DEFAULT_TASK})")
    sft.add_argument("--lm", help="LM name or local path to start from (default: the embedded SmolLM2-135M-Instruct)")
    sft.add_argument("--output", required=True, help="directory to write the fine-tuned model and tokenizer to")
    sft.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    sft.add_argument("--lora", action="store_true", help="train LoRA adapters (merged into the weights when saving)")
    sft.add_argument("--lora-r", type=int, help="LoRA rank (alpha = 2 r; default r=16)")
    sft.add_argument("--epochs", type=int, default=1, help="default 1")
    sft.add_argument("--lr", type=float, help="peak learning rate (default 5e-5; 2e-4 with --lora)")
    sft.add_argument("--batch-size", type=int, default=8, help="default 8")
    sft.add_argument("--grad-accum", type=int, default=1, help="forward passes per optimizer step (default 1)")
    sft.add_argument("--warmup-ratio", type=float, default=0.1, help="default 0.1")
    sft.add_argument("--max-grad-norm", type=float, default=1.0, help="default 1.0 (0: no clipping)")
    sft.add_argument("--max-prompt-tokens", type=int, help="prompt budget (default: the task's, 320 for news)")
    sft.add_argument("--max-target-tokens", type=int, help="longest summary incl. EOS (default: task's max_new_tokens, 48)")
    sft.add_argument("--limit", type=int, help="use the first N examples")
    sft.add_argument("--eval-fraction", type=float, default=0.1, help="share held out for the before/after loss (default 0.1)")
    sft.add_argument("--eval-data", help="separate held-out file (instead of --eval-fraction)")
    sft.add_argument("--article-field", help="article field in --data (default: detected)")
    sft.add_argument("--summary-field", help="summary field in --data (default: detected)")
    sft.add_argument("--gradient-checkpointing", action="store_true", help="less memory, slower")
    sft.add_argument("--seed", type=int, default=0, help="default 0")
    sft.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    add_trainer_flags(sft, "--output")
    sft.set_defaults(run=run)


def add_trainer_flags(parser: argparse.ArgumentParser, output_flag: str) -> None:
    """The checkpoint and log flags of ``sft`` and ``train-rm`` (both train on transformers.Trainer)."""
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help=f"continue from a checkpoint: the latest in {output_flag} without a path")
    parser.add_argument("--save-steps", type=int, help="save a checkpoint every N optimizer steps (default: none)")
    parser.add_argument("--logging-steps", type=int, default=10, help="log the loss every N optimizer steps (default 10)")
    parser.add_argument("--report-to", default="csv",
                        help="log formats in the output directory: csv, tensorboard, json, log, stdout, comma-separated, "
                        "or none (default csv: progress.csv, which sb3-textrl plot reads)")


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl sft`` with the parsed arguments (the implementation is imported here)."""
    from sb3_textrl.sft import train_sft

    try:
        result = train_sft(
            args.lm,
            args.data,
            args.output,
            task=args.task,
            use_lora=args.lora,
            lora_config=None if args.lora_r is None else dict(r=args.lora_r, lora_alpha=2 * args.lora_r),
            epochs=args.epochs,
            learning_rate=args.lr,
            batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            warmup_ratio=args.warmup_ratio,
            max_grad_norm=args.max_grad_norm,
            max_prompt_tokens=args.max_prompt_tokens,
            max_target_tokens=args.max_target_tokens,
            limit=args.limit,
            eval_fraction=args.eval_fraction,
            eval_data=args.eval_data,
            article_field=args.article_field,
            summary_field=args.summary_field,
            gradient_checkpointing=args.gradient_checkpointing,
            seed=args.seed,
            device=args.device,
            overwrite=args.overwrite,
            resume_from_checkpoint=args.resume,
            save_steps=args.save_steps,
            logging_steps=args.logging_steps,
            report_to=args.report_to,
        )
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"sb3-textrl sft: error: {err}", file=sys.stderr)
        return 2

    def fmt(loss: float | None) -> str:
        return "n/a" if loss is None else f"{loss:.4f}"

    print(
        f"SFT done: {result.n_examples} training examples ({result.n_train_tokens} summary tokens per epoch), "
        f"{result.optimizer_steps} optimizer steps in {result.train_time_s:.1f} s.\n"
        f"Held-out loss per summary token ({result.n_eval_examples} examples): {fmt(result.eval_loss_before)} before, "
        f"{fmt(result.eval_loss_after)} after.\n"
        f"Articles cut to max_prompt_tokens: {result.n_prompts_truncated}; summaries cut to max_target_tokens: "
        f"{result.n_targets_truncated}.\n"
        f"Model and tokenizer saved to {result.output_dir} (use it as policy_kwargs=dict(lm=...) and env tokenizer)."
    )
    return 0
