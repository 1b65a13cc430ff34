"""Command-line flags from a dataclass of options, so a script lists its options once (the examples use it)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def parse_dataclass_options(options_class: type[T], description: str | None, skip: Sequence[str] = (),
                            args: Sequence[str] | None = None) -> T:
    """
    Parse ``--some-option VALUE`` flags into an instance of ``options_class``: one flag per field (underscores become
    dashes), typed like the field's default (a field defaulting to None takes the type its annotation names besides
    None, e.g. ``int | None``, else a string), booleans as ``--flag`` / ``--no-flag`` switches.

    :param options_class: a dataclass whose fields all have defaults
    :param description: the parser's description (a script passes its ``__doc__``, shown by ``--help``)
    :param skip: fields without a flag (they keep their defaults)
    :param args: the arguments to parse; None: ``sys.argv[1:]``
    :return: the options
    """
    if not is_dataclass(options_class):
        raise TypeError(f"parse_dataclass_options needs a dataclass, got {options_class!r}")
    defaults = options_class()
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in fields(defaults):
        if field.name in skip:
            continue
        value: Any = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            # --flag and --no-flag both exist, so a switch that defaults to True can be turned off.
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parse = type(value) if value is not None else _optional_type(field.type)
            if _accepts_none(field.type):
                parse = _none_or(parse)
            parser.add_argument(flag, type=parse, default=value)
    return options_class(**vars(parser.parse_args(args)))


def _optional_type(annotation: Any) -> type:
    """The parser of a field that defaults to None: ``int`` for ``int | None``, ``float`` likewise, else ``str``."""
    text = annotation if isinstance(annotation, str) else repr(annotation)  # annotations are strings here (PEP 563)
    names = {part.strip() for part in text.replace("Optional[", "").rstrip("]").split("|")} - {"None"}
    return {"int": int, "float": float}.get(names.pop(), str) if len(names) == 1 else str


def _accepts_none(annotation: Any) -> bool:
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return "None" in {part.strip() for part in text.replace("Optional[", "").rstrip("]").split("|")} or "Optional[" in text


def _none_or(parse: type) -> Any:
    def parse_or_none(text: str) -> Any:
        return None if text.strip().lower() == "none" else parse(text)

    parse_or_none.__name__ = parse.__name__  # argparse names the type in its error messages
    return parse_or_none
