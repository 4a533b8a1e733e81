"""The labeled store: model inputs that received a feedback label, kept as training data.

The service keeps each request's model input (the preprocessed uint8 square; no DICOM header,
no file name, only the random request id) in ``pending/`` for a limited time, as a raw ``.npy``:
writing one costs ~0.1 ms where a PNG encode costs ~1.5 ms on the scoring thread. Feedback
compresses it to a PNG in ``labeled/``, where the fine-tune job finds it. The label
itself stays in the inference log (the latest feedback wins), so a corrected label needs no
file move. Pending inputs nobody labeled are deleted after the retention period.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


def _valid(request_id: str) -> bool:
    # Request ids arrive from clients with feedback: never let one name a path.
    return bool(_REQUEST_ID.match(request_id))


class RetainedInputs:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.pending = self.root / "pending"
        self.labeled = self.root / "labeled"

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

    def keep(self, request_id: str, pixels: np.ndarray) -> None:
        if not _valid(request_id):
            raise ValueError(f"not a request id: {request_id!r}")
        self.pending.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(pixels, dtype=np.uint8), allow_pickle=False)
        self._write_atomically(self._pending_path(request_id), buffer.getvalue())

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
        self._write_atomically(target, buffer.getvalue())
        pending.unlink(missing_ok=True)
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
        return removed
