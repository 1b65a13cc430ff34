"""Evaluating a text policy: batched generation, ROUGE, task reward, KL to the reference, length, diversity, baselines.

``evaluate(model, task, ...)`` completes the task's prompts with a saved model (or an LM directory), scores the
completions and the baselines (lead-3, the reference itself) and returns an :class:`EvalResult` that writes a JSON
file and a Markdown report. ``sb3-textrl eval`` (:mod:`sb3_textrl.cli.evaluate`) is the same from the command line.

The modules, by concern:

- :mod:`~sb3_textrl.evaluation.samples`: :class:`Sample`, :func:`generate_samples` (the fast path or the env loop) and
  :func:`generate_sample_sets` (greedy and sampled completions of the same prompts)
- :mod:`~sb3_textrl.evaluation.reference`: :func:`has_reference`, :func:`reference_identity`, :func:`kl_to_reference`
- :mod:`~sb3_textrl.evaluation.inputs`: what :func:`evaluate` is asked for, checked (model settings, env, prompts,
  decodings, baselines; :func:`saved_model_settings`)
- :mod:`~sb3_textrl.evaluation.run`: :func:`evaluate`, in named steps
- :mod:`~sb3_textrl.evaluation.results`: :class:`EvalResult`, :class:`EvalSample`, their files, :data:`METRICS`
- :mod:`~sb3_textrl.evaluation.report`: the Markdown report
"""

from sb3_textrl.common.names import DEFAULT_TASK
from sb3_textrl.evaluation.inputs import BASELINES, saved_model_settings
from sb3_textrl.evaluation.reference import has_reference, kl_to_reference, reference_identity
from sb3_textrl.evaluation.results import JSON_NAME, MARKDOWN_NAME, METRICS, EvalResult, EvalSample, default_output_dir
from sb3_textrl.evaluation.run import evaluate
from sb3_textrl.evaluation.samples import Sample, SampleSets, generate_sample_sets, generate_samples

__all__ = [
    "BASELINES",
    "DEFAULT_TASK",
    "JSON_NAME",
    "MARKDOWN_NAME",
    "METRICS",
    "EvalResult",
    "EvalSample",
    "Sample",
    "SampleSets",
    "default_output_dir",
    "evaluate",
    "generate_sample_sets",
    "generate_samples",
    "has_reference",
    "kl_to_reference",
    "reference_identity",
    "saved_model_settings",
]
