"""Batched augmentation and batching over the preprocessed uint8 cache, on any torch device.

Every sample in a batch draws its own crop, rotation, flip, brightness and contrast. Crop, rotation
and flip are composed into one affine matrix per sample and applied with a single ``grid_sample``,
so each image is resampled once (sequential per-op transforms would interpolate three times) and
the whole batch is one kernel call on CPU or GPU. Normalization uses the
:class:`PreprocessingConfig` constants so evaluation and serving see identical inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.preprocessing import PreprocessingConfig


@dataclass(frozen=True)
class AugmentationConfig:
    crop_scale: tuple[float, float] = (0.8, 1.0)  # share of the image area kept by the crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation_degrees: float = 15.0
    # Flipping mirrors the heart to the right side; kept on by default (it regularizes small
    # datasets) and switchable for teams that prefer anatomically plausible inputs only.
    horizontal_flip: bool = True
    brightness: float = 0.2
    contrast: float = 0.2
    # Acquisition variation between scanners and sites (0 disables each): a random gamma in
    # [1/gamma, gamma], a Gaussian blur with sigma drawn from [0, blur_sigma] pixels, and
    # Gaussian noise with a standard deviation drawn from [0, noise_std] (on the [0, 1] scale).
    gamma: float = 1.0
    blur_sigma: float = 0.0
    noise_std: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> AugmentationConfig:
        return cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}  # JSON lists
        )


NO_AUGMENTATION = AugmentationConfig(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    rotation_degrees=0.0,
    horizontal_flip=False,
    brightness=0.0,
    contrast=0.0,
)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, H, W) -> float32 in [0, 1]."""
    return images.to(torch.float32).div_(255.0)


def normalize(unit_images: torch.Tensor, preprocessing: PreprocessingConfig) -> torch.Tensor:
    """The torch twin of :func:`preprocessing.normalize_uint8` (same constants, same order)."""
    return (unit_images - preprocessing.mean) / preprocessing.std


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def affine_matrices(
    n: int, config: AugmentationConfig, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """(n, 2, 3) matrices mapping output to input coordinates, in ``affine_grid``'s [-1, 1] space.

    Random resized crop: area share ``s`` and aspect ratio ``r`` give a crop of half-widths
    ``sqrt(s*r)`` by ``sqrt(s/r)`` (clipped to the image), centred where it still fits; then a
    rotation about the crop centre and an optional mirror.
    """
    scale = _uniform(n, *config.crop_scale, generator, device)
    log_ratio = _uniform(n, *(math.log(r) for r in config.crop_ratio), generator, device)
    ratio = torch.exp(log_ratio)
    half_w = torch.sqrt(scale * ratio).clamp(max=1.0)
    half_h = torch.sqrt(scale / ratio).clamp(max=1.0)
    centre_x = (torch.rand(n, generator=generator, device=device) * 2 - 1) * (1 - half_w)
    centre_y = (torch.rand(n, generator=generator, device=device) * 2 - 1) * (1 - half_h)
    angle = _uniform(n, -config.rotation_degrees, config.rotation_degrees, generator, device) * (
        math.pi / 180
    )
    flip = torch.ones(n, device=device)
    if config.horizontal_flip:
        flip = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -flip, flip)
    cos, sin = torch.cos(angle), torch.sin(angle)
    matrices = torch.empty(n, 2, 3, device=device)
    matrices[:, 0, 0] = cos * half_w * flip
    matrices[:, 0, 1] = -sin * half_h
    matrices[:, 0, 2] = centre_x
    matrices[:, 1, 0] = sin * half_w * flip
    matrices[:, 1, 1] = cos * half_h
    matrices[:, 1, 2] = centre_y
    return matrices


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """(N, 1, H, W) images, each blurred with its own sigma (pixels, at most ``max_sigma``), in
    two grouped 1-D passes: one kernel call for the whole batch whatever the mix of sigmas.

    The kernel radius comes from ``max_sigma``, known on the host: reading ``sigmas.max()`` back
    from a GPU would make every batch wait for the device.
    """
    n, _, height, width = images.shape
    radius = max(1, math.ceil(3 * max_sigma))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    # A floor on sigma keeps the kernel finite; at 1e-3 pixels it is a delta (no blur).
    kernel = torch.exp(-0.5 * (offsets / sigmas.clamp(min=1e-3).view(n, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    stacked = images.view(1, n, height, width)
    padded = F.pad(stacked, (radius, radius, 0, 0), mode="replicate")
    stacked = F.conv2d(padded, kernel.view(n, 1, 1, -1), groups=n)
    padded = F.pad(stacked, (0, 0, radius, radius), mode="replicate")
    stacked = F.conv2d(padded, kernel.view(n, 1, -1, 1), groups=n)
    return stacked.view(n, 1, height, width)


def augment(
    unit_images: torch.Tensor, config: AugmentationConfig, generator: torch.Generator
) -> torch.Tensor:
    """Per-sample random crop/rotation/flip, then gamma, blur, brightness, contrast and noise
    where enabled; stays in [0, 1]."""
    n, _, height, width = unit_images.shape
    device = unit_images.device
    matrices = affine_matrices(n, config, generator, device)
    grid = F.affine_grid(matrices, [n, 1, height, width], align_corners=False)
    # Zero padding: rotated corners are black, as in the field's standard RandomRotation.
    images = F.grid_sample(
        unit_images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    # Disabled steps draw no random numbers, so enabling one never changes the others' draws.
    if config.gamma > 1.0:
        log_gamma = math.log(config.gamma)
        gamma = torch.exp(_uniform(n, -log_gamma, log_gamma, generator, device))
        images = images.clamp(min=1e-6) ** gamma.view(n, 1, 1, 1)
    if config.blur_sigma > 0.0:
        sigmas = _uniform(n, 0.0, config.blur_sigma, generator, device)
        images = gaussian_blur(images, sigmas, config.blur_sigma)
    if config.brightness:
        factor = _uniform(n, 1 - config.brightness, 1 + config.brightness, generator, device)
        images = images * factor.view(n, 1, 1, 1)
    if config.contrast:
        factor = _uniform(n, 1 - config.contrast, 1 + config.contrast, generator, device)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = (images - mean) * factor.view(n, 1, 1, 1) + mean
    if config.noise_std > 0.0:
        std = _uniform(n, 0.0, config.noise_std, generator, device)
        noise = torch.randn(images.shape, generator=generator, device=device)
        images = images + noise * std.view(n, 1, 1, 1)
    return images.clamp_(0.0, 1.0)


def balanced_indices(labels: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """An epoch's worth of indices drawn so that each class appears equally often."""
    labels_t = torch.as_tensor(labels.astype(np.int64))
    counts = torch.bincount(labels_t, minlength=2).to(torch.float64)
    weights = (1.0 / counts)[labels_t]
    return torch.multinomial(weights, len(labels), replacement=True, generator=generator)


class TensorBatches:
    """A split held as one uint8 tensor (on the training device) and served in batches.

    With a 224x224 cache one image is 49 KiB, so the 5,216-image Kaggle training set is 256 MiB:
    small enough for host or accelerator memory, which removes per-sample loading entirely.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        preprocessing: PreprocessingConfig,
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError(f"expected uint8 (N, H, W) images, got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.device = torch.device(device)
        self.images = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).to(self.device)
        self.labels_np = labels.astype(np.float32)
        self.labels = torch.from_numpy(self.labels_np).to(self.device)
        self.preprocessing = preprocessing

    @classmethod
    def from_cache(
        cls, cache: PreprocessedCache, split: str, *, device: torch.device | str = "cpu"
    ) -> TensorBatches:
        """One split of the cache, normalized with the preprocessing the cache was built with."""
        return cls(
            cache.images(split, mmap=False),
            cache.labels(split),
            PreprocessingConfig.from_dict(cache.preprocessing),
            device=device,
        )

    def __len__(self) -> int:
        return len(self.labels_np)

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def batch(
        self,
        indices: torch.Tensor,
        *,
        augmentation: AugmentationConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        indices = indices.to(self.device)
        images = to_unit_float(self.images.index_select(0, indices))
        if augmentation is not None and augmentation != NO_AUGMENTATION:
            assert generator is not None
            images = augment(images, augmentation, generator)
        return normalize(images, self.preprocessing), self.labels.index_select(0, indices)

    def training_epoch(
        self,
        batch_size: int,
        *,
        augmentation: AugmentationConfig,
        seed: int,
        balanced: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled (or class-balanced) augmented batches, fully determined by ``seed``.

        ``shard=(rank, world_size)``: every process of a distributed run draws the same order of
        global batches of ``batch_size`` and keeps its own interleaved share of each, so the
        processes together take the steps one process would. A final batch too small to give
        every process an image is dropped (a process without one would stall the others)."""
        rank, world_size = shard
        # Each process augments its own images: a seed of its own keeps their draws independent.
        generator = torch.Generator(device=self.device).manual_seed(seed + 7919 * rank)
        order_generator = torch.Generator().manual_seed(seed)
        if balanced:
            order = balanced_indices(self.labels_np, order_generator)
        else:
            order = torch.randperm(len(self), generator=order_generator)
        # One copy per epoch: copying each batch's indices from pageable host memory would make
        # the host wait for the GPU to drain its queue before every batch.
        order = order.to(self.device)
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            if world_size > 1:
                if len(indices) < world_size:
                    return
                indices = indices[rank::world_size]
            yield self.batch(indices, augmentation=augmentation, generator=generator)

    def evaluation_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            indices = torch.arange(start, min(start + batch_size, len(self)), device=self.device)
            yield self.batch(indices)
