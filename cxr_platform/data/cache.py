"""Decode each split once into memory-mappable uint8 arrays, keyed by content.

Layout: ``CACHE/<preprocessing fingerprint>/<split>-<key>.npy`` plus a ``.csv`` sidecar with
one row per image. The key hashes the preprocessing config and the ordered content hashes, so an
unchanged input maps to an existing file and is not recomputed. When a split changes, rows whose
content is already in any array of the same preprocessing are copied instead of decoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_platform.data.decoded import DEFAULT_MAX_PIXELS
from cxr_platform.data.parallel import parallel_map
from cxr_platform.data.preprocessing import PreprocessingConfig, preprocess
from cxr_platform.data.splits import SPLIT_NAMES
from cxr_platform.errors import CxrError


class CacheInputChangedError(CxrError):
    """A file's bytes differ from the hash in the split manifest: the profile is stale."""


@dataclass(frozen=True)
class CachedSplit:
    split: str
    images_path: Path
    index_path: Path
    n_images: int
    key: str
    reused: bool  # True when the whole array already existed


@dataclass(frozen=True)
class PreprocessedCache:
    root: Path
    preprocessing: dict
    splits: dict[str, CachedSplit] = field(default_factory=dict)

    def images(self, split: str, *, mmap: bool = True) -> np.ndarray:
        return np.load(self.splits[split].images_path, mmap_mode="r" if mmap else None)

    def index(self, split: str) -> pd.DataFrame:
        return pd.read_csv(self.splits[split].index_path, dtype={"patient_id": str})

    def labels(self, split: str) -> np.ndarray:
        return (self.index(split)["label"] == "PNEUMONIA").to_numpy(dtype=np.float32)


def _split_key(config: PreprocessingConfig, hashes: list[str]) -> str:
    digest = hashlib.sha256(config.fingerprint().encode())
    for content_hash in hashes:
        digest.update(content_hash.encode())
    return digest.hexdigest()[:20]


def _decode_verified(
    item: tuple[str, str], config: PreprocessingConfig, max_pixels: int
) -> np.ndarray:
    path, expected_hash = item
    data = Path(path).read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_hash:
        raise CacheInputChangedError(
            f"{path} changed after it was profiled (hash {actual[:12]} != {expected_hash[:12]}); "
            "re-run the data profile and split"
        )
    return preprocess(data, config, max_pixels=max_pixels)


def _existing_rows(folder: Path, exclude: Path) -> dict[str, tuple[Path, int]]:
    rows: dict[str, tuple[Path, int]] = {}
    for sidecar in folder.glob("*.csv"):
        images = sidecar.with_suffix(".npy")
        if images == exclude or not images.exists():
            continue
        hashes = pd.read_csv(sidecar, usecols=["content_hash"])["content_hash"].astype(str)
        for row, content_hash in enumerate(hashes):
            rows.setdefault(content_hash, (images, row))
    return rows


def build_cache(
    manifest: pd.DataFrame,
    cache_dir: str | Path,
    config: PreprocessingConfig,
    *,
    workers: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> PreprocessedCache:
    """Build (or reuse) one uint8 ``(N, size, size)`` array per split of ``manifest``."""
    folder = Path(cache_dir) / config.fingerprint()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessing.json").write_text(json.dumps(config.to_dict(), indent=2))
    splits: dict[str, CachedSplit] = {}
    for split in SPLIT_NAMES:
        part = manifest[manifest["split"] == split].reset_index(drop=True)
        hashes = part["content_hash"].astype(str).tolist()
        key = _split_key(config, hashes)
        images_path = folder / f"{split}-{key}.npy"
        index_path = folder / f"{split}-{key}.csv"
        reused = images_path.exists() and index_path.exists()
        if not reused:
            _write_split(
                part, images_path, index_path, config, workers, max_pixels, progress, split
            )
        splits[split] = CachedSplit(split, images_path, index_path, len(part), key, reused)
    return PreprocessedCache(root=folder, preprocessing=config.to_dict(), splits=splits)


def _write_split(
    part: pd.DataFrame,
    images_path: Path,
    index_path: Path,
    config: PreprocessingConfig,
    workers: int,
    max_pixels: int,
    progress: bool,
    split: str,
) -> None:
    size = config.image_size
    tmp_images = images_path.with_name(images_path.stem + f".{os.getpid()}.tmp.npy")
    array = np.lib.format.open_memmap(
        tmp_images, mode="w+", dtype=np.uint8, shape=(len(part), size, size)
    )
    try:
        known = _existing_rows(images_path.parent, exclude=images_path)
        to_decode: list[int] = []
        open_arrays: dict[Path, np.ndarray] = {}
        for row, content_hash in enumerate(part["content_hash"].astype(str)):
            if content_hash in known:
                source, source_row = known[content_hash]
                if source not in open_arrays:
                    open_arrays[source] = np.load(source, mmap_mode="r")
                array[row] = open_arrays[source][source_row]
            else:
                to_decode.append(row)
        items = [(part.at[row, "path"], part.at[row, "content_hash"]) for row in to_decode]
        decoded = parallel_map(
            partial(_decode_verified, config=config, max_pixels=max_pixels),
            items,
            workers=workers,
            description=f"caching {split}",
            progress=progress,
        )
        for row, pixels in zip(to_decode, decoded, strict=True):
            array[row] = pixels
        array.flush()
        del array
        part.to_csv(index_path.with_suffix(".csv.tmp"), index=False)
        # The array lands last: its presence is what marks the split as complete.
        index_path.with_suffix(".csv.tmp").replace(index_path)
        tmp_images.replace(images_path)
    finally:
        if tmp_images.exists():
            tmp_images.unlink()
