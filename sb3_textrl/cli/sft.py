"""``sb3-textrl sft``: supervised fine-tuning on (prompt, completion) pairs, the warm start before PPO."""

from __future__ import annotations

import argparse

from sb3_textrl.cli.common import (
    add_command,
    add_flag,
    add_model,
    add_output_dir,
    add_run_flags,
    add_task_flags,
    add_trainer_flags,
    env_kwargs,
    float_in,
    non_negative_float,
    positive_float,
    positive_int,
)
from sb3_textrl.common.names import DEFAULT_TASK


def add_parser(commands: argparse._SubParsersAction) -> None:
    """
    Add the ``sft`` subcommand to the ``sb3-textrl`` parser.

    :param commands: the parser's subparsers (``parser.add_subparsers()``)
    """
    parser = add_command(
        commands,
        "sft",
        help="supervised fine-tuning on (prompt, completion) pairs: the warm start before PPO",
        description="Fine-tune a causal LM on (article, summary) or TRL-style (prompt, completion) pairs, formatted as "
        "the task's env shows its prompts; the loss is on the completion tokens (and EOS) only. Runs on "
        "transformers.Trainer (checkpoints, --resume, logs in --output-dir) and writes a plain model directory usable "
        "as policy_kwargs=dict(lm=DIR) or --model DIR.",
    )
    add_task_flags(
        parser,
        "JSONL/JSON/CSV of article/summary or prompt/completion rows (default: the task's own prompts and references)",
        default_task=None,
        default_task_help=f"{DEFAULT_TASK}; prompt/completion rows: plain prompts, the LM's chat template",
        max_new_tokens=False,
    )
    add_model(parser, "LM name or local path to start from (default: the embedded SmolLM2-135M-Instruct)")
    add_output_dir(parser, "directory to write the fine-tuned model and tokenizer to", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists and is not empty")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (merged into the weights when saving)")
    parser.add_argument("--lora-r", type=positive_int, help="LoRA rank (alpha = 2 r; default r=16)")
    parser.add_argument("--epochs", type=positive_int, default=1, help="passes over the training examples (default 1)")
    add_flag(
        parser,
        "--learning-rate",
        old=("--lr",),
        type=positive_float,
        help="peak learning rate (default 5e-5; 2e-4 with --lora)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="examples per forward pass (default 8)")
    add_flag(
        parser,
        "--gradient-accumulation-steps",
        old=("--grad-accum",),
        type=positive_int,
        default=1,
        help="forward passes per optimizer step (default 1)",
    )
    parser.add_argument(
        "--warmup-ratio",
        type=float_in(0.0, 1.0, high_open=True),
        default=0.1,
        help="share of the steps warming the learning rate up (default 0.1)",
    )
    parser.add_argument(
        "--max-grad-norm", type=non_negative_float, default=1.0, help="gradient norm clip (default 1.0; 0: no clipping)"
    )
    parser.add_argument("--max-prompt-tokens", type=positive_int, help="prompt budget (default: the task's, 320 for news)")
    parser.add_argument(
        "--max-target-tokens", type=positive_int, help="longest completion incl. EOS (default: the task's max_new_tokens)"
    )
    parser.add_argument("--limit", type=positive_int, help="use the first N examples")
    parser.add_argument(
        "--eval-fraction",
        type=float_in(0.0, 1.0, high_open=True),
        default=0.1,
        help="share held out for the before/after loss (default 0.1; 0: none)",
    )
    add_flag(parser, "--eval-dataset", old=("--eval-data",), help="separate held-out file (instead of --eval-fraction)")
    parser.add_argument("--article-field", help="article field in --dataset (default: detected)")
    parser.add_argument("--summary-field", help="summary field in --dataset (default: detected)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="less memory, slower")
    add_run_flags(parser)
    add_trainer_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``sb3-textrl sft`` with the parsed arguments (the implementation is imported here)."""
    from sb3_textrl.sft import train_sft

    task_kwargs = env_kwargs(args, args.task)
    dataset, tokenizer = task_kwargs.pop("dataset", None), task_kwargs.pop("tokenizer", None)
    result = train_sft(
        args.model,
        dataset,
        args.output_dir,
        task=args.task,
        tokenizer=tokenizer,
        task_kwargs=task_kwargs,
        use_lora=args.lora,
        lora_config=None if args.lora_r is None else dict(r=args.lora_r, lora_alpha=2 * args.lora_r),
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm,
        max_prompt_tokens=args.max_prompt_tokens,
        max_target_tokens=args.max_target_tokens,
        limit=args.limit,
        eval_fraction=args.eval_fraction,
        eval_data=args.eval_dataset,
        article_field=args.article_field,
        summary_field=args.summary_field,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
        progress_bar=not args.quiet,
        resume_from_checkpoint=args.resume,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        report_to=args.report_to,
    )

    def fmt(loss: float | None) -> str:
        return "n/a" if loss is None else f"{loss:.4f}"

    print(
        f"SFT done: {result.n_examples} training examples ({result.n_train_tokens} completion tokens per epoch), "
        f"{result.optimizer_steps} optimizer steps in {result.train_time_s:.1f} s.\n"
        f"Held-out loss per completion token ({result.n_eval_examples} examples): {fmt(result.eval_loss_before)} "
        f"before, {fmt(result.eval_loss_after)} after.\n"
        f"Prompts cut to max_prompt_tokens: {result.n_prompts_truncated}; completions cut to max_target_tokens: "
        f"{result.n_targets_truncated}.\n"
        f"Model and tokenizer saved to {result.output_dir}: use it as --model {result.output_dir}, or "
        "policy_kwargs=dict(lm=...) with the same path as the env's tokenizer."
    )
    return 0
