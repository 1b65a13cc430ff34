"""Human feedback: the SQLite store of prompts, candidates and judgements, and the rating page that fills it."""

from sb3_textrl.feedback.store import (
    CHOICES,
    SCHEMA_VERSION,
    FeedbackStore,
    FeedbackStoreError,
    PreferencePair,
    empty_preferences_message,
)

__all__ = [
    "CHOICES",
    "SCHEMA_VERSION",
    "FeedbackStore",
    "FeedbackStoreError",
    "PreferencePair",
    "empty_preferences_message",
]
