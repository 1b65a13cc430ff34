"""The ids of the registered text tasks, kept apart from :mod:`sb3_textrl.envs.registry` (which loads transformers)
so that ``import sb3_textrl`` can record its built-in tasks without it."""

from __future__ import annotations

_TEXT_TASKS: set[str] = set()


def list_text_tasks() -> list[str]:
    """Ids of the text tasks registered in this process (built-in and user tasks)."""
    return sorted(_TEXT_TASKS)


def mark_text_task(id: str) -> None:
    """Record a task registered directly with ``gym.register`` (the built-in tasks) in :func:`list_text_tasks`."""
    _TEXT_TASKS.add(id)
