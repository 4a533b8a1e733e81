"""Lung-field masks joined to the images they outline, and brought onto the model's square.

A mask folder is laid out like the image folder: ``<masks>/<relative folder>/<image stem>.png``
beside ``<images>/<relative folder>/<image stem>.<any suffix>`` (the shared Kermany masks and the
synthetic set's ``lung_masks/`` both are). A mask is a single-channel image, background 0 and lung
any value of 128 or more; it must have its image's size, since it was drawn on that image, and it
goes through the same resize (stretch or letterbox) as the pixels do, with nearest neighbour so
that it stays a mask.

An image without a mask is not an error: it is left out of segmentation training and evaluation,
and counted. A mask that does not fit its image is an error naming both, so a misaligned folder is
found before a network learns from it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image

from cxr_platform.data.parallel import parallel_map
from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.data.splits import SPLIT_NAMES
from cxr_platform.errors import CxrError

MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".gif")
LUNG_THRESHOLD = 128


class LungMaskError(CxrError):
    """A lung-field mask cannot be used: unreadable, empty, or not the size of its image."""


def mask_relative_path(image_relative_path: str) -> PurePosixPath:
    """Where an image's mask lies inside a mask folder, without its suffix."""
    relative = PurePosixPath(image_relative_path)
    return relative.with_name(relative.name.split(".", 1)[0])


def find_mask(masks_root: Path, image_relative_path: str) -> Path | None:
    stem = masks_root / mask_relative_path(image_relative_path)
    for suffix in MASK_SUFFIXES:
        candidate = stem.with_name(stem.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def read_mask(path: str | Path, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file -> bool (H, W), lung True."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"))
    except (OSError, ValueError) as error:
        raise LungMaskError(f"{path}: cannot read the mask ({error})") from error
    if expected_shape is not None and pixels.shape != tuple(expected_shape):
        raise LungMaskError(
            f"{path}: mask is {pixels.shape[1]}x{pixels.shape[0]} but its image is "
            f"{expected_shape[1]}x{expected_shape[0]}; a mask must be drawn on its own image"
        )
    return pixels >= LUNG_THRESHOLD


def mask_to_square(mask: np.ndarray, config: PreprocessingConfig) -> np.ndarray:
    """bool (H, W) -> bool (size, size), through the same geometry as ``to_square_uint8``."""
    mask = np.asarray(mask, dtype=bool)
    if config.resize_mode == "letterbox":
        height, width = mask.shape
        side = max(height, width)
        canvas = np.zeros((side, side), dtype=bool)
        top, left = (side - height) // 2, (side - width) // 2
        canvas[top : top + height, left : left + width] = mask
        mask = canvas
    size = config.image_size
    if mask.shape != (size, size):
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
            (size, size), Image.Resampling.NEAREST
        )
        mask = np.asarray(resized) >= LUNG_THRESHOLD
    return mask


def _image_shape(path: str) -> tuple[int, int]:
    # Only the header: the size is all the alignment check needs. DICOM is decoded in full.
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except OSError:
        from cxr_platform.data.imaging import read_image

        return read_image(path).pixels.shape


def _square_mask(item: tuple[str, str], config: PreprocessingConfig) -> np.ndarray:
    image_path, mask_path = item
    mask = read_mask(mask_path, _image_shape(image_path))
    return mask_to_square(mask, config)


@dataclass(frozen=True)
class LungMaskSplit:
    split: str
    masks_path: Path  # bool (N, size, size), row i belongs to the cache's row rows[i]
    rows: np.ndarray  # rows of the preprocessed cache's split that have a mask
    n_images: int  # images of the split, with or without a mask


@dataclass(frozen=True)
class LungMaskCache:
    masks_root: Path
    splits: dict[str, LungMaskSplit]

    def masks(self, split: str) -> np.ndarray:
        return np.load(self.splits[split].masks_path, mmap_mode="r")

    def rows(self, split: str) -> np.ndarray:
        return self.splits[split].rows

    def coverage(self) -> dict[str, tuple[int, int]]:
        """Per split: (images with a mask, images)."""
        return {name: (len(s.rows), s.n_images) for name, s in self.splits.items()}


def _masks_key(config: PreprocessingConfig, items: Sequence[tuple[str, str]]) -> str:
    digest = hashlib.sha256(config.fingerprint().encode())
    for image_path, mask_path in items:
        digest.update(image_path.encode())
        stat = os.stat(mask_path)
        digest.update(f"{mask_path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def build_mask_cache(
    split_indexes: dict[str, pd.DataFrame],
    masks_root: str | Path,
    cache_dir: str | Path,
    config: PreprocessingConfig,
    *,
    workers: int = 1,
    progress: bool = True,
) -> LungMaskCache:
    """One bool ``(N, size, size)`` array per split, aligned with the preprocessed cache's rows.

    ``split_indexes`` are the preprocessed cache's own index tables (``cache.index(split)``), so
    a mask's row is found by position and a patient is in the split the classifier put it in.
    """
    masks_root = Path(masks_root)
    if not masks_root.is_dir():
        raise LungMaskError(f"lung mask folder {masks_root} does not exist or is not a folder")
    folder = Path(cache_dir) / "lung-masks" / config.fingerprint()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    splits: dict[str, LungMaskSplit] = {}
    found_any = False
    for split in SPLIT_NAMES:
        index = split_indexes.get(split)
        if index is None:
            continue
        joined = [find_mask(masks_root, str(rel)) for rel in index["relative_path"]]
        rows = np.array([i for i, path in enumerate(joined) if path is not None], dtype=np.int64)
        found_any = found_any or len(rows) > 0
        items = [(str(index.at[int(i), "path"]), str(joined[int(i)])) for i in rows]
        masks_path = folder / f"{split}-{_masks_key(config, items)}.npy"
        if not masks_path.exists():
            squares = parallel_map(
                partial(_square_mask, config=config),
                items,
                workers=workers,
                description=f"lung masks {split}",
                progress=progress,
            )
            array = (
                np.stack(squares)
                if squares
                else np.zeros((0, config.image_size, config.image_size), dtype=bool)
            )
            tmp = masks_path.with_name(masks_path.stem + f".{os.getpid()}.tmp.npy")
            np.save(tmp, array)
            tmp.replace(masks_path)
        splits[split] = LungMaskSplit(split, masks_path, rows, len(index))
    if not found_any:
        raise LungMaskError(
            f"no image of the data folder has a mask in {masks_root}: masks are looked for at "
            "<mask folder>/<image's folder>/<image's stem>.png"
        )
    return LungMaskCache(masks_root=masks_root, splits=splits)
