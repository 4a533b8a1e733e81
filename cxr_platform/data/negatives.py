"""Images that are not frontal chest radiographs, for measuring and testing the input gate.

The training data has none, so they are made here, honestly and reproducibly, never stored:

- ``other_modality``: CT, MR, ultrasound, nuclear-medicine and other DICOM test files that pydicom
  ships (rendered with their own windowing; a multi-frame file gives its middle frame);
- ``photograph``: the sample photographs matplotlib and scikit-learn ship, and crops of them;
- ``document``: rendered pages of text and forms; ``screenshot``: rendered plots and dialogs;
- transformed radiographs (from images the caller passes, e.g. a held-out test split):
  ``rotated_90``, ``inverted``, ``upside_down``, ``corner_crop``, ``lateral_like`` (one side of
  the thorax, stretched), ``tiny``, ``padded`` (a small film in a large blank frame),
  ``extreme_aspect`` (a thin strip);
- ``near_constant``: flat and almost-flat images.

Kinds that cannot be sourced here (radiographs of other body parts, non-human radiographs,
mammograms, real lateral views) are named in ``UNSOURCED_KINDS``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

UNSOURCED_KINDS = (
    "radiograph of another body part",
    "non-human radiograph",
    "mammogram",
    "real lateral chest view",
)


@dataclass(frozen=True)
class Negative:
    kind: str
    source: str  # the file, or the radiograph index, it was made from
    pixels: np.ndarray  # float32 (H, W) in [0, 1], as the decoder would hand it over


def _gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _scaled(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    low, high = np.percentile(array, (0.5, 99.5))
    return np.clip((array - low) / max(high - low, 1e-9), 0, 1).astype(np.float32)


def other_modalities() -> Iterator[Negative]:
    """Every pydicom test file with pixels that is not a radiograph (CT, MR, US, NM, OT...)."""
    import pydicom
    from pydicom.data import get_testdata_files

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # test files are deliberately odd
        paths = sorted(get_testdata_files("*.dcm"))
        for path in paths:
            try:
                dataset = pydicom.dcmread(path)
                if getattr(dataset, "Modality", "") in ("CR", "DX"):
                    continue
                array = dataset.pixel_array
            except Exception:  # no pixels, or a compression this install cannot decode
                continue
            if array.ndim == 4 or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
                array = array[len(array) // 2]
            if array.ndim == 3:
                array = array[..., :3].mean(axis=-1)
            if min(array.shape) < 64 or np.ptp(array) == 0:
                continue
            yield Negative("other_modality", Path(path).name, _scaled(array))


def photographs() -> Iterator[Negative]:
    import matplotlib
    from sklearn.datasets import load_sample_images

    sample_dir = Path(matplotlib.get_data_path()) / "sample_data"
    photos = [("grace_hopper.jpg", Image.open(sample_dir / "grace_hopper.jpg"))]
    bunch = load_sample_images()
    photos += [
        (Path(name).name, Image.fromarray(image))
        for name, image in zip(bunch.filenames, bunch.images, strict=True)
    ]
    for name, photo in photos:
        pixels = _gray(photo)
        yield Negative("photograph", name, pixels)
        height, width = pixels.shape
        for index, (top, left) in enumerate(((0, 0), (height // 3, width // 3))):
            crop = pixels[top : top + height * 2 // 3, left : left + width * 2 // 3]
            yield Negative("photograph", f"{name}#crop{index}", crop)


def _words(rng: np.random.Generator, n: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join(
        "".join(rng.choice(list(letters), size=int(rng.integers(2, 10)))) for _ in range(n)
    )


def documents(n: int = 24, seed: int = 0) -> Iterator[Negative]:
    """Pages of text, forms with boxes and tables, some scanned-looking (grey, tilted, noisy)."""
    rng = np.random.default_rng(seed)
    for index in range(n):
        page = Image.new("L", (850, 1100), int(rng.integers(225, 256)))
        draw = ImageDraw.Draw(page)
        y = 60
        while y < 1040:
            if rng.random() < 0.15:  # a form field or a table row
                draw.rectangle((60, y, 790, y + 40), outline=0, width=2)
                draw.text((70, y + 12), _words(rng, 3) + ":", fill=0)
                y += 55
            else:
                draw.text((60, y), _words(rng, int(rng.integers(6, 12))), fill=0)
                y += int(rng.integers(18, 30))
        if index % 3 == 2:  # scanned: tilted, grey, noisy
            page = page.rotate(float(rng.uniform(-3, 3)), fillcolor=200)
        pixels = _gray(page)
        if index % 3 == 2:
            pixels = np.clip(pixels * 0.85 + rng.normal(0, 0.03, pixels.shape), 0, 1)
        yield Negative("document", f"page{index}", pixels.astype(np.float32))


def screenshots(n: int = 24, seed: int = 0) -> Iterator[Negative]:
    """Rendered charts and dialog-like windows, as a screen capture sent by mistake would be."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    for index in range(n):
        if index % 2 == 0:
            fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=80)
            x = np.linspace(0, 10, 200)
            for _ in range(int(rng.integers(1, 4))):
                ax.plot(x, np.sin(x * rng.uniform(0.5, 2)) * rng.uniform(0.5, 2))
            ax.set_title(_words(rng, 3))
            fig.canvas.draw()
            pixels = _gray(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())))
            plt.close(fig)
        else:
            window = Image.new("L", (800, 600), 235)
            draw = ImageDraw.Draw(window)
            draw.rectangle((0, 0, 800, 32), fill=60)
            draw.text((10, 10), _words(rng, 4), fill=255)
            for row in range(int(rng.integers(3, 8))):
                top = 60 + row * 70
                draw.rectangle((40, top, 760, top + 50), outline=120, width=1)
                draw.text((50, top + 18), _words(rng, 5), fill=20)
            draw.rectangle((600, 540, 760, 580), fill=90)
            pixels = _gray(window)
        yield Negative("screenshot", f"screen{index}", pixels)


def transformed_radiographs(images: np.ndarray, *, seed: int = 0) -> Iterator[Negative]:
    """Wrong views of real radiographs. ``images``: (N, H, W) uint8 or float in [0, 1]."""
    rng = np.random.default_rng(seed)
    for index, image in enumerate(images):
        pixels = np.asarray(image, dtype=np.float32)
        if pixels.max() > 1.0:
            pixels = pixels / 255.0
        height, width = pixels.shape
        source = f"radiograph{index}"
        yield Negative("rotated_90", source, np.rot90(pixels, 1 if index % 2 else 3).copy())
        yield Negative("inverted", source, 1.0 - pixels)
        yield Negative("upside_down", source, pixels[::-1].copy())
        corner = [(0, 0), (0, width // 2), (height // 2, 0), (height // 2, width // 2)][index % 4]
        yield Negative(
            "corner_crop",
            source,
            pixels[corner[0] : corner[0] + height // 2, corner[1] : corner[1] + width // 2],
        )
        side = slice(0, width * 3 // 5) if index % 2 else slice(width * 2 // 5, width)
        yield Negative("lateral_like", source, pixels[:, side].copy())
        small = int(rng.integers(6, 40))
        tiny = Image.fromarray((pixels * 255).astype(np.uint8)).resize((small, small))
        yield Negative("tiny", source, _gray(tiny))
        frame = np.zeros((height * 3, width * 3), np.float32)
        frame[height : 2 * height, width : 2 * width] = pixels
        yield Negative("padded", source, frame)
        yield Negative("extreme_aspect", source, pixels[height // 2 - height // 8 : height // 2])


def near_constant(n: int = 20, seed: int = 0) -> Iterator[Negative]:
    rng = np.random.default_rng(seed)
    for index in range(n):
        level = float(rng.uniform(0, 1))
        noise = rng.normal(0, 0.003, (256, 256)) if index % 2 else 0.0
        pixels = np.clip(np.full((256, 256), level) + noise, 0, 1).astype(np.float32)
        yield Negative("near_constant", f"flat{index}", pixels)


def negative_suite(radiographs: np.ndarray, *, seed: int = 0) -> list[Negative]:
    """Every kind above; the transformed kinds from ``radiographs``."""
    return [
        *other_modalities(),
        *photographs(),
        *documents(seed=seed),
        *screenshots(seed=seed),
        *transformed_radiographs(radiographs, seed=seed),
        *near_constant(seed=seed),
    ]
