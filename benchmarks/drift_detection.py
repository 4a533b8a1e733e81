"""How often the drift rule fires on in-distribution traffic, and how many shifted images each
shift needs before it fires.

Traffic goes through the service's own path without HTTP: each image is decoded, shifted,
encoded as PNG, then decoded, preprocessed, featurized and scored by the production version
exactly as ``POST /predict`` does, and judged against that version's stored reference with
the configured rule (``CXR_DRIFT_*``).

    CXR_HOME=<home with a production model> python benchmarks/drift_detection.py
    CXR_HOME=<kaggle home> python benchmarks/drift_detection.py \\
        --source-csv <home>/cache/<fingerprint>/test-<key>.csv      # unseen real images

In-distribution traffic: fresh synthetic patients (default) or the images a CSV lists
(``path,label``; a cache index's test split is never used for training or the reference).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_platform.data.cache import CachedSplit, PreprocessedCache
from cxr_platform.data.features import image_features
from cxr_platform.data.imaging import read_image
from cxr_platform.data.shifts import SHIFT_NAMES, apply_shift, encode_png
from cxr_platform.demo.traffic import TrafficImage, synthetic_traffic
from cxr_platform.deployment.reference import load_reference, reference_from_cache
from cxr_platform.deployment.registry import PRODUCTION, registry_for
from cxr_platform.model_version.predictor import Predictor
from cxr_platform.monitoring.drift import evaluate_window
from cxr_platform.monitoring.windows import drift_rule
from cxr_platform.settings import load_settings


def log_rows(
    predictor: Predictor, images: list[TrafficImage], shift: str, severity: float, seed: int
):
    """What the inference log would hold for these images."""
    rng = np.random.default_rng(seed)
    rows = []
    for image in images:
        pixels = apply_shift(read_image(image.path).pixels, shift, severity=severity, rng=rng)
        prepared = predictor.prepare(io.BytesIO(encode_png(pixels)))
        prediction = predictor.predict_prepared(prepared.pixels[None])[0]
        rows.append(
            {
                **image_features(prepared.pixels, prepared.decoded).to_dict(),
                "probability": prediction.probability,
                "label": prediction.label,
                "model_version": predictor.model_version,
                "feedback_label": image.label,
            }
        )
    return pd.DataFrame(rows)


def cache_of(cache_dir: Path) -> PreprocessedCache:
    """The home's preprocessed cache, read back from its folder (one preprocessing)."""
    (folder,) = {path.parent for path in cache_dir.glob("*/val-*.npy")}
    splits = {}
    for split in ("train", "val"):
        (images,) = folder.glob(f"{split}-*.npy")
        splits[split] = CachedSplit(
            split,
            images,
            images.with_suffix(".csv"),
            len(np.load(images, mmap_mode="r")),
            images.stem.split("-", 1)[1],
            reused=True,
        )
    preprocessing = json.loads((folder / "preprocessing.json").read_text())
    return PreprocessedCache(folder, preprocessing, splits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=20, help="in-distribution windows")
    parser.add_argument(
        "--window-size", type=int, default=None, help="default: CXR_DRIFT_WINDOW_SIZE"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 50, 100, 200])
    parser.add_argument("--severities", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--mixed",
        type=int,
        nargs="*",
        default=None,
        help="also: shifted images needed among in-distribution ones in one full window "
        "(counts to try, e.g. 10 20 50 100)",
    )
    parser.add_argument("--no-labels", action="store_true", help="judge without feedback labels")
    parser.add_argument("--source-csv", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--version", default=PRODUCTION, help="registry version or alias")
    parser.add_argument(
        "--rebuild-reference", action="store_true", help="from the home's cache, not the version"
    )
    parser.add_argument(
        "--validation-only-reference",
        action="store_true",
        help="compare inputs with the validation images only (the design the training rows fixed)",
    )
    args = parser.parse_args()

    settings = load_settings()
    size = args.window_size or settings.monitoring.drift_window_size
    rule = drift_rule(settings.monitoring)
    registry = registry_for(settings.registry)
    production = registry.get(args.version)
    folder = registry.download(production.version)
    reference = load_reference(folder)
    predictor = Predictor(folder, model_version=production.version)
    if reference is None or args.rebuild_reference:
        # A version exported before drift monitoring: make its reference the way an export
        # does, from the home's cached validation split.
        reference = reference_from_cache(cache_of(settings.data.cache_dir), predictor)
    if args.validation_only_reference:
        reference = reference[reference["split"] == "val"]
    expected = production.metrics
    needed = args.windows * size
    n_shifted = max([*args.sizes, *(args.mixed or [])])
    if args.source_csv is not None:
        listed = pd.read_csv(args.source_csv)
        pool = [
            TrafficImage(Path(p), str(label))
            for p, label in zip(listed["path"], listed["label"], strict=True)
        ]
        pool = [pool[i] for i in np.random.default_rng(args.seed).permutation(len(pool))]
    else:
        pool = synthetic_traffic(settings.data, needed + n_shifted, seed=args.seed)
    started = time.perf_counter()
    in_distribution = log_rows(predictor, pool[: min(needed, len(pool))], "none", 1.0, args.seed)
    if args.no_labels:
        in_distribution["feedback_label"] = None
    windows = [
        in_distribution.iloc[i : i + size] for i in range(0, len(in_distribution) - size + 1, size)
    ]
    n_val = int(reference["probability"].notna().sum())
    print(
        f"version {production.version} ({production.arch}), reference {n_val} validation + "
        f"{len(reference) - n_val} training images, rule {rule.to_dict()}"
    )
    print(f"\nIn-distribution: {len(windows)} disjoint windows of {size}")
    false_alarms, largest_share = [], 0.0
    for index, window in enumerate(windows):
        result = evaluate_window(
            reference,
            window,
            window=f"w{index}",
            rule=rule,
            model_version=production.version,
            expected_metrics=expected,
        )
        largest_share = max(largest_share, result.drift_share)
        if result.fired:
            false_alarms.append(result.summary())
    print(
        f"  the rule fired in {len(false_alarms)} of {len(windows)} windows; largest share of "
        f"drifted features {largest_share:.2f} (input drift needs {rule.input_drift_share:g})"
    )
    for line in false_alarms:
        print(f"    {line}")

    rng = np.random.default_rng(args.seed + 1)

    def sample(frame: pd.DataFrame, n: int) -> pd.DataFrame:
        return frame.sample(n, random_state=int(rng.integers(2**31)))

    def fire_rate(make_window: Callable[[], pd.DataFrame]) -> float:
        """Share of ``args.repeats`` random windows on which the rule fires."""
        fired = sum(
            evaluate_window(
                reference,
                make_window(),
                window="r",
                rule=rule,
                model_version=production.version,
                expected_metrics=expected,
            ).fired
            for _ in range(args.repeats)
        )
        return fired / args.repeats

    def row(label: str, counts: list[int], rates: list[float]) -> str:
        first = next((n for n, r in zip(counts, rates, strict=True) if r >= 0.9), None)
        return (
            f"  {label:<17} "
            + "".join(f"{r:>7.0%}" for r in rates)
            + f"   {first if first else '> ' + str(max(counts))}"
        )

    # False-alarm rate per window size, the baseline each detection rate is read against.
    print(f"\nDetection: share of {args.repeats} random windows that fire, per window size")
    print("  shift       sev   " + "".join(f"{n:>7}" for n in args.sizes) + "   images needed")
    baseline = [fire_rate(lambda n=n: sample(in_distribution, n)) for n in args.sizes]
    print("  none (false alarms) " + "".join(f"{b:>7.0%}" for b in baseline))
    # Shifted images come from patients the in-distribution windows did not use.
    shifted_pool = pool[-n_shifted:] if len(pool) >= needed + n_shifted else pool[:n_shifted]
    mixed_rates: dict[str, list[float]] = {}
    for shift in SHIFT_NAMES[1:]:
        for severity in args.severities:
            rows = log_rows(predictor, shifted_pool, shift, severity, args.seed)
            if args.no_labels:
                rows["feedback_label"] = None
            label = f"{shift:<11} {severity:<5g}"
            rates = [fire_rate(lambda n=n, rows=rows: sample(rows, n)) for n in args.sizes]
            print(row(label, args.sizes, rates))
            if args.mixed:
                mixed_rates[label] = [
                    fire_rate(
                        lambda k=k, rows=rows: pd.concat(
                            [sample(rows, k), sample(in_distribution, size - k)]
                        )
                    )
                    for k in args.mixed
                ]
    if args.mixed:
        print(f"\nMixed: shifted images among {size} in one window; share of windows that fire")
        print("  shift       sev   " + "".join(f"{k:>7}" for k in args.mixed) + "   images needed")
        for label, rates in mixed_rates.items():
            print(row(label, args.mixed, rates))
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
