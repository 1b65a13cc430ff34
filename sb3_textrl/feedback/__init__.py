"""Human feedback: the SQLite store of prompts, candidates and judgements, and the rating page that fills it."""

from sb3_textrl.feedback.store import (
    CHOICES,
    SCHEMA_VERSION,
    FeedbackStorageError,
    FeedbackStore,
    FeedbackStoreError,
    PreferencePair,
    Progress,
    empty_preferences_message,
    random_pair_orders,
    recent_pace,
)

__all__ = [
    "CHOICES",
    "SCHEMA_VERSION",
    "FeedbackStorageError",
    "FeedbackStore",
    "FeedbackStoreError",
    "PreferencePair",
    "Progress",
    "empty_preferences_message",
    "random_pair_orders",
    "recent_pace",
]
