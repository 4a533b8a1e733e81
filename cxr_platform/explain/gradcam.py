"""Batched Grad-CAM (Selvaraju et al. 2017) through captum's ``LayerGradCam``.

captum differentiates the logit with respect to the target layer's output via ``autograd.grad``
and a forward hook, so it never installs full backward hooks, which break on DenseNet's in-place
ReLU. Which layer to explain is the model factory's decision (``gradcam_layer``).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from matplotlib import colormaps
from PIL import Image
from torch import nn

from cxr_platform.data.preprocessing import PreprocessingConfig, normalize_uint8
from cxr_platform.models.zoo import gradcam_layer

# (model, normalized images N x 1 x H x W) -> heatmaps N x H x W in [0, 1]
HeatmapMethod = Callable[[nn.Module, torch.Tensor], np.ndarray]


def gradcam_heatmaps(
    model: nn.Module, arch: str, images: torch.Tensor, *, batch_size: int = 32, relu: bool = True
) -> np.ndarray:
    """Grad-CAM of the pneumonia logit for normalized images (N, 1, H, W).

    Returns float32 (N, H, W): the ReLU'd class activation map upsampled bilinearly to the input
    size and scaled to [0, 1] per image (all zeros where no region supports pneumonia). With
    ``relu=False`` the signed map, scaled to [-1, 1]: what the randomization check compares,
    because a random network's ReLU'd map is often all zeros and would "differ" trivially.
    """
    model.eval()
    layer = gradcam_layer(model, arch)
    cam = LayerGradCam(model, layer)
    height, width = images.shape[-2:]
    device = next(model.parameters()).device
    maps = []
    with torch.enable_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device).float()
            # A frozen backbone has no parameter that requires grad; an input that does keeps
            # the graph alive up to the explained layer.
            batch.requires_grad_(True)
            attributions = cam.attribute(batch, target=0, relu_attributions=relu)
            upsampled = LayerAttribution.interpolate(attributions, (height, width), "bilinear")
            maps.append(upsampled.detach().float().cpu()[:, 0])
    heatmaps = torch.cat(maps)
    if relu:
        heatmaps = heatmaps.clamp_min(0)
    peak = heatmaps.abs().flatten(1).amax(dim=1).clamp_min(1e-12)
    return (heatmaps / peak[:, None, None]).numpy().astype(np.float32)


def gradcam_method(arch: str, *, relu: bool = True) -> HeatmapMethod:
    """Grad-CAM as a :data:`HeatmapMethod`, for the sanity checks."""
    return lambda model, images: gradcam_heatmaps(model, arch, images, relu=relu)


def heatmaps_for_uint8(
    model: nn.Module, arch: str, images: np.ndarray, preprocessing: PreprocessingConfig
) -> np.ndarray:
    """Grad-CAM for cached uint8 squares (N, S, S), normalized the way the model was trained."""
    normalized = torch.from_numpy(normalize_uint8(np.asarray(images), preprocessing))[:, None]
    return gradcam_heatmaps(model, arch, normalized)


@functools.cache
def _colormap_palette(name: str) -> list[int]:
    """The colormap sampled at 256 levels, as a flat RGB palette for Pillow."""
    table = colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
    return np.clip(np.rint(table * 255.0), 0, 255).astype(np.uint8).reshape(-1).tolist()


def overlay(
    gray: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.45, colormap: str = "jet"
) -> np.ndarray:
    """RGB uint8: the X-ray with the heatmap blended in where it is non-zero.

    ``gray`` is uint8 (H, W) at any size; the heatmap is resized to it. Opacity scales with the
    heatmap so regions without evidence keep the original grey values. The heatmap is quantized
    to 256 levels (what an 8-bit display shows anyway) and blended by Pillow's palette and
    composite operations, so a detector-sized radiograph takes milliseconds, not a colormap
    evaluation in float64 per pixel.
    """
    gray = np.asarray(gray)
    if gray.dtype != np.uint8:
        raise ValueError("overlay expects a uint8 grayscale image")
    height, width = gray.shape
    if heatmap.shape != gray.shape:
        heatmap = np.asarray(
            Image.fromarray(heatmap.astype(np.float32)).resize(
                (width, height), Image.Resampling.BILINEAR
            )
        )
    levels = np.clip(np.rint(np.asarray(heatmap, np.float32) * 255.0), 0, 255).astype(np.uint8)
    colored = Image.fromarray(levels, mode="L").convert("P")
    colored.putpalette(_colormap_palette(colormap))
    opacity = Image.fromarray(levels, mode="L").point([round(v * alpha) for v in range(256)])
    base = Image.fromarray(gray, mode="L").convert("RGB")
    return np.asarray(Image.composite(colored.convert("RGB"), base, opacity))


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
