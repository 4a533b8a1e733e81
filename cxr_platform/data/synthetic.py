"""A deterministic synthetic chest-radiograph dataset: the embedded default for demos and tests.

Images are rendered like a frontal projection radiograph (bright = attenuating): a soft-tissue
thorax, dark lung fields, a heart shadow over the medial left lung, spine, clavicles and ribs,
vascular texture, exposure and noise that vary per image. Pneumonia is drawn as patchy
opacities inside the lung fields, with a lesion mask saved per image so explanations can be
checked against ground truth, and every image's lung fields are saved as a mask for the lung
segmentation version. Several images per patient share the patient's anatomy.

It is learnable but not trivial: lesions range from obvious to faint, and both classes carry
benign soft-tissue densities (breast shadows, skin folds) that a global brightness rule cannot
separate from disease. What it is not: a stand-in for real radiographs. Its anatomy is a handful
of shapes, its only disease is lobar-style consolidation, and a model that does well on it says
nothing about real patients; it exists so the whole platform runs, and can be checked (lesion
masks for Grad-CAM, known shifts for drift), with no data and in minutes.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_platform.data.parallel import parallel_map

# Kaggle training split: 1,341 NORMAL vs 3,875 PNEUMONIA images.
KAGGLE_NORMAL_TO_PNEUMONIA = 1341 / 3875
# 4: lung-field masks under lung_masks/, laid out like the images.
GENERATOR_VERSION = 4
# Lung fields, one mask per image at <root>/lung_masks/<class>/<stem>.png, laid out like the
# images so the segmentation version reads them as it reads any mask folder.
LUNG_MASK_FOLDER = "lung_masks"
COMPLETE_MARKER = "synthetic.json"


@dataclass(frozen=True)
class SyntheticSpec:
    n_patients: int = 400
    seed: int = 1337
    images_per_patient: tuple[int, int] = (1, 4)  # inclusive range
    base_height: int = 288
    jpeg_share: float = 0.1  # some images as JPEG so format handling is exercised
    # Peak opacity added to the lung field, faint to obvious. Fainter sets (0.07 upwards) need
    # thousands of images before a CNN trained from scratch beats chance; this range lets the
    # embedded demo learn in a few CPU minutes while the faintest cases stay hard (they are
    # most of what a 0.95-sensitivity threshold still misses).
    lesion_strength: tuple[float, float] = (0.14, 0.34)
    version: int = GENERATOR_VERSION

    def n_normal_patients(self) -> int:
        # Same images-per-patient distribution for both classes, so patient shares set the
        # image imbalance: normal / total = r / (1 + r).
        share = KAGGLE_NORMAL_TO_PNEUMONIA / (1 + KAGGLE_NORMAL_TO_PNEUMONIA)
        return max(1, min(self.n_patients - 1, round(self.n_patients * share)))


@dataclass(frozen=True)
class _Anatomy:
    width: int
    height: int
    thorax_rx: float
    thorax_ry: float
    lung_dx: float
    lung_cy: float
    lung_rx: float
    lung_ry: float
    heart_cx: float
    heart_cy: float
    heart_rx: float
    heart_ry: float
    rib_spacing: float
    rib_curve: float
    breast_shadow: float
    skin_fold: bool


def _coords(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return xs / (width - 1), ys / (height - 1)


def _soft_ellipse(x, y, cx, cy, rx, ry, edge=0.08, angle=0.0) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    dx, dy = x - cx, y - cy
    u, v = (dx * cos + dy * sin) / rx, (-dx * sin + dy * cos) / ry
    distance = np.sqrt(u * u + v * v)
    # tanh form of the logistic: no overflow far from the edge.
    return 0.5 * (1.0 - np.tanh((distance - 1.0) / (2.0 * edge)))


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Band-limited noise in [-1, 1]: random values on a coarse grid, upsampled bicubically."""
    coarse = rng.standard_normal((max(2, height // cell), max(2, width // cell))).astype(np.float32)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    field = np.asarray(image, dtype=np.float32)
    return field / (np.abs(field).max() + 1e-6)


def _anatomy(rng: np.random.Generator, spec: SyntheticSpec) -> _Anatomy:
    height = spec.base_height + int(rng.integers(-16, 33))
    width = int(height * rng.uniform(0.85, 1.05))
    return _Anatomy(
        width=width,
        height=height,
        thorax_rx=rng.uniform(0.40, 0.46),
        thorax_ry=rng.uniform(0.50, 0.56),
        lung_dx=rng.uniform(0.17, 0.21),
        lung_cy=rng.uniform(0.45, 0.50),
        lung_rx=rng.uniform(0.12, 0.15),
        lung_ry=rng.uniform(0.25, 0.30),
        heart_cx=rng.uniform(0.55, 0.59),
        heart_cy=rng.uniform(0.64, 0.68),
        heart_rx=rng.uniform(0.13, 0.17),
        heart_ry=rng.uniform(0.11, 0.14),
        rib_spacing=rng.uniform(0.062, 0.075),
        rib_curve=rng.uniform(0.8, 1.4),
        breast_shadow=float(rng.uniform(0.0, 0.14)) if rng.random() < 0.4 else 0.0,
        skin_fold=bool(rng.random() < 0.15),
    )


def _lung_masks(x, y, anatomy: _Anatomy, shift: tuple[float, float], tilt: float):
    sx, sy = shift
    right = _soft_ellipse(
        x,
        y,
        0.5 - anatomy.lung_dx + sx,
        anatomy.lung_cy + sy,
        anatomy.lung_rx,
        anatomy.lung_ry,
        edge=0.06,
        angle=tilt + 0.08,
    )
    left = _soft_ellipse(
        x,
        y,
        0.5 + anatomy.lung_dx + sx,
        anatomy.lung_cy + sy,
        anatomy.lung_rx * 0.95,
        anatomy.lung_ry * 0.97,
        edge=0.06,
        angle=tilt - 0.08,
    )
    return right, left


def _render(
    rng: np.random.Generator,
    anatomy: _Anatomy,
    pneumonia: bool,
    lesion_strength: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One radiograph (float [0,1]), its lesion mask and its lung fields (both bool)."""
    h, w = anatomy.height, anatomy.width
    x, y = _coords(h, w)
    shift = (float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03)))
    tilt = float(rng.uniform(-0.05, 0.05))
    sx, sy = shift

    body = _soft_ellipse(
        x, y, 0.5 + sx, 0.58 + sy, anatomy.thorax_rx, anatomy.thorax_ry, edge=0.05, angle=tilt
    )
    image = 0.04 + 0.50 * body
    right, left = _lung_masks(x, y, anatomy, shift, tilt)
    lungs = np.maximum(right, left)
    image -= 0.33 * lungs

    # Vascular markings: fine texture, denser towards the hila, in every lung.
    texture = _smooth_noise(rng, h, w, cell=6)
    hilum = np.exp(-(((x - 0.5 - sx) / 0.22) ** 2))
    image += 0.035 * texture * lungs * (0.5 + hilum)

    heart = _soft_ellipse(
        x,
        y,
        anatomy.heart_cx + sx,
        anatomy.heart_cy + sy,
        anatomy.heart_rx,
        anatomy.heart_ry,
        edge=0.10,
        angle=-0.3,
    )
    image += 0.20 * heart * body
    spine = np.exp(-(((x - 0.5 - sx) / 0.035) ** 2)) * body
    image += 0.16 * spine

    # Posterior ribs: arcs that fall laterally, one family per side.
    thickness = 0.011
    for k in range(10):
        y0 = 0.20 + sy + k * anatomy.rib_spacing
        for side in (-1.0, 1.0):
            dx = (x - 0.5 - sx) * side
            curve = y0 + anatomy.rib_curve * 0.9 * dx**2 + 0.04 * dx
            band = (
                np.exp(-(((y - curve) / thickness) ** 2)) * (dx > 0.03) * (dx < anatomy.thorax_rx)
            )
            image += 0.055 * band * body
    # Clavicles.
    for side in (-1.0, 1.0):
        dx = (x - 0.5 - sx) * side
        curve = 0.17 + sy - 0.12 * dx + 0.35 * dx**2
        image += 0.12 * np.exp(-(((y - curve) / 0.012) ** 2)) * (dx > 0.03) * (dx < 0.33)

    # Benign densities in both classes: breast shadows over the lower lungs, skin folds.
    if anatomy.breast_shadow:
        for side in (-1.0, 1.0):
            shadow = _soft_ellipse(x, y, 0.5 + side * 0.24 + sx, 0.78 + sy, 0.17, 0.10, edge=0.25)
            image += anatomy.breast_shadow * shadow
    if anatomy.skin_fold:
        angle = rng.uniform(-0.6, 0.6)
        offset = rng.uniform(0.25, 0.75)
        line = np.abs((x - offset) * math.cos(angle) + (y - 0.5) * math.sin(angle))
        image += 0.05 * np.exp(-((line / 0.01) ** 2)) * body

    lesion = np.zeros((h, w), dtype=np.float32)
    if pneumonia:
        lesion = _opacities(rng, x, y, right, left, h, w, lesion_strength)
        image += lesion

    # Exposure, detector response and noise vary per acquisition, within what a modality's own
    # processing leaves in a stored radiograph (it windows and equalizes each image). Wider
    # exposure changes are a shift, not the training distribution: the drift loop's contrast and
    # gamma shifts, and the full profile's acquisition augmentation, cover them.
    gain = rng.uniform(0.92, 1.08)
    offset = rng.uniform(-0.015, 0.02)
    gamma = rng.uniform(0.95, 1.06)
    image = np.clip(image * gain + offset, 0.0, 1.0) ** gamma
    blur_noise = _smooth_noise(rng, h, w, cell=2)
    image += rng.uniform(0.006, 0.02) * blur_noise
    image += rng.uniform(0.004, 0.02) * rng.standard_normal((h, w)).astype(np.float32)
    mask = lesion > 0.35 * lesion.max() if pneumonia else np.zeros((h, w), dtype=bool)
    # The lung fields as drawn: where the soft edge is past half way, the border a reader sees.
    lung_fields = lungs > 0.5
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask, lung_fields


def _opacities(rng, x, y, right, left, h, w, lesion_strength) -> np.ndarray:
    """Consolidation: one to four confluent opacities inside the lung fields, each a soft blob
    mottled at the scale of acini (not pixel speckle), whiter at its core and fading at its
    margins, as airspace disease fills the alveoli around the airways."""
    lungs = np.maximum(right, left)
    strength = rng.uniform(*lesion_strength)
    field = np.zeros((h, w), dtype=np.float32)
    inside = np.argwhere(lungs > 0.8)
    # Consolidation favours the lower zones; bilateral disease is common.
    weights = (inside[:, 0] / h) ** 2
    weights /= weights.sum()
    for _ in range(int(rng.integers(1, 5))):
        cy, cx = inside[rng.choice(len(inside), p=weights)]
        # Segmental to lobar in size (a sigma of 6-12% of the image): smaller round opacities
        # are nodules, another finding.
        radius = rng.uniform(0.06, 0.12)
        aspect = rng.uniform(0.7, 1.4)
        blob = np.exp(
            -(((x - cx / (w - 1)) / aspect) ** 2 + ((y - cy / (h - 1)) * aspect) ** 2)
            / (2 * radius**2)
        )
        mottled = np.clip(0.75 + 0.5 * _smooth_noise(rng, h, w, cell=14), 0.0, 1.0)
        field = np.maximum(field, blob * mottled * rng.uniform(0.7, 1.0))
    return (strength * field * lungs).astype(np.float32)


def render_radiograph(
    seed: int, *, pneumonia: bool = False, spec: SyntheticSpec | None = None
) -> np.ndarray:
    """One synthetic frontal chest radiograph (float [0, 1]) of a new patient, drawn the way
    the dataset draws them: what tests send where a real radiograph is needed."""
    spec = spec or SyntheticSpec()
    rng = np.random.default_rng([spec.seed, 1_000_003, seed])
    pixels, _, _ = _render(rng, _anatomy(rng, spec), pneumonia, spec.lesion_strength)
    return pixels.astype(np.float32)


def _patient_rows(
    patient_index: int, spec: SyntheticSpec, root: Path, n_normal: int
) -> list[dict[str, str]]:
    # One generator per patient, derived from (seed, patient): output does not depend on how
    # patients are spread over worker processes.
    rng = np.random.default_rng([spec.seed, patient_index])
    pneumonia = patient_index >= n_normal
    label = "PNEUMONIA" if pneumonia else "NORMAL"
    patient = f"SYN-P{patient_index:04d}"
    anatomy = _anatomy(rng, spec)
    rows = []
    low, high = spec.images_per_patient
    for k in range(int(rng.integers(low, high + 1))):
        pixels, mask, lung_fields = _render(rng, anatomy, pneumonia, spec.lesion_strength)
        suffix = ".jpeg" if rng.random() < spec.jpeg_share else ".png"
        relative = Path(label) / f"{patient}-{k + 1:02d}{suffix}"
        image = Image.fromarray(np.rint(pixels * 255).astype(np.uint8))
        image.save(root / relative, quality=92) if suffix == ".jpeg" else image.save(
            root / relative
        )
        lung_relative = Path(LUNG_MASK_FOLDER) / label / f"{patient}-{k + 1:02d}.png"
        Image.fromarray(lung_fields.astype(np.uint8) * 255).save(root / lung_relative)
        mask_relative = ""
        if pneumonia:
            mask_relative = (Path("masks") / f"{patient}-{k + 1:02d}.png").as_posix()
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / mask_relative)
        rows.append(
            {
                "file": relative.as_posix(),
                "label": label,
                "patient_id": patient,
                "mask": mask_relative,
            }
        )
    return rows


def generate_synthetic_dataset(
    root: str | Path, spec: SyntheticSpec | None = None, *, workers: int = 1, progress: bool = True
) -> Path:
    """Write the dataset to ``root`` (labels.csv layout + masks/); reuse it when already complete.

    Generation goes to a temporary sibling folder that is renamed into place at the end, so an
    interrupted run never leaves a half-written dataset that looks complete.
    """
    spec = spec or SyntheticSpec()
    root = Path(root)
    marker = root / COMPLETE_MARKER
    if marker.exists():
        recorded = json.loads(marker.read_text())
        if recorded.get("spec") == _jsonable(spec):
            return root
        shutil.rmtree(root)
    tmp = root.with_name(root.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for folder in (
        "NORMAL",
        "PNEUMONIA",
        "masks",
        *(f"{LUNG_MASK_FOLDER}/{c}" for c in ("NORMAL", "PNEUMONIA")),
    ):
        (tmp / folder).mkdir(parents=True)
    n_normal = spec.n_normal_patients()
    per_patient = parallel_map(
        partial(_patient_rows, spec=spec, root=tmp, n_normal=n_normal),
        list(range(spec.n_patients)),
        workers=workers,
        description="rendering synthetic X-rays",
        progress=progress,
        chunksize=4,
    )
    rows = [row for patient_rows in per_patient for row in patient_rows]
    with (tmp / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label", "patient_id", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    counts = {label: sum(r["label"] == label for r in rows) for label in ("NORMAL", "PNEUMONIA")}
    (tmp / COMPLETE_MARKER).write_text(
        json.dumps({"spec": _jsonable(spec), "images": len(rows), "per_class": counts}, indent=2)
    )
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return root


def _jsonable(spec: SyntheticSpec) -> dict:
    return json.loads(json.dumps(asdict(spec)))


def lesion_mask_path(dataset_root: str | Path, image_relative_path: str) -> Path | None:
    """The saved lesion mask for a synthetic image (None for normal images)."""
    stem = Path(image_relative_path).name.split(".", 1)[0]
    candidate = Path(dataset_root) / "masks" / f"{stem}.png"
    return candidate if candidate.exists() else None
