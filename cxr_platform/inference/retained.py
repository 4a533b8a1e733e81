"""The labeled store: model inputs that received a feedback label, kept as training data.

The service keeps each request's model input (the preprocessed uint8 square; no DICOM header,
no file name, only the random request id) in ``pending/`` for a limited time, as a raw ``.npy``:
writing one costs ~0.1 ms where a PNG encode costs ~1.5 ms on the scoring thread. Feedback
compresses it to a PNG in ``labeled/``, where the fine-tune job finds it. The label
itself stays in the inference log (the latest feedback wins), so a corrected label needs no
file move. Pending inputs nobody labeled are deleted after the retention period.

The store has a byte budget and respects the host's free-space watermark (:class:`DiskBudget`).
Past the budget the oldest unlabeled inputs make room for new ones; when only labeled inputs are
left (they are training data, never deleted by the budget) or the disk is at its watermark, new
inputs are not kept: predictions go on, only the chance of a training example is lost.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_platform.disk import DiskBudget

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


def _valid(request_id: str) -> bool:
    # Request ids arrive from clients with feedback: never let one name a path.
    return bool(_REQUEST_ID.match(request_id))


class RetainedInputs:
    def __init__(
        self,
        root: Path,
        budget: DiskBudget | None = None,
        *,
        on_skipped: Callable[[str], None] | None = None,
        on_evicted: Callable[[int], None] | None = None,
    ) -> None:
        """``on_skipped(reason)`` hears of each input not kept ("budget" or "disk");
        ``on_evicted(n)`` of unlabeled inputs deleted to make room."""
        self.root = Path(root)
        self.pending = self.root / "pending"
        self.labeled = self.root / "labeled"
        self.budget = budget or DiskBudget()
        self._on_skipped = on_skipped
        self._on_evicted = on_evicted
        # Sizes on disk, so a budget check costs no directory walk: pending inputs oldest first
        # (the eviction order), labeled ones as a sum. Built from the folders on first use; the
        # service is the store's only writer.
        self._index_lock = threading.Lock()
        self._pending_sizes: dict[str, int] | None = None
        self._pending_bytes = 0
        self._labeled_bytes = 0
        self._skipping = False

    def _load_index(self) -> None:
        stamped = []
        if self.pending.exists():
            for entry in os.scandir(self.pending):
                if not entry.name.endswith(".npy"):
                    continue
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                stamped.append((stat.st_mtime_ns, entry.name[: -len(".npy")], stat.st_size))
        self._pending_sizes = {request_id: size for _, request_id, size in sorted(stamped)}
        self._pending_bytes = sum(self._pending_sizes.values())
        labeled = 0
        if self.labeled.exists():
            for entry in os.scandir(self.labeled):
                try:
                    labeled += entry.stat().st_size
                except FileNotFoundError:
                    continue
        self._labeled_bytes = labeled

    def _index(self) -> dict[str, int]:
        if self._pending_sizes is None:
            self._load_index()
        assert self._pending_sizes is not None
        return self._pending_sizes

    def _forget_pending(self, request_id: str) -> None:
        size = self._index().pop(request_id, 0)  # loads the index first, then subtracts
        self._pending_bytes -= size

    def used_bytes(self) -> int:
        with self._index_lock:
            self._index()
            return self._pending_bytes + self._labeled_bytes

    def _path(self, folder: Path, request_id: str) -> Path:
        return folder / f"{request_id}.png"

    def _pending_path(self, request_id: str) -> Path:
        return self.pending / f"{request_id}.npy"

    @staticmethod
    def _write_atomically(target: Path, data: bytes) -> None:
        """Written to a temporary name, then renamed: a reader never sees half a file."""
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def keep(self, request_id: str, pixels: np.ndarray) -> bool:
        """True when the input was kept; False when the budget or the disk had no room."""
        if not _valid(request_id):
            raise ValueError(f"not a request id: {request_id!r}")
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(pixels, dtype=np.uint8), allow_pickle=False)
        data = buffer.getvalue()
        with self._index_lock:
            evicted = self._make_room(len(data))
            used = self._pending_bytes + self._labeled_bytes
            shortfall = self.budget.shortfall(self.root, used, len(data))
            if shortfall is None:
                self.pending.mkdir(parents=True, exist_ok=True)
                self._write_atomically(self._pending_path(request_id), data)
                self._forget_pending(request_id)  # a retried id replaces its file
                self._index()[request_id] = len(data)
                self._pending_bytes += len(data)
            self._note(shortfall)
        if evicted and self._on_evicted is not None:
            self._on_evicted(evicted)
        if shortfall is not None and self._on_skipped is not None:
            self._on_skipped(shortfall.split(":", 1)[0])
        return shortfall is None

    def _make_room(self, incoming: int) -> int:
        """Delete the oldest unlabeled inputs until ``incoming`` bytes fit the byte budget."""
        if self.budget.max_bytes is None or self._labeled_bytes + incoming > self.budget.max_bytes:
            return 0  # labeled inputs alone fill the budget: deleting the rest would not help
        pending = self._index()
        evicted = 0
        while pending and self._pending_bytes + self._labeled_bytes + incoming > (
            self.budget.max_bytes
        ):
            oldest = next(iter(pending))
            self._forget_pending(oldest)
            self._pending_path(oldest).unlink(missing_ok=True)
            evicted += 1
        return evicted

    def _note(self, shortfall: str | None) -> None:
        """One log line when the store starts refusing inputs and one when it takes them again,
        not one per request."""
        if shortfall is not None and not self._skipping:
            log.warning("not keeping new inputs for feedback (%s); predictions continue", shortfall)
        elif shortfall is None and self._skipping:
            log.info("keeping inputs for feedback again")
        self._skipping = shortfall is not None

    def mark_labeled(self, request_id: str) -> bool:
        """True when the input is (now) in the labeled store."""
        if not _valid(request_id):
            return False
        target = self._path(self.labeled, request_id)
        if target.exists():
            return True
        pending = self._pending_path(request_id)
        try:
            pixels = np.load(pending, allow_pickle=False)
        except FileNotFoundError:
            return target.exists()  # pruned, never kept, or moved by a concurrent feedback
        self.labeled.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
        # Labeling is not held to the budget: the PNG is smaller than the input it replaces.
        self._write_atomically(target, buffer.getvalue())
        pending.unlink(missing_ok=True)
        with self._index_lock:
            self._forget_pending(request_id)
            self._labeled_bytes += len(buffer.getvalue())
        return True

    def labeled_ids(self) -> set[str]:
        if not self.labeled.exists():
            return set()
        return {path.stem for path in self.labeled.glob("*.png")}

    def load_labeled(self, request_ids: Iterable[str]) -> tuple[list[str], np.ndarray]:
        """(ids found, uint8 images) for the given ids, in their order, skipping absent ones."""
        found, images = [], []
        for request_id in request_ids:
            path = self._path(self.labeled, request_id)
            if not _valid(request_id) or not path.exists():
                continue
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("L"), dtype=np.uint8))
            found.append(request_id)
        if not images:
            return [], np.zeros((0, 0, 0), dtype=np.uint8)
        return found, np.stack(images)

    def prune(self, max_age_seconds: float) -> int:
        """Delete pending inputs older than ``max_age_seconds``; labeled ones are kept."""
        if not self.pending.exists():
            return 0
        cutoff = time.time() - max_age_seconds
        removed = 0
        for path in self.pending.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # labeled or pruned meanwhile
        with self._index_lock:
            self._load_index()
        return removed
