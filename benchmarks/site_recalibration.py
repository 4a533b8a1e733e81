"""A site's own operating point, as the platform makes it (`calibration/site_point.py`), on
stand-ins for another site: what the site is served after the paired gate, against what it had
(as deployed) and against the best a threshold could do on the whole stand-in; and the label-free
estimates of sensitivity, specificity and prevalence against the truth.

Stand-ins (no second real site exists here), each scored once by the production version:
the internal test split as acquired and under acquisition shifts (`data/shifts.py`); its normal
images of one file-name family (NORMAL2-IM, the family whose specificity was lowest) beside its
pneumonia images; a prior-shifted mix (pneumonia patients dropped to a prevalence of 0.3); with
``--held-out DIR``, normal images never trained on beside the test pneumonia images. Adversarial
ones made from the test split's own scores (logit units): a site where everything scores one
logit higher but 12% of the pneumonia patients are missed (their scores those of the positives
the model scores lowest), one where only 12% of the pneumonia patients score 3 logits lower, and
a site under target (every pneumonia score moved down until the deployed sensitivity is 0.80,
pneumonia patients dropped to a prevalence of 0.4, so 100 labels hold about 40 positives).

Per label budget, ``--draws`` draws of that many labels (whole patients) propose and judge a
threshold; the site is then served the candidate if the gate passed it, else the current one,
and judged on the rest of the stand-in. An *unsafe raise* is a passed raise whose served
sensitivity on the rest is below target - margin (or, where the deployed one already was, lower
still).

``--simulated`` runs what needs no model: the review's simulation (validation positives
N(2, 1.5), site positives 88% N(3, 1) and 12% N(-1.5, 1), site negatives N(0, 1.3), the
current threshold where the site's true sensitivity is 0.915; a population of 20,000 at
prevalence 0.5 drawn from), the same site without the subgroup, and the tail check's power
against a missed subgroup at 15, 30 and 60 positive studies.

    .venv/bin/python benchmarks/site_recalibration.py --home HOME [--draws 200]
    .venv/bin/python benchmarks/site_recalibration.py --simulated [--draws 200]
"""

from __future__ import annotations

import argparse
import glob
import platform
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import norm

from cxr_platform.calibration.label_free import (
    adjusted_count_prevalence,
    confidence_based_estimate,
)
from cxr_platform.calibration.paired import LOWER, RAISE, positive_shift
from cxr_platform.calibration.prevalence import estimate_prevalence
from cxr_platform.calibration.refit import NotEnoughLabelsError
from cxr_platform.calibration.site_point import calls, logit_threshold, site_operating_point
from cxr_platform.model_version.operating_point import OperatingPoint
from cxr_platform.models.evaluation import best_specificity

BUDGETS = (50, 100, 200, 400)
MARGIN = 0.02  # the platform's default (CXR_RECALIBRATION_MARGIN)
MIN_GAIN = 0.02  # the platform's default (CXR_RECALIBRATION_MIN_SPECIFICITY_GAIN)
SUBGROUP = 0.12


@dataclass
class StandIn:
    name: str
    labels: np.ndarray
    logits: np.ndarray
    patients: np.ndarray
    # The current version's threshold and target where they differ from the benchmark's own.
    point: OperatingPoint | None = None
    margin: float = MARGIN


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


@dataclass
class Row:
    served: np.ndarray  # per draw: (sensitivity, specificity) on the rest
    deployed: np.ndarray
    raised: int
    lowered: int
    unsafe: int
    too_few: int
    verdicts: dict[str, int]
    needed: list[int]
    seconds: list[float]


def budget_row(stand_in, point, reference_positives, target, budget, draws, rng, minimum) -> Row:
    labels, patients, logits = stand_in.labels, stand_in.patients, stand_in.logits
    margin = stand_in.margin
    current_calls = calls(point, logits)
    row = Row(np.zeros((0, 2)), np.zeros((0, 2)), 0, 0, 0, 0, {}, [], [])
    served, deployed = [], []
    for _ in range(draws):
        drawn = draw_by_patient(patients, budget, rng)
        rest = np.setdiff1d(np.arange(len(labels)), drawn)
        before = rates(labels[rest], current_calls[rest])
        deployed.append(before)
        started = time.perf_counter()
        try:
            evidence = site_operating_point(
                labels[drawn],
                logits[drawn],
                patients[drawn],
                reference_positives,
                point,
                target_sensitivity=target,
                margin=margin,
                min_negatives=minimum,
                min_specificity_gain=MIN_GAIN,
                current_calls=current_calls[drawn],
            )
        except NotEnoughLabelsError:
            row.too_few += 1
            served.append(before)
            continue
        finally:
            row.seconds.append(time.perf_counter() - started)
        verdict = evidence.judgement.verdict
        row.verdicts[verdict] = row.verdicts.get(verdict, 0) + 1
        if evidence.judgement.labels_to_decide:
            row.needed.append(sum(evidence.judgement.labels_to_decide.values()))
        if not evidence.passed:
            served.append(before)
            continue
        after = rates(labels[rest], calls(evidence.operating_point, logits[rest]))
        served.append(after)
        direction = evidence.proposal.direction
        row.raised += direction == RAISE
        row.lowered += direction == LOWER
        floor = target - margin
        if direction == RAISE and after[0] < floor:
            row.unsafe += before[0] >= floor or after[0] < before[0]
    row.served, row.deployed = np.array(served), np.array(deployed)
    return row


def print_header() -> None:
    print(
        "\n| stand-in | n (pneumonia) | as deployed: sens / spec | best threshold: spec | labels "
        "| raised / lowered | too few | unsafe raises | served sens: mean / 5th pct / >= "
        "target-margin / >= target | served spec: mean / 5th pct | share of the possible gain | "
        "verdicts | labels to decide (median) | s per decision: mean / max |"
    )
    print(
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | --- | ---: "
        "| --- |"
    )


def print_rows(stand_in, point, reference_positives, target, budgets, draws, rng, minimum):
    labels = stand_in.labels
    current = stand_in.point or point
    before = rates(labels, calls(current, stand_in.logits))
    best = best_specificity(labels, stand_in.logits, target)
    possible = best - before[1]
    floor = target - stand_in.margin
    head = (
        f"| {stand_in.name} | {len(labels)} ({int(labels.sum())}) | {before[0]:.3f} / "
        f"{before[1]:.3f} | {best:.3f}"
    )
    for budget in budgets:
        if budget > len(labels) * 2 / 3:
            print(
                f"{head} | {budget} | | | | too few images to leave a rest half as large as "
                "the labels | | | | | |"
            )
            continue
        row = budget_row(
            stand_in, current, reference_positives, target, budget, draws, rng, minimum
        )
        sens, spec = row.served[:, 0], row.served[:, 1]
        gain = f"{(spec.mean() - before[1]) / possible:.0%}" if possible > 0.01 else "none possible"
        print(
            f"{head} | {budget} | {row.raised} / {row.lowered} | {row.too_few} | "
            f"{row.unsafe}/{draws} | {sens.mean():.3f} / {np.quantile(sens, 0.05):.3f} / "
            f"{(sens >= floor).mean():.0%} (deployed {(row.deployed[:, 0] >= floor).mean():.0%})"
            f" / {(sens >= target).mean():.0%} | {spec.mean():.3f} / "
            f"{np.quantile(spec, 0.05):.3f} | {gain} | "
            + ", ".join(f"{k} {v}" for k, v in sorted(row.verdicts.items()))
            + f" | {int(np.median(row.needed)) if row.needed else ''} | "
            f"{np.mean(row.seconds):.2f} / {np.max(row.seconds):.2f} |",
            flush=True,
        )


def label_free_rows(stand_in, point, training_prevalence, rng, budget=100, draws=50):
    """Per stand-in: truth against CBPE (the version's calibration), CBPE with Platt refitted on
    ``budget`` labels, EM prevalence, and the adjusted count from ``budget`` labels."""
    labels, logits = stand_in.labels, stand_in.logits
    probabilities = point.probabilities(logits)
    called = calls(point, logits)
    truth_sens, truth_spec = rates(labels, called)
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


def _patients_of_class(stand_in: StandIn, label: int) -> np.ndarray:
    return np.unique(stand_in.patients[stand_in.labels == label])


def missed_subgroup(stand_in: StandIn, threshold: float, rng) -> StandIn:
    """Everything one logit higher, but 12% of the pneumonia patients scored as the positives
    the model scores lowest (resampled from those under the threshold)."""
    logits = stand_in.logits + 1.0
    positives = stand_in.labels == 1
    lowest = stand_in.logits[positives & (stand_in.logits < threshold)]
    patients = _patients_of_class(stand_in, 1)
    chosen = rng.choice(patients, int(round(SUBGROUP * patients.size)), replace=False)
    members = np.isin(stand_in.patients, chosen) & positives
    logits[members] = rng.choice(lowest, int(members.sum()))
    return replace(stand_in, name="missed subgroup: +1 logit, 12% scored lowest", logits=logits)


def shifted_subgroup(stand_in: StandIn, rng) -> StandIn:
    """Only 12% of the pneumonia patients score 3 logits lower."""
    logits = stand_in.logits.copy()
    positives = stand_in.labels == 1
    patients = _patients_of_class(stand_in, 1)
    chosen = rng.choice(patients, int(round(SUBGROUP * patients.size)), replace=False)
    logits[np.isin(stand_in.patients, chosen) & positives] -= 3.0
    return replace(stand_in, name="missed subgroup: 12% 3 logits lower", logits=logits)


def fewer_positives(stand_in: StandIn, prevalence: float, rng) -> np.ndarray:
    """A mask keeping every negative and pneumonia patients, in random order, until the
    prevalence is ``prevalence``."""
    positives = stand_in.labels == 1
    wanted = prevalence / (1 - prevalence) * int((~positives).sum())
    keep, kept = [], 0
    for patient in rng.permutation(_patients_of_class(stand_in, 1)):
        if kept >= wanted:
            break
        keep.append(patient)
        kept += int(((stand_in.patients == patient) & positives).sum())
    return ~positives | np.isin(stand_in.patients, keep)


def subset(stand_in: StandIn, mask: np.ndarray, name: str, logits=None) -> StandIn:
    logits = stand_in.logits if logits is None else logits
    return StandIn(name, stand_in.labels[mask], logits[mask], stand_in.patients[mask])


def under_target(stand_in: StandIn, threshold: float, rng, sensitivity=0.80, prevalence=0.5):
    """Every pneumonia score moved down until the deployed sensitivity is ``sensitivity``;
    pneumonia patients dropped (in random order) to ``prevalence``."""
    positives = stand_in.labels == 1
    scores = stand_in.logits[positives]
    move = brentq(lambda d: np.mean(scores - d >= threshold) - sensitivity, 0.0, 30.0)
    logits = np.where(positives, stand_in.logits - move, stand_in.logits)
    return subset(
        stand_in,
        fewer_positives(stand_in, prevalence, rng),
        f"under target: pneumonia {move:.2f} logits lower, prevalence {prevalence:g}",
        logits,
    )


def tail_power(reference: np.ndarray, site_positives: np.ndarray, subgroup, rng, draws) -> str:
    """The share of draws whose tail check rejects the shift model, at 15, 30 and 60 positive
    studies (one image each) drawn from ``site_positives`` with a share ``subgroup[0]`` moved
    by ``subgroup[1]`` logits."""
    share, move = subgroup
    cells = []
    for studies in (15, 30, 60):
        rejected = 0
        for _ in range(draws):
            drawn = rng.choice(site_positives, studies)
            drawn = np.where(rng.random(studies) < share, drawn + move, drawn)
            rejected += positive_shift(drawn, reference).tail.rejected
        cells.append(f"{rejected / draws:.0%}")
    return " | ".join(cells)


def simulated(draws: int, budgets: list[int], target: float, minimum: int) -> None:
    rng = np.random.default_rng(3)
    reference = rng.normal(2.0, 1.5, 580)
    components = [(1 - SUBGROUP, 3.0, 1.0), (SUBGROUP, -1.5, 1.0)]

    def sensitivity(t: float, parts) -> float:
        return sum(w * norm.sf(t, mu, sd) for w, mu, sd in parts)

    current = brentq(lambda t: sensitivity(t, components) - 0.915, -5, 5)
    point = OperatingPoint(float(expit(current)), 1.0, "x", target, 0.95, 0.9, bias=0.0)
    n = 20_000

    def population(parts, name):
        positives = np.concatenate(
            [rng.normal(mu, sd, int(round(w * n / 2))) for w, mu, sd in parts]
        )
        negatives = rng.normal(0.0, 1.3, n // 2)
        labels = np.r_[np.ones(positives.size, int), np.zeros(negatives.size, int)]
        logits = np.r_[positives, negatives]
        return StandIn(name, labels, logits, np.arange(labels.size).astype(str), point, 0.05)

    print(
        "\nSimulated (logit units; margin 0.05 as in the review): validation positives "
        "N(2, 1.5) x 580, site negatives N(0, 1.3), prevalence 0.5, current threshold "
        f"{current:.3f} (the subgroup site's true sensitivity 0.915 there)."
    )
    print_header()
    for stand_in in (
        population(components, "review's simulation: 88% N(3, 1), 12% N(-1.5, 1)"),
        population([(1.0, 3.0, 1.0)], "the same site without the subgroup: N(3, 1)"),
    ):
        print_rows(stand_in, point, reference, target, budgets, draws, rng, minimum)
    print(
        "\nThe tail check's power (share of draws rejecting the shift model), positives one "
        "study each drawn from the validation positives' population moved by one logit, "
        "N(3, 1.5), with a share moved down; the first row is the rate at which a true shift "
        "model is rejected.\n"
    )
    print("| subgroup | 15 studies | 30 studies | 60 studies |")
    print("| --- | ---: | ---: | ---: |")
    bulk = rng.normal(3.0, 1.5, 20_000)
    for share, move in ((0.0, 0.0), (0.10, -4.5), (0.15, -4.5), (0.10, -2.5), (0.15, -2.5)):
        name = "none (a pure shift)" if share == 0 else f"{share:.0%}, {move:+g} logits"
        print(f"| {name} | {tail_power(reference, bulk, (share, move), rng, draws)} |")


def commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--simulated", action="store_true", help="what needs no model only")
    parser.add_argument(
        "--held-out", type=Path, default=None, help="normal images never trained on"
    )
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--shifts", default="blur:0.5,blur:1.0,contrast:0.5,exposure:0.5")
    parser.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS))
    parser.add_argument("--no-label-free", action="store_true")
    args = parser.parse_args()
    if args.home is None and not args.simulated:
        parser.error("give --home, --simulated, or both")
    started = time.perf_counter()
    budgets = [int(b) for b in args.budgets.split(",")]
    print(
        f"# site recalibration, {time.strftime('%Y-%m-%d')}, commit {commit()}, "
        f"{platform.processor() or platform.machine()}, margin {MARGIN:g}, minimum "
        f"specificity gain {MIN_GAIN:g}, {args.draws} draws"
    )
    if args.simulated:
        simulated(args.draws, budgets, 0.95, 10)
    if args.home is not None:
        real(args, budgets)
    print(f"\n{time.perf_counter() - started:.0f} s")


def real(args, budgets: list[int]) -> None:
    from cxr_platform.calibration.site import reference_positive_logits
    from cxr_platform.data.imaging import read_image
    from cxr_platform.data.patients import file_name_family
    from cxr_platform.data.shifts import apply_shift, encode_png
    from cxr_platform.deployment.reference import PROBABILITY, load_reference
    from cxr_platform.deployment.registry import PRODUCTION, registry_for
    from cxr_platform.inference.live import ServingModels
    from cxr_platform.inference.scoring import request_for, score_items
    from cxr_platform.model_version.predictor import Predictor
    from cxr_platform.settings import load_settings

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

    def score(images, shift="none", severity=1.0):
        """(labels, logits, patients) of the images the gate accepted."""
        shift_rng = np.random.default_rng(0)
        rows = []
        for path, label, patient in images:
            pixels = apply_shift(read_image(path).pixels, shift, severity=severity, rng=shift_rng)
            request = request_for(
                models,
                encode_png(pixels),
                max_pixels=10**8,
                uid_salt=b"",
                started=0.0,
                source="batch",
            )
            outcome = score_items([request])[0]
            if outcome.production is not None:
                rows.append((label, outcome.production.logit, patient))
        labels, logits, patients = zip(*rows, strict=True)
        return np.array(labels), np.array(logits, dtype=np.float64), np.array(patients)

    stand_ins: list[StandIn] = []

    def add(name, images, shift="none", severity=1.0):
        stand_ins.append(StandIn(name, *score(images, shift, severity)))

    add("test split, as acquired", test)
    for spec in args.shifts.split(","):
        shift, severity = spec.split(":")
        add(f"test split, {shift} {severity}", test, shift, float(severity))
    family = [item for item in test if item[1] == 1 or file_name_family(item[0].name) != "IM"]
    add("NORMAL2 family + test pneumonia", family)
    whole = stand_ins[0]
    rng = np.random.default_rng(11)
    stand_ins.append(
        subset(whole, fewer_positives(whole, 0.3, rng), "test split, prior shift to 0.3")
    )
    if args.held_out is not None:
        held = [(p, 0, f"held:{p.name}") for p in sorted(args.held_out.iterdir())]
        add(
            f"held-out family {args.held_out.name} + test pneumonia",
            held + [t for t in test if t[1]],
        )
    current = logit_threshold(point)
    stand_ins.append(missed_subgroup(whole, current, rng))
    stand_ins.append(shifted_subgroup(whole, rng))
    stand_ins.append(under_target(whole, current, rng))
    minimum = settings.monitoring.recalibration_min_negatives
    print(
        f"\nModel {info.version} ({predictor.model_name}), target sensitivity {target:g}, "
        f"margin {MARGIN:g}, threshold {point.threshold:.3f}; {reference_positives.size} "
        f"validation positives of {reference_positives.studies} patients."
    )
    print_header()
    for stand_in in stand_ins:
        print_rows(stand_in, point, reference_positives, target, budgets, args.draws, rng, minimum)
    print(
        "\nThe tail check's power on the model's own scores (share of draws rejecting the shift "
        "model): positives of the test split, one study each, with a share moved down.\n"
    )
    print("| subgroup | 15 studies | 30 studies | 60 studies |")
    print("| --- | ---: | ---: | ---: |")
    test_positives = whole.logits[whole.labels == 1]
    for share, move in ((0.0, 0.0), (0.10, -3.0), (0.15, -3.0), (0.10, -2.0), (0.15, -2.0)):
        name = "none (the test split as it is)" if share == 0 else f"{share:.0%}, {move:+g}"
        power = tail_power(reference_positives, test_positives, (share, move), rng, args.draws)
        print(f"| {name} | {power} |")
    if args.no_label_free:
        return
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
    print(f"\nvalidation prevalence (the calibration's prior) {training_prevalence:.3f}")


if __name__ == "__main__":
    main()
