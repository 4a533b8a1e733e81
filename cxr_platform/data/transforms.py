"""torchvision v2 transforms and DataLoaders over the preprocessed cache.

Inputs are uint8 tensors ``(1, H, W)`` straight from the cache; normalization uses the
:class:`PreprocessingConfig` constants so evaluation and serving see identical inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2

from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.preprocessing import PreprocessingConfig


@dataclass(frozen=True)
class AugmentationConfig:
    crop_scale: tuple[float, float] = (0.8, 1.0)
    rotation_degrees: float = 15.0
    # Flipping mirrors the heart to the right side; kept on by default (it regularizes small
    # datasets) and switchable for teams that prefer anatomically plausible inputs only.
    horizontal_flip: bool = True
    brightness: float = 0.2
    contrast: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)


def train_transforms(
    preprocessing: PreprocessingConfig, augmentation: AugmentationConfig
) -> v2.Compose:
    size = preprocessing.image_size
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=augmentation.crop_scale, antialias=True),
        v2.RandomRotation(augmentation.rotation_degrees),
    ]
    if augmentation.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if augmentation.brightness or augmentation.contrast:
        steps.append(
            v2.ColorJitter(brightness=augmentation.brightness, contrast=augmentation.contrast)
        )
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([preprocessing.mean], [preprocessing.std]),
    ]
    return v2.Compose(steps)


def eval_transforms(preprocessing: PreprocessingConfig) -> v2.Compose:
    return v2.Compose(
        [
            v2.Resize((preprocessing.image_size, preprocessing.image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([preprocessing.mean], [preprocessing.std]),
        ]
    )


class CachedImageDataset(Dataset):
    """Images of one split from the memory-mapped cache, with float labels (1 = pneumonia)."""

    def __init__(self, cache: PreprocessedCache, split: str, transform: v2.Compose) -> None:
        self.images_path = cache.splits[split].images_path
        self.labels = cache.labels(split)
        self.transform = transform
        self._images: np.ndarray | None = None  # opened lazily: one memmap per worker process

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        image = torch.from_numpy(np.array(self._images[index], copy=True)).unsqueeze(0)
        return self.transform(image), torch.tensor(self.labels[index])


def class_balanced_sampler(labels: np.ndarray, *, seed: int) -> WeightedRandomSampler:
    """Draw each class equally often per epoch (with replacement)."""
    labels = labels.astype(np.int64)
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    weights = 1.0 / counts[labels]
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(
        torch.as_tensor(weights), num_samples=len(labels), replacement=True, generator=generator
    )


def build_dataloader(
    cache: PreprocessedCache,
    split: str,
    *,
    preprocessing: PreprocessingConfig,
    augmentation: AugmentationConfig | None = None,
    batch_size: int = 32,
    balanced: bool = False,
    workers: int = 0,
    seed: int = 0,
) -> DataLoader:
    """Training split: augmented and shuffled (or class-balanced); others: deterministic order."""
    training = split == "train"
    transform = (
        train_transforms(preprocessing, augmentation or AugmentationConfig())
        if training
        else eval_transforms(preprocessing)
    )
    dataset = CachedImageDataset(cache, split, transform)
    sampler = class_balanced_sampler(dataset.labels, seed=seed) if training and balanced else None
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=training and sampler is None,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=generator,
        drop_last=False,
    )
