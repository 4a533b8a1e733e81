"""What the node's image results cost on the wire: bytes before and after each kind's lossless
transfer syntax, and the CPU the compression takes, on a detector-sized radiograph.

The heatmap is what Grad-CAM gives: a coarse map (7x7, a ResNet's last stage) resized to the
image, peak 1. Alongside the objects the node sends now (BINARY SEG and float parametric map,
deflated; RGB secondary capture in JPEG-LS), the run builds the encodings it replaced, which
OHIF could not show (FRACTIONAL SEG and 16-bit map, both in JPEG-LS), as the baseline.

    .venv/bin/python benchmarks/result_sizes.py [--rows 2000 --columns 1700 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import JPEGLSLossless

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the realistic radiograph builder

from cxr_platform.model_version.predictor import Prediction  # noqa: E402
from cxr_platform.pacs import results as made  # noqa: E402
from cxr_platform.pacs.compression import compress_dataset  # noqa: E402
from cxr_platform.pacs.storage import encode_dataset  # noqa: E402
from cxr_platform_tests.synthetic_dicom import RadiographSpec, radiograph_dataset  # noqa: E402


def grad_cam_like(rows: int, columns: int, seed: int) -> np.ndarray:
    coarse = np.random.default_rng(seed).random((7, 7)).astype(np.float32)
    coarse /= coarse.max()
    return np.asarray(
        Image.fromarray(coarse).resize((columns, rows), Image.Resampling.BILINEAR),
        dtype=np.float32,
    )


def fractional_seg(source: Dataset, heatmap: np.ndarray, algorithm: made.Algorithm) -> Dataset:
    """The SEG as the node built it before (FRACTIONAL, 8-bit)."""
    uids = made.result_uids(source, algorithm, "seg")
    return hd.seg.Segmentation(
        source_images=[source],
        pixel_array=heatmap[None],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=1,
                segment_label="Grad-CAM",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=made.PNEUMONIA,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name=algorithm.name,
                    family=codes.cid7162.ArtificialIntelligence,
                    version=algorithm.version,
                ),
            )
        ],
        series_instance_uid=uids.series_instance_uid,
        series_number=made.SEG_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        omit_empty_frames=False,
        **algorithm.equipment(),
    )


def integer_pmap(source: Dataset, heatmap: np.ndarray, algorithm: made.Algorithm) -> Dataset:
    """The map as the node built it before (16-bit stored, a slope back to 0-1)."""
    uids = made.result_uids(source, algorithm, "pmap")
    top = 65535
    return hd.pm.ParametricMap(
        source_images=[made._map_geometry(source, algorithm)],
        pixel_array=np.rint(heatmap * top).astype(np.uint16),
        series_instance_uid=uids.series_instance_uid,
        series_number=made.PMAP_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[
            hd.pm.RealWorldValueMapping(
                lut_label="GRADCAM",
                lut_explanation="Grad-CAM relevance",
                unit=codes.UCUM.NoUnits,
                value_range=(0, top),
                slope=1.0 / top,
                intercept=0.0,
            )
        ],
        voi_lut_transformations=[
            hd.VOILUTTransformation(window_center=top / 2, window_width=top + 1.0)
        ],
        **algorithm.equipment(),
    )


def unquantized(dataset: Dataset, heatmap: np.ndarray) -> Dataset:
    """The same map with the heatmap's full float32 values (what PMAP_LEVELS avoids)."""
    dataset.FloatPixelData = np.clip(heatmap, 0, 1).astype(np.float32).tobytes()
    return dataset


def in_jpeg_ls(dataset: Dataset) -> Dataset:
    dataset.compress(JPEGLSLossless, generate_instance_uid=False)
    return dataset


def measure(
    build: Callable[[], Dataset], compress: Callable[[Dataset], Dataset], repeats: int
) -> tuple[int, int, float]:
    """(raw bytes, compressed bytes, median ms to compress and encode)."""
    raw = len(encode_dataset(build()))
    timings, size = [], 0
    for _ in range(repeats):
        dataset = build()
        started = time.perf_counter()
        size = len(encode_dataset(compress(dataset)))
        timings.append((time.perf_counter() - started) * 1000)
    return raw, size, statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--columns", type=int, default=1700)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # A smooth body with a little quantum noise: a detector image compresses as one does, not as
    # white noise.
    rng = np.random.default_rng(args.seed)
    body = grad_cam_like(args.rows, args.columns, args.seed + 1)
    gray = np.clip(0.2 + 0.6 * body + rng.normal(0, 0.01, body.shape), 0, 1)
    source = radiograph_dataset(gray, RadiographSpec())
    heatmap = grad_cam_like(args.rows, args.columns, args.seed)
    algorithm = made.Algorithm("resnet18", "1", 0.5)
    prediction = Prediction(0.8, "PNEUMONIA", 1.4, 0.5, "resnet18", "1")
    overlay = np.repeat((gray * 255).astype(np.uint8)[..., None], 3, axis=-1)

    rows = [
        ("SEG BINARY, deflated (now)", lambda: made.build_seg(source, heatmap, algorithm),
         compress_dataset),
        ("SEG FRACTIONAL, JPEG-LS (before)", lambda: fractional_seg(source, heatmap, algorithm),
         in_jpeg_ls),
        ("map float32, deflated (now)", lambda: made.build_pmap(source, heatmap, algorithm),
         compress_dataset),
        ("map float32 unquantized, deflated",
         lambda: unquantized(made.build_pmap(source, heatmap, algorithm), heatmap),
         compress_dataset),
        ("map 16-bit, JPEG-LS (before)", lambda: integer_pmap(source, heatmap, algorithm),
         in_jpeg_ls),
        ("SC RGB, JPEG-LS (unchanged)",
         lambda: made.build_sc(source, overlay, prediction, algorithm), compress_dataset),
    ]  # fmt: skip
    print(f"{args.rows}x{args.columns}, median of {args.repeats}")
    print(f"{'result':<34} {'raw MB':>8} {'sent MB':>8} {'ratio':>6} {'ms':>7}")
    for name, build, compress in rows:
        raw, sent, ms = measure(build, compress, args.repeats)
        print(f"{name:<34} {raw / 1e6:8.3f} {sent / 1e6:8.3f} {raw / sent:6.1f} {ms:7.1f}")


if __name__ == "__main__":
    main()
