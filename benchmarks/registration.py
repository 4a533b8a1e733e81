"""What a model card costs a registration: `register_folder` with the card (built from the run's
tags, parameters and evaluation report, written as Markdown and HTML beside the model files, its
summary set as the version's description) against the same registration without it, measured in
the same run on the embedded store (SQLite and a local artifact folder).

The model folder holds files of a ResNet18 export's sizes (ONNX, TorchScript and weights, about
45 MB each, random bytes: their content does not matter to the registry), and the run holds a
real evaluation report of the shape `cxr evaluate` logs (val and test splits, subgroups).

    .venv/bin/python benchmarks/registration.py [--repeats 5] [--file-mb 45]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_platform.deployment.registry import ModelRegistry  # noqa: E402
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.model_version.tags import VersionTags  # noqa: E402
from cxr_platform.models.evaluation import evaluate_split
from cxr_platform.tracking import ExperimentTracker  # noqa: E402

POINT = OperatingPoint(
    threshold=0.5,
    temperature=1.0,
    rule="sensitivity_target",
    target_sensitivity=0.95,
    val_sensitivity=0.95,
    val_specificity=0.8,
)


def _evaluation_report(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("val", 780), ("test", 790)):
        labels = (rng.random(n) < 0.74).astype(int)
        logits = rng.normal(loc=np.where(labels == 1, 1.5, -1.5), scale=1.2)
        patients = np.array([f"p{i // 2}" for i in range(n)])
        evaluation = evaluate_split(
            split, labels, logits, POINT, n_bootstrap=200, patients=patients
        )
        splits[split] = asdict(evaluation)
    return {
        "arch": "resnet18",
        "model_name": "resnet18",
        "operating_point": POINT.to_dict(),
        "splits": splits,
        "training": {},
        "checkpoint_sha256": "0" * 64,
        "subgroups": [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--file-mb", type=int, default=45)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        home = Path(work)
        uri = f"sqlite:///{home / 'mlflow.db'}"
        tracker = ExperimentTracker(uri, artifact_root=home / "artifacts")
        run = tracker.start_run("benchmark", tags={})
        report = home / "evaluation.json"
        report.write_text(json.dumps(_evaluation_report(7), default=float))
        run.log_artifact(report, "evaluation")
        run.log_params({"profile": "full", "pretrained": "auto", "pretrained_loaded": "true"})
        run.finish()
        model = home / "model"
        model.mkdir()
        rng = np.random.default_rng(0)
        for name in ("model.onnx", "model.torchscript.pt", "weights.pt"):
            (model / name).write_bytes(rng.bytes(args.file_mb * 1024 * 1024))
        (model / "metadata.json").write_text("{}")
        tags = VersionTags(
            model_name="resnet18",
            arch="resnet18",
            threshold=0.42,
            data_version="f" * 64,
            git_commit="0123abc",
            metrics={"test_auc": 0.95},
        )
        registry = ModelRegistry(uri, name="benchmark", cache_dir=home / "cache")
        card_seconds: list[float] = []
        write_card = registry._write_card

        def timed_card(*card_args, **card_kwargs) -> None:
            started = time.perf_counter()
            write_card(*card_args, **card_kwargs)
            card_seconds.append(time.perf_counter() - started)

        timings: dict[str, list[float]] = {"without card": [], "with card": []}
        for _ in range(args.repeats):
            for label in ("without card", "with card"):
                registry._write_card = (  # type: ignore[method-assign]
                    timed_card if label == "with card" else (lambda *a, **k: None)
                )
                started = time.perf_counter()
                registry.register_folder(model, run_id=run.run_id, tags=tags, triggered_by="bench")
                timings[label].append(time.perf_counter() - started)
    baseline = statistics.median(timings["without card"])
    print(f"registration of a {3 * args.file_mb} MB model folder, median of {args.repeats}:")
    for label, values in timings.items():
        median = statistics.median(values)
        print(f"  {label:<13} {median * 1000:8.1f} ms  ({median / baseline:.2f}x)")
    print(f"  the card alone {statistics.median(card_seconds) * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
