"""Batched decoding with a text policy at ``generate()`` speed: the one home of evaluation's and sampling's decoding.

Stepping an SB3 VecEnv token by token (``model.predict`` then ``env.step``) costs a Python round trip through every env,
an observation copy and a cache lookup per token. For evaluation the env adds nothing the policy needs at each step,
so :func:`decode` drives the policy's LM directly, as ``generate()`` would: one prefill of the left-padded prompts into
a ``transformers.DynamicCache``, then one batched one-token forward per step, rows dropped from the batch as soon as
they emit a stop token.

It samples from the policy's own distribution: the policy's :meth:`~sb3_textrl.TransformerLMPolicy._logits` (LM head,
autocast, vocabulary crop), its ``_distribution`` (temperature, top-k, top-p), NLPO's top-p sets from the masking
policy (its own cache, like the rollout's) and, for a ``MaskableTransformerLMPolicy``, the env's action masks. The stop
rules are the env's: a stop token ends a row (and is kept as its last token), else ``max_new_tokens`` does.

:func:`generate_env_samples` wraps it for a :class:`~sb3_textrl.envs.text_env.TextGenerationEnv`: it returns the
:class:`~sb3_textrl.evaluation.Sample` objects the env loop would (completion decoded as the env does, the env's reward
scored in one batch, the episode's last observation in the env's layout). :func:`fast_path_unsupported` says when the
env loop must be used instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import gymnasium as gym
import numpy as np
import torch as th
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from sb3_textrl.common.kv_cache import positions_from_mask
from sb3_textrl.nlpo import top_p_allowed

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

    from sb3_textrl.envs.masks import ActionMask
    from sb3_textrl.envs.text_env import TextGenerationEnv, TextPrompt
    from sb3_textrl.evaluation.samples import Sample
    from sb3_textrl.policies import TransformerLMPolicy

# (rows of the batch (N,), tokens each row generated so far) -> (N, V) bool, True where the env allows the token
EnvMaskFn = Callable[[np.ndarray, Sequence[np.ndarray]], np.ndarray]

# Gymnasium and SB3 wrappers that leave a text env's steps, rewards and observations as they are.
_TRANSPARENT_WRAPPERS = ("Monitor", "OrderEnforcing", "PassiveEnvChecker", "TimeLimit")
# Methods of TextGenerationEnv whose behaviour the fast path reproduces; a subclass that overrides one needs the env loop.
_REPRODUCED_METHODS = ("reset", "step", "_finish", "completion_ids", "completion_text", "_compute_mask", "_observation")


class FastPathUnsupported(RuntimeError):
    """Raised by :func:`decode` when the model needs the env loop (e.g. a cache layer other than full attention)."""


@dataclass
class DecodeOutput:
    """
    What :func:`decode` generated.

    :param tokens: per prompt, the generated token ids (int64), a final stop token included
    :param ended_by_stop_token: (B,) bool, whether a stop token ended the row (else ``max_new_tokens`` did)
    """

    tokens: list[np.ndarray]
    ended_by_stop_token: np.ndarray


class _LMStepper:
    """One LM's decoding state: a DynamicCache over the batch's live rows, their attention mask and next positions."""

    def __init__(self, policy: TransformerLMPolicy, model: Any, ids: th.Tensor, mask: th.Tensor):
        self.policy, self.model = policy, model
        hidden, past = policy._trunk(model, ids, mask, positions_from_mask(mask), None, use_cache=True)  # (B, P, H)
        assert past is not None
        for layer in past.layers:
            if type(layer) is not DynamicLayer:  # sliding-window / static layers cannot be pruned and padded like this
                raise FastPathUnsupported(f"the LM's KV cache has {type(layer).__name__} layers (full attention only)")
            assert layer.keys is not None and layer.values is not None  # the prefill filled every layer
            # Padding columns are never attended to, but a fully masked query may leave NaN there, and 0 * NaN = NaN.
            keep = mask.bool()[:, None, :, None]  # (B, 1, P, 1)
            layer.keys = th.where(keep, layer.keys, 0.0)
            layer.values = th.where(keep, layer.values, 0.0)
        self.past: DynamicCache = past
        self.mask = mask  # (N, P + t) attention mask of the live rows
        self.positions = mask.sum(dim=1, keepdim=True)  # (N, 1) position id of each live row's next token
        self.hidden = hidden[:, -1]  # (N, H) left padding: the last column is every row's last token

    def logits(self) -> th.Tensor:
        """(N, V) float32 logits of the next token of every live row."""
        return self.policy._logits(self.model, self.hidden)

    def keep(self, rows: th.Tensor) -> None:
        """Drop the rows that finished: ``rows`` are the indices (into the live rows) that go on."""
        self.past.batch_select_indices(rows)
        self.mask, self.positions, self.hidden = self.mask[rows], self.positions[rows], self.hidden[rows]

    def advance(self, tokens: th.Tensor) -> None:
        """Feed each live row its new token (N,): one batched one-token forward."""
        self.mask = th.cat([self.mask, th.ones_like(self.mask[:, :1])], dim=1)
        hidden, past = self.policy._trunk(
            self.model, tokens.view(-1, 1), self.mask, self.positions, self.past, use_cache=True
        )  # (N, 1, H)
        assert past is not None
        self.past, self.hidden = past, hidden[:, -1]
        self.positions = self.positions + 1


def row_flags(deterministic: bool | Sequence[bool], n_rows: int) -> list[bool]:
    """``deterministic`` as one flag per row: a bool for every row, or a sequence checked to have ``n_rows`` flags."""
    if isinstance(deterministic, bool | np.bool_):
        return [bool(deterministic)] * n_rows
    flags = [bool(flag) for flag in deterministic]
    if len(flags) != n_rows:
        raise ValueError(f"deterministic has {len(flags)} flags for {n_rows} prompts: give one per prompt, or one bool")
    return flags


def _distinct(prompts: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """The distinct prompts in order of first appearance, and each prompt's index among them."""
    index: dict[bytes, int] = {}
    distinct: list[np.ndarray] = []
    for prompt in prompts:
        key = np.asarray(prompt, dtype=np.int64).tobytes()
        if key not in index:
            index[key] = len(distinct)
            distinct.append(prompt)
    return distinct, [index[np.asarray(p, dtype=np.int64).tobytes()] for p in prompts]


def _left_pad(prompts: Sequence[np.ndarray], device: th.device) -> tuple[th.Tensor, th.Tensor]:
    """Prompts (each (L_i,)) -> ids (B, P) and mask (B, P), left-padded with token 0 (masked out)."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return th.as_tensor(ids, device=device), th.as_tensor(mask, device=device)


@contextlib.contextmanager
def _masking_model(policy: TransformerLMPolicy) -> Iterator[Any]:
    """The NLPO masking policy's LM, or None without NLPO."""
    if policy.nlpo_top_p is None:
        yield None
        return
    with policy.masking_model() as model:
        yield model


@th.no_grad()
def decode(
    policy: TransformerLMPolicy,
    prompts: Sequence[np.ndarray],
    max_new_tokens: int,
    stop_token_ids: Collection[int],
    deterministic: bool | Sequence[bool] = True,
    env_masks: EnvMaskFn | None = None,
) -> DecodeOutput:
    """
    Complete a batch of prompts with the policy's sampling distribution, one batched forward per token.

    Each step does what the policy's rollout step does for one token (``TransformerLMPolicy._sample_step``): the LM
    head through ``policy._logits``, the allowed tokens (the env's masks, or NLPO's top-p set of the masking policy
    within them), then ``policy._distribution`` (temperature, top-k, top-p) and its ``get_actions``. Sampling draws from
    torch's global generator: seed it (``th.manual_seed``) for a reproducible run. Identical prompts of the batch are
    prefilled once and their KV cache shared, so greedy and sampled completions of one prompt (``deterministic`` per
    row) cost one prefill, which is most of the time of a short completion of a long prompt.

    :param policy: a causal-LM :class:`~sb3_textrl.TransformerLMPolicy` (or ``MaskableTransformerLMPolicy``)
    :param prompts: token ids of each prompt, (L_i,) int arrays of any lengths (at least 1 token each)
    :param max_new_tokens: length limit of a completion
    :param stop_token_ids: tokens that end a row (kept as its last token); empty: every row runs to the limit
    :param deterministic: greedy decoding (the most likely allowed token) instead of sampling; or one flag per prompt
    :param env_masks: the env's action masks, called once per step with the live rows and their tokens so far
        (:class:`EnvActionMasks`); None: no env mask
    :return: the generated tokens of every prompt
    :raises FastPathUnsupported: the LM's cache is not made of full-attention layers
    """
    from sb3_textrl.maskable import MaskableTransformerLMPolicy

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = policy.device
    n_rows = len(prompts)
    flags = row_flags(deterministic, n_rows)
    greedy_rows = th.as_tensor(flags, device=device) if len(set(flags)) > 1 else None  # (B,) bool; None: all alike
    distinct_prompts, prefill_row = _distinct(prompts)  # one prefill per distinct prompt
    ids, mask = _left_pad(distinct_prompts, device)
    stop = th.as_tensor(sorted(int(t) for t in stop_token_ids), dtype=th.long, device=device)
    generated = th.zeros(n_rows, max_new_tokens, dtype=th.long, device=device)  # (B, T)
    lengths = th.zeros(n_rows, dtype=th.long, device=device)  # (B,)
    stopped = th.zeros(n_rows, dtype=th.bool, device=device)  # (B,)
    live = th.arange(n_rows, device=device)  # (N,) batch row of each live row

    lm = _LMStepper(policy, policy._hf_model(), ids, mask)
    masker = None
    if policy.nlpo_top_p is not None:
        with _masking_model(policy) as model:
            masker = _LMStepper(policy, model, ids, mask)
    if len(distinct_prompts) < n_rows:  # the rows of a repeated prompt start from copies of its prefill
        rows = th.as_tensor(prefill_row, device=device)  # (B,)
        lm.keep(rows)
        if masker is not None:
            masker.keep(rows)
    for step in range(max_new_tokens):
        logits = lm.logits()  # (N, V)
        allowed = None
        if env_masks is not None:
            so_far = generated[live, :step].cpu().numpy()
            allowed = th.as_tensor(env_masks(live.cpu().numpy(), list(so_far)), device=device)  # (N, V)
            if isinstance(policy, MaskableTransformerLMPolicy):  # it checks them as in training
                allowed = policy._env_mask(allowed, len(logits), device)
        if masker is not None:  # NLPO: the masking policy's top-p set, within the env's valid tokens (nlpo_allowed)
            with _masking_model(policy):
                mask_logits = masker.logits()
            allowed = top_p_allowed(mask_logits, policy.nlpo_top_p, allowed)  # type: ignore[arg-type]
        distribution = policy._distribution(logits, allowed)
        if greedy_rows is None:
            actions = distribution.get_actions(deterministic=flags[0]).long()  # (N,)
        else:  # a draw for every live row (so a row's draws do not depend on which rows ended), the mode where greedy
            actions = th.where(greedy_rows[live], distribution.mode(), distribution.sample()).long()  # (N,)
        generated[live, step] = actions
        lengths[live] += 1
        ends = th.isin(actions, stop)  # (N,)
        stopped[live] = ends
        if step == max_new_tokens - 1:
            break
        if bool(ends.any()):
            if bool(ends.all()):
                break
            going_on = th.nonzero(~ends).squeeze(1)
            live, actions = live[going_on], actions[going_on]
            lm.keep(going_on)
            if masker is not None:
                masker.keep(going_on)
        lm.advance(actions)
        if masker is not None:
            with _masking_model(policy):
                masker.advance(actions)
    tokens = generated.cpu().numpy()
    counts = lengths.cpu().numpy()
    return DecodeOutput([tokens[row, : counts[row]].copy() for row in range(n_rows)], stopped.cpu().numpy())


class EnvActionMasks:
    """
    A text env's action masks for :func:`decode`, computed as the env's ``action_masks()`` computes them
    (``TextGenerationEnv._compute_mask``): a per-episode mask once per prompt, a per-step one at every step.

    :param env: the (unwrapped) text env whose ``action_mask`` is set
    :param prompt_indices: the prompt index of each row of the batch
    """

    def __init__(self, env: TextGenerationEnv, prompt_indices: Sequence[int]):
        assert env.action_mask is not None
        self.env = env
        self.action_mask: ActionMask = env.action_mask
        self.prompt_indices = [int(i) for i in prompt_indices]
        self._per_prompt: dict[int, np.ndarray] = {}

    def __call__(self, rows: np.ndarray, generated: Sequence[np.ndarray]) -> np.ndarray:
        """(N, V) bool masks of the given rows after their ``generated`` tokens."""
        return np.stack([self._mask(self.prompt_indices[int(row)], tokens) for row, tokens in zip(rows, generated)])

    def _mask(self, index: int, generated: np.ndarray) -> np.ndarray:
        env = self.env
        prompt: TextPrompt = env.prompts[index]
        if not self.action_mask.per_episode:
            return self._checked(self.action_mask(prompt, env.prompt_ids[index], generated.astype(np.int64)), index)
        mask = self._per_prompt.get(index)
        if mask is None:
            mask = self._per_prompt[index] = self._checked(
                self.action_mask(prompt, env.prompt_ids[index], np.zeros(0, dtype=np.int64)), index
            )
        return mask

    def _checked(self, mask: Any, index: int) -> np.ndarray:
        """The checks of ``TextGenerationEnv._checked_mask``: one bool per token, at least one allowed."""
        vocab = int(cast(gym.spaces.Discrete, self.env.action_space).n)  # TextGenerationEnv's action space
        mask = np.asarray(mask)
        if mask.shape != (vocab,):
            raise ValueError(
                f"{self.env.task_id}: the action mask {self.action_mask!r} returned shape {mask.shape} (prompt {index}); "
                f"it must be a bool array of shape ({vocab},), one entry per token of the tokenizer (len(tokenizer))"
            )
        mask = mask.astype(bool, copy=False)
        if not mask.any():
            raise ValueError(
                f"{self.env.task_id}: the action mask {self.action_mask!r} allows no token (prompt {index}); it must "
                "allow at least one token, e.g. the stop token (EOS) so that a completion can end"
            )
        return mask


def fast_path_unsupported(model: BaseAlgorithm, env: VecEnv) -> str | None:
    """
    Why :func:`generate_env_samples` cannot stand in for the env loop here, or None when it can.

    It needs a causal-LM policy and an in-process VecEnv (``DummyVecEnv``) of plain
    :class:`~sb3_textrl.envs.text_env.TextGenerationEnv` s, wrapped only in wrappers that change nothing
    (``Monitor``, ``OrderEnforcing``, ``PassiveEnvChecker``, a ``TimeLimit`` no shorter than ``max_new_tokens``).

    :param model: the SB3 model that generates
    :param env: the task's VecEnv
    :return: the reason, or None
    """
    from stable_baselines3.common.vec_env import DummyVecEnv

    from sb3_textrl.envs.text_env import TextGenerationEnv
    from sb3_textrl.policies import TransformerLMPolicy

    policy = model.policy
    if not isinstance(policy, TransformerLMPolicy):
        return f"the policy is a {type(policy).__name__}, not a TransformerLMPolicy"
    env = _without_reward_batching(env)
    if getattr(policy._hf_model().config, "is_encoder_decoder", False):
        return f"{type(policy).__name__} decodes with an encoder-decoder LM (the fast path drives causal LMs)"
    if type(env) is not DummyVecEnv:
        return f"the env is a {type(env).__name__} (the fast path reads the envs in this process: a DummyVecEnv)"
    text_env = env.envs[0]
    while isinstance(text_env, gym.Wrapper):
        name = type(text_env).__name__
        if name not in _TRANSPARENT_WRAPPERS:
            return f"the text env is wrapped in {name}, which may change its steps, rewards or observations"
        limit = getattr(text_env, "_max_episode_steps", None)
        if name == "TimeLimit" and limit is not None and limit < text_env.unwrapped.max_new_tokens:  # type: ignore[attr-defined]
            return f"a TimeLimit of {limit} steps ends episodes before max_new_tokens"
        text_env = text_env.env
    if not isinstance(text_env, TextGenerationEnv):
        return f"the env is a {type(text_env).__name__}, not a TextGenerationEnv"
    overridden = [m for m in _REPRODUCED_METHODS if getattr(type(text_env), m) is not getattr(TextGenerationEnv, m)]
    if overridden:
        return f"{type(text_env).__name__} overrides TextGenerationEnv.{', .'.join(overridden)}"
    return None


def _without_reward_batching(env: VecEnv) -> VecEnv:
    """The VecEnv under any BatchedRewardVecEnv: batching changes when rewards are computed, not what they are."""
    from sb3_textrl.envs.batched import BatchedRewardVecEnv

    while isinstance(env, BatchedRewardVecEnv):
        env = env.venv
    return env


def text_env_of(env: VecEnv) -> TextGenerationEnv:
    """The first env of a DummyVecEnv (under reward batching), unwrapped: its envs share prompts, tokenizer and reward."""
    # The fast path's env: a DummyVecEnv of TextGenerationEnvs (see fast_path_unsupported).
    return cast("TextGenerationEnv", cast("DummyVecEnv", _without_reward_batching(env)).envs[0].unwrapped)


def generate_env_samples(
    model: BaseAlgorithm,
    env: VecEnv,
    prompt_indices: Sequence[int],
    deterministic: bool | Sequence[bool] = True,
    batch_size: int | None = None,
    progress_bar: bool = False,
) -> list[Sample]:
    """
    Complete the env's prompts with :func:`decode`, ``batch_size`` at a time, and give the samples the env loop gives.

    Call it where :func:`fast_path_unsupported` returns None (``evaluation.generate_samples`` does).

    :param model: a model with a causal-LM :class:`~sb3_textrl.TransformerLMPolicy`; a ``MaskableTransformerLMPolicy``
        decodes under the env's action masks, as MaskablePPO trained it
    :param env: a DummyVecEnv of the task (only read: its envs are not stepped)
    :param prompt_indices: which of the task's prompts to complete (repeats allowed: a batch prefills each prompt once)
    :param deterministic: greedy decoding (True) or sampling from the policy; or one flag per entry of ``prompt_indices``
    :param batch_size: prompts decoded at once (None: ``env.num_envs``)
    :param progress_bar: show a progress bar over prompts
    :return: one :class:`~sb3_textrl.evaluation.Sample` per prompt, in the order given
    """
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
    from tqdm.auto import tqdm

    from sb3_textrl.evaluation.samples import Sample
    from sb3_textrl.rewards.base import score_batch

    policy: TransformerLMPolicy = model.policy  # type: ignore[assignment]
    policy.set_training_mode(False)  # as SB3's predict() does: no dropout
    text_env = text_env_of(env)
    batch_size = batch_size or env.num_envs
    order = [int(i) for i in prompt_indices]
    flags = row_flags(deterministic, len(order))
    masked = isinstance(policy, MaskableActorCriticPolicy) and text_env.action_mask is not None
    n_prompt, n_new = text_env.max_prompt_tokens, text_env.max_new_tokens
    tokens: list[np.ndarray] = []
    stopped: list[bool] = []
    bar = tqdm(total=len(order), desc="generating", disable=not progress_bar)
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        out = decode(
            policy, [text_env.prompt_ids[i] for i in batch], n_new, text_env.stop_token_ids,
            flags[first : first + batch_size],
            EnvActionMasks(text_env, batch) if masked else None,
        )
        tokens += out.tokens
        stopped += [bool(s) for s in out.ended_by_stop_token]
        bar.update(len(batch))
    bar.close()

    prompts = [text_env.prompts[i] for i in order]
    texts = _completion_texts(text_env, tokens)
    rewards = score_batch(text_env.reward_fn, [p.text for p in prompts], texts, [p.reference for p in prompts],
                          text_env.task_id)
    samples = []
    for index, prompt, text, reward, generated, ended in zip(order, prompts, texts, rewards, tokens, stopped):
        samples.append(
            Sample(
                prompt_index=index, prompt=prompt.text, completion=text, reference=prompt.reference, reward=float(reward),
                completion_tokens=len(generated), ended_by_stop_token=ended,
                observation=_env_observation(text_env.prompt_ids[index], generated, n_prompt, n_new),
            )
        )
    return samples


def _completion_texts(text_env: TextGenerationEnv, tokens: Sequence[np.ndarray]) -> list[str]:
    """The completions decoded as ``TextGenerationEnv.completion_text``: without a final stop token, special tokens skipped."""
    stop_ids = text_env.stop_token_ids
    # cast: decoding one sequence gives one string (decode() is typed for a batch of sequences too).
    return [
        cast(str, text_env.tokenizer.decode(t[:-1] if len(t) and int(t[-1]) in stop_ids else t, skip_special_tokens=True))
        for t in tokens
    ]


def _env_observation(prompt_ids: np.ndarray, generated: np.ndarray, n_prompt: int, n_new: int) -> dict[str, np.ndarray]:
    """
    The episode's last observation in the env's layout: the prompt left-padded into the first ``n_prompt`` columns,
    then the generated tokens, then zeros.

    :param prompt_ids: the prompt's token ids
    :param generated: the generated token ids
    :param n_prompt: the env's ``max_prompt_tokens``
    :param n_new: the env's ``max_new_tokens``
    :return: ``{"input_ids", "attention_mask"}``, each (n_prompt + n_new,) int64
    """
    ids = np.zeros(n_prompt + n_new, dtype=np.int64)
    attention = np.zeros_like(ids)
    ids[n_prompt - len(prompt_ids) : n_prompt] = prompt_ids
    ids[n_prompt : n_prompt + len(generated)] = generated
    attention[n_prompt - len(prompt_ids) : n_prompt + len(generated)] = 1
    return {"input_ids": ids, "attention_mask": attention}
