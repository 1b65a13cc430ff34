"""Text generation as a Gymnasium environment: one step appends one token, the task reward comes at the end."""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from transformers import PreTrainedTokenizerBase

from sb3_textrl.envs.arguments import check_context, check_lengths_and_render_mode, checked_penalty, resolve_stop_ids
from sb3_textrl.envs.chat import encode_prompts, env_prompts
from sb3_textrl.envs.masks import MaskSpec, resolve_action_mask
from sb3_textrl.envs.memo import tokenizer_memo
from sb3_textrl.rewards.base import RewardFn, TextReward, reward_name, score_batch

logger = logging.getLogger("sb3_textrl")
_already_logged: set[str] = set()


def log_once(message: str) -> None:
    """Log a warning once per process (every env of a VecEnv would otherwise repeat it)."""
    if message not in _already_logged:
        _already_logged.add(message)
        logger.warning(message)


@dataclass
class TextPrompt:
    """
    One prompt of a text task.

    :param text: the prompt's text, which the reward and the raters see; the LM is given it too unless ``templated``
        is set. A prompt built with a template of its own (NewsSummary-v0's) holds the whole templated string here.
    :param reference: optional reference completion (e.g. a human summary) handed to the reward
    :param meta: anything else the task wants to keep with the prompt (ids, source, the raw article)
    :param messages: the conversation (``[{"role": ..., "content": ...}, ...]``) of a conversational prompt, whose
        ``text`` is the content of its last user message; once templated, the conversation the chat template was
        given (a string prompt's is one user message, after the task's system prompt)
    :param templated: the string the LM is given when the task applied the tokenizer's chat template
        (:mod:`sb3_textrl.envs.chat`); None: the LM is given ``text``
    """

    text: str
    reference: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] | None = None
    templated: str | None = None

    @property
    def lm_text(self) -> str:
        """The string the LM is given: ``templated`` when set, else ``text``."""
        return self.text if self.templated is None else self.templated


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """
    A short hash of a tokenizer's id → token mapping, to tell whether an env and an LM speak the same vocabulary.

    :param tokenizer: a Hugging Face tokenizer
    :return: 16 hex digits
    """

    def compute() -> str:
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        return hashlib.sha256("\x00".join(str(t) for t in tokens).encode()).hexdigest()[:16]

    return tokenizer_memo(tokenizer, "fingerprint", compute)


class TextObservationSpace(spaces.Dict):
    """
    Observation space of a text env: ``input_ids`` and ``attention_mask``, both of width
    ``max_prompt_tokens + max_new_tokens``. The prompt is left-padded into the first ``max_prompt_tokens``
    columns and the generated tokens follow it, so the valid tokens of a row are always contiguous.

    Token ids are an integer ``Box`` (SB3 one-hot encodes ``MultiDiscrete``, gigabytes at real vocabulary sizes).
    The space also carries the tokenizer's name and fingerprint so the policy can check it uses the same one.

    :param vocab_size: number of token ids (the tokenizer's length)
    :param max_prompt_tokens: width of the prompt region
    :param max_new_tokens: width of the completion region (the episode's length limit)
    :param tokenizer_name: name or path the tokenizer was loaded from
    :param tokenizer_hash: :func:`tokenizer_fingerprint` of that tokenizer
    """

    def __init__(
        self,
        vocab_size: int,
        max_prompt_tokens: int,
        max_new_tokens: int,
        tokenizer_name: str = "",
        tokenizer_hash: str = "",
    ):
        width = max_prompt_tokens + max_new_tokens
        super().__init__(
            {
                "input_ids": spaces.Box(0, vocab_size - 1, shape=(width,), dtype=np.int64),
                "attention_mask": spaces.Box(0, 1, shape=(width,), dtype=np.int64),
            }
        )
        self.vocab_size = vocab_size
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.tokenizer_name = tokenizer_name
        self.tokenizer_hash = tokenizer_hash


class TextGenerationEnv(gym.Env):
    """
    A text task: the observation is a prompt plus the tokens generated so far, an action is the next token.

    The episode ends when a stop token is generated (``terminated``) or after ``max_new_tokens`` tokens
    (``truncated``). The task reward is paid at the last step; every other step pays 0 (the policy side adds
    the per-token KL penalty). The completion text is decoded only at the end of the episode.

    :param prompts: the task's prompts (:class:`TextPrompt` or plain strings)
    :param reward: ``(prompts, completions, references) -> floats`` or a :class:`TextReward`
    :param tokenizer: a loaded Hugging Face tokenizer (the policy's LM must use the same vocabulary)
    :param max_new_tokens: length limit of a completion
    :param max_prompt_tokens: prompts longer than this keep their last ``max_prompt_tokens`` tokens (logged)
    :param stop_token_ids: tokens that end a completion; default: the tokenizer's EOS (and ``<|im_end|>`` for
        chat-template tokenizers)
    :param task_id: the registered id, used in messages
    :param tokenizer_name: name or path the tokenizer came from (kept in the observation space)
    :param add_special_tokens: let the tokenizer add its special tokens (e.g. BOS) to each prompt that is not
        chat-templated (a templated prompt holds the template's own)
    :param render_mode: ``"ansi"`` or ``"human"``
    :param action_mask: which tokens the env allows next, read by sb3-contrib's ``MaskablePPO`` through
        :meth:`action_masks`: a callable ``(prompt_ids, generated_ids) -> bool array over the vocabulary``,
        ``"article"``, ``{"banned": [...]}``, an :class:`~sb3_textrl.envs.masks.ActionMask` or a list of these
        (see :mod:`sb3_textrl.envs.masks`); None allows every token
    :param prompt_order_seed: seed of the prompt order alone, kept by ``reset(seed=...)``: envs given the same value
        visit the prompts in the same order, which is how the k envs of a group sample the same prompt
        (:func:`~sb3_textrl.envs.groups.make_group_vec_env`); None: the order follows the env's own seed
    :param missing_eos_penalty: subtracted from the reward of a completion that reaches ``max_new_tokens`` without a
        stop token (TRL's ``missing_eos_penalty`` of its PPO/RLOO configs, here in the env): it teaches the policy to
        finish its completions. ``info["task_reward"]`` stays the reward function's score; ``info["reward_parts"]``
        holds the penalty (``"missing_eos_penalty"``), and the step pays the sum of the parts. None or 0: no penalty
    :param length_penalty: subtracted from the reward once per generated token (stop token included), at the end of the
        episode, as ``info["reward_parts"]["length_penalty"]``; 0: none
    """

    # render_fps is unused by text rendering; declaring it (as Gymnasium's toy-text envs do) keeps
    # gymnasium.utils.env_checker.check_env free of "No render fps was declared" warnings.
    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}
    observation_space: TextObservationSpace
    action_space: spaces.Discrete

    def __init__(
        self,
        prompts: Sequence[TextPrompt | str],
        reward: RewardFn | TextReward,
        tokenizer: PreTrainedTokenizerBase,
        max_new_tokens: int = 32,
        max_prompt_tokens: int = 256,
        stop_token_ids: Sequence[int] | None = None,
        task_id: str = "TextGeneration",
        tokenizer_name: str = "",
        add_special_tokens: bool = True,
        render_mode: str | None = None,
        action_mask: MaskSpec = None,
        prompt_order_seed: int | None = None,
        missing_eos_penalty: float | None = None,
        length_penalty: float = 0.0,
    ):
        super().__init__()
        self.missing_eos_penalty = checked_penalty("missing_eos_penalty", missing_eos_penalty, task_id)
        self.length_penalty = checked_penalty("length_penalty", length_penalty, task_id)
        check_lengths_and_render_mode(max_new_tokens, max_prompt_tokens, render_mode, self.metadata["render_modes"], task_id)
        check_context(tokenizer, max_prompt_tokens, max_new_tokens, task_id)
        self.prompts = env_prompts(prompts, task_id)
        if not self.prompts:
            raise ValueError(f"{task_id}: the task has no prompts; give at least one")
        self.reward_fn = reward
        self.tokenizer = tokenizer
        self.task_id = task_id
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.render_mode = render_mode
        self.stop_token_ids = resolve_stop_ids(tokenizer, stop_token_ids, task_id)
        self.prompt_ids = self._tokenize_prompts(add_special_tokens)
        self.action_mask = resolve_action_mask(action_mask, tokenizer, self.stop_token_ids, task_id)
        self._episode_masks: dict[int, np.ndarray] = {}  # prompt index -> allowed ids, for per-episode masks
        self._allowed: np.ndarray | None = None  # (V,) mask of the current step, computed at most once
        self._n_masked_out = 0
        self.observation_space = TextObservationSpace(
            len(tokenizer), max_prompt_tokens, max_new_tokens, tokenizer_name, tokenizer_fingerprint(tokenizer)
        )
        self.action_space = spaces.Discrete(len(tokenizer))
        self._order = np.arange(len(self.prompts))
        self.prompt_order_seed = prompt_order_seed
        # Its own generator, so that the env's seed (make_vec_env gives seed + rank) does not change the order.
        self._order_rng = None if prompt_order_seed is None else np.random.default_rng(prompt_order_seed)
        self._cursor = len(self.prompts)  # forces a fresh permutation at the first reset
        self._prompt_index = 0
        self._prompt_queue: list[int] = []
        self._ids = np.zeros(max_prompt_tokens + max_new_tokens, dtype=np.int64)
        self._mask = np.zeros_like(self._ids)
        self._n_generated = 0
        # True until reset() and again once the episode ends (a stop token ends it before max_new_tokens)
        self._episode_over = True
        # Set by a batched scorer (BatchedRewardVecEnv) just before the step that ends the episode:
        # (token, completion text, task reward), used by that step instead of a call to the reward.
        self._preset: tuple[int, str, float] | None = None

    # What changes while the env runs (prompt order and position, the episode in flight, its masks, the env's own
    # random generator); the rest is made from the env's arguments.
    _RESUME_ATTRIBUTES = (
        "_order", "_order_rng", "_cursor", "_prompt_index", "_prompt_queue", "_ids", "_mask", "_n_generated",
        "_episode_over", "_allowed", "_n_masked_out", "_preset", "_episode_masks", "_np_random", "_np_random_seed",
    )

    def resume_state(self) -> dict[str, Any]:
        """
        What this env would need to continue exactly where it is, in a new process (see
        :mod:`sb3_textrl.common.resume`): its prompt order and position, the episode in flight and its generator.

        :return: a picklable dict (copies: the env goes on changing)
        """
        return copy.deepcopy({name: getattr(self, name) for name in self._RESUME_ATTRIBUTES if hasattr(self, name)})

    def restore_resume_state(self, state: dict[str, Any]) -> None:
        """
        Continue from :meth:`resume_state` (of an env of the same task and arguments).

        :param state: what :meth:`resume_state` returned
        """
        unknown = set(state) - set(self._RESUME_ATTRIBUTES)
        if unknown:
            raise ValueError(f"{self.task_id}: not a resume state of this env (unknown entries {sorted(unknown)})")
        if len(state.get("_order", self._order)) != len(self.prompts):
            raise ValueError(
                f"{self.task_id}: the resume state is of an env with {len(state['_order'])} prompts, this one has "
                f"{len(self.prompts)}: make the env with the arguments of the run that was saved"
            )
        for name, value in copy.deepcopy(state).items():
            setattr(self, name, value)

    def _tokenize_prompts(self, add_special_tokens: bool) -> list[np.ndarray]:
        # The envs of a VecEnv share their prompts' token ids (each env copies its own arrays below).
        key = ("prompt_ids", add_special_tokens, tuple((p.lm_text, p.templated is not None) for p in self.prompts))
        encoded = tokenizer_memo(self.tokenizer, key, lambda: encode_prompts(self.tokenizer, self.prompts, add_special_tokens))
        too_long = sum(len(ids) > self.max_prompt_tokens for ids in encoded)
        if too_long:
            log_once(
                f"{self.task_id}: {too_long} of {len(encoded)} prompts are longer than max_prompt_tokens="
                f"{self.max_prompt_tokens} and were truncated to their last {self.max_prompt_tokens} tokens; "
                "raise max_prompt_tokens to keep them whole."
            )
        empty = [i for i, ids in enumerate(encoded) if len(ids) == 0]
        if empty:
            raise ValueError(f"{self.task_id}: prompts {empty[:5]} are empty after tokenization; remove them")
        return [np.asarray(ids[-self.max_prompt_tokens :], dtype=np.int64) for ids in encoded]

    # -- Gymnasium API ------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """
        Start a new completion. Prompts are visited in a seeded random order, each once per pass.

        :param seed: reseeds the prompt order
        :param options: ``{"prompt_index": i}`` picks prompt ``i`` instead (so does a queue set by
            :meth:`queue_prompts`, which also serves the VecEnvs' automatic resets)
        """
        super().reset(seed=seed)
        if seed is not None and self._order_rng is None:
            self._cursor = len(self.prompts)
        if options and "prompt_index" in options:
            self._prompt_index = self._checked_index(options["prompt_index"])
        elif self._prompt_queue:
            self._prompt_index = self._prompt_queue.pop(0)
        else:
            if self._cursor >= len(self.prompts):
                rng = self.np_random if self._order_rng is None else self._order_rng
                self._order = rng.permutation(len(self.prompts))
                self._cursor = 0
            self._prompt_index = int(self._order[self._cursor])
            self._cursor += 1
        prompt = self.prompt_ids[self._prompt_index]
        self._ids[:] = 0
        self._mask[:] = 0
        self._ids[self.max_prompt_tokens - len(prompt) : self.max_prompt_tokens] = prompt
        self._mask[self.max_prompt_tokens - len(prompt) : self.max_prompt_tokens] = 1
        self._n_generated = 0
        self._episode_over = False
        self._allowed = None
        self._n_masked_out = 0
        self._preset = None
        return self._observation(), {"prompt": self.prompts[self._prompt_index].text, "prompt_index": self._prompt_index}

    def _checked_index(self, index: Any) -> int:
        index = int(index)
        if not 0 <= index < len(self.prompts):
            raise IndexError(f"{self.task_id}: prompt_index {index} out of range [0, {len(self.prompts)})")
        return index

    def queue_prompts(self, indices: list[int]) -> None:
        """
        The prompts of the next resets, in order (an empty list clears the queue); then the seeded order resumes.

        Batched generation uses it: a VecEnv resets a finished env by itself, without options, and the queue lets
        that reset start the next prompt to complete rather than a random one.

        :param indices: prompt indices
        """
        self._prompt_queue = [self._checked_index(i) for i in indices]

    def step(self, action: int | np.integer | np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        token = int(np.asarray(action).item())
        preset, self._preset = self._preset, None  # good for this step only, even if it raises
        if not 0 <= token < self.action_space.n:
            raise ValueError(f"{self.task_id}: action {token} is not a token id in [0, {self.action_space.n})")
        if self._episode_over:
            raise RuntimeError(f"{self.task_id}: step() called before reset() or after the episode ended; call reset()")
        if self.action_mask is not None and not self.action_masks()[token]:
            # Only MaskablePPO with MaskableTransformerLMPolicy samples within the mask; other callers are told once.
            self._n_masked_out += 1
            log_once(
                f"{self.task_id}: a generated token is outside the env's action mask; the mask is applied only by "
                "sb3_contrib.MaskablePPO with sb3_textrl.MaskableTransformerLMPolicy (or predict(..., action_masks=...))"
            )
        self._allowed = None
        slot = self.max_prompt_tokens + self._n_generated
        self._ids[slot] = token
        self._mask[slot] = 1
        self._n_generated += 1
        terminated, truncated = self._ends_episode(token, self._n_generated)
        reward: float = 0.0
        info: dict[str, Any] = {}
        if terminated or truncated:
            self._episode_over = True
            # A preset for another token (a wrapper changed the action) is ignored: the env scores by itself.
            reward, info = self._finish(terminated, preset if preset is not None and preset[0] == token else None)
        return self._observation(), reward, terminated, truncated, info

    def _ends_episode(self, token: int, n_generated: int) -> tuple[bool, bool]:
        """(terminated, truncated) after ``token`` became the ``n_generated``-th generated token."""
        terminated = token in self.stop_token_ids
        return terminated, not terminated and n_generated >= self.max_new_tokens

    def render(self) -> str | None:
        text = f"{self.prompts[self._prompt_index].text}[{self.completion_text()}]"
        if self.render_mode == "human":
            print(text)
            return None
        return text

    # -- helpers ------------------------------------------------------------------------------------------
    def action_masks(self) -> np.ndarray:
        """
        The tokens allowed as the next action (sb3-contrib's convention, read by ``MaskablePPO``).

        :return: (V,) bool, True = allowed; all True when the task has no ``action_mask``
        """
        if self._episode_over:
            raise RuntimeError(
                f"{self.task_id}: action_masks() called before reset() or after the episode ended; call reset()"
            )
        if self._allowed is None:
            self._allowed = self._compute_mask()
        return self._allowed

    def _compute_mask(self) -> np.ndarray:
        vocab = int(self.action_space.n)
        if self.action_mask is None:
            return np.ones(vocab, dtype=bool)
        prompt, prompt_ids = self.prompts[self._prompt_index], self.prompt_ids[self._prompt_index]
        if not self.action_mask.per_episode:
            generated = self._ids[self.max_prompt_tokens : self.max_prompt_tokens + self._n_generated]
            return self._checked_mask(self.action_mask(prompt, prompt_ids, generated.copy()))
        # A per-episode mask is kept as its allowed ids (compact), one entry per prompt.
        allowed_ids = self._episode_masks.get(self._prompt_index)
        if allowed_ids is None:
            mask = self._checked_mask(self.action_mask(prompt, prompt_ids, np.zeros(0, dtype=np.int64)))
            allowed_ids = self._episode_masks[self._prompt_index] = np.flatnonzero(mask).astype(np.int32)
        allowed = np.zeros(vocab, dtype=bool)
        allowed[allowed_ids] = True
        return allowed

    def _checked_mask(self, mask: Any) -> np.ndarray:
        vocab = int(self.action_space.n)
        mask = np.asarray(mask)
        where = f"prompt {self._prompt_index}, after {self._n_generated} generated tokens"
        if mask.shape != (vocab,):
            raise ValueError(
                f"{self.task_id}: the action mask {self.action_mask!r} returned shape {mask.shape} ({where}); it must be "
                f"a bool array of shape ({vocab},), one entry per token of the tokenizer (len(tokenizer))"
            )
        if mask.dtype != bool:
            mask = mask.astype(bool)
        if not mask.any():
            raise ValueError(
                f"{self.task_id}: the action mask {self.action_mask!r} allows no token ({where}); it must allow at least "
                "one token, e.g. the stop token (EOS) so that a completion can end"
            )
        return mask

    def _observation(self) -> dict[str, np.ndarray]:
        return {"input_ids": self._ids.copy(), "attention_mask": self._mask.copy()}

    def completion_ids(self) -> np.ndarray:
        """Token ids generated in this episode, without a final stop token."""
        generated = self._ids[self.max_prompt_tokens : self.max_prompt_tokens + self._n_generated]
        if len(generated) and int(generated[-1]) in self.stop_token_ids:
            generated = generated[:-1]
        return generated

    def completion_text(self) -> str:
        """The completion so far, decoded."""
        # decode() is typed for batches too; one sequence of ids decodes to one string
        return cast(str, self.tokenizer.decode(self.completion_ids(), skip_special_tokens=True))

    # -- batched scoring (see sb3_textrl.envs.batched) ---------------------------------------------------------
    @property
    def reward_name(self) -> str:
        """The name of the task's reward (the key of ``info["reward_parts"]``)."""
        return reward_name(self.reward_fn)

    def episode_end_preview(self, action: int | np.integer | np.ndarray) -> dict[str, Any] | None:
        """
        What the reward would be asked to score if ``action`` were the next step, without taking the step.

        :class:`~sb3_textrl.envs.batched.BatchedRewardVecEnv` calls it for every env before a vectorised step, scores
        the episodes that will end in one reward call, and hands each env its value with :meth:`preset_reward`.

        :param action: the next token
        :return: ``{"prompt", "completion", "reference"}`` if that token ends the episode, else None (also when the
            step would raise: the step itself then raises as usual)
        """
        token = int(np.asarray(action).item())
        if self._episode_over or not 0 <= token < self.action_space.n:
            return None
        if not any(self._ends_episode(token, self._n_generated + 1)):
            return None
        generated = self._ids[self.max_prompt_tokens : self.max_prompt_tokens + self._n_generated]
        if token not in self.stop_token_ids:
            generated = np.append(generated, token)  # a final stop token is not part of the completion
        prompt = self.prompts[self._prompt_index]
        completion = self.tokenizer.decode(generated, skip_special_tokens=True)
        return {"prompt": prompt.text, "completion": completion, "reference": prompt.reference}

    def preset_reward(self, action: int | np.integer | np.ndarray, completion: str, reward: float) -> None:
        """
        The task reward of the next step, scored elsewhere (in a batch with other envs' episodes).

        The next :meth:`step` uses it instead of calling the reward if that step takes ``action`` and ends the
        episode; any other step drops it, so a stale preset can never pay a wrong reward.

        :param action: the token the reward was computed for
        :param completion: the completion text scored (from :meth:`episode_end_preview`; saves decoding it again)
        :param reward: the checked task reward
        """
        self._preset = (int(np.asarray(action).item()), completion, float(reward))

    def _finish(
        self, ended_by_stop_token: bool, preset: tuple[int, str, float] | None = None
    ) -> tuple[float, dict[str, Any]]:
        prompt = self.prompts[self._prompt_index]
        if preset is not None:
            _, completion, reward = preset
        else:
            completion = self.completion_text()
            reward = float(score_batch(self.reward_fn, [prompt.text], [completion], [prompt.reference], self.task_id)[0])
        parts = {reward_name(self.reward_fn): reward}
        if self.missing_eos_penalty and not ended_by_stop_token:
            parts["missing_eos_penalty"] = -self.missing_eos_penalty
        if self.length_penalty:
            parts["length_penalty"] = -self.length_penalty * self._n_generated
        info = {
            "prompt": prompt.text,
            "prompt_index": self._prompt_index,
            "completion": completion,
            "reference": prompt.reference,
            "task_reward": reward,
            "reward_parts": parts,
            "completion_tokens": self._n_generated,
            "ended_by_stop_token": ended_by_stop_token,
        }
        if self.action_mask is not None:
            info["masked_out_tokens"] = self._n_masked_out  # generated tokens the mask did not allow (0 with MaskablePPO)
        # The step pays the task's score plus the penalties; info["task_reward"] keeps the score alone, as evaluation
        # reports it.
        return float(sum(parts.values())), info
