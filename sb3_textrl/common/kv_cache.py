"""A KV cache kept across SB3 rollout steps, one row per env, for a batched one-token forward per step.

SB3 calls ``policy.forward(obs)`` once per vectorised env step with the *whole* observation (prompt plus the
tokens so far) of every env. Re-encoding it each step costs O(context) per token; instead we keep the keys and
values of every env's context and feed only the newest token. Envs end their episodes at different steps, so
the rows of the cache are right-aligned: each row's valid tokens end at the last column, and a row that starts
a new episode is re-filled from its observation and left-padded to the common length.

The cache never trusts the caller: it records the token ids each row holds and compares them with the
observation, so ``predict()`` calls, evaluation on other envs or a parameter update (``reset()``) cannot make
it serve stale keys.

Besides keys and values the cache can keep per-token features that the trunk function returns (with
``trainable_layers``, the hidden state entering the first trainable block), in the same right-aligned columns, so
that every token of an episode keeps its features however its row was filled.

Envs that start the same prompt in the same step (k samples per prompt) share one prefill: identical rows are
encoded once and their keys copied. A row whose observation did not change since the last step (an env waiting for
its group) costs no forward at all, and a row whose new observation another row already holds copies that row's keys
instead of a prefill: with :func:`~sb3_textrl.envs.groups.make_group_vec_env`'s lock-step, a group of k envs encodes
each of its prompts once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch as th
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# (input_ids (B, S), attention_mask (B, S_past + S), position_ids (B, S), past)
#   -> (hidden (B, S, H), new past, per-token features (B, S, F) to keep with the keys, or None)
TrunkFn = Callable[
    [th.Tensor, th.Tensor, th.Tensor, DynamicCache | None], tuple[th.Tensor, DynamicCache, th.Tensor | None]
]


def right_align(input_ids: th.Tensor, attention_mask: th.Tensor, drop_last: int = 0) -> tuple[th.Tensor, th.Tensor]:
    """
    Move each row's contiguous valid tokens to the right end of a tensor just wide enough for the longest row.

    :param input_ids: (B, L) token ids whose valid tokens (``attention_mask == 1``) are contiguous in each row
    :param attention_mask: (B, L) 0/1 mask
    :param drop_last: number of valid tokens to leave out at the end of each row
    :return: ids (B, W) and mask (B, W), with W the longest row's kept length (at least 1)
    """
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1) - drop_last  # (B,)
    first = th.where(mask.any(dim=1), mask.float().argmax(dim=1), th.zeros_like(lengths))  # first valid column
    width = max(int(lengths.max().item()), 1)
    offsets = th.arange(width, device=input_ids.device) - width  # (W,) negative offsets from the row's end
    source = first.unsqueeze(1) + lengths.unsqueeze(1) + offsets.unsqueeze(0)  # (B, W)
    new_mask = offsets.unsqueeze(0) >= -lengths.unsqueeze(1)
    ids = th.gather(input_ids, 1, source.clamp(0, input_ids.shape[1] - 1)) * new_mask
    return ids, new_mask.long()


def last_valid_index(attention_mask: th.Tensor) -> th.Tensor:
    """
    Column of each row's last valid token.

    :param attention_mask: (B, L) 0/1 mask
    :return: (B,) column indices
    """
    return attention_mask.shape[1] - 1 - attention_mask.flip(dims=[1]).float().argmax(dim=1)


def longest_extensions(input_ids: th.Tensor, attention_mask: th.Tensor, chunk: int = 256) -> th.Tensor:
    """
    For every row, the longest row whose valid tokens start with this row's valid tokens (in the same columns).

    A causal LM computes the same hidden state for a token whatever follows it, so the steps of one episode can all
    be read off the forward pass of its longest observation.

    :param input_ids: (N, L) token ids
    :param attention_mask: (N, L) 0/1 mask
    :param chunk: rows compared at a time (the comparison holds chunk x N x L booleans)
    :return: (N,) index of the covering row (a row covers itself)
    """
    valid = attention_mask.bool()
    n_rows = len(input_ids)
    lengths = valid.sum(dim=1)
    # Prefer the longest cover, then the lowest index, so equal rows all pick the same representative.
    preference = lengths * n_rows + (n_rows - th.arange(n_rows, device=input_ids.device))
    cover = th.empty(n_rows, dtype=th.long, device=input_ids.device)
    for first in range(0, n_rows, chunk):
        ids, mask = input_ids[first : first + chunk, None], valid[first : first + chunk, None]  # (C, 1, L)
        agrees = ((ids == input_ids[None]) | ~mask).all(dim=-1)  # (C, N): other row equal on this row's tokens
        contains = (~mask | valid[None]).all(dim=-1)  # (C, N): other row holds all of this row's columns
        cover[first : first + chunk] = th.where(agrees & contains, preference[None], -1).argmax(dim=1)
    return cover


def positions_from_mask(mask: th.Tensor) -> th.Tensor:
    """
    Position ids that count only valid tokens, as ``generate()`` does for left-padded batches.

    :param mask: (B, S) 0/1 attention mask
    :return: (B, S) position ids, 0 on padding
    """
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


class RolloutKVCache:
    """
    Per-env KV cache of a causal LM across rollout steps.

    :param trunk: function running the LM trunk (without its head) on new tokens with a past cache
    """

    def __init__(self, trunk: TrunkFn):
        self.trunk = trunk
        self.reset()

    def reset(self) -> None:
        """Forget everything (after a parameter update, a device move or a change in the number of envs)."""
        self.past: DynamicCache | None = None
        self.mask: th.Tensor | None = None  # (B, C) valid columns of the cache, right-aligned
        self.features: th.Tensor | None = None  # (B, C, F) per-token features from the trunk, same columns
        self.tokens: th.Tensor | None = None  # (B, L) the observation each row's cache holds
        self.token_mask: th.Tensor | None = None  # (B, L) its attention mask
        self.last_hidden: th.Tensor | None = None  # (B, H) hidden state of each row's last token
        self.prefilled_rows = 0  # rows encoded by prefills since the last reset (after sharing identical ones)

    @th.no_grad()
    def step(self, input_ids: th.Tensor, attention_mask: th.Tensor) -> th.Tensor:
        """
        Final hidden state of the last valid token of every row, re-using the keys of earlier steps.

        :param input_ids: (B, L) observation token ids, valid tokens contiguous in each row
        :param attention_mask: (B, L) 0/1 mask
        :return: (B, H) hidden state at each row's last valid token
        """
        ids = input_ids * attention_mask
        batch = ids.shape[0]
        if self.tokens is not None and (self.tokens.shape != ids.shape or self.tokens.device != ids.device):
            self.reset()
        held = th.zeros(batch, dtype=th.bool, device=ids.device)
        if self.tokens is None:
            rebuild = th.ones(batch, dtype=th.bool, device=ids.device)
        else:
            assert self.token_mask is not None and self.last_hidden is not None
            if th.equal(ids, self.tokens) and th.equal(attention_mask, self.token_mask):
                return self.last_hidden  # the same observations again (e.g. predict_values after forward)
            extends = self._extends_by_one(ids, attention_mask)
            held = self._reuse_held(ids, attention_mask, ~extends)
            rebuild = ~held & ~extends

        if bool(rebuild.any()):
            self._prefill(ids[rebuild], attention_mask[rebuild], rebuild)
        assert self.mask is not None
        if bool(held.all()):
            self.tokens, self.token_mask = ids.clone(), attention_mask.clone()
            assert self.last_hidden is not None
            return self.last_hidden
        # Every other row now holds all of its observation but the last token: feed that token to all rows at once.
        # Held rows already hold theirs: they take a masked-out column (no key) and keep their hidden state.
        last_token = th.gather(ids, 1, last_valid_index(attention_mask).unsqueeze(1))  # (B, 1)
        step_mask = th.cat([self.mask, (~held).to(self.mask.dtype).unsqueeze(1)], dim=1)
        position = self.mask.sum(dim=1, keepdim=True)
        hidden, self.past, features = self.trunk(last_token, step_mask, position, self.past)
        self.mask = step_mask
        self.features = None if features is None or self.features is None else th.cat([self.features, features], dim=1)
        last_hidden = hidden[:, -1]
        if bool(held.any()):
            assert self.last_hidden is not None
            last_hidden = th.where(held.unsqueeze(1), self.last_hidden, last_hidden)
            self._realign(held)
        self.tokens, self.token_mask = ids.clone(), attention_mask.clone()
        self.last_hidden = last_hidden
        return self.last_hidden

    def _reuse_held(self, ids: th.Tensor, attention_mask: th.Tensor, may_copy: th.Tensor) -> th.Tensor:
        """
        Rows whose whole observation the cache already holds: unchanged rows (an env waiting for its group, see
        :func:`~sb3_textrl.envs.groups.make_group_vec_env`), and rows whose new observation another row holds, whose
        keys, features and hidden state are copied over (a group member meeting a prompt a sibling already encoded).

        :param ids: (B, L) observation ids (zero on padding)
        :param attention_mask: (B, L) 0/1 mask
        :param may_copy: (B,) bool, rows that may take another row's copy (not those that extend their own by one token)
        :return: (B,) bool, the rows that need no forward in this step
        """
        assert self.tokens is not None and self.token_mask is not None and self.last_hidden is not None
        assert self.past is not None and self.mask is not None
        held = (ids == self.tokens).all(dim=1) & (attention_mask == self.token_mask).all(dim=1)
        # Only rows that would otherwise be prefilled look for a copy: (R, B, L) comparisons, R is small.
        candidates = (~held & may_copy).nonzero().squeeze(1)
        if len(candidates) == 0:
            return held
        same = (ids[candidates, None] == self.tokens[None]).all(dim=-1)  # (R, B)
        same &= (attention_mask[candidates, None] == self.token_mask[None]).all(dim=-1)
        found = same.any(dim=1)
        if not bool(found.any()):
            return held
        targets, sources = candidates[found], same[found].float().argmax(dim=1)
        # Every row of the cache is right-aligned in the same columns, so a whole row copies as it is.
        for _, keys, values in _attention_layers(self.past):  # in place
            keys[targets] = keys[sources]
            values[targets] = values[sources]
        self.mask[targets] = self.mask[sources]
        if self.features is not None:
            self.features[targets] = self.features[sources]
        self.last_hidden = self.last_hidden.clone()  # the caller may still hold the previous step's tensor
        self.last_hidden[targets] = self.last_hidden[sources]
        held[targets] = True
        return held

    def _realign(self, rows: th.Tensor) -> None:
        """Move the given rows' newest (masked-out) column to the front, so that their valid tokens end the cache again."""
        assert self.past is not None and self.mask is not None
        for _, keys, values in _attention_layers(self.past):  # (B, heads, C, D), in place
            keys[rows] = keys[rows].roll(1, dims=2)
            values[rows] = values[rows].roll(1, dims=2)
            keys[rows, :, 0] = 0.0  # masked out; zeroed so that no stray value can ever leak through attention
            values[rows, :, 0] = 0.0
        self.mask[rows] = self.mask[rows].roll(1, dims=1)
        if self.features is not None:  # (B, C, F)
            self.features[rows] = self.features[rows].roll(1, dims=1)
            self.features[rows, 0] = 0.0
        self._trim()

    def features_of(self, input_ids: th.Tensor, attention_mask: th.Tensor) -> tuple[th.Tensor, th.Tensor] | None:
        """
        The kept per-token features of observations, in their own column layout.

        A row's features are found when the cache holds that observation, or one that extends it (the cache may have
        moved on by one step, e.g. to a terminal observation).

        :param input_ids: (B, L) observations, the same batch layout as the steps
        :param attention_mask: (B, L) 0/1 mask
        :return: features (B, L, F) (zero on padding) and (B,) bool: rows found; None when the cache keeps none
        """
        if self.features is None or self.tokens is None or self.tokens.shape != input_ids.shape:
            return None
        assert self.token_mask is not None
        mask = attention_mask.bool()
        ids = input_ids * attention_mask
        held = self.token_mask.bool()
        found = ((ids == self.tokens) | ~mask).all(dim=1) & (~mask | held).all(dim=1)  # same tokens in the same columns
        # The cache's columns are right-aligned at each row's last held token.
        last_held = last_valid_index(self.token_mask).unsqueeze(1)  # (B, 1)
        columns = th.arange(ids.shape[1], device=ids.device).unsqueeze(0)  # (1, L)
        source = self.features.shape[1] - 1 - (last_held - columns)  # (B, L)
        valid = mask & (source >= 0) & found.unsqueeze(1)
        source = source.clamp(0, self.features.shape[1] - 1).unsqueeze(-1).expand(-1, -1, self.features.shape[2])
        gathered = th.gather(self.features, 1, source)  # (B, L, F)
        return gathered * valid.unsqueeze(-1), found

    def _extends_by_one(self, ids: th.Tensor, attention_mask: th.Tensor) -> th.Tensor:
        """Rows whose observation is the cached one plus exactly one new token."""
        assert self.tokens is not None and self.token_mask is not None
        last = last_valid_index(attention_mask).unsqueeze(1)
        previous_ids = ids.scatter(1, last, 0)
        previous_mask = attention_mask.scatter(1, last, 0)
        # Compare masks as well as ids: token id 0 is a real token in most vocabularies.
        return (previous_ids == self.tokens).all(dim=1) & (previous_mask == self.token_mask).all(dim=1)

    def _encode_distinct(self, context_ids: th.Tensor, context_mask: th.Tensor) -> tuple[DynamicCache, th.Tensor | None]:
        """Prefill the rows, encoding each distinct row once (envs that start the same prompt share the work)."""
        rows = th.cat([context_ids, context_mask], dim=1)
        distinct, inverse = th.unique(rows, dim=0, return_inverse=True)
        shared = len(distinct) < len(rows)
        if shared:
            width = context_ids.shape[1]
            context_ids, context_mask = distinct[:, :width], distinct[:, width:]
        _, fresh, features = self.trunk(context_ids, context_mask, positions_from_mask(context_mask), None)
        self._check_layers(fresh)  # before the first use of the layers' keys, which other layer types lack
        self.prefilled_rows += len(context_ids)
        if shared:
            for layer, keys, values in _attention_layers(fresh):
                layer.keys, layer.values = keys[inverse], values[inverse]
            features = None if features is None else features[inverse]
        return fresh, features

    def _prefill(self, ids: th.Tensor, attention_mask: th.Tensor, rows: th.Tensor) -> None:
        """Encode all but the last token of the given rows and splice their keys into the batch cache."""
        context_ids, context_mask = right_align(ids, attention_mask, drop_last=1)  # (R, W)
        fresh, features = self._encode_distinct(context_ids, context_mask)
        if not bool(context_mask.any(dim=1).all()):  # a fully masked row (a one-token observation) may hold NaN keys
            keep = context_mask.bool()[:, None, :, None]  # (R, 1, W, 1)
            for layer, keys, values in _attention_layers(fresh):
                layer.keys, layer.values = th.where(keep, keys, 0.0), th.where(keep, values, 0.0)
        if features is not None:
            features = th.where(context_mask.bool().unsqueeze(-1), features, 0.0)
        if self.past is None or bool(rows.all()):  # an empty cache is always rebuilt for all rows
            self.past, self.mask, self.features = fresh, context_mask, features
            return
        assert self.mask is not None
        old_width, new_width = self.mask.shape[1], context_mask.shape[1]
        width = max(old_width, new_width)
        self.mask = _splice_rows(self.mask, context_mask, rows, width, dim=1)
        old_layers, new_layers = _attention_layers(self.past), _attention_layers(fresh)
        for (layer, keys, values), (_, new_keys, new_values) in zip(old_layers, new_layers):
            layer.keys = _splice_rows(keys, new_keys, rows, width, dim=2)  # (B, heads, C, D)
            layer.values = _splice_rows(values, new_values, rows, width, dim=2)
        if features is None or self.features is None:
            self.features = None
        else:
            self.features = _splice_rows(self.features, features, rows, width, dim=1)
        self._trim()

    def _trim(self) -> None:
        """Drop leading columns that no row uses any more, so the cache stays as short as the longest context."""
        assert self.mask is not None and self.past is not None
        used = self.mask.any(dim=0)
        first = int(used.float().argmax().item())
        if first == 0:
            return
        self.mask = self.mask[:, first:]
        if self.features is not None:
            self.features = self.features[:, first:]
        for layer, keys, values in _attention_layers(self.past):
            layer.keys, layer.values = keys[:, :, first:], values[:, :, first:]

    @staticmethod
    def _check_layers(past: DynamicCache) -> None:
        """Refuse a cache with layers other than full attention (sliding-window, linear-attention, dummy layers)."""
        for layer in past.layers:
            if type(layer) is not DynamicLayer:
                raise NotImplementedError(
                    f"The rollout KV cache supports full-attention layers only, got {type(layer).__name__}; "
                    "pass policy_kwargs=dict(use_kv_cache=False) for this model."
                )


def _attention_layers(past: DynamicCache) -> list[tuple[DynamicLayer, th.Tensor, th.Tensor]]:
    """
    The layers of a cache that :meth:`RolloutKVCache._check_layers` admitted, each with its keys and values.

    :param past: a prefilled cache of full-attention layers
    :return: per layer (the layer, its keys (B, heads, C, D), its values (B, heads, C, D))
    """
    layers = []
    for layer in past.layers:
        # Checked when the cache was filled; a prefilled layer holds its keys and values.
        assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
        layers.append((layer, layer.keys, layer.values))
    return layers


def _splice_rows(old: th.Tensor, new: th.Tensor, rows: th.Tensor, width: int, dim: int) -> th.Tensor:
    """
    ``old`` with the given rows replaced by ``new``, both right-aligned in ``width`` columns along ``dim``.

    :param old: (B, ...) the batch (columns along ``dim``)
    :param new: (R, ...) the replacement rows
    :param rows: (B,) bool, True for the R replaced rows
    :param width: columns of the result (at least both inputs' widths)
    :param dim: the column dimension
    :return: (B, ..., width, ...) tensor
    """
    shape = list(old.shape)
    shape[dim] = width
    merged = old.new_zeros(shape)
    merged.narrow(dim, width - old.shape[dim], old.shape[dim]).copy_(old)
    merged[rows] = 0
    target = merged[rows]  # advanced indexing copies: write the rows back after filling them
    target.narrow(dim, width - new.shape[dim], new.shape[dim]).copy_(new)
    merged[rows] = target
    return merged
