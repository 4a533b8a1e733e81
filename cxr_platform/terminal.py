"""Progress for people: bars only where a person watches a terminal, and time left in words.

Every long loop (decoding folders, training epochs, scoring folders) asks :func:`interactive`
before drawing a bar, so logs, pipes, CI and Dagster's captured output stay free of carriage
returns; the same loops report finished steps as log lines, which is what the Dagster run log
shows.
"""

from __future__ import annotations

import sys
from typing import TextIO


def interactive(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stderr, where bars go) is a terminal."""
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced by an object without a terminal, or closed
        return False


def duration_text(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``1 h 12 min``: rounded as a person reads an estimate."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s" if minutes < 10 and rest else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"
