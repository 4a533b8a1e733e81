"""The site validation report of a silent trial: how the version did on the site's own studies,
beside its internal test figures, and a plain verdict on what to do next.

Figures are per image at the version's operating point, with 95% intervals that resample whole
studies (images of one study are not independent). A figure *falls* when its whole interval lies
below the internal test figure: chance alone would rarely put it there. No patient data: the
report counts, cuts by modality, manufacturer, view and age band, and names labels-file lines.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_platform.calibration.report_labels import (
    LabelJoin,
    ReportLabels,
    join_by_study,
    refuse_mostly_unmatched,
)
from cxr_platform.calibration.silent_trial import FAILED, REFUSED, SCORED
from cxr_platform.deployment.model_card import card_html
from cxr_platform.inference.log import InferenceLog
from cxr_platform.inference.retained import RetainedInputs
from cxr_platform.inference.scoring import OUTSIDE_INTENDED_USE
from cxr_platform.models.evaluation import (
    cluster_bootstrap_intervals,
    mann_whitney_auc,
    threshold_metrics,
)

TRIAL_REPORTER = "silent-trial report labels"
FIGURES = ("auc", "sensitivity", "specificity", "ppv", "npv")
# Judged against the internal test: PPV and NPV move with the site's prevalence, so they are
# shown, never judged.
JUDGED = ("auc", "sensitivity", "specificity")
SUBGROUP_DIMENSIONS = ("modality", "manufacturer", "view", "age_band")

WITHIN, RECALIBRATE, FINE_TUNE, MORE_LABELS, DO_NOT_DEPLOY, NO_IMAGES = (
    "within",
    "recalibrate",
    "fine_tune",
    "more_labels",
    "do_not_deploy",
    "no_images",
)


def join_trial_labels(
    rows: pd.DataFrame,
    labels: ReportLabels,
    log: InferenceLog,
    retained: RetainedInputs | None = None,
) -> tuple[LabelJoin, dict[str, str]]:
    """Join the labels to the trial's studies and put them in the site's labeled store (the
    log's feedback, reporter ``silent-trial report labels``), where ``cxr recalibrate --site``
    finds them; with ``retained``, the kept model inputs of labelled images become the
    fine-tune's training data as a feedback label makes them. Returns the join and each scored
    image's label."""
    studies_by_key: dict[str, dict[str, str]] = {
        "study_instance_uid": {study: study for study in rows["study"].dropna()},
        "accession_number": _mapping(rows, "accession"),
        "path": _mapping(rows, "path"),
    }
    join = join_by_study(labels, studies_by_key)
    refuse_mostly_unmatched(labels, join)
    scored = rows[(rows["outcome"] == SCORED) & rows["study"].isin(list(join.by_study))]
    by_request = {str(row.request_id): join.by_study[str(row.study)] for row in scored.itertuples()}
    log.label_requests(by_request, reporter=TRIAL_REPORTER)
    if retained is not None:
        for request_id in by_request:
            retained.mark_labeled(request_id)
    return join, by_request


def _mapping(rows: pd.DataFrame, column: str) -> dict[str, str]:
    known = rows.dropna(subset=[column, "study"])
    return dict(zip(known[column].astype(str), known["study"].astype(str), strict=True))


@dataclass(frozen=True)
class SiteFigure:
    name: str
    site: float | None
    low: float | None
    high: float | None
    internal: float | None
    falls: bool


@dataclass
class SiteValidationReport:
    site: str
    model_name: str
    model_version: str
    threshold: float
    partitions: list[str]
    created_at: str
    studies: int
    images: int
    scored: int
    refused: dict[str, int]
    refused_by_check: dict[str, int]
    failed: dict[str, int]
    failed_studies: int
    labels_file: str | None
    labels: dict[str, Any] | None
    labelled_images: int
    labelled_studies: int
    positives: int
    negatives: int
    prevalence: float | None
    figures: list[SiteFigure]
    subgroups: list[dict[str, Any]]
    verdict: str
    next_step: str
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_site_report(
    rows: pd.DataFrame,
    *,
    site: str,
    model_name: str,
    model_version: str,
    threshold: float,
    internal: dict[str, float],
    labels_by_request: dict[str, str] | None = None,
    join: LabelJoin | None = None,
    labels_file: str | None = None,
    min_per_class: int = 30,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> SiteValidationReport:
    """``internal``: the version's metrics (``test_auc``, ``test_sensitivity``, ...)."""
    labels_by_request = labels_by_request or {}
    images = rows[rows["request_id"].notna()]
    scored = images[images["outcome"] == SCORED]
    refused = images[images["outcome"] == REFUSED]
    failed = rows[rows["outcome"] == FAILED]
    labelled = scored[scored["request_id"].isin(list(labels_by_request))].copy()
    labelled["truth"] = [int(labels_by_request[r] == "PNEUMONIA") for r in labelled["request_id"]]
    positives, negatives = int(labelled["truth"].sum()), int((labelled["truth"] == 0).sum())
    figures = _figures(labelled, threshold, internal, n_bootstrap, seed)
    report = SiteValidationReport(
        site=site,
        model_name=model_name,
        model_version=str(model_version),
        threshold=float(threshold),
        partitions=sorted(set(rows["partition"].astype(str))),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        studies=int(rows["study"].nunique()),
        images=len(images),
        scored=len(scored),
        refused=_counts(refused["reason"]),
        refused_by_check=_counts(refused["detail"]),
        failed=_counts(failed["reason"]),
        failed_studies=int(failed["study"].nunique()),
        labels_file=labels_file,
        labels=join.to_dict() if join is not None else None,
        labelled_images=len(labelled),
        labelled_studies=int(labelled["study"].nunique()),
        positives=positives,
        negatives=negatives,
        prevalence=_study_prevalence(labelled),
        figures=figures,
        subgroups=_subgroups(labelled, threshold, n_bootstrap, seed),
        verdict="",
        next_step="",
    )
    report.verdict, report.next_step, report.reasons = _verdict(report, min_per_class)
    return report


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in values.fillna("unknown").value_counts().sort_index().items()}


def _study_prevalence(labelled: pd.DataFrame) -> float | None:
    if labelled.empty:
        return None
    by_study = labelled.groupby("study")["truth"].max()
    return float(by_study.mean())


def _rates(
    labelled: pd.DataFrame, threshold: float, n_bootstrap: int, seed: int
) -> dict[str, tuple[float | None, float | None, float | None]]:
    truth = labelled["truth"].to_numpy(dtype=int)
    probabilities = labelled["probability"].to_numpy(dtype=float)
    if len(truth) == 0:
        return {name: (None, None, None) for name in FIGURES}
    point = threshold_metrics(truth, probabilities, threshold)
    both = 0 < truth.sum() < len(truth)
    point["auc"] = (
        mann_whitney_auc(probabilities[truth == 1], probabilities[truth == 0]) if both else None
    )
    intervals = cluster_bootstrap_intervals(
        truth,
        probabilities,
        probabilities,
        threshold,
        labelled["study"].to_numpy(dtype=str),
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    return {name: (point.get(name), *intervals.get(name, (None, None))) for name in FIGURES}


def _figures(
    labelled: pd.DataFrame,
    threshold: float,
    internal: dict[str, float],
    n_bootstrap: int,
    seed: int,
) -> list[SiteFigure]:
    figures = []
    for name, (value, low, high) in _rates(labelled, threshold, n_bootstrap, seed).items():
        expected = internal.get(f"test_{name}")
        falls = name in JUDGED and high is not None and expected is not None and high < expected
        figures.append(SiteFigure(name, value, low, high, expected, falls))
    return figures


def _subgroups(
    labelled: pd.DataFrame, threshold: float, n_bootstrap: int, seed: int
) -> list[dict[str, Any]]:
    found = []
    for dimension in SUBGROUP_DIMENSIONS:
        values = labelled[dimension].fillna("not stated").astype(str)
        if values.nunique() < 2 and (values == "not stated").all():
            continue  # the headers say nothing of it
        for group in sorted(values.unique()):
            members = labelled[values == group]
            rates = _rates(members, threshold, n_bootstrap, seed)
            found.append(
                {
                    "dimension": dimension,
                    "group": group,
                    "images": len(members),
                    "positives": int(members["truth"].sum()),
                    **{
                        f"{name}{suffix}": rates[name][index]
                        for name in ("sensitivity", "specificity")
                        for index, suffix in ((0, ""), (1, "_low"), (2, "_high"))
                    },
                }
            )
    return found


def _verdict(report: SiteValidationReport, min_per_class: int) -> tuple[str, str, list[str]]:
    site = report.site
    reasons: list[str] = []
    if report.images == 0:
        return (
            NO_IMAGES,
            "Check the date range and that the archive holds CR or DX studies for it.",
            ["no image was retrieved"],
        )
    outside = report.refused.get(OUTSIDE_INTENDED_USE, 0) / report.images
    refused = sum(report.refused.values()) / report.images
    if refused >= 0.2:
        reasons.append(f"{refused:.0%} of the site's images were refused")
    if outside > 0.5:
        reasons.append(f"{outside:.0%} of the site's patients are outside the intended use")
        return (
            DO_NOT_DEPLOY,
            "Do not deploy this version here: most of the site's patients are outside its "
            "intended use.",
            reasons,
        )
    if report.positives < min_per_class or report.negatives < min_per_class:
        reasons.append(
            f"{report.positives} positive and {report.negatives} negative labelled images; "
            f"at least {min_per_class} of each are needed to judge"
        )
        return (
            MORE_LABELS,
            f"Label more of the site's studies (at least {min_per_class} of each class) and "
            "join them again.",
            reasons,
        )
    falling = [figure for figure in report.figures if figure.falls]
    for figure in falling:
        reasons.append(
            f"{figure.name} {figure.site:.3f} (95% CI {figure.low:.3f}-{figure.high:.3f}) is "
            f"below the internal test's {figure.internal:.3f}"
        )
    if any(figure.name == "auc" for figure in falling):
        return (
            FINE_TUNE,
            "The version ranks this site's images worse than its internal test: fine-tune on "
            "the site's labelled studies (their labels are in the log now), or do not deploy.",
            reasons,
        )
    if falling:
        return (
            RECALIBRATE,
            f"The ranking holds but the operating point does not: `cxr recalibrate --site "
            f"'{site}'` fits the site its own threshold from these labels.",
            reasons,
        )
    return (
        WITHIN,
        "The site stays within the internal test's figures: the version can go live here.",
        reasons,
    )


# ---- files -------------------------------------------------------------------------------


def report_folder(
    root: Path,
    trial_folder: Path,
    labels_path: Path | None,
    partitions: list[str] | None = None,
) -> Path:
    """One folder per content: the partition records reported on and the labels file. The
    same inputs give the same folder, which is written once."""
    digest = hashlib.sha256()
    for path in sorted((trial_folder / "partitions").glob("*.jsonl")):
        if partitions is not None and path.stem not in partitions:
            continue
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    if labels_path is not None:
        digest.update(b"labels\0" + labels_path.read_bytes())
    return root / digest.hexdigest()[:16]


def write_report(report: SiteValidationReport, folder: Path) -> Path:
    """report.json, report.md and report.html; written to a sibling and renamed into place."""
    if (folder / "report.json").exists():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    markdown = report_markdown(report)
    (partial / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (partial / "report.md").write_text(markdown)
    title = f"Silent trial at {report.site}: {report.model_name} version {report.model_version}"
    (partial / "report.html").write_text(card_html(markdown, title))
    partial.replace(folder)
    return folder


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def report_markdown(report: SiteValidationReport) -> str:
    lines = [
        f"# Silent trial at {report.site}",
        "",
        f"{report.model_name} version {report.model_version}, operating threshold "
        f"{report.threshold:.3f}; study dates {_span(report.partitions)}. Nothing was sent to "
        "the site's PACS.",
        "",
        f"**Verdict: {report.verdict.replace('_', ' ')}.** {report.next_step}",
        "",
        *(f"- {reason}" for reason in report.reasons),
        "",
        "## What was scored",
        "",
        "| | count |",
        "| --- | ---: |",
        f"| studies | {report.studies} |",
        f"| images | {report.images} |",
        f"| scored | {report.scored} |",
        *(f"| refused: {why.replace('_', ' ')} | {n} |" for why, n in report.refused.items()),
        *(
            f"| not retrieved or unreadable: {why.replace('_', ' ')} | {n} |"
            for why, n in report.failed.items()
        ),
        "",
    ]
    if report.refused_by_check:
        lines += ["Refusals by the check that made them: "]
        lines[-1] += ", ".join(f"{k} {v}" for k, v in report.refused_by_check.items()) + "."
        lines.append("")
    lines += [
        "## Against the site's report labels",
        "",
        f"{report.labelled_images} labelled images of {report.labelled_studies} studies "
        f"({report.positives} pneumonia, {report.negatives} normal); the site's prevalence "
        f"{_number(report.prevalence, 2)} by study.",
        "",
        "| figure | at the site | 95% CI (by study) | internal test | |",
        "| --- | ---: | --- | ---: | --- |",
    ]
    for figure in report.figures:
        interval = f"{_number(figure.low)}-{_number(figure.high)}"
        flag = "**falls**" if figure.falls else ""
        lines.append(
            f"| {figure.name.upper() if figure.name == 'auc' else figure.name} | "
            f"{_number(figure.site)} | {interval} | {_number(figure.internal)} | {flag} |"
        )
    if report.labels:
        lines += [
            "",
            f"Labels file {report.labels_file}: {report.labels['labelled_studies']} studies "
            f"joined, {report.labels['unmatched_keys']} keys matched no study"
            + _lines_text(report.labels["unmatched_lines"])
            + f", {report.labels['conflicting_studies']} studies left out for conflicting "
            "labels" + _lines_text(report.labels["conflicting_lines"]) + ".",
        ]
    if report.subgroups:
        lines += [
            "",
            "## Subgroups (where the headers say)",
            "",
            "| by | group | images | pneumonia | sensitivity (95% CI) | specificity (95% CI) |",
            "| --- | --- | ---: | ---: | --- | --- |",
        ]
        for group in report.subgroups:
            lines.append(
                f"| {group['dimension']} | {group['group']} | {group['images']} | "
                f"{group['positives']} | {_rate(group, 'sensitivity')} | "
                f"{_rate(group, 'specificity')} |"
            )
    return "\n".join(lines) + "\n"


def _rate(group: dict[str, Any], name: str) -> str:
    if group[name] is None:
        return "-"
    return f"{group[name]:.3f} ({_number(group[f'{name}_low'])}-{_number(group[f'{name}_high'])})"


def _lines_text(lines: list[int]) -> str:
    if not lines:
        return ""
    more = "..." if len(lines) > 10 else ""
    return f" (lines {', '.join(map(str, lines[:10]))}{more})"


def _span(partitions: list[str]) -> str:
    if not partitions:
        return "none"
    return partitions[0] if len(partitions) == 1 else f"{partitions[0]} to {partitions[-1]}"
