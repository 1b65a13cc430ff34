"""Former home of :class:`KLController`, which now lives in :mod:`sb3_textrl.common.kl` with the rest of the KL penalty.

Kept so that ``from sb3_textrl.common.kl_controller import KLController`` and objects pickled under this path load.
"""

from __future__ import annotations

from sb3_textrl.common.kl import KLController

__all__ = ["KLController"]
