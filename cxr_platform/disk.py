"""Disk budgets for the stores that grow with traffic.

The service's retained inputs and the DICOM node's spool and outbox grow with every request. Each
gets a byte budget of its own and respects one free-space watermark for the filesystem it is on:
a host that fills its disk fails everything at once (the inference log, the ledger, the OS), so a
store stops growing well before that, and says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MEGABYTE = 1024 * 1024


@dataclass(frozen=True)
class DiskBudget:
    max_bytes: int | None = None  # None: the store may grow without a byte limit
    min_free_bytes: int = 0  # the filesystem keeps at least this much free

    @classmethod
    def from_megabytes(cls, max_mb: float, min_free_mb: float) -> DiskBudget:
        """Settings speak megabytes; 0 means no limit."""
        return cls(
            max_bytes=int(max_mb * MEGABYTE) if max_mb > 0 else None,
            min_free_bytes=int(min_free_mb * MEGABYTE),
        )

    def shortfall(self, path: Path, used: int, incoming: int) -> str | None:
        """Why ``incoming`` more bytes must not be written to a store holding ``used`` bytes at
        ``path``; None when there is room."""
        if self.max_bytes is not None and used + incoming > self.max_bytes:
            return f"budget: {used / MEGABYTE:.1f} of {self.max_bytes / MEGABYTE:.1f} MB used"
        if self.min_free_bytes:
            free = free_bytes(path)
            if free - incoming < self.min_free_bytes:
                return (
                    f"disk: {free / MEGABYTE:.0f} MB free, the watermark keeps "
                    f"{self.min_free_bytes / MEGABYTE:.0f} MB"
                )
        return None


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path`` (the root's
    reserve does not count: the platform does not run as root)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def folder_bytes(path: Path) -> int:
    """Bytes in the files under ``path``; files removed while it counts are skipped."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += folder_bytes(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
    return total
