"""TextRolloutBuffer: a PPO rollout buffer that stores token ids compactly and yields whole episodes."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Generator, Iterable
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.type_aliases import DictRolloutBufferSamples
from stable_baselines3.common.vec_env import VecNormalize

from sb3_textrl.common import metric_keys as keys
from sb3_textrl.common.advantages import (
    ADVANTAGES,
    critic_warning,
    group_advantages,
    no_group_message,
    normalized_task_rewards,
)
from sb3_textrl.common.kl import KLReducer, penalized_rewards, token_kl
from sb3_textrl.common.sb3_bridge import find_algorithm, record_metrics, rollout_extras
from sb3_textrl.common.segments import (
    Segment,
    append_actions,
    episode_bounds,
    flat_steps,
    pack_segments,
    scatter_steps,
    segment_batch,
    split_hidden_layout,
)
from sb3_textrl.common.waits import final_waits, prompt_only, waited
from sb3_textrl.nlpo import NLPO_ALLOWED, pack_allowed, unpack_allowed
from sb3_textrl.policies import TransformerLMPolicy
from sb3_textrl.rollout_metrics import RolloutMetrics


class TextRolloutBuffer(RolloutMetrics, RolloutBuffer):
    """
    Rollout buffer for text envs, a drop-in ``rollout_buffer_class`` for SB3's ``PPO``.

    - Memory grows with tokens, not tokens × context: each episode segment keeps one observation (its context
      at the segment's first step); the later observations are that context plus the segment's own actions.
    - ``get()`` yields minibatches of whole segments, so the policy runs one teacher-forced forward per episode
      instead of one per token (exact for a causal LM).
    - Before computing advantages it adds the per-token KL penalty −β·(log π − log π_ref) to the rewards, scoring
      the reference model once per segment, adapts β when the policy's controller has a target, and records
      ``rollout/task_reward``, ``rollout/kl_to_ref``, ``rollout/kl_coef`` and ``rollout/completion_len`` in the
      algorithm's logger (:class:`~sb3_textrl.rollout_metrics.RolloutMetrics`). The estimate, the per-episode statistic
      and β's rule are :mod:`sb3_textrl.common.kl`'s. SB3 hands a buffer neither the policy nor the algorithm: both come
      through :mod:`sb3_textrl.common.sb3_bridge`.

    - With a policy built with ``trainable_layers``, it also keeps the hidden state entering the first trainable block
      at every token of every segment (from the rollout's KV cache: 4·H bytes a token in float32, context included),
      so that the reference pass and training run only the top blocks.

    Minibatches hold whole segments, so their sizes vary around ``batch_size`` steps.

    **Advantages.** ``advantage="gae"`` (default) is SB3's GAE with the policy's value head. ``"rloo"`` and ``"grpo"``
    use no critic: each completion's return is compared with the other completions of the same prompt (a *group*),
    and episodes outside a complete group are left out of the minibatches (:mod:`sb3_textrl.common.advantages` has
    the formulas and the rules). Under :func:`~sb3_textrl.envs.groups.make_group_vec_env`'s lock-step the steps in
    which a member waits for its siblings are recognised from the observations and left idle
    (:mod:`sb3_textrl.common.waits`).

    :param buffer_size: steps per env (PPO's ``n_steps``)
    :param observation_space: a text env's Dict observation space
    :param action_space: Discrete vocabulary
    :param device: torch device
    :param gae_lambda: GAE λ
    :param gamma: discount
    :param n_envs: number of envs
    :param advantage: ``"gae"``, ``"rloo"`` or ``"grpo"`` (pass it as ``rollout_buffer_kwargs=dict(advantage=...)``)
    :param normalize_rewards: standardise the task reward with running statistics of the episodes' last-step rewards
        before the KL penalty is added (:func:`~sb3_textrl.common.advantages.normalized_task_rewards`, clipped to
        ±``REWARD_CLIP``; logged as ``rollout/reward_norm_mean`` and ``rollout/reward_norm_std``, while
        ``rollout/task_reward`` stays the raw reward). The statistics live in the buffer and start afresh after ``PPO.load``
    :param kl_warn_threshold: warn (once) when ``rollout/kl_to_ref``, the mean per-completion KL to the reference in
        nats, exceeds this; None: never (:func:`~sb3_textrl.common.kl.kl_alarms`)
    :param kl_negative_tolerance: warn (once) when ``rollout/kl_to_ref`` is below −max(this, 3 standard errors of the
        mean), a sign that the sampling and the reference do not match; None: never

    ``train/explained_variance`` (SB3 computes it over every stored step) is recorded again, before it is logged, over
    the steps that were trained (:meth:`explained_variance`); it is NaN with a frozen value head (``critic=False``).

    **Hooks** (attributes, None by default; :func:`sb3_textrl.distributed.make_data_parallel` sets both):

    - ``minibatch_partition(segments, batch_size)``: how :meth:`get` splits the shuffled segments into minibatches;
      None packs them greedily into groups of at least ``batch_size`` steps.
    - ``kl_reducer(kl, n_tokens)`` (:data:`~sb3_textrl.common.kl.KLReducer`): what β adapts from. After recording
      ``rollout/kl_to_ref`` the buffer calls it, every rollout, with that statistic (None when no episode lies wholly
      in the rollout) and the rollout's sampled tokens (waiting steps excluded), and feeds the pair it returns to
      the controller's ``update`` (a returned KL of None leaves β unchanged; so does a value-head warm-up). Without
      one, β adapts from this buffer's own rollout.
    """

    ADVANTAGES = ADVANTAGES
    REWARD_CLIP = 10.0  # as VecNormalize's clip_reward: a first rollout's small std cannot blow a reward up

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        gae_lambda: float = 1,
        gamma: float = 0.99,
        n_envs: int = 1,
        advantage: str = "gae",
        normalize_rewards: bool = False,
        kl_warn_threshold: float | None = 20.0,
        kl_negative_tolerance: float | None = 0.1,
    ):
        if advantage not in self.ADVANTAGES:
            raise ValueError(f"advantage must be one of {self.ADVANTAGES}, got {advantage!r}")
        for name, value in (("kl_warn_threshold", kl_warn_threshold), ("kl_negative_tolerance", kl_negative_tolerance)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (nats per completion) or None, got {value}")
        self.advantage = advantage
        self.normalize_rewards = normalize_rewards
        self.reward_rms = RunningMeanStd(shape=())
        self.kl_warn_threshold = kl_warn_threshold
        self.kl_negative_tolerance = kl_negative_tolerance
        self._warned_kl: set[str] = set()
        self._completion_kls: list[float] = []
        self._warned_critic = False
        ids_space = observation_space.spaces.get("input_ids") if isinstance(observation_space, spaces.Dict) else None
        if ids_space is None or ids_space.shape is None:
            raise TypeError(f"TextRolloutBuffer needs a text env's Dict observation space, got {observation_space}")
        self.width = int(ids_space.shape[0])
        # Columns of the prompt (TextObservationSpace); None: no prompt region known, so no waiting steps recognised.
        self.prompt_width: int | None = getattr(observation_space, "max_prompt_tokens", None)
        self.policy: TransformerLMPolicy | None = None
        self.metrics: dict[str, float] = {}
        # Hooks (see the class docstring); sb3_textrl.distributed sets both so that the ranks agree.
        # How get() splits the shuffled segments into minibatches: (segments, batch_size) -> groups of segments.
        self.minibatch_partition: Callable[[list[Segment], int], Iterable[list[Segment]]] | None = None
        # What β adapts from: (this rollout's mean KL per episode or None, sampled tokens) -> (KL or None, tokens).
        self.kl_reducer: KLReducer | None = None
        super().__init__(
            buffer_size, observation_space, action_space, device, gae_lambda=gae_lambda, gamma=gamma, n_envs=n_envs
        )

    def reset(self) -> None:
        if getattr(self, "full", False) and self.generator_ready:
            # SB3 recorded the trained rollout's train/explained_variance over every step: record the trained steps' one
            record_metrics({keys.EXPLAINED_VARIANCE: self.explained_variance()}, prefix=keys.TRAIN)
        # Per-step arrays as in RolloutBuffer, but no per-step observations.
        shape = (self.buffer_size, self.n_envs)
        self.actions = np.zeros(shape, dtype=np.int64)
        self.rewards = np.zeros(shape, dtype=np.float32)
        self.task_rewards = np.zeros(shape, dtype=np.float32)
        self.returns = np.zeros(shape, dtype=np.float32)
        self.episode_starts = np.zeros(shape, dtype=np.float32)
        self.values = np.zeros(shape, dtype=np.float32)
        self.log_probs = np.zeros(shape, dtype=np.float32)
        self.ref_log_probs = np.zeros(shape, dtype=np.float32)
        self.advantages = np.zeros(shape, dtype=np.float32)
        self.waits = np.zeros(shape, dtype=bool)  # steps in which an env waited for its group (see the class docstring)
        # Contexts: token ids fit int32 for any vocabulary; masks are contiguous, kept as bool.
        self.contexts = np.zeros((0, self.width), dtype=np.int32)
        self.context_masks = np.zeros((0, self.width), dtype=bool)
        self._context_rows: list[tuple[np.ndarray, np.ndarray]] = []
        self.segments: list[Segment] = []
        # Indices of the segments that get() yields (None: all); set by the group advantages.
        self.trained_segments: list[int] | None = None
        self._open: list[Segment | None] = [None] * self.n_envs
        self._at_prompt = np.zeros(self.n_envs, dtype=bool)  # each env's previous step showed its prompt alone
        # NLPO: the allowed-token set of every step, one bit per token (allocated by the first step that has one).
        self.nlpo_allowed: np.ndarray | None = None
        # trainable_layers: hidden states entering the first trainable block (allocated by the first step that has one):
        # (n_ctx, H) for each context's valid tokens, and (steps, envs, H) for each step's last observation token.
        self.context_split: list[th.Tensor] = []
        self.step_split: th.Tensor | None = None
        self.generator_ready = False
        self.pos = 0
        self.full = False

    def add(  # type: ignore[override]
        self,
        obs: dict[str, np.ndarray],
        action: np.ndarray,
        reward: np.ndarray,
        episode_start: np.ndarray,
        value: th.Tensor,
        log_prob: th.Tensor,
    ) -> None:
        """Store one step of every env (same arguments as SB3's RolloutBuffer.add)."""
        extras = rollout_extras(log_prob)  # the policy and NLPO's sets, from the policy's forward (see sb3_bridge)
        policy = extras.policy
        if policy is not None:
            self.policy = policy
        if np.issubdtype(np.asarray(obs["input_ids"]).dtype, np.floating):
            raise TypeError(
                "TextRolloutBuffer got float observations of token ids: the env is probably wrapped in VecNormalize with "
                "norm_obs=True, which turns the ids into noise. Use VecNormalize(venv, norm_obs=False, norm_reward=True) "
                "to normalise rewards only, or rollout_buffer_kwargs=dict(normalize_rewards=True)"
            )
        at_prompt = prompt_only(obs["attention_mask"], self.prompt_width)
        after_done = np.asarray(episode_start).astype(bool).reshape(self.n_envs)
        # An observation without generated tokens begins an episode, whatever SB3's episode_start says (after a wait).
        begins = after_done | at_prompt
        new_contexts = self._extend_segments(obs, begins, waited(self._at_prompt, at_prompt, after_done))
        self._at_prompt = at_prompt
        if policy is not None and policy.layer_split is not None:
            self._keep_split_hidden(policy, obs, new_contexts)
        self.actions[self.pos] = np.asarray(action).reshape(self.n_envs)
        self.rewards[self.pos] = np.asarray(reward)
        self.task_rewards[self.pos] = np.asarray(reward)
        self.episode_starts[self.pos] = begins
        self.values[self.pos] = value.clone().cpu().numpy().flatten()
        self.log_probs[self.pos] = log_prob.clone().cpu().numpy().flatten()
        if extras.nlpo_allowed is not None:
            packed = pack_allowed(extras.nlpo_allowed)  # (n_envs, ceil(V / 8))
            if self.nlpo_allowed is None:
                self.nlpo_allowed = np.zeros((self.buffer_size, *packed.shape), dtype=np.uint8)
            self.nlpo_allowed[self.pos] = packed
        self.pos += 1
        if self.pos == self.buffer_size:
            self.full = True
            if policy is not None:
                policy.bootstrap_after_rollout = True
            self.contexts = np.stack([ids for ids, _ in self._context_rows])
            self.context_masks = np.stack([mask for _, mask in self._context_rows])

    def _extend_segments(self, obs: dict[str, np.ndarray], begins: np.ndarray, wait_before: np.ndarray) -> list[int]:
        """
        Put each env's step in its episode segment: one more step of the open one, or a new one storing its context.

        :param obs: the step's observations
        :param begins: (n_envs,) bool, whether the step begins an episode
        :param wait_before: (n_envs,) bool, whether the env's previous step waited for its group (lock-step)
        :return: the envs whose context was stored at this step
        """
        new_contexts = []
        for env in range(self.n_envs):
            segment = self._open[env]
            if segment is not None and not begins[env]:
                segment.length += 1  # the common case: one more token of an open episode, no context to store
                continue
            ids, mask = obs["input_ids"][env].astype(np.int32), obs["attention_mask"][env].astype(bool)
            if segment is not None and wait_before[env]:
                # The prompt again, no token generated and no episode ended: the previous step waited for the group.
                self.waits[segment.start, env] = True
                segment.start = self.pos  # the episode (of length 1 so far) starts here instead
                held_ids, held_mask = self._context_rows[segment.context]
                if not (np.array_equal(ids, held_ids) and np.array_equal(mask, held_mask)):
                    self._context_rows.append((ids, mask))
                    segment.context = len(self._context_rows) - 1
                    new_contexts.append(env)
                continue
            # A new episode starts here: its context is stored once, its later steps are its own actions.
            self._context_rows.append((ids, mask))
            segment = Segment(env, self.pos, 1, len(self._context_rows) - 1)
            self.segments.append(segment)
            self._open[env] = segment
            new_contexts.append(env)
        return new_contexts

    def _mark_final_waits(self, dones: np.ndarray) -> None:
        """Tell whether the rollout's last step waited too: the observation after it shows the same prompt alone."""
        algorithm = find_algorithm()
        if getattr(algorithm, "rollout_buffer", None) is not self:
            return  # not filled by an algorithm's collect_rollouts(): the last step stays a start
        # collect_rollouts() sets _last_obs to the observation after the rollout
        waited = final_waits(self._at_prompt, getattr(algorithm, "_last_obs", None), dones, self.prompt_width, self.width)
        self.waits[self.buffer_size - 1, waited] = True
        idle = {id(self._open[env]) for env in np.flatnonzero(waited)}
        self.segments = [s for s in self.segments if id(s) not in idle]
        for env in np.flatnonzero(waited):
            self._open[env] = None

    def _keep_split_hidden(self, policy: TransformerLMPolicy, obs: dict[str, np.ndarray], new_contexts: list[int]) -> None:
        """Keep the step's hidden states at the first trainable block: whole contexts of new segments, else the last token."""
        ids = th.as_tensor(obs["input_ids"], device=self.device).long()
        mask = th.as_tensor(obs["attention_mask"], device=self.device).long()
        hidden = policy.split_hidden(ids, mask)  # (n_envs, L, H)
        if self.step_split is None:
            self.step_split = hidden.new_zeros(self.buffer_size, self.n_envs, hidden.shape[-1])
        last = self.width - 1 - mask.flip(dims=[1]).argmax(dim=1)  # (n_envs,) column of each observation's last token
        self.step_split[self.pos] = hidden[th.arange(self.n_envs, device=hidden.device), last]
        for env in new_contexts:
            self.context_split.append(hidden[env, mask[env].bool()].clone())  # (n_ctx, H)

    # -- KL penalty, advantages, metrics -------------------------------------------------------------------
    def compute_returns_and_advantage(self, last_values: th.Tensor, dones: np.ndarray) -> None:
        """Apply the KL penalty to the rewards, then SB3's GAE; record the rollout's text metrics."""
        self._mark_final_waits(dones)
        kl = np.zeros_like(self.rewards)
        policy = self.policy
        if policy is not None:
            policy.note_rollout()
            self._check_warmup(policy)
        task_rewards = self.task_rewards
        norm_metrics: dict[str, float] = {}
        if self.normalize_rewards:
            task_rewards, norm_metrics = normalized_task_rewards(
                self.task_rewards, self.episode_starts, dones, self.reward_rms, self.REWARD_CLIP
            )
        self.rewards = task_rewards.copy()
        if policy is not None and policy.kl_controller.enabled:
            self.ref_log_probs = self._score_reference(policy)
            kl = token_kl(self.log_probs, self.ref_log_probs, idle=self.waits)  # a wait samples nothing
            self.rewards = penalized_rewards(task_rewards, kl, policy.kl_controller.value)
        self._check_critic(policy)
        if self.advantage == "gae":
            super().compute_returns_and_advantage(last_values, dones)
            group_metrics: dict[str, float] = {}
        else:
            group_metrics = self._group_advantages(dones)
        self.metrics = self._episode_metrics(kl, dones) | group_metrics | norm_metrics
        if self.advantage == "gae" and self.waits.any():  # e.g. GAE on a lock-step VecEnv: waits are idle there too
            self.metrics[keys.GROUP_WAIT_STEPS] = float(self.waits.sum())
        if policy is not None:
            self.metrics[keys.KL_COEF] = policy.kl_controller.value
        self._adapt_kl_coef(policy)
        if policy is not None and policy.kl_controller.enabled:
            self._check_kl(policy)
        record_metrics(self.metrics)

    def _adapt_kl_coef(self, policy: TransformerLMPolicy | None) -> None:
        """Feed this rollout's ``kl_to_ref`` (through ``kl_reducer``, if set) to β's controller."""
        observed, n_tokens = self.metrics.get(keys.KL_TO_REF), int(self.waits.size - self.waits.sum())
        if self.kl_reducer is not None:  # called on every rollout: under data parallel it is a collective
            observed, n_tokens = self.kl_reducer(observed, n_tokens)
        # During a value-head warm-up the policy does not move: its KL says nothing about β.
        if policy is not None and observed is not None and not policy.in_value_warmup:
            policy.kl_controller.update(observed, n_tokens)

    def _check_critic(self, policy: TransformerLMPolicy | None) -> None:
        warning = None if policy is None else critic_warning(self.advantage, getattr(policy, "critic", True))
        if warning is not None and not self._warned_critic:
            self._warned_critic = True
            warnings.warn(warning, stacklevel=3)

    def _check_warmup(self, policy: TransformerLMPolicy) -> None:
        algorithm = find_algorithm()
        if policy.in_value_warmup and getattr(algorithm, "vf_coef", None) == 0:
            raise ValueError(
                f"value_warmup_rollouts={policy.value_warmup_rollouts} trains the value head alone, but vf_coef=0 gives it "
                "no loss: use vf_coef > 0 (PPO's default is 0.5) or drop value_warmup_rollouts"
            )

    def _group_advantages(self, dones: np.ndarray) -> dict[str, float]:
        """RLOO / GRPO advantages (:mod:`sb3_textrl.common.advantages`); returns the group metrics."""
        starts_here, ends_here = episode_bounds(self.segments, self.episode_starts, dones, self.buffer_size)
        # Siblings: episodes that start the same context (prompt, padding included) at the same step (after any waits,
        # so members that waited for different numbers of steps meet).
        rows = [self._context_rows[s.context] for s in self.segments]
        group_keys = [
            (s.start, ids.tobytes() + mask.tobytes()) if here else None
            for s, (ids, mask), here in zip(self.segments, rows, starts_here)
        ]
        advantages, self.trained_segments, n_groups = group_advantages(
            self.advantage, self.segments, group_keys, ends_here, self.rewards
        )
        self.advantages[:] = advantages
        self.returns = self.advantages + self.values
        waits = int(self.waits.sum())
        dropped = self.buffer_size * self.n_envs - waits - sum(self.segments[i].length for i in self.trained_segments)
        if not n_groups:
            warnings.warn(no_group_message(self.advantage, training=False), stacklevel=3)
        return {keys.GROUPS: float(n_groups), keys.GROUP_DROPPED_STEPS: float(dropped), keys.GROUP_WAIT_STEPS: float(waits)}

    def _score_reference(self, policy: TransformerLMPolicy, steps_per_batch: int = 512) -> np.ndarray:
        """log π_ref of every stored action: one no-grad forward per segment, about ``steps_per_batch`` at a time."""
        ref = np.zeros_like(self.log_probs)
        for chunk in self._pack(list(range(len(self.segments))), steps_per_batch):
            actions = th.as_tensor(self._flat(self.actions, chunk), device=self.device)
            self._scatter(ref, chunk, self._reference_log_probs(policy, chunk, actions).cpu().numpy())
        return ref

    def _reference_log_probs(self, policy: TransformerLMPolicy, chunk: list[Segment], actions: th.Tensor) -> th.Tensor:
        """(N,) log π_ref of one chunk's actions, segment after segment (MaskableTextRolloutBuffer adds the masks)."""
        return policy.reference_log_probs(self.segment_batch(chunk), actions)

    # -- minibatches of whole segments --------------------------------------------------------------------
    def get(self, batch_size: int | None = None) -> Generator[DictRolloutBufferSamples, None, None]:  # type: ignore[override]
        """Minibatches of whole segments in random order, each of at least ``batch_size`` steps but the last."""
        assert self.full, "The rollout buffer is not full yet"
        self.generator_ready = True
        if self.trained_segments is None:
            order = list(np.random.permutation(len(self.segments)))
        else:  # group advantages: the episodes of complete groups only
            if not self.trained_segments:
                # SB3's train() would fail on its first minibatch-free epoch with an UnboundLocalError on `loss`.
                raise RuntimeError(no_group_message(self.advantage, training=True))
            order = [self.trained_segments[i] for i in np.random.permutation(len(self.trained_segments))]
        batch_size = batch_size or self.buffer_size * self.n_envs
        if self.minibatch_partition is not None:
            chunks: Iterable[list[Segment]] = self.minibatch_partition([self.segments[i] for i in order], batch_size)
        else:
            chunks = self._pack(order, batch_size)
        for chunk in chunks:
            yield self._get_samples(chunk)

    def _pack(self, order: list[int], batch_size: int) -> Generator[list[Segment], None, None]:
        return pack_segments([self.segments[i] for i in order], batch_size)

    def _flat(self, array: np.ndarray, chunk: list[Segment]) -> np.ndarray:
        """Per-step values of the chunk's segments, segment after segment."""
        return flat_steps(array, chunk)

    @staticmethod
    def _scatter(array: np.ndarray, chunk: list[Segment], values: np.ndarray) -> None:
        scatter_steps(array, chunk, values)

    def segment_batch(self, chunk: list[Segment]) -> dict[str, th.Tensor]:
        """
        The policy's input for a chunk of stored segments, as training gets it (:mod:`sb3_textrl.common.segments`):
        each row its segment's context and actions; pair it with ``flat_steps(buffer.actions, chunk)``.
        """
        contexts = [s.context for s in chunk]
        actions = [self.actions[s.start : s.start + s.length, s.env] for s in chunk]
        ids, mask, starts = append_actions(self.contexts[contexts], self.context_masks[contexts], actions)
        split = None
        if self.step_split is not None:
            later = [self.step_split[s.start + 1 : s.start + s.length, s.env] for s in chunk]  # (length - 1, H) each
            split = split_hidden_layout([self.context_split[i] for i in contexts], later, starts, self.width)
        return segment_batch(ids, mask, starts, [s.length for s in chunk], self.device, split)

    def _get_samples(  # type: ignore[override]
        self, chunk: list[Segment], env: VecNormalize | None = None
    ) -> DictRolloutBufferSamples:
        def flat(array: np.ndarray) -> th.Tensor:
            return self.to_torch(self._flat(array, chunk).astype(np.float32))

        observations = self.segment_batch(chunk)
        if self.nlpo_allowed is not None:  # the rollout's NLPO sets, so training masks exactly as the rollout did
            n_tokens = int(self.action_space.n)  # type: ignore[attr-defined]
            allowed = unpack_allowed(self._flat(self.nlpo_allowed, chunk), n_tokens)
            observations[NLPO_ALLOWED] = th.as_tensor(allowed, device=self.device)
        return DictRolloutBufferSamples(
            observations=observations,
            actions=flat(self.actions),
            old_values=flat(self.values),
            old_log_prob=flat(self.log_probs),
            advantages=flat(self.advantages),
            returns=flat(self.returns),
        )

    def size_in_bytes(self) -> dict[str, Any]:
        """Memory held by the buffer's arrays, to check that it grows with tokens, not tokens × context."""
        sizes = {k: v.nbytes for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}
        if self.step_split is not None:  # trainable_layers: O(tokens × hidden)
            sizes["step_split"] = self.step_split.nbytes
            sizes["context_split"] = sum(t.nbytes for t in self.context_split)
        return sizes | {"total": sum(sizes.values())}
