"""The episode-segment layout: how whole episodes are batched for one teacher-forced forward each, in one place.

A *segment* is a run of one env's actions scored together: the steps between two episode starts in
:class:`~sb3_textrl.buffers.TextRolloutBuffer`, or one finished completion in
:func:`~sb3_textrl.evaluation.kl_to_reference`. Its row of the batch is its context (the observation at its first
step) with its actions written after the context's last valid token. In a causal LM the hidden state of the context's
last token predicts the first action, the next column the second, and so on::

    input_ids       pad pad  p0  p1  p2  a0  a1  a2   0   0      (one row, W columns)
    attention_mask    0   0   1   1   1   1   1   1   0   0
    start                             ^ column 4 (p2)             length 3
    hidden state at columns 4, 5, 6 predicts a0, a1, a2

A segment batch is the dict that the policies' ``evaluate_actions`` and ``reference_log_probs`` read:

- ``input_ids``, ``attention_mask``: (S, W) int64, one row per segment
- :data:`SEGMENT_STARTS`: (S,) column of the hidden state that predicts the segment's first action
- :data:`SEGMENT_LENGTHS`: (S,) number of actions in the segment; the N = Σ lengths actions come segment after segment
- :data:`SPLIT_HIDDEN` (only with ``trainable_layers``): (S, W, H) hidden states entering the first trainable block, in
  the columns of ``input_ids``

:func:`segment_batch` builds it (the buffer from stored contexts and actions via :func:`append_actions`, the
evaluation from finished observations via :func:`completion_batch`); :func:`action_positions` and
:func:`action_hidden` are the index arithmetic a policy needs to read each action's hidden state off its forward.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch as th

# Keys of a segment batch (besides input_ids and attention_mask).
SEGMENT_STARTS = "segment_starts"  # (S,) column of the hidden state that predicts the segment's first action
SEGMENT_LENGTHS = "segment_lengths"  # (S,) number of actions in the segment
# With trainable_layers: (S, W, H) hidden states entering the first trainable block, in the columns of input_ids.
SPLIT_HIDDEN = "split_hidden"


@dataclass
class Segment:
    """The steps of one env between two episode starts (or the ends of the buffer)."""

    env: int
    start: int  # first step in the buffer
    length: int  # number of steps
    context: int  # row in ``contexts``: the observation at the first step


def episode_bounds(
    segments: Sequence[Segment], episode_starts: np.ndarray, dones: np.ndarray, buffer_size: int
) -> tuple[list[bool], list[bool]]:
    """
    Which segments start their episode in the rollout, and which end it there (a done, or the next episode's start).

    :param segments: a buffer's segments
    :param episode_starts: (buffer_size, n_envs) the buffer's episode starts
    :param dones: (n_envs,) the dones after the rollout's last step
    :param buffer_size: steps per env
    :return: ``(starts_here, ends_here)``, one bool per segment each
    """
    starts_here = [bool(episode_starts[s.start, s.env]) for s in segments]
    ends_here = [s.start + s.length < buffer_size or bool(dones[s.env]) for s in segments]
    return starts_here, ends_here


def flat_steps(array: np.ndarray, segments: Iterable[Segment]) -> np.ndarray:
    """(buffer_size, n_envs, ...) per-step values -> (N, ...) those of the segments' steps, segment after segment."""
    steps = [array[s.start : s.start + s.length, s.env] for s in segments]
    return np.concatenate(steps) if steps else np.zeros((0, *array.shape[2:]), dtype=array.dtype)


def scatter_steps(array: np.ndarray, segments: Iterable[Segment], values: np.ndarray) -> None:
    """The inverse of :func:`flat_steps`: write (N, ...) ``values`` into the segments' steps of ``array``."""
    offset = 0
    for s in segments:
        array[s.start : s.start + s.length, s.env] = values[offset : offset + s.length]
        offset += s.length


def pack_segments(segments: Iterable[Segment], batch_size: int) -> Generator[list[Segment], None, None]:
    """Consecutive groups of ``segments`` of at least ``batch_size`` steps each (the last may hold fewer)."""
    chunk: list[Segment] = []
    steps = 0
    for segment in segments:
        chunk.append(segment)
        steps += segment.length
        if steps >= batch_size:
            yield chunk
            chunk, steps = [], 0
    if chunk:
        yield chunk


def last_valid_columns(attention_mask: np.ndarray) -> np.ndarray:
    """(S, W) mask -> (S,) int64 column of each row's last valid token (rows need at least one)."""
    mask = np.asarray(attention_mask).astype(bool)
    return (mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)).astype(np.int64)


def append_actions(
    contexts: np.ndarray, context_masks: np.ndarray, actions: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """
    Rows of a segment batch from contexts: each segment's actions written after its context's last valid token.

    Actions past the last column are left out (the segment's last action is never an input of its own segment).

    :param contexts: (S, W) token ids of each segment's context (copied, not modified)
    :param context_masks: (S, W) their attention masks
    :param actions: S arrays, the actions of each segment
    :return: ``(input_ids (S, W) int64, attention_mask (S, W) bool, starts (S,) int64)``
    """
    ids = np.array(contexts, dtype=np.int64)  # (S, W)
    mask = np.array(context_masks, dtype=bool)  # (S, W)
    width = ids.shape[1]
    starts = last_valid_columns(mask)  # (S,) the context's last token predicts the first action
    for row, (last, tokens) in enumerate(zip(starts.tolist(), actions)):
        n = min(len(tokens), width - last - 1)
        ids[row, last + 1 : last + 1 + n] = tokens[:n]
        mask[row, last + 1 : last + 1 + n] = True
    return ids, mask, starts


def segment_actions(input_ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(S, W) ids, (S,) starts, (S,) lengths -> (N,) the actions read off the rows, segment after segment."""
    return np.concatenate([row[start + 1 : start + 1 + n] for row, start, n in zip(input_ids, starts, lengths)])


def segment_batch(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    starts: np.ndarray,
    lengths: Sequence[int] | np.ndarray,
    device: th.device | str,
    split_hidden: th.Tensor | None = None,
) -> dict[str, th.Tensor]:
    """
    A segment batch (see the module docstring) on ``device``.

    :param input_ids: (S, W) token ids, each row a context with its segment's actions after it
    :param attention_mask: (S, W) their mask (bool or int)
    :param starts: (S,) column of the hidden state predicting each segment's first action
    :param lengths: (S,) actions per segment
    :param device: torch device of the tensors
    :param split_hidden: (S, W, H) hidden states at the first trainable block (``trainable_layers``), or None
    :return: the dict of tensors, int64 but ``split_hidden``
    """
    batch = {
        "input_ids": th.as_tensor(np.asarray(input_ids, dtype=np.int64), device=device),  # (S, W)
        "attention_mask": th.as_tensor(np.asarray(attention_mask).astype(np.int64), device=device),  # (S, W)
        SEGMENT_STARTS: th.as_tensor(np.asarray(starts, dtype=np.int64), device=device),  # (S,)
        SEGMENT_LENGTHS: th.as_tensor(np.asarray(lengths, dtype=np.int64), device=device),  # (S,)
    }
    if split_hidden is not None:
        batch[SPLIT_HIDDEN] = split_hidden  # (S, W, H)
    return batch


def completion_batch(
    input_ids: np.ndarray, attention_mask: np.ndarray, lengths: np.ndarray, device: th.device | str
) -> tuple[dict[str, th.Tensor], th.Tensor]:
    """
    The segment batch of finished episodes: rows whose last ``length`` valid tokens are the episode's actions.

    :param input_ids: (S, W) each episode's last observation (prompt and every generated token)
    :param attention_mask: (S, W) its mask
    :param lengths: (S,) tokens each episode generated
    :param device: torch device
    :return: the batch and its (N,) actions, segment after segment
    """
    input_ids, lengths = np.asarray(input_ids, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    starts = last_valid_columns(attention_mask) - lengths  # (S,) the token before the generated ones (the prompt's last)
    actions = segment_actions(input_ids, starts, lengths)  # (N,)
    return segment_batch(input_ids, attention_mask, starts, lengths, device), th.as_tensor(actions, device=device)


def split_hidden_layout(
    contexts: Sequence[th.Tensor], later_steps: Sequence[th.Tensor], starts: np.ndarray, width: int
) -> th.Tensor:
    """
    The :data:`SPLIT_HIDDEN` entry of a segment batch, from the hidden states kept at rollout time.

    Each context's hidden states end at its start column; each later step's observation ended with the previous action,
    so its hidden state goes in that action's column. The segment's last action is never an input of its own segment:
    its column stays 0 (unread), as do the columns past ``width``.

    :param contexts: S tensors (n_ctx, H), each context's hidden states at its valid tokens
    :param later_steps: S tensors (length − 1, H), the hidden state at the last token of each later step's observation
    :param starts: (S,) start columns (see :func:`append_actions`)
    :param width: W, the columns of ``input_ids``
    :return: (S, W, H), dtype and device of the contexts'
    """
    first = contexts[0]
    split = first.new_zeros(len(contexts), width, first.shape[-1])  # (S, W, H)
    for row, (context, later, last) in enumerate(zip(contexts, later_steps, np.asarray(starts).tolist())):
        split[row, last + 1 - len(context) : last + 1] = context
        n = min(len(later), width - last - 1)
        split[row, last + 1 : last + 1 + n] = later[:n]
    return split


def used_columns(attention_mask: th.Tensor, starts: th.Tensor, lengths: th.Tensor) -> tuple[int, int]:
    """
    ``(first, end)``: the columns ``first:end`` of a segment batch that some segment reads; the left padding shared by
    every row and the columns after the last action are cropped before the forward.

    :param attention_mask: (S, W)
    :param starts: (S,) start columns
    :param lengths: (S,) actions per segment
    """
    used = attention_mask.bool().any(dim=0)  # (W,)
    first = int(used.float().argmax().item())
    end = int((starts + lengths).max().item())
    return first, end


def action_positions(starts: th.Tensor, lengths: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """
    Where the hidden state that predicts each action stands: action j of segment s at (row s, column starts[s] + j).

    :param starts: (S,) column predicting each segment's first action (in the columns of the hidden states)
    :param lengths: (S,) actions per segment
    :return: ``(rows, columns)``, each (N,) int64 with N = Σ lengths, segment after segment
    """
    starts, lengths = starts.long(), lengths.long()
    rows = th.repeat_interleave(th.arange(len(lengths), device=lengths.device), lengths)  # (N,) segment of each action
    firsts = lengths.cumsum(0) - lengths  # (S,) index in N of each segment's first action
    offsets = th.arange(int(lengths.sum().item()), device=lengths.device) - th.repeat_interleave(firsts, lengths)  # (N,)
    columns = th.repeat_interleave(starts, lengths) + offsets  # (N,)
    return rows, columns


def action_hidden(hidden: th.Tensor, starts: th.Tensor, lengths: th.Tensor) -> th.Tensor:
    """
    The hidden state that predicts each action (see :func:`action_positions`).

    :param hidden: (S, W, H) hidden states of a forward over the segment batch's rows (possibly cropped: shift
        ``starts`` by the cropped columns)
    :param starts: (S,) column predicting each segment's first action, in the columns of ``hidden``
    :param lengths: (S,) actions per segment
    :return: (N, H)
    """
    rows, columns = action_positions(starts, lengths)
    return hidden[rows, columns]
