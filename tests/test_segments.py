"""The episode-segment layout's one home, sb3_textrl.common.segments: its index arithmetic on hand-made rows, and the
buffer and the evaluation's KL building the same batch for the same episodes."""

from __future__ import annotations

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from test_kl import one_rollout

from sb3_textrl import policies
from sb3_textrl.common import segments
from sb3_textrl.common.segments import (
    SEGMENT_LENGTHS,
    SEGMENT_STARTS,
    Segment,
    action_hidden,
    action_positions,
    append_actions,
    completion_batch,
    episode_bounds,
    flat_steps,
    pack_segments,
    scatter_steps,
    segment_batch,
    split_hidden_layout,
    used_columns,
)
from sb3_textrl.evaluation import Sample, kl_to_reference

PAD = 9


# -- by hand ----------------------------------------------------------------------------------------------------
def hand_made():
    """Two segments in rows of 8 columns: a 3-token context with 3 actions, a 1-token context with 9 (cut to 7)."""
    contexts = np.array([[PAD, PAD, 11, 12, 13, 0, 0, 0], [21, 0, 0, 0, 0, 0, 0, 0]], dtype=np.int32)
    masks = contexts > 0
    masks[0, :2] = False  # left padding
    actions = [np.array([31, 32, 33]), np.arange(41, 50)]
    return contexts, masks, actions


def test_action_positions_by_hand():
    rows, columns = action_positions(th.tensor([4, 1]), th.tensor([3, 2]))
    assert rows.tolist() == [0, 0, 0, 1, 1]
    assert columns.tolist() == [4, 5, 6, 1, 2]
    rows, columns = action_positions(th.tensor([2, 5, 0]), th.tensor([1, 0, 2]))  # an empty segment takes no row
    assert rows.tolist() == [0, 2, 2] and columns.tolist() == [2, 0, 1]
    hidden = th.arange(2 * 8 * 1.0).reshape(2, 8, 1)  # (S, W, H): value = 8 * row + column
    assert action_hidden(hidden, th.tensor([4, 1]), th.tensor([3, 2])).squeeze(1).tolist() == [4, 5, 6, 9, 10]


def test_append_actions_writes_each_segment_after_its_context():
    contexts, masks, actions = hand_made()
    ids, mask, starts = append_actions(contexts, masks, actions)
    assert starts.tolist() == [4, 0]  # the context's last token predicts the first action
    assert ids.dtype == np.int64 and mask.dtype == bool
    assert ids.tolist() == [[PAD, PAD, 11, 12, 13, 31, 32, 33], [21, 41, 42, 43, 44, 45, 46, 47]]  # cut at the width
    assert mask.tolist() == [[False, False] + [True] * 6, [True] * 8]
    assert contexts[0, 5] == 0 and not masks[0, 5]  # the inputs are copied, not modified
    # The token after each predicting column is the action it predicts.
    lengths = th.tensor([3, 7])
    rows, columns = action_positions(th.as_tensor(starts), lengths)
    assert ids[rows.numpy(), columns.numpy() + 1].tolist() == [31, 32, 33, 41, 42, 43, 44, 45, 46, 47]
    assert used_columns(th.as_tensor(mask), th.as_tensor(starts), lengths) == (0, 7)
    assert used_columns(th.as_tensor(mask[:1]), th.as_tensor(starts[:1]), lengths[:1]) == (2, 7)


def test_completion_batch_reads_the_segments_off_finished_rows():
    contexts, masks, actions = hand_made()
    ids, mask, starts = append_actions(contexts[:1], masks[:1], actions[:1])
    batch, flat_actions = completion_batch(ids.astype(np.int32), mask, np.array([3]), "cpu")
    expected = segment_batch(ids, mask, starts, [3], "cpu")
    assert batch.keys() == expected.keys() == {"input_ids", "attention_mask", SEGMENT_STARTS, SEGMENT_LENGTHS}
    for key, value in expected.items():
        assert value.dtype == th.int64 and th.equal(batch[key], value), key
    assert flat_actions.dtype == th.int64 and flat_actions.tolist() == [31, 32, 33]


def test_split_hidden_layout_by_hand():
    contexts = [th.full((3, 2), 1.0), th.full((1, 2), 2.0)]  # (n_ctx, H) each
    later = [th.tensor([[5.0, 5.0], [6.0, 6.0]]), th.arange(16.0).reshape(8, 2)]  # (length - 1, H) each
    split = split_hidden_layout(contexts, later, np.array([4, 0]), width=8)
    assert split.shape == (2, 8, 2)
    assert split[0, :, 0].tolist() == [0, 0, 1, 1, 1, 5, 6, 0]  # the last action's column stays 0
    assert split[1, :, 0].tolist() == [2, 0, 2, 4, 6, 8, 10, 12]  # later steps cut at the width


def test_steps_of_segments_by_hand():
    # Env 0: an episode cut by the rollout's start (steps 0-1), then one to its end (2-3); env 1: one episode (0-3).
    segments = [Segment(0, 0, 2, 0), Segment(0, 2, 2, 1), Segment(1, 0, 4, 2)]
    steps = np.arange(8).reshape(4, 2)  # (buffer_size, n_envs): value = 2 * step + env
    assert flat_steps(steps, segments).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert flat_steps(steps, []).shape == (0,)
    out = np.zeros_like(steps)
    scatter_steps(out, segments[1:], np.arange(1, 7))
    assert out.tolist() == [[0, 3], [0, 4], [1, 5], [2, 6]]
    assert [[s.length for s in chunk] for chunk in pack_segments(segments, 3)] == [[2, 2], [4]]
    episode_starts = np.array([[0, 1], [0, 0], [1, 0], [0, 0]])
    assert episode_bounds(segments, episode_starts, np.array([True, False]), 4) == ([False, True, True], [True, True, False])


def test_policies_keep_the_keys():
    assert (policies.SEGMENT_STARTS, policies.SEGMENT_LENGTHS, policies.SPLIT_HIDDEN) == (
        segments.SEGMENT_STARTS,
        segments.SEGMENT_LENGTHS,
        segments.SPLIT_HIDDEN,
    )


# -- the buffer and the evaluation build the same batch ----------------------------------------------------------
class TerminalObservations(BaseCallback):
    """(buffer step, env) -> (the episode's last observation, its completion_tokens), from SB3's infos."""

    def __init__(self) -> None:
        super().__init__()
        self.ends: dict[tuple[int, int], tuple[dict[str, np.ndarray], int]] = {}

    def _on_step(self) -> bool:
        pos = self.model.rollout_buffer.pos  # called before the step is added
        for env in np.flatnonzero(self.locals["dones"]):
            info = self.locals["infos"][env]
            self.ends[(pos, int(env))] = (info["terminal_observation"], info["completion_tokens"])
        return True


def test_buffer_and_kl_to_reference_build_the_same_segment_batch(ragged_task, tiny_lm, monkeypatch):
    ends = TerminalObservations()
    model, _ = one_rollout(ragged_task, tiny_lm, callbacks=[ends])
    buffer = model.rollout_buffer
    whole = [
        s for s in buffer.segments if buffer.episode_starts[s.start, s.env] and (s.start + s.length - 1, s.env) in ends.ends
    ]
    assert 1 < len(whole) < len(buffer.segments)  # ragged stops: some episodes are cut by the rollout's ends
    samples = []
    for s in whole:
        observation, n_tokens = ends.ends[(s.start + s.length - 1, s.env)]
        assert n_tokens == s.length
        samples.append(Sample(0, "", "", None, 0.0, n_tokens, observation=observation))

    seen = []
    reference_log_probs = model.policy.reference_log_probs

    def spy(obs, actions):
        seen.append((obs, actions))
        return reference_log_probs(obs, actions)

    monkeypatch.setattr(model.policy, "reference_log_probs", spy)
    kl_to_reference(model.policy, samples, batch_size=len(samples))
    ((evaluated, actions),) = seen  # one batch of every episode
    stored = buffer.segment_batch(whole)
    assert evaluated.keys() == stored.keys()
    for key, value in stored.items():
        assert evaluated[key].dtype == value.dtype and th.equal(evaluated[key], value), key
    assert actions.tolist() == flat_steps(buffer.actions, whole).tolist()
