"""The one way stoker warns: a ``StokerWarning`` at the user's line, once per process, and logged.

Every warning stoker gives goes through ``warn``, which finds the first frame outside the
``stoker`` package by itself, so no caller counts stack levels. The same message (or ``key``) is
given once per process: a setting changed every epoch is told once, not every epoch.
"""

from __future__ import annotations

import logging
import sys
import types
import warnings
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING

from stoker.errors import StokerWarning

if TYPE_CHECKING:
    from stoker.plan import Adjustment

__all__ = ["tell", "warn"]

logger = logging.getLogger("stoker")

# What was already told in this process (tests clear it between tests).
told: set[Hashable] = set()


def warn(
    message: str,
    *,
    key: Hashable | None = None,
    once: bool = True,
    category: type[StokerWarning] = StokerWarning,
) -> bool:
    """Warn ``message`` at the first caller outside stoker, and log it; ``False`` if already told.

    ``key`` says what counts as the same warning (default: the message); ``once=False`` warns
    every time; ``category`` is ``StokerWarning`` or a subclass (``InputBoundWarning``).
    """
    seen = message if key is None else key
    if once and seen in told:
        return False
    told.add(seen)
    logger.warning(message)
    warnings.warn(message, category, stacklevel=_user_stacklevel())
    return True


def tell(adjustments: Iterable[Adjustment]) -> None:
    """Warn about each planner adjustment once per process."""
    for adj in adjustments:
        warn(
            f"stoker changed {adj.setting} from {adj.requested!r} to {adj.chosen!r}: {adj.reason}",
            key=(adj.setting, repr(adj.requested), repr(adj.chosen), adj.reason),
        )


def _user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called in ``warn`` that names the first frame
    outside the stoker package (level 1 is ``warn`` itself)."""
    frame: types.FrameType | None = sys._getframe(1)  # warn()
    level = 1
    while frame is not None and _in_stoker(frame):
        frame = frame.f_back
        level += 1
    return level


def _in_stoker(frame: types.FrameType) -> bool:
    name = frame.f_globals.get("__name__", "")
    return bool(name == "stoker" or name.startswith("stoker."))
