"""A site's own operating point, as the platform makes it (`calibration/site_point.py`), on
stand-ins for another site: what the site is served after the paired gate, against what it had
(as deployed) and against the best a threshold could do on the whole stand-in; and the label-free
estimates of sensitivity, specificity and prevalence against the truth.

Stand-ins (no second real site exists here), each scored once by the production version:
the internal test split as acquired and under acquisition shifts (`data/shifts.py`); its normal
images of one file-name family (NORMAL2-IM, the family whose specificity was lowest) beside its
pneumonia images; a prior-shifted mix (pneumonia patients dropped to a prevalence of 0.3); and,
with ``--held-out DIR``, normal images never trained on beside the test pneumonia images.
Per label budget, ``--draws`` draws of that many labels (whole patients) propose and judge a
threshold; the site is then served the candidate if the gate passed it, else the current one,
and judged on the rest of the stand-in.

    .venv/bin/python benchmarks/site_recalibration.py --home HOME [--draws 200]
"""

from __future__ import annotations

import argparse
import glob
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_platform.calibration.label_free import (
    adjusted_count_prevalence,
    confidence_based_estimate,
)
from cxr_platform.calibration.prevalence import estimate_prevalence
from cxr_platform.calibration.refit import NotEnoughLabelsError, logits_from_probabilities
from cxr_platform.calibration.site import reference_positive_logits
from cxr_platform.calibration.site_point import calls, site_operating_point
from cxr_platform.data.imaging import read_image
from cxr_platform.data.patients import file_name_family
from cxr_platform.data.shifts import apply_shift, encode_png
from cxr_platform.deployment.reference import PROBABILITY, load_reference
from cxr_platform.deployment.registry import PRODUCTION, registry_for
from cxr_platform.inference.live import ServingModels
from cxr_platform.inference.scoring import request_for, score_items
from cxr_platform.model_version.predictor import Predictor
from cxr_platform.models.evaluation import best_specificity
from cxr_platform.settings import load_settings

BUDGETS = (50, 100, 200, 400)
MARGIN = 0.02


@dataclass
class StandIn:
    name: str
    labels: np.ndarray
    probabilities: np.ndarray
    patients: np.ndarray


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


def budget_row(stand_in, point, reference_positives, target, budget, draws, rng, minimum):
    labels, patients = stand_in.labels, stand_in.patients
    logits = logits_from_probabilities(stand_in.probabilities, point)
    current_calls = stand_in.probabilities >= point.threshold
    served, deployed, promoted, too_few, verdicts, needed = [], [], 0, 0, {}, []
    for _ in range(draws):
        drawn = draw_by_patient(patients, budget, rng)
        rest = np.setdiff1d(np.arange(len(labels)), drawn)
        deployed.append(rates(labels[rest], current_calls[rest]))
        try:
            evidence = site_operating_point(
                labels[drawn],
                logits[drawn],
                patients[drawn],
                reference_positives,
                point,
                target_sensitivity=target,
                margin=MARGIN,
                min_negatives=minimum,
                current_calls=current_calls[drawn],
            )
        except NotEnoughLabelsError:
            too_few += 1
            served.append(rates(labels[rest], current_calls[rest]))
            continue
        verdict = evidence.judgement.verdict
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        if evidence.judgement.labels_to_decide:
            needed.append(sum(evidence.judgement.labels_to_decide.values()))
        if evidence.passed:
            promoted += 1
            served.append(rates(labels[rest], calls(evidence.operating_point, logits[rest])))
        else:
            served.append(rates(labels[rest], current_calls[rest]))
    return np.array(served), np.array(deployed), promoted, too_few, verdicts, needed


def label_free_rows(stand_in, point, training_prevalence, rng, budget=100, draws=50):
    """Per stand-in: truth against CBPE (the version's calibration), CBPE with Platt refitted on
    ``budget`` labels, EM prevalence, and the adjusted count from ``budget`` labels."""
    labels, probabilities = stand_in.labels, stand_in.probabilities
    called = probabilities >= point.threshold
    truth_sens, truth_spec = rates(labels, called)
    logits = logits_from_probabilities(probabilities, point)
    em = estimate_prevalence(probabilities, training_prevalence).prevalence
    plain = confidence_based_estimate(
        probabilities, point.threshold, prior=(training_prevalence, em)
    )
    refitted, adjusted = [], []
    for _ in range(draws):
        drawn = draw_by_patient(stand_in.patients, budget, rng)
        if labels[drawn].min() == labels[drawn].max():
            continue
        refitted.append(
            confidence_based_estimate(
                probabilities,
                point.threshold,
                logits=logits,
                labeled_logits=logits[drawn],
                labels=labels[drawn],
            )
        )
        adjusted.append(adjusted_count_prevalence(called, labels[drawn], called[drawn]))
    refit_sens = np.array([e.sensitivity for e in refitted])
    refit_spec = np.array([e.specificity for e in refitted])
    refit_prev = np.array([e.prevalence for e in refitted])
    adjusted = np.array([a.prevalence for a in adjusted if a.prevalence is not None])
    counted = (
        f"{adjusted.mean():.3f} ({np.quantile(adjusted, 0.05):.3f}-"
        f"{np.quantile(adjusted, 0.95):.3f})"
        if adjusted.size
        else "none: the labels' tpr - fpr is under 0.1 (every image called alike)"
    )
    return (
        f"| {stand_in.name} | {truth_sens:.3f} / {truth_spec:.3f} / {labels.mean():.3f} | "
        f"{plain.sensitivity:.3f} / {plain.specificity:.3f} / {plain.prevalence:.3f} | "
        f"{refit_sens.mean():.3f} / {refit_spec.mean():.3f} / {refit_prev.mean():.3f} | "
        f"{em:.3f} | {counted} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument(
        "--held-out", type=Path, default=None, help="normal images never trained on"
    )
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--shifts", default="blur:0.5,blur:1.0,contrast:0.5,exposure:0.5")
    parser.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS))
    args = parser.parse_args()
    started = time.perf_counter()
    settings = load_settings(home=args.home)
    registry = registry_for(settings.registry)
    info = registry.get(PRODUCTION)
    folder = registry.download(info.version)
    predictor = Predictor(folder, model_version=info.version)
    point = predictor.metadata.calibration
    target = settings.training.target_sensitivity
    reference = load_reference(folder)
    validation = reference[reference[PROBABILITY].notna()]
    reference_positives = reference_positive_logits(folder, point, info.version)
    training_prevalence = float((validation["label"] == "PNEUMONIA").mean())
    models = ServingModels(predictor, None)
    index = pd.read_csv(sorted(glob.glob(str(args.home / "cache/*/test-*.csv")))[0], dtype=str)
    test = [
        (Path(p), int(label == "PNEUMONIA"), patient)
        for p, label, patient in zip(index.path, index.label, index.patient_id, strict=True)
    ]
    stand_ins: list[StandIn] = []

    def add(name, images, shift="none", severity=1.0):
        stand_ins.append(StandIn(name, *score(models, images, shift, severity)))

    add("test split, as acquired", test)
    for spec in args.shifts.split(","):
        shift, severity = spec.split(":")
        add(f"test split, {shift} {severity}", test, shift, float(severity))
    family = [item for item in test if item[1] == 1 or file_name_family(item[0].name) != "IM"]
    add("NORMAL2 family + test pneumonia", family)
    whole = stand_ins[0]
    rng = np.random.default_rng(11)
    # Pneumonia patients dropped, in random order, until the stand-in's prevalence is 0.3.
    wanted = 0.3 / 0.7 * int((whole.labels == 0).sum())
    keep_patients, kept = [], 0
    for patient in rng.permutation(np.unique(whole.patients[whole.labels == 1])):
        if kept >= wanted:
            break
        keep_patients.append(patient)
        kept += int(((whole.patients == patient) & (whole.labels == 1)).sum())
    mixed = (whole.labels == 0) | np.isin(whole.patients, keep_patients)
    stand_ins.append(
        StandIn(
            "test split, prior shift to 0.3",
            whole.labels[mixed],
            whole.probabilities[mixed],
            whole.patients[mixed],
        )
    )
    if args.held_out is not None:
        held = [(p, 0, f"held:{p.name}") for p in sorted(args.held_out.iterdir())]
        add(
            f"held-out family {args.held_out.name} + test pneumonia",
            held + [t for t in test if t[1]],
        )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    minimum = settings.monitoring.recalibration_min_negatives
    print(
        f"# site recalibration, {time.strftime('%Y-%m-%d')}, commit {commit}, "
        f"{platform.processor() or platform.machine()}, model {info.version} "
        f"({predictor.model_name}), target sensitivity {target:g}, margin {MARGIN:g}, "
        f"{args.draws} draws"
    )
    print(
        "\n| stand-in | n (pneumonia) | as deployed: sens / spec | best threshold: spec | labels "
        "| promoted | too few | served: sens mean / 5th pct / share >= target-0.02 | served: spec "
        "mean / 5th pct | share of the possible gain | verdicts | labels to decide (median) |"
    )
    print("| --- | --- | --- | --- | ---: | ---: | ---: | --- | --- | ---: | --- | ---: |")
    budgets = [int(b) for b in args.budgets.split(",")]
    for stand_in in stand_ins:
        labels = stand_in.labels
        before = rates(labels, stand_in.probabilities >= point.threshold)
        best = best_specificity(labels, stand_in.probabilities, target)
        possible = best - before[1]
        for budget in budgets:
            if budget > len(labels) * 2 / 3:
                print(
                    f"| {stand_in.name} | {len(labels)} ({labels.sum()}) | {before[0]:.3f} / "
                    f"{before[1]:.3f} | {best:.3f} | {budget} | | | too few images to leave a "
                    "rest half as large as the labels | | | | |"
                )
                continue
            served, deployed, promoted, too_few, verdicts, needed = budget_row(
                stand_in, point, reference_positives, target, budget, args.draws, rng, minimum
            )
            sens, spec = served[:, 0], served[:, 1]
            gain = (
                f"{(spec.mean() - before[1]) / possible:.0%}"
                if possible > 0.01
                else "none possible"
            )
            print(
                f"| {stand_in.name} | {len(labels)} ({labels.sum()}) | {before[0]:.3f} / "
                f"{before[1]:.3f} | {best:.3f} | {budget} | {promoted}/{args.draws} | "
                f"{too_few} | {sens.mean():.3f} / {np.quantile(sens, 0.05):.3f} / "
                f"{(sens >= target - MARGIN).mean():.0%} (as deployed "
                f"{(deployed[:, 0] >= target - MARGIN).mean():.0%}) | {spec.mean():.3f} / "
                f"{np.quantile(spec, 0.05):.3f} | {gain} | "
                + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items()))
                + f" | {int(np.median(needed)) if needed else ''} |",
                flush=True,
            )
    print(
        "\nLabel-free, each stand-in whole: truth, then estimates as sensitivity / specificity "
        "/ prevalence at the version's threshold. CBPE uses the version's calibration moved to "
        "the EM prevalence; CBPE refitted uses Platt refitted on 100 labels (mean of 50 "
        "draws); EM assumes the calibration holds; the adjusted count uses the site's "
        "confusion matrix from 100 labels (mean, 5-95%).\n"
    )
    print(
        "| stand-in | truth | CBPE | CBPE, Platt refitted on 100 labels | EM prevalence | "
        "adjusted count prevalence |"
    )
    print("| --- | --- | --- | --- | ---: | --- |")
    for stand_in in stand_ins:
        print(label_free_rows(stand_in, point, training_prevalence, rng), flush=True)
    print(
        f"\nvalidation prevalence (the calibration's prior) {training_prevalence:.3f}; "
        f"{time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
