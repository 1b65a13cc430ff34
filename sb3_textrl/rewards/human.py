"""A human in the loop as the reward: finished episodes go to the feedback store, raters score them 1-5 on the rating
page (``sb3-textrl rate``), and the env waits for the scores.

Meant for small live runs, as in the classic RLHF loop (generate, let people judge, reinforce). Every rating stays in
the store, so the same judgements later train a reward model (``sb3-textrl train-rm``) that replaces the people.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import numpy as np

from sb3_textrl.rewards.base import RewardFn, TextReward

logger = logging.getLogger(__name__)

UNRATED_POLICIES = ("neutral", "fallback", "error")


def rating_to_reward(score: float) -> float:
    """Map a 1-5 rating to [-1, 1]: 3 (neutral) gives 0, 5 gives 1, 1 gives -1."""
    return (float(score) - 3.0) / 2.0


class HumanReward(TextReward):
    """
    Reward = the rating a person gives the completion on the rating page, mapped from 1..5 to [-1, 1].

    Each call stores the prompts and completions, asks for a rating of each completion and waits, polling the
    store, until all are rated or ``timeout_s`` passes. Episodes still unrated then get a reward by the
    ``unrated`` policy; their rating requests stay open (a late rating is still kept as reward-model data).

    With a VecEnv of several envs, each env waits for its own episode: use ``SubprocVecEnv`` so that the
    episodes of a rollout are shown to raters together rather than one after the other.

    :param db: path of the feedback database (created if missing); start ``sb3-textrl rate --db DB`` beside the run
    :param timeout_s: seconds to wait for the ratings of one call; None waits for ever
    :param unrated: what an episode unrated at the timeout gets: ``"neutral"`` (``neutral_reward``, the reward of a
        rating of 3), ``"fallback"`` (the ``fallback`` reward's score) or ``"error"`` (raise ``TimeoutError``)
    :param fallback: reward used for unrated episodes when ``unrated="fallback"``
    :param neutral_reward: reward of an unrated episode when ``unrated="neutral"``
    :param poll_interval_s: seconds between two looks at the store
    :param model_label: recorded as the model of the stored candidates
    :param task: recorded as the task of the stored prompts
    """

    name = "human"

    def __init__(
        self,
        db: str | os.PathLike,
        timeout_s: float | None = 600.0,
        unrated: str = "neutral",
        fallback: RewardFn | TextReward | None = None,
        neutral_reward: float = 0.0,
        poll_interval_s: float = 0.5,
        model_label: str = "policy",
        task: str | None = None,
    ) -> None:
        super().__init__()
        if unrated not in UNRATED_POLICIES:
            raise ValueError(f"unrated={unrated!r}: choose one of {', '.join(UNRATED_POLICIES)}")
        if unrated == "fallback" and fallback is None:
            raise ValueError("unrated='fallback' needs a fallback reward: HumanReward(db, unrated='fallback', fallback=...)")
        if timeout_s is not None and timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0 or None, got {timeout_s}")
        self.db = os.fspath(db)
        self.timeout_s = timeout_s
        self.unrated = unrated
        self.fallback = fallback
        self.neutral_reward = neutral_reward
        self.poll_interval_s = poll_interval_s
        self.model_label = model_label
        self.task = task
        self.n_rated = 0
        self.n_unrated = 0
        # Completions of the same prompt share one prompt row, so their ratings also pair up for reward models.
        self._prompt_ids: dict[str, int] = {}
        self._store = None

    def _open_store(self):
        if self._store is None:
            from sb3_textrl.feedback import FeedbackStore

            self._store = FeedbackStore(self.db)
        return self._store

    def _request(self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str | None]) -> list[int]:
        store = self._open_store()
        candidate_ids = []
        for prompt, completion, reference in zip(prompts, completions, references):
            if prompt not in self._prompt_ids:
                self._prompt_ids[prompt] = store.add_prompt(prompt, task=self.task, reference=reference)
            candidate_id = store.add_candidate(self._prompt_ids[prompt], completion, model=self.model_label)
            store.request_rating(candidate_id)
            candidate_ids.append(candidate_id)
        return candidate_ids

    def _wait(self, candidate_ids: list[int]) -> dict[int, float]:
        store = self._open_store()
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while True:
            ratings = store.ratings(candidate_ids)
            if len(ratings) == len(candidate_ids) or (deadline is not None and time.monotonic() >= deadline):
                return ratings
            time.sleep(self.poll_interval_s)

    def score(self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str | None]) -> np.ndarray:
        candidate_ids = self._request(prompts, completions, references)
        ratings = self._wait(candidate_ids)
        rewards = np.full(len(candidate_ids), np.nan)
        missing = []
        for position, candidate_id in enumerate(candidate_ids):
            if candidate_id in ratings:
                rewards[position] = rating_to_reward(ratings[candidate_id])
            else:
                missing.append(position)
        self.n_rated += len(candidate_ids) - len(missing)
        self.n_unrated += len(missing)
        if missing:
            self._fill_unrated(rewards, missing, prompts, completions, references)
        return rewards

    def _fill_unrated(
        self,
        rewards: np.ndarray,
        missing: list[int],
        prompts: Sequence[str],
        completions: Sequence[str],
        references: Sequence[str | None],
    ) -> None:
        message = (
            f"HumanReward: {len(missing)} of {len(rewards)} episodes were not rated within {self.timeout_s} s "
            f"(open the rating page: sb3-textrl rate --db {self.db})"
        )
        if self.unrated == "error":
            raise TimeoutError(message + "; pass unrated='neutral' or 'fallback' to go on without them.")
        if self.unrated == "neutral":
            rewards[missing] = self.neutral_reward
            logger.warning("%s; they get the neutral reward %s.", message, self.neutral_reward)
            return
        assert self.fallback is not None
        scores = self.fallback(
            [prompts[i] for i in missing], [completions[i] for i in missing], [references[i] for i in missing]
        )
        rewards[missing] = np.asarray(scores, dtype=np.float64)
        logger.warning("%s; they get the fallback reward.", message)

    def close(self) -> None:
        """Close the store connection."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def __getstate__(self) -> dict:
        # SubprocVecEnv pickles the env factory: connections do not travel, each process opens its own.
        state = self.__dict__.copy()
        state["_store"] = None
        return state
