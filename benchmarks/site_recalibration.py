"""Recalibration for a stand-in of another site: specificity at the sensitivity target before and
after, with 50, 100 and 200 of the site's labels; and the EM prevalence estimate of unlabeled
traffic against the truth.

Stand-ins (no second real site exists here): the production version's internal test split under
an acquisition shift of ``monitoring/shifts.py``, and, with ``--held-out DIR``, normal images of
a file-name family the model never saw (the same test pneumonia images beside them). Each
stand-in's images are scored once by the exported model; the logits come back from the logged
probabilities as the platform does it. Per label budget, ``--draws`` random draws of that many
labels (drawn by patient) fit the operating point; it is judged on the rest of the stand-in.

    .venv/bin/python benchmarks/site_recalibration.py --home HOME [--held-out DIR] [--draws 200]
"""

from __future__ import annotations

import argparse
import glob
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_platform.calibration.prevalence import estimate_prevalence
from cxr_platform.calibration.refit import (
    NotEnoughLabelsError,
    logits_from_probabilities,
    recalibrate,
)
from cxr_platform.data.imaging import read_image
from cxr_platform.data.shifts import apply_shift, encode_png
from cxr_platform.deployment.registry import PRODUCTION, registry_for
from cxr_platform.inference.live import ServingModels
from cxr_platform.inference.scoring import request_for, score_items
from cxr_platform.model_version.predictor import Predictor
from cxr_platform.settings import load_settings

BUDGETS = (50, 100, 200, 400)
PREVALENCES = (0.1, 0.3, 0.5, 0.7)


def score(models: ServingModels, images: list[tuple[Path, int, str]], shift: str, severity: float):
    """(labels, probabilities, patients) of the images the gate accepted."""
    rng = np.random.default_rng(0)
    rows = []
    for path, label, patient in images:
        pixels = apply_shift(read_image(path).pixels, shift, severity=severity, rng=rng)
        request = request_for(
            models, encode_png(pixels), max_pixels=10**8, uid_salt=b"", started=0.0, source="batch"
        )
        outcome = score_items([request])[0]
        if outcome.production is not None:
            rows.append((label, outcome.production.probability, patient))
    labels, probabilities, patients = zip(*rows, strict=True)
    return np.array(labels), np.array(probabilities), np.array(patients)


def rates(labels: np.ndarray, called: np.ndarray) -> tuple[float, float]:
    return float(called[labels == 1].mean()), float((~called[labels == 0]).mean())


def draw_by_patient(patients: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Whole patients, in random order, until ``n`` images are taken (a site labels studies)."""
    order = rng.permutation(np.unique(patients))
    chosen, total = [], 0
    for patient in order:
        members = np.flatnonzero(patients == patient)
        chosen.append(members)
        total += len(members)
        if total >= n:
            break
    return np.concatenate(chosen)[:n]


def budget_rows(name, labels, logits, patients, target, draws, rng):
    rows = []
    for budget in BUDGETS:
        confident, point, refused = [], [], 0
        for _ in range(draws):
            fit = draw_by_patient(patients, budget, rng)
            rest = np.setdiff1d(np.arange(len(labels)), fit)
            try:
                result = recalibrate(
                    labels[fit], logits[fit], target_sensitivity=target, groups=patients[fit]
                )
            except NotEnoughLabelsError:
                refused += 1
                continue
            probabilities = result.operating_point.probabilities(logits[rest])
            confident.append(rates(labels[rest], probabilities >= result.operating_point.threshold))
            point.append(rates(labels[rest], probabilities >= result.point_estimate_threshold))
        rows.append((name, budget, draws, refused, np.array(confident), np.array(point)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument(
        "--held-out", type=Path, default=None, help="normal images never trained on"
    )
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--shifts", default="none:1.0,blur:0.5,blur:1.0,contrast:0.5,exposure:0.5")
    args = parser.parse_args()
    started = time.perf_counter()
    settings = load_settings(home=args.home)
    registry = registry_for(settings.registry)
    info = registry.get(PRODUCTION)
    predictor = Predictor(registry.download(info.version), model_version=info.version)
    point = predictor.metadata.calibration
    target = point.target_sensitivity or settings.training.target_sensitivity
    models = ServingModels(predictor, None)
    index = pd.read_csv(sorted(glob.glob(str(args.home / "cache/*/test-*.csv")))[0], dtype=str)
    test = [
        (Path(p), int(label == "PNEUMONIA"), patient)
        for p, label, patient in zip(index.path, index.label, index.patient_id, strict=True)
    ]
    stand_ins: dict[str, list] = {}
    for spec in args.shifts.split(","):
        shift, severity = spec.split(":")
        stand_ins[f"test split, {shift} {severity}"] = [test, shift, float(severity)]
    if args.held_out is not None:
        held = [(p, 0, f"held:{p.name}") for p in sorted(args.held_out.iterdir())]
        pneumonia = [item for item in test if item[1] == 1]
        stand_ins[f"held-out family {args.held_out.name} + test pneumonia"] = [
            held + pneumonia,
            "none",
            1.0,
        ]
        stand_ins[f"held-out family {args.held_out.name} + test pneumonia, blur 0.5"] = [
            held + pneumonia,
            "blur",
            0.5,
        ]
    rng = np.random.default_rng(7)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(
        f"# site recalibration, {time.strftime('%Y-%m-%d')}, commit {commit}, "
        f"{platform.processor() or platform.machine()}, model {info.version} "
        f"({predictor.model_name}), target sensitivity {target:g}, {args.draws} draws"
    )
    print(
        "\n| stand-in | n (pneumonia) | before: sens / spec | labels | refused | after: "
        "sens mean (2.5-97.5%) | share >= target | spec mean (2.5-97.5%) | point-estimate "
        "threshold: share >= target, spec |"
    )
    print("| --- | --- | --- | ---: | ---: | --- | ---: | --- | --- |")
    prevalence_rows = []
    for name, (images, shift, severity) in stand_ins.items():
        labels, probabilities, patients = score(models, images, shift, severity)
        logits = logits_from_probabilities(probabilities, point)
        before = rates(labels, probabilities >= point.threshold)
        for _, budget, draws, refused, confident, pointwise in budget_rows(
            name, labels, logits, patients, target, args.draws, rng
        ):
            if len(confident) == 0:
                after = "all refused (too few positives to certify the target)"
                print(
                    f"| {name} | {len(labels)} ({labels.sum()}) | {before[0]:.3f} / "
                    f"{before[1]:.3f} | {budget} | {refused}/{draws} | {after} | | | |"
                )
                continue
            sens, spec = confident[:, 0], confident[:, 1]
            print(
                f"| {name} | {len(labels)} ({labels.sum()}) | {before[0]:.3f} / {before[1]:.3f} "
                f"| {budget} | {refused}/{draws} | {sens.mean():.3f} "
                f"({np.quantile(sens, 0.025):.3f}-{np.quantile(sens, 0.975):.3f}) | "
                f"{(sens >= target).mean():.0%} | {spec.mean():.3f} "
                f"({np.quantile(spec, 0.025):.3f}-{np.quantile(spec, 0.975):.3f}) | "
                f"{(pointwise[:, 0] >= target).mean():.0%}, {pointwise[:, 1].mean():.3f} |"
            )
        prevalence_rows.append((name, labels, probabilities))
    print(
        "\n| stand-in | true prevalence | EM estimate mean (2.5-97.5%) | positive rate at the "
        "threshold | mean probability |"
    )
    print("| --- | ---: | --- | --- | --- |")
    val = pd.read_csv(sorted(glob.glob(str(args.home / "cache/*/val-*.csv")))[0], dtype=str)
    training_prevalence = float((val.label == "PNEUMONIA").mean())
    for name, labels, probabilities in prevalence_rows:
        positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
        for prevalence in PREVALENCES:
            n_pos = min(len(positives), int(round(300 * prevalence)))
            n_neg = min(len(negatives), int(round(n_pos * (1 - prevalence) / prevalence)))
            estimates, rates_at, means = [], [], []
            for _ in range(50):
                chosen = np.r_[
                    rng.choice(positives, n_pos, replace=False),
                    rng.choice(negatives, n_neg, replace=False),
                ]
                estimates.append(
                    estimate_prevalence(probabilities[chosen], training_prevalence).prevalence
                )
                rates_at.append((probabilities[chosen] >= point.threshold).mean())
                means.append(probabilities[chosen].mean())
            truth = n_pos / (n_pos + n_neg)
            estimates = np.array(estimates)
            print(
                f"| {name} | {truth:.2f} | {estimates.mean():.3f} "
                f"({np.quantile(estimates, 0.025):.3f}-{np.quantile(estimates, 0.975):.3f}) | "
                f"{np.mean(rates_at):.3f} | {np.mean(means):.3f} |"
            )
    print(
        f"\nvalidation prevalence (the calibration's prior) {training_prevalence:.3f}; "
        f"{time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
