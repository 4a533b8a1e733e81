"""Single models, ensembles and test-time augmentation, judged on stand-ins for another site.

Every candidate is built the way the platform builds a version (``models/ensemble.py``): each
member's logit through its own Platt calibration fitted on validation, the calibrated logits
averaged, optionally over the image and its mirror image, then the candidate's own calibration
and threshold (highest specificity at sensitivity >= 0.95) fitted on validation and frozen.

Stand-ins for another site (no second real site exists here), all from the held-out test split
of the real-data home's patient split:

- ``test``: the internal test split as acquired;
- ``NORMAL2 family``: the test normals of the NORMAL2-IM file-name family (the family with all
  the false positives of the main job's model, a different acquisition era of the source
  archive) beside every test pneumonia image;
- the five acquisition shifts of ``models/robustness.py`` applied to the test split.

Per candidate and stand-in: AUC with a 95% interval (whole patients resampled), sensitivity and
specificity at the validation threshold, the best specificity any threshold gives there at
sensitivity >= 0.95, and for the best ensemble against the best single model a paired bootstrap
of the AUC difference. Serving cost: ONNX Runtime images/s of the exported graph (logit and
population features, as served), against the first single model, in the same run.

    CXR_HOME=<real-data home> .venv/bin/python benchmarks/ensemble_search.py \\
        --data-dir ../shared/data/kaggle-chest-xray-224 \\
        --member main=<home>/models/baseline_cnn/<run>/best.pt --member seed7=... [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cxr_platform.data.patients import file_name_family
from cxr_platform.data.pipeline import prepare
from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.data.transforms import TensorBatches
from cxr_platform.deployment.export import export_onnx, metadata_for_checkpoint
from cxr_platform.model_version.files import onnx_session
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.models.checkpoint import Checkpoint
from cxr_platform.models.ensemble import combine
from cxr_platform.models.evaluation import (
    ThresholdRule,
    best_specificity,
    cluster_bootstrap_intervals,
    fit_operating_point,
    mann_whitney_auc,
    patient_resamples,
    threshold_metrics,
)
from cxr_platform.models.robustness import ROBUSTNESS_SHIFTS, shifted_split
from cxr_platform.models.training import predict_logits
from cxr_platform.models.zoo import FlipAveraged, WithFeatures
from cxr_platform.provenance import git_commit
from cxr_platform.settings import load_settings

TARGET_SENSITIVITY = 0.95


@dataclass(frozen=True)
class StandIn:
    name: str
    images: np.ndarray  # uint8 (N, S, S)
    labels: np.ndarray
    patients: np.ndarray


def stand_ins(cache) -> list[StandIn]:
    index = cache.index("test")
    images = cache.images("test", mmap=False)
    labels = cache.labels("test")
    patients = index["patient_id"].astype(str).to_numpy()
    families = np.array([file_name_family(Path(p).name) for p in index["path"]])
    family = (labels == 1) | (families == "NORMAL#-IM")
    out = [
        StandIn("test", images, labels, patients),
        StandIn("NORMAL2 family", images[family], labels[family], patients[family]),
    ]
    for shift, severity in ROBUSTNESS_SHIFTS.items():
        out.append(
            StandIn(f"{shift} {severity}", shifted_split(images, shift, severity), labels, patients)
        )
    return out


def logits_of(model, images, labels, preprocessing) -> np.ndarray:
    batches = TensorBatches(images, labels, preprocessing, device="cpu")
    return predict_logits(model, batches, batch_size=64)


def paired_auc_difference(
    labels: np.ndarray,
    patients: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    n_bootstrap: int,
    seed: int = 0,
) -> tuple[float, float, float]:
    """AUC(first) - AUC(second), with a 95% interval resampling whole patients per class."""

    def difference(chosen: np.ndarray) -> float:
        truth = labels[chosen]
        pos, neg = truth == 1, truth == 0
        return mann_whitney_auc(first[chosen][pos], first[chosen][neg]) - mann_whitney_auc(
            second[chosen][pos], second[chosen][neg]
        )

    draws = [
        difference(chosen) for chosen in patient_resamples(labels, patients, n_bootstrap, seed=seed)
    ]
    everything = np.arange(len(labels))
    return (
        difference(everything),
        float(np.quantile(draws, 0.025)),
        float(np.quantile(draws, 0.975)),
    )


def onnx_images_per_second(checkpoint: Checkpoint, point: OperatingPoint, batch: int = 32) -> float:
    """ONNX Runtime on this machine, the graph as exported for serving (logit and features)."""
    metadata = metadata_for_checkpoint(
        checkpoint,
        point,
        model_name="candidate",
        mlflow_run_id=None,
        manifest_hash=None,
        git_commit=None,
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(
            WithFeatures(checkpoint.bare_model(), checkpoint.arch, flip=checkpoint.flip_averaged),
            metadata,
            path,
        )
        session = onnx_session(path)
        size = metadata.preprocessing_config.image_size
        images = np.random.default_rng(0).normal(size=(batch, 1, size, size)).astype(np.float32)
        name = session.get_inputs()[0].name
        session.run(None, {name: images})  # warm-up
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < 3.0 or runs < 3:
            session.run(None, {name: images})
            runs += 1
        return runs * batch / (time.perf_counter() - started)


def _ci(values: dict) -> str:
    low, high = values["auc_ci"]
    return f"{values['auc']:.4f} ({low:.3f}-{high:.3f})"


def markdown_tables(result: dict) -> str:
    """The RESULTS.md tables: one row per candidate, then the paired comparison."""
    speed = result.get("onnx_img_per_s", {})
    baseline_speed = next(iter(speed.values()), None)
    lines = [
        "| candidate | TTA | train s to kept epoch | ONNX img/s (x first) | val AUC | "
        "test AUC (95% CI) | test spec @val / best | NORMAL2 AUC (95% CI) | "
        "NORMAL2 spec @val / best | shifts mean AUC | shifts spec @val mean / min | "
        "shifts best spec mean |",
        "|---|---|---:|---:|---:|---|---|---|---|---:|---|---:|",
    ]
    for row in result["rows"]:
        sites = row["stand_ins"]
        shifts = [v for name, v in sites.items() if name not in ("test", "NORMAL2 family")]
        key = f"{row['candidate']}/{row['tta']}"
        img_s = (
            f"{speed[key]:.0f} ({speed[key] / baseline_speed:.2f}x)"
            if key in speed and baseline_speed
            else ""
        )
        test, family = sites["test"], sites["NORMAL2 family"]
        lines.append(
            f"| {row['candidate']} | {row['tta']} | {row['training_seconds']:.0f} | {img_s} | "
            f"{row['val_auc']:.4f} | {_ci(test)} | "
            f"{test['specificity']:.3f} / {test['best_specificity_at_0.95']:.3f} | "
            f"{_ci(family)} | "
            f"{family['specificity']:.3f} / {family['best_specificity_at_0.95']:.3f} | "
            f"{np.mean([v['auc'] for v in shifts]):.4f} | "
            f"{np.mean([v['specificity'] for v in shifts]):.3f} / "
            f"{min(v['specificity'] for v in shifts):.3f} | "
            f"{np.mean([v['best_specificity_at_0.95'] for v in shifts]):.3f} |"
        )
    comparison = result["comparison"]
    lines += [
        "",
        f"Best by validation AUC: ensemble `{comparison['ensemble']}` against single "
        f"`{comparison['single']}`, paired (whole patients resampled), and against the best "
        "single model on each stand-in with that model's interval half-width:",
        "",
        "| stand-in | paired AUC difference (95% CI) | best single there | ensemble minus it | "
        "its half-width |",
        "|---|---|---|---:|---:|",
    ]
    for name, values in comparison["stand_ins"].items():
        low, high = values["difference_ci"]
        lines.append(
            f"| {name} | {values['difference']:+.4f} ({low:+.4f} to {high:+.4f}) | "
            f"{values['best_single_on_this_stand_in']} | "
            f"{values['ensemble_minus_best_single_here']:+.4f} | "
            f"{values['best_single_half_width']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--member", action="append", default=[], help="NAME=CHECKPOINT")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("ensemble_search.json"))
    parser.add_argument("--no-speed", action="store_true", help="skip the ONNX throughput")
    parser.add_argument(
        "--render", type=Path, default=None, help="print the tables of a saved --out file only"
    )
    args = parser.parse_args()
    if args.render is not None:
        print(markdown_tables(json.loads(args.render.read_text())))
        return

    if args.data_dir is None or len(args.member) < 2:
        parser.error("--data-dir and two --member checkpoints or more are needed")
    settings = load_settings(data_dir=args.data_dir)
    _, cache = prepare(settings.data, progress=False)
    preprocessing = PreprocessingConfig.from_dict(cache.preprocessing)
    rule = ThresholdRule("sensitivity_target", TARGET_SENSITIVITY)
    val_images, val_labels = cache.images("val", mmap=False), cache.labels("val")
    sites = stand_ins(cache)
    print(
        f"val {len(val_labels)}, stand-ins {[f'{s.name} ({len(s.labels)})' for s in sites]}; "
        f"commit {git_commit()}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )

    names, checkpoints, raw = [], [], {}
    for spec in args.member:
        name, path = spec.split("=", 1)
        checkpoint = Checkpoint.load(path)
        if checkpoint.preprocessing != cache.preprocessing:
            raise SystemExit(f"{name} was trained with other preprocessing than this cache")
        names.append(name)
        checkpoints.append(checkpoint)
        started = time.perf_counter()
        bare = checkpoint.bare_model()
        for tta, model in (("none", bare), ("flip", FlipAveraged(bare).eval())):
            raw[name, tta, "val"] = logits_of(model, val_images, val_labels, preprocessing)
            for site in sites:
                raw[name, tta, site.name] = logits_of(
                    model, site.images, site.labels, preprocessing
                )
        seconds = sum(record.seconds for record in checkpoint.history)
        print(
            f"scored {name} ({checkpoint.arch}, {len(checkpoint.history)} epochs, "
            f"{seconds:.0f} s training) in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    # Each member's calibration, fitted on its own validation logits (as its evaluation does).
    points = {
        name: fit_operating_point(val_labels, raw[name, "none", "val"], rule) for name in names
    }

    def calibrated(name: str, tta: str, split: str) -> np.ndarray:
        point = points[name]
        return raw[name, tta, split] / point.temperature + point.bias

    candidates = [(name,) for name in names] + [
        combo for size in range(2, len(names) + 1) for combo in itertools.combinations(names, size)
    ]
    rows = []
    scores_of: dict[tuple[tuple[str, ...], str], dict[str, np.ndarray]] = {}
    for combo, tta in itertools.product(candidates, ("none", "flip")):
        if len(combo) == 1:
            scores = {
                split: raw[combo[0], tta, split] for split in ["val", *(s.name for s in sites)]
            }
        else:
            scores = {
                split: np.mean([calibrated(n, tta, split) for n in combo], axis=0)
                for split in ["val", *(s.name for s in sites)]
            }
        scores_of[combo, tta] = scores
        point = fit_operating_point(val_labels, scores["val"], rule)
        row = {
            "candidate": "+".join(combo),
            "members": list(combo),
            "tta": tta,
            "training_seconds": sum(
                sum(r.seconds for r in checkpoints[names.index(n)].history) for n in combo
            ),
            "val_auc": mann_whitney_auc(
                scores["val"][val_labels == 1], scores["val"][val_labels == 0]
            ),
            "stand_ins": {},
        }
        for site in sites:
            values = scores[site.name]
            probabilities = point.probabilities(values)
            intervals = cluster_bootstrap_intervals(
                site.labels,
                values,
                probabilities,
                point.threshold,
                site.patients,
                n_bootstrap=args.bootstrap,
            )
            at_val = threshold_metrics(site.labels, probabilities, point.threshold)
            row["stand_ins"][site.name] = {
                "auc": mann_whitney_auc(values[site.labels == 1], values[site.labels == 0]),
                "auc_ci": intervals["auc"],
                "sensitivity": at_val["sensitivity"],
                "specificity": at_val["specificity"],
                "best_specificity_at_0.95": best_specificity(
                    site.labels, values, TARGET_SENSITIVITY
                ),
            }
        rows.append(row)
        shown = " | ".join(
            f"{name} {v['auc']:.4f} ({v['auc_ci'][0]:.3f}-{v['auc_ci'][1]:.3f}) "
            f"spec {v['specificity']:.3f}/{v['best_specificity_at_0.95']:.3f}"
            for name, v in row["stand_ins"].items()
        )
        print(f"{row['candidate']:<28} {tta:<4} val {row['val_auc']:.4f} | {shown}", flush=True)

    # The best ensemble against the best single model, by validation AUC (what a release
    # would use) and paired on each stand-in.
    singles = [r for r in rows if len(r["members"]) == 1 and r["tta"] == "none"]
    ensembles = [r for r in rows if len(r["members"]) > 1]
    best_single = max(singles, key=lambda r: r["val_auc"])
    best_ensemble = max(ensembles, key=lambda r: r["val_auc"])
    comparison = {
        "ensemble": best_ensemble["candidate"] + "/" + best_ensemble["tta"],
        "single": best_single["candidate"],
        "stand_ins": {},
    }
    for site in sites:
        first = scores_of[tuple(best_ensemble["members"]), best_ensemble["tta"]][site.name]
        second = scores_of[tuple(best_single["members"]), "none"][site.name]
        difference, low, high = paired_auc_difference(
            site.labels, site.patients, first, second, args.bootstrap
        )
        best_single_here = max(singles, key=lambda r: r["stand_ins"][site.name]["auc"])
        ci = best_single_here["stand_ins"][site.name]["auc_ci"]
        comparison["stand_ins"][site.name] = {
            "difference": difference,
            "difference_ci": (low, high),
            "best_single_on_this_stand_in": best_single_here["candidate"],
            "best_single_half_width": (ci[1] - ci[0]) / 2,
            "ensemble_minus_best_single_here": best_ensemble["stand_ins"][site.name]["auc"]
            - best_single_here["stand_ins"][site.name]["auc"],
        }
        print(
            f"{comparison['ensemble']} - {best_single['candidate']} on {site.name}: "
            f"{difference:+.4f} ({low:+.4f} to {high:+.4f}); against the best single here "
            f"({best_single_here['candidate']}): "
            f"{comparison['stand_ins'][site.name]['ensemble_minus_best_single_here']:+.4f}, "
            f"its half-width {comparison['stand_ins'][site.name]['best_single_half_width']:.4f}",
            flush=True,
        )

    speed = {}
    if not args.no_speed:
        timed = [
            ((names[0],), "none"),
            ((names[0],), "flip"),
            *(((n,), "none") for n in names[1:]),
            (tuple(best_ensemble["members"]), "none"),
            (tuple(best_ensemble["members"]), "flip"),
            (tuple(names), "none"),
        ]
        for combo, tta in dict.fromkeys(timed):
            chosen = [checkpoints[names.index(n)] for n in combo]
            if len(chosen) == 1:
                single = chosen[0]
                checkpoint = replace(single, config=replace(single.config, tta_flip=tta == "flip"))
            else:
                checkpoint = combine(chosen, [points[n] for n in combo], test_time_augmentation=tta)
            key = f"{'+'.join(combo)}/{tta}"
            speed[key] = onnx_images_per_second(checkpoint, points[combo[0]])
            print(
                f"ONNX Runtime {key}: {speed[key]:.1f} img/s "
                f"({speed[key] / speed[f'{names[0]}/none']:.2f}x of {names[0]})",
                flush=True,
            )

    args.out.write_text(
        json.dumps(
            {
                "commit": git_commit(),
                "rows": rows,
                "comparison": comparison,
                "onnx_img_per_s": speed,
            },
            indent=1,
            default=float,
        )
    )
    print(markdown_tables(json.loads(args.out.read_text())))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
