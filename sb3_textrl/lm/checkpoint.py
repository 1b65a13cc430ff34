"""
What a saved policy holds: what was trained, and the base LM's identity instead of its frozen weights.

With LoRA (or ``trainable_layers``, or the frozen reference copy of a full fine-tuning run) most of the policy's state
dict is the base LM, frozen and unchanged: ``model.save`` would write the whole LM into every ``model.zip``. The policy's
``state_dict()`` leaves those tensors out and adds :data:`BASE_LM_MARKER`, the base LM's fingerprint (a SHA-256 over
its tensors). ``load_state_dict`` accepts their absence only with that marker, and only when the LM the policy loaded
has the same fingerprint; it then fills them from the LM it loaded, so SB3's strict loading passes. Anything trainable,
and any frozen tensor that no longer equals the base LM's, is saved as before.

Per tensor, the digest is taken once (lazily, at the first save or load) and re-taken only when the tensor's version
counter or storage changed since, so a save that leaves the LM out costs no hashing after the first.
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch as th
from transformers import PreTrainedModel

from sb3_textrl.models.assets import EMBEDDED_LM_NAME
from sb3_textrl.models.loading import resolve_lm_path
from sb3_textrl.nlpo import renamed_state_keys

if TYPE_CHECKING:
    from sb3_textrl.policies import TransformerLMPolicy

# The state-dict entry that says "the base LM's frozen weights were left out"; its value: their fingerprint (32 bytes).
BASE_LM_MARKER = "base_lm_sha256"
_EMBEDDED_ALIASES = ("embedded", EMBEDDED_LM_NAME)


def absolute_lm(lm: str | os.PathLike | None) -> str | None:
    """
    ``lm`` with a relative local directory made absolute, so that a saved model loads from any working directory;
    hub names, the embedded aliases and None are returned as they are.
    """
    if lm is None:
        return None
    name = os.fspath(lm)
    if name in _EMBEDDED_ALIASES or Path(name).expanduser().is_absolute() or not Path(name).expanduser().is_dir():
        return name
    return str(Path(name).expanduser().resolve())


def _is_missing_directory(lm: str | None) -> bool:
    if lm is None:
        return False
    path = resolve_lm_path(lm)
    return (Path(path).expanduser().is_absolute() or path.startswith(".")) and not Path(path).expanduser().exists()


def missing_lm_message(lm: str | None, reason: str) -> str:
    """The error of a base LM directory that is not there: how to point a saved model at the LM's new place."""
    return (
        f"The base LM {lm!r} of this policy is not found ({reason}). A model saved by sb3_textrl stores the LM's name or "
        "path and a hash of its weights, not the LM itself. If it has moved, load with "
        "sb3_textrl.load_model(MODEL_ZIP, lm=NEW_PATH) (SB3's equivalent: PPO.load(MODEL_ZIP, custom_objects="
        "{'policy_kwargs': {**saved_policy_kwargs, 'lm': NEW_PATH}})); sb3_textrl.save_model(model, MODEL_ZIP, "
        "bundle_lm=True) writes a file that carries its LM. When building a new policy, pass lm= a directory that "
        "holds a Hugging Face model (or None for the embedded default LM)."
    )


def load_base_lm(policy: TransformerLMPolicy) -> PreTrainedModel:
    """``policy._load_lm()``; a missing local LM directory raises the error that names the ``lm=`` override."""
    try:
        return policy._load_lm()
    except OSError as error:
        if not _is_missing_directory(policy.lm_name):
            raise
        reason = f"there is no directory {resolve_lm_path(policy.lm_name)!r}"
        raise OSError(missing_lm_message(policy.lm_name, reason)) from error


def tensor_digest(tensor: th.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    data = tensor.detach().reshape(-1).contiguous().cpu().view(th.uint8).numpy()
    digest = hashlib.sha256(f"{tensor.dtype} {tuple(tensor.shape)}|".encode())
    digest.update(data.data)  # contiguous uint8: hashed without a copy
    return digest.hexdigest()


def _stamp(tensor: th.Tensor) -> tuple[int, int]:
    # A tensor changed in place bumps its version counter; one replaced (load_state_dict(assign=True)) moves storage.
    return tensor._version, tensor.data_ptr()


class BaseWeights:
    """
    The policy's frozen tensors that come from the base LM: which state-dict keys they are (found by identity when the
    policy is built), their digests and the LM's fingerprint.

    :param keys: the policy's state-dict key of each such tensor → its name in the base LM's state dict
    :param base_names: every name of the base LM's state dict (the fingerprint covers them all)
    """

    def __init__(self, keys: dict[str, str], base_names: set[str]):
        self.keys = keys
        self.base_names = base_names
        self.digests: dict[str, str] | None = None  # base name -> digest, at the first save or load
        self.checked: dict[str, tuple[int, int]] = {}  # policy key -> stamp when last found equal to the base
        self.fingerprint: str | None = None

    @classmethod
    def of(cls, policy: th.nn.Module, base_state: Mapping[str, th.Tensor], ref: th.nn.Module | None) -> BaseWeights:
        """
        Find the base LM's tensors in ``policy``: the very tensors of ``base_state`` (the LM's ``state_dict(keep_vars=
        True)`` as loaded; peft wraps, but keeps, them) that are frozen, and those of ``ref`` (the frozen reference
        copied from the LM) by name. Tied weights count once, under their first name.
        """
        first_name: dict[int, str] = {}
        for name, tensor in base_state.items():
            first_name.setdefault(id(tensor), name)
        canonical = {name: first_name[id(tensor)] for name, tensor in base_state.items()}
        keys: dict[str, str] = {}
        for key, tensor in th.nn.Module.state_dict(policy, keep_vars=True).items():
            found = first_name.get(id(tensor))
            if found is not None and not tensor.requires_grad:
                keys[key] = found
        if ref is not None:
            ref_prefix = next(key for key, module in policy.named_modules() if module is ref) + "."
            keys.update({ref_prefix + name: canonical[name] for name in ref.state_dict() if name in canonical})
        return cls(keys, set(first_name.values()))

    def _ensure_digests(self, state: Mapping[str, th.Tensor]) -> None:
        """Take the digests of the base tensors (once: they are assumed unchanged since the LM was loaded)."""
        if self.digests is not None:
            return
        digests: dict[str, str] = {}
        by_storage: dict[tuple[Any, ...], str] = {}  # tied weights are hashed once
        for key, name in self.keys.items():
            tensor = state[key]
            storage = (*_stamp(tensor), str(tensor.dtype), *tensor.shape)
            digest = by_storage.get(storage) or tensor_digest(tensor)
            by_storage[storage] = digest
            if digests.setdefault(name, digest) == digest:
                self.checked[key] = _stamp(tensor)
        self.digests = digests
        if set(digests) == self.base_names and len(self.checked) == len(self.keys):
            joined = "\n".join(f"{name} {digests[name]}" for name in sorted(digests))
            self.fingerprint = hashlib.sha256(joined.encode()).hexdigest()

    def unchanged_keys(self, state: Mapping[str, th.Tensor]) -> list[str]:
        """The keys of ``state`` (the policy's, ``keep_vars=True``) that are frozen and equal the base LM's tensors."""
        self._ensure_digests(state)
        if self.fingerprint is None or self.digests is None:
            return []
        unchanged = []
        for key, name in self.keys.items():
            tensor = state.get(key)
            if tensor is None or tensor.requires_grad:
                continue
            if self.checked.get(key) != _stamp(tensor):
                if tensor_digest(tensor) != self.digests[name]:
                    continue
                self.checked[key] = _stamp(tensor)
            unchanged.append(key)
        return unchanged

    def own_fingerprint(self, policy: th.nn.Module) -> str | None:
        """The fingerprint of the base LM this policy holds (None when it does not hold all of it, unchanged)."""
        self._ensure_digests(th.nn.Module.state_dict(policy, keep_vars=True))
        return self.fingerprint


def without_base_weights(
    policy: TransformerLMPolicy, state: dict[str, Any], prefix: str = "", tensors: Mapping[str, th.Tensor] | None = None
) -> dict[str, Any]:
    """
    ``state`` (the policy's ``state_dict()``) without the base LM's frozen, unchanged tensors, plus the marker; as
    it is with ``save_base_lm=True`` or when nothing can be left out.

    :param tensors: the policy's tensors to compare with the base LM's (default: its own, ``keep_vars=True``; a
        sharded policy passes the gathered full tensors)
    """
    base: BaseWeights | None = getattr(policy, "base_weights", None)
    if base is None or policy.save_base_lm:
        return state
    keys = base.unchanged_keys(th.nn.Module.state_dict(policy, keep_vars=True) if tensors is None else tensors)
    if not keys or base.fingerprint is None:
        return state
    for key in keys:
        del state[prefix + key]
    state[prefix + BASE_LM_MARKER] = th.tensor(list(bytes.fromhex(base.fingerprint)), dtype=th.uint8)
    return state


def loadable_state_dict(policy: TransformerLMPolicy, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """
    What ``policy.load_state_dict`` loads: older layouts renamed (NLPO's frozen copy before NLPOMasking), the rollout
    count kept when the state predates it, and the base LM's weights filled in when they were left out.
    """
    state_dict = renamed_state_keys(state_dict)
    if "n_rollouts" not in state_dict:  # saved before the rollout count existed: keep the current count
        state_dict = _with_entries(state_dict, {"n_rollouts": policy.n_rollouts.clone()})
    return with_base_weights(policy, state_dict)


def _with_entries(state_dict: Mapping[str, Any], entries: Mapping[str, Any], drop: str = "") -> Mapping[str, Any]:
    """A copy of ``state_dict`` with ``entries`` added where missing and ``drop`` removed, its ``_metadata`` kept."""
    result = collections.OrderedDict((key, value) for key, value in state_dict.items() if key != drop)
    for key, value in entries.items():
        result.setdefault(key, value)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        result._metadata = metadata  # type: ignore[attr-defined]  # torch's per-module versions travel with it
    return result


def with_base_weights(policy: TransformerLMPolicy, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """
    A state dict saved without the base LM's weights, completed from the LM the policy loaded (after checking that it
    is the same LM); any other state dict as it is, for the usual strict check.
    """
    base: BaseWeights | None = getattr(policy, "base_weights", None)
    own = None if base is None else base.own_fingerprint(policy)  # before loading: the digests of the LM as loaded
    if BASE_LM_MARKER not in state_dict:
        return state_dict
    saved = bytes(state_dict[BASE_LM_MARKER].tolist()).hex()
    if base is None or own is None:
        raise ValueError(
            "This state dict was saved without the base LM's frozen weights, but this policy does not hold the whole "
            "base LM frozen and unchanged (built with other use_lora, trainable_layers or kl_coef?): load it into a "
            "policy built with the saved policy_kwargs (sb3_textrl.load_model(MODEL_ZIP) or PPO.load(MODEL_ZIP))."
        )
    if own != saved:
        raise ValueError(
            f"This checkpoint was trained on a base LM whose weights hash to {saved[:16]}, but the LM this policy "
            f"loaded (lm={policy.lm_name!r}) hashes to {own[:16]}: its adapters and value head would be applied to "
            "another model. Load it with the LM it was trained on: sb3_textrl.load_model(MODEL_ZIP, lm=THAT_LM) (SB3: "
            "PPO.load(MODEL_ZIP, custom_objects={'policy_kwargs': {**saved_policy_kwargs, 'lm': THAT_LM}}))."
        )
    own_state = th.nn.Module.state_dict(policy)
    return _with_entries(state_dict, {key: own_state[key] for key in base.keys}, drop=BASE_LM_MARKER)
