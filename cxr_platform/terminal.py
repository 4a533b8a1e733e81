"""Progress for people: bars only where a person watches a terminal, and time left in words.

Every long loop (decoding folders, training epochs, scoring folders) asks :func:`interactive`
before drawing a bar, so logs, pipes, CI and Dagster's captured output stay free of carriage
returns; the same loops report finished steps as log lines, which is what the Dagster run log
shows.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

_attached: TextIO | None = None
# Where a command's progress lines go when no terminal watches (CI logs, nohup, a pipe): the
# stderr it started with, which Dagster's capture of a step's output does not take away.
_lines: TextIO | None = None


def interactive(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default: where bars go) is a terminal."""
    if stream is None:
        if _attached is not None:
            return True
        stream = sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced by an object without a terminal, or closed
        return False


def progress_stream() -> TextIO:
    """Where bars and progress lines go: the attached terminal, else stderr."""
    return _attached if _attached is not None else sys.stderr


@contextmanager
def attached(stream: TextIO | None = None) -> Iterator[None]:
    """Keep drawing on this terminal while the work inside redirects stderr.

    Dagster captures each step's output by pointing file descriptors 1 and 2 at its compute-log
    files, so a step run by ``cxr demo`` at a terminal no longer sees one. A duplicate of the
    terminal's descriptor, taken before, still reaches the person watching.
    """
    global _attached, _lines
    stream = stream if stream is not None else sys.stderr
    if _attached is not None or _lines is not None:
        yield
        return
    if not interactive(stream):
        try:
            _lines = os.fdopen(os.dup(stream.fileno()), "w", buffering=1, encoding="utf-8")
        except (AttributeError, OSError, ValueError):  # no descriptor behind it (a test's buffer)
            yield
            return
        try:
            yield
        finally:
            _lines.close()
            _lines = None
        return
    duplicate = os.fdopen(os.dup(stream.fileno()), "w", buffering=1, encoding="utf-8")
    _attached = duplicate
    try:
        yield
    finally:
        _attached = None
        duplicate.close()


def progress_line(line: str) -> None:
    """A finished step's line (an epoch), for a command whose output no terminal shows; with a
    terminal, the bar's own line says it."""
    if _lines is not None and _attached is None:
        print(line, file=_lines, flush=True)


def duration_text(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``1 h 12 min``: rounded as a person reads an estimate."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 600:  # seconds still matter under ten minutes
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"
