"""Renamed keyword arguments and dataclass fields: the old name keeps working, with a ``DeprecationWarning`` that
names the new one; passing both names is an error. Torch-free (the CLI's configs use it).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])
_C = TypeVar("_C", bound=type)


def _warn(where: str, old: str, new: str, stacklevel: int) -> None:
    message = f"{where}: {old!r} is deprecated, use {new!r} (same meaning); {old!r} will be removed in a later release."
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel + 1)


def rename_kwargs(kwargs: dict[str, Any], renames: Mapping[str, str], where: str, stacklevel: int = 2) -> dict[str, Any]:
    """
    Replace deprecated keyword names by their new ones, warning for each.

    :param kwargs: the keyword arguments of a call (changed in place)
    :param renames: old name -> new name
    :param where: what was called, for the messages, e.g. ``"train_sft()"``
    :param stacklevel: the warning's stack level, counted from the caller of this function (2: its caller's caller)
    :return: ``kwargs``, with new names only
    :raises TypeError: when a call gives both the old and the new name
    """
    for old, new in renames.items():
        if old not in kwargs:
            continue
        if new in kwargs:
            raise TypeError(f"{where} got both {old!r} and {new!r}; pass only {new!r} ({old!r} is its deprecated name).")
        _warn(where, old, new, stacklevel + 1)
        kwargs[new] = kwargs.pop(old)
    return kwargs


def renamed_kwargs(**renames: str) -> Callable[[_F], _F]:
    """
    Decorator: the function also accepts the deprecated keyword names ``old="new"`` (a warning names the new one).

    :param renames: old name = new name
    :return: the decorator
    """

    def decorate(func: _F) -> _F:
        where = f"{func.__qualname__.removesuffix('.__init__')}()"

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return func(*args, **rename_kwargs(kwargs, renames, where))

        return wrapper  # type: ignore[return-value]

    return decorate


def _alias(cls_name: str, old: str, new: str) -> property:
    where = f"{cls_name}.{old}"

    def get(self: Any) -> Any:
        _warn(where, old, new, 2)
        return getattr(self, new)

    def set_(self: Any, value: Any) -> None:
        _warn(where, old, new, 2)
        setattr(self, new, value)

    return property(get, set_, doc=f"Deprecated name of :attr:`{new}`.")


def renamed_fields(**renames: str) -> Callable[[_C], _C]:
    """
    Class decorator (put above ``@dataclass``): the constructor accepts the deprecated field names ``old="new"``,
    and the old names read and write the new fields; each use warns.

    :param renames: old name = new name
    :return: the decorator
    """

    def decorate(cls: _C) -> _C:
        cls.__init__ = renamed_kwargs(**renames)(cls.__init__)  # type: ignore[misc]
        for old, new in renames.items():
            setattr(cls, old, _alias(cls.__name__, old, new))
        return cls

    return decorate
