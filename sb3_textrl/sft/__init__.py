"""
Supervised fine-tuning (SFT): the warm start of the RLHF loop, on (article, summary) pairs, TRL's prompt/completion
rows or a task's prompts and references.

The model learns to continue each prompt with its reference summary. Only the summary tokens and the EOS token
after them are trained on (the prompt's labels are -100), so the model learns to write summaries and to stop,
not to reproduce articles. The prompts are built exactly as the env builds them (:func:`build_news_prompts`
for news data, the task's env for prompt/completion rows and a task's own prompts), so that PPO starts from a
policy trained on the very token sequences it will see.

The modules: :mod:`~sb3_textrl.sft.data` (examples, batches, collation), :mod:`~sb3_textrl.sft.loss` (the loss on
the summary tokens), :mod:`~sb3_textrl.sft.trainer` (the ``transformers.Trainer`` subclass that trains),
:mod:`~sb3_textrl.sft.train` (:func:`train_sft`, the run in named steps) and :mod:`~sb3_textrl.sft.output`
(:class:`SFTResult` and the saved directory).
"""

# Importable from here as before the split into modules, and as before not in __all__.
from sb3_textrl.sft.data import IGNORE_INDEX as IGNORE_INDEX
from sb3_textrl.sft.data import SftData as SftData
from sb3_textrl.sft.data import (
    SFTExample,
    collate_sft,
    load_sft_examples,
    make_sft_examples,
    news_sft_examples,
    prompt_completion_sft_examples,
    task_sft_examples,
)
from sb3_textrl.sft.loss import evaluate_sft_loss, target_nll
from sb3_textrl.sft.output import RESULT_FILE as RESULT_FILE
from sb3_textrl.sft.output import SFTResult
from sb3_textrl.sft.train import lora_kwargs, train_sft

__all__ = [
    "SFTExample",
    "SFTResult",
    "collate_sft",
    "evaluate_sft_loss",
    "load_sft_examples",
    "lora_kwargs",
    "make_sft_examples",
    "news_sft_examples",
    "prompt_completion_sft_examples",
    "target_nll",
    "task_sft_examples",
    "train_sft",
]
