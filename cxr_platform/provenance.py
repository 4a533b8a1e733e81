"""Where a result came from: the code version that produced it."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


@cache
def git_commit() -> str | None:
    """HEAD of the checkout this package runs from, with ``-dirty`` when files are modified;
    None for an installed package outside a git checkout."""
    try:
        head = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head
