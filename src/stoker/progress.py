"""One progress reporter for long work (scans, caching, tuning): a bar on a terminal, silence in logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar", "progress_bar"]


class ProgressBar:
    """Draws ``label [####....] done/total unit (rate/s, ETA)`` on one line of ``stream``.

    Call it as ``bar(done, total)`` (the ``progress`` callback shape stoker's functions take) or
    ``bar(done, total, note)``. The line ends when ``done`` reaches ``total``, or at ``close()``.
    Redraws at most 10 times a second.
    """

    def __init__(self, label: str, unit: str = "", stream: TextIO | None = None) -> None:
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self._start = time.perf_counter()
        self._last_draw = 0.0
        self._drawn = False

    def __call__(self, done: float, total: float, note: str = "") -> None:
        now = time.perf_counter()
        if done < total and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        elapsed = now - self._start
        width = 24
        filled = min(width, int(width * done / total)) if total > 0 else 0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 and total > done else 0.0
        unit = f" {self.unit}" if self.unit else ""
        counts = f"{done:g}/{total:g}{unit}" if total > 0 else f"{done:g}{unit}"
        extra = f" ({rate:.1f}/s, ETA {_clock(eta)})" if done < total else f" ({_clock(elapsed)})"
        text = f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {counts}{extra} {note}"
        self.stream.write(text.ljust(100))
        self.stream.flush()
        self._drawn = True
        if total > 0 and done >= total:
            self.close()

    def close(self) -> None:
        """End the bar's line, if anything was drawn."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def progress_bar(label: str, unit: str = "", stream: TextIO | None = None) -> ProgressBar | None:
    """A ``ProgressBar`` when ``stream`` (stderr by default) is a terminal, else ``None``."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is None or not isatty():
        return None
    return ProgressBar(label, unit, stream)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"
