"""A model card per registry version: what the version is for, how far to trust it, and where it
came from, for a radiologist, a PACS administrator or a regulator reading it without the code.

The card is built from what the registry already holds (the version's tags, its training run's
parameters and the evaluation report logged with that run), so it says only what was measured.
Written once, as ``model_card.md`` and ``model_card.html`` in the version's own files, when the
version is registered. Standard library and ``markdown-it-py`` only: the registry imports it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import PurePath
from typing import Any

from markdown_it import MarkdownIt

from cxr_platform.model_version.tags import VersionTags

CARD_MARKDOWN = "model_card.md"
CARD_HTML = "model_card.html"

INTENDED_USE = (
    "A second reader for frontal (PA or AP) chest radiographs: it flags images with the "
    "appearance of pneumonia so a radiologist can read them sooner, and shows where it looked "
    "(a Grad-CAM heatmap). Every study is still read and reported by a radiologist. Its output "
    "is a calibrated probability, a yes/no at the operating point below, and, through the DICOM "
    "node, a structured report and a heatmap series that go back to PACS.",
)
NOT_INTENDED_USE = (
    "Diagnosis, or any decision without a radiologist's read.",
    "Ruling disease out: 'no pneumonia flagged' says nothing about other findings (nodules, "
    "effusion, pneumothorax, lines and tubes, fractures); the model knows two classes only.",
    "Telling bacterial from viral pneumonia, or grading severity.",
    "Lateral views, CT, other body parts or other modalities.",
    "A population or equipment unlike its training data without a site operating point "
    "(`cxr recalibrate`) checked on that site's own labels.",
)

_RATES = ("auc", "sensitivity", "specificity", "ppv", "npv")
_RATE_NAMES = {
    "auc": "ROC AUC",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "accuracy": "Accuracy",
    "ece": "Calibration error (ECE, after calibration)",
}
# Run parameters a reader can judge the training by, in the order shown.
_TRAINING_PARAMS = (
    ("profile", "profile"),
    ("pretrained", "ImageNet weights asked for"),
    ("pretrained_loaded", "ImageNet weights loaded"),
    ("frozen_epochs", "epochs with the backbone frozen (at most)"),
    ("finetune_epochs", "epochs training every layer (at most)"),
    ("patience", "early-stopping patience (epochs)"),
    ("batch_size", "batch size"),
    ("preprocessing.image_size", "image side (px)"),
    ("n_train", "training images"),
    ("n_val", "validation images"),
    ("world_size", "training processes"),
    ("resolved_device", "device"),
)


@dataclass(frozen=True)
class CardFacts:
    """Everything a card says, gathered from the registry and the training run."""

    registered_model: str
    version: str
    created_at: datetime
    tags: VersionTags
    run_id: str | None = None
    run_params: Mapping[str, str] = field(default_factory=dict)
    # The training run's evaluation report (EvaluationReport.to_dict()), when it has one.
    evaluation: Mapping[str, Any] | None = None
    run_link: str | None = None  # the run in an MLflow UI, when one is known


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def _with_interval(values: Mapping[str, Any], rate: str) -> str:
    low, high = values.get(f"{rate}_ci_low"), values.get(f"{rate}_ci_high")
    if low is None or high is None:
        return _number(values.get(rate))
    return f"{_number(values.get(rate))} ({_number(low)}-{_number(high)})"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return lines


def _made_by(tags: VersionTags) -> str:
    if tags.recalibrated_from:
        return (
            f"version {tags.recalibrated_from} with its operating point refitted for site "
            f"`{tags.site}`; the weights are that version's"
        )
    if tags.finetuned_from:
        return (
            f"version {tags.finetuned_from} fine-tuned on the training split plus "
            f"{tags.labeled_examples or 0} labeled live examples"
        )
    return "trained by the platform's training pipeline"


def _counts(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{count} {name}" for name, count in sorted(value.items()))
    return str(value)


def _model_name(tags: VersionTags) -> str:
    name, arch = tags.model_name or "?", tags.arch or "?"
    return name if name == arch else f"{name} ({arch})"


def _data_source(tags: VersionTags) -> str:
    if tags.data_dir is None:
        return "the synthetic demo set the platform renders (no real radiographs)"
    # The folder's name only: the full path is a machine's, not the data's.
    return f"the image folder `{PurePath(tags.data_dir).name}`"


def _split_rows(evaluation: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    rows = []
    for name in ("val", "test"):
        split = (evaluation.get("splits") or {}).get(name)
        if not split:
            continue
        n, positive = split.get("n", 0), split.get("n_positive", 0)
        rows.append(
            (
                name,
                n,
                positive,
                n - positive,
                split.get("n_patients") if split.get("n_patients") is not None else "n/a",
            )
        )
    return rows


def _metric_rows(split: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    rows = [(_RATE_NAMES[rate], _with_interval(split, rate)) for rate in _RATES]
    rows.append((_RATE_NAMES["accuracy"], _number(split.get("accuracy"))))
    rows.append((_RATE_NAMES["ece"], _number(split.get("ece"))))
    rows.append(
        (
            "Confusion at the operating point (TP/FP/FN/TN)",
            "/".join(str(split.get(key, "?")) for key in ("tp", "fp", "fn", "tn")),
        )
    )
    return rows


def _subgroup_rows(subgroups: list[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            group.get("split"),
            group.get("dimension"),
            group.get("group"),
            group.get("n"),
            _number(group.get("auc")),
            _with_interval(group, "sensitivity"),
            _with_interval(group, "specificity"),
            ", ".join(group.get("flagged") or ()) or "-",
        )
        for group in subgroups
    ]


def _limitations(facts: CardFacts) -> list[str]:
    tags, params = facts.tags, facts.run_params
    evaluation = facts.evaluation or {}
    notes = []
    if tags.data_dir is None:
        notes.append(
            "**Evaluated on synthetic images only.** Its figures show the pipeline works end to "
            "end; they say nothing about how it reads real radiographs. Not for clinical use."
        )
    else:
        notes.append(
            "Evaluated on a held-out part of the same collection it was trained on: no external "
            "validation. The Kaggle 'Chest X-Ray Images (Pneumonia)' collection this platform "
            "is built around holds pediatric images (ages 1-5) from one centre; check that the "
            "population and equipment match before relying on it elsewhere."
        )
    from_scratch = str(params.get("pretrained_loaded", params.get("pretrained", ""))).lower()
    if not tags.finetuned_from and from_scratch == "false":
        notes.append(
            "Trained from scratch: no ImageNet weights were loaded (offline machine or the "
            "baseline CNN), so it learned every feature from this data alone."
        )
    if params.get("profile") == "demo":
        notes.append("Demo profile: small images and a few epochs, sized for a CPU in minutes.")
    if not tags.input_gate:
        notes.append("No input gate: it scores any image it is given, chest radiograph or not.")
    flagged = [group for group in evaluation.get("subgroups") or [] if group.get("flagged")]
    for group in flagged:
        notes.append(
            f"Subgroup shortfall: {group.get('split')} {group.get('dimension')}="
            f"{group.get('group')} (n={group.get('n')}) has "
            f"{', '.join(group.get('flagged') or ())} below the split's own figure."
        )
    if tags.recalibrated_from:
        notes.append(
            f"Only the operating point was fitted for site `{tags.site}`, on that site's "
            "labels; the evaluation report below is the source version's, at its own threshold."
        )
    if tags.finetuned_from:
        notes.append(
            "Fine-tuned on labels that came back from live traffic: their quality is the "
            "labelling site's."
        )
    notes.append(
        "The threshold was chosen on the validation split; test figures are at that threshold, "
        "never tuned on test."
    )
    return notes


def _field_line(name: str, values: list[str] | None, basis: str | None) -> str:
    return f"- {name}: " + (f"{'/'.join(values)} ({basis})." if values else "not stated.")


def population_check_words(check: dict[str, Any]) -> str:
    """What the check by pixels was fitted against and what it refuses of such patients: held
    out by patient, and (given several collections) with each whole collection left out, the
    figure to expect of patients from elsewhere."""
    outside = check.get("out_of_population") or {}
    collections = outside.get("collections") or []
    patients = f"{outside['n_patients']} patients" if outside.get("n_patients") else "patients"
    words = (
        f"a population check fitted against {outside.get('n_images')} images of {patients} "
        f"it is not for ({outside.get('folder')}), which "
        f"refused {outside.get('cv_refused_rate', 0):.0%} of them held out "
        f"({outside.get('cv_folds')}-fold, by patient)"
    )
    if "left_out_refused_rate" in outside:
        each = "; ".join(
            f"{entry['name']} {entry['refused_when_left_out']:.0%} of {entry['n_images']}"
            for entry in collections
        )
        words += (
            f" and **{outside['left_out_refused_rate']:.0%} with each of its "
            f"{len(collections)} collections left out in turn, the figure to expect of "
            f"patients from elsewhere** ({each})"
        )
    else:
        words += (
            " (one collection only: how it does on patients from elsewhere is not measured, "
            "and may be lower)"
        )
    words += f", and {check.get('val_refused')} of {check.get('n_val')} validation images"
    if check.get("n_shifted_val"):
        words += (
            f" ({check.get('shifted_val_refused')} of {check['n_shifted_val']} under "
            "acquisition shifts)"
        )
    return words


def _intended_use_lines(tags: VersionTags) -> list[str]:
    """Who the version is for, each field with where it came from; a range a deployment
    declared instead of its training data's in bold, with the range it replaced."""
    use = tags.intended_use
    if not use:
        return [
            "- **Population: not stated** (exported before intended use was recorded): it "
            "answers for any image its input gate takes for a chest radiograph."
        ]
    ages = use.get("age_years")
    age_text = f"{ages[0]}-{ages[1]} years (completed)" if ages else "not stated"
    age_line = f"- Ages: {age_text} ({use.get('age_basis')})."
    if use.get("widened_from"):
        low, high = use["widened_from"]
        age_line = (
            f"- **Ages: {age_text}, {use.get('age_basis')}; the training data's range was "
            f"{low}-{high} years.**"
        )
    check = tags.population_check or {}
    pixels = (
        "else by how the image looks to the network: " + population_check_words(check)
        if check
        else "**and by nothing else: no images of other patients were given at export "
        "(CXR_OUT_OF_POPULATION_DIR), so this version has no check by pixels** and answers "
        "for an adult whose age nobody states"
    )
    return [
        f"- **Population: {use.get('population')}.**",
        age_line,
        _field_line("Projections", use.get("projections"), use.get("projections_basis")),
        _field_line("Modalities", use.get("modalities"), use.get("modalities_basis")),
        "- Outside it the platform gives no answer: an image is refused by the patient age its "
        f"header (or the caller) states, {pixels}; the reason goes back in words "
        "(`outside_intended_use`).",
    ]


def _header_lines(facts: CardFacts) -> list[str]:
    tags = facts.tags
    created = facts.created_at.strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"# Model card: {facts.registered_model} version {facts.version}",
        "",
        *_table(
            ("", ""),
            [
                ("Model", _model_name(tags)),
                ("Registered", created),
                ("Made from", _made_by(tags)),
                ("Task", "NORMAL vs PNEUMONIA on one frontal chest radiograph"),
            ],
        ),
        "",
        "## Intended use",
        *_intended_use_lines(tags),
        *[f"- {line}" for line in INTENDED_USE],
        "",
        "## Not intended for",
        *[f"- {line}" for line in NOT_INTENDED_USE],
    ]


def _training_lines(facts: CardFacts) -> list[str]:
    tags, evaluation = facts.tags, facts.evaluation or {}
    lines = [
        "",
        "## Training data and split",
        f"- Source: {_data_source(tags)}.",
        "- Split by patient into train, validation and test (70/15/15, stratified by label): "
        "no patient's images are in two splits.",
        f"- Data version (hash of the split manifest): `{tags.data_version or 'unknown'}`.",
    ]
    if evaluation:
        lines += [
            "",
            *_table(
                ("split", "images", "pneumonia", "normal", "patients"), _split_rows(evaluation)
            ),
        ]
    # A fine-tune starts from its parent's weights: whether ImageNet's loaded is the parent's.
    skipped = {"pretrained", "pretrained_loaded"} if tags.finetuned_from else set()
    trained_with = [
        (label, facts.run_params[name])
        for name, label in _TRAINING_PARAMS
        if name in facts.run_params and name not in skipped
    ]
    if trained_with:
        lines += ["", "Training:", "", *_table(("parameter", "value"), trained_with)]
    return lines


def _member_lines(evaluation: Mapping[str, Any]) -> list[str]:
    """An ensemble's members, each with the figures of its own evaluation (same splits)."""
    members = (evaluation.get("training") or {}).get("members") or []
    if not members:
        return []
    rows = [
        (
            f"{index}. {member.get('model_name')}" + (" (Grad-CAM)" if index == 1 else ""),
            member.get("arch"),
            f"`{member.get('mlflow_run_id')}`",
            _number(member.get("best_val_auc")),
            _with_interval(
                {
                    "auc": member.get("test_auc"),
                    "auc_ci_low": member.get("test_auc_ci_low"),
                    "auc_ci_high": member.get("test_auc_ci_high"),
                },
                "auc",
            ),
            _number(member.get("test_sensitivity")),
            _number(member.get("test_specificity")),
        )
        for index, member in enumerate(members, start=1)
    ]
    return [
        "",
        "## Ensemble members",
        f"This version is {len(members)} trained models in one graph: each member's logit goes "
        "through that member's own calibration (fitted on validation), the version averages "
        "them, and its own calibration and threshold below were then fitted on validation for "
        "the combination. Grad-CAM heatmaps and the population check read the first member. "
        "Each member's figures are its own evaluation's, at its own threshold, on the same test "
        "split:",
        "",
        *_table(
            (
                "member",
                "architecture",
                "training run",
                "val AUC",
                "test AUC (95% CI)",
                "test sensitivity",
                "test specificity",
            ),
            rows,
        ),
    ]


def _operating_point_lines(tags: VersionTags) -> list[str]:
    lines = ["", "## Operating point"]
    lines.append(
        f"- Threshold {_number(tags.threshold, 4)} on the calibrated probability"
        + (f" ({tags.threshold_rule})" if tags.threshold_rule else "")
        + (f"; calibration {tags.calibration}" if tags.calibration else "")
        + "."
    )
    if tags.site:
        lines.append(
            f"- Fitted for site `{tags.site}`"
            + (
                f", whose estimated prevalence is {_number(tags.site_prevalence)}"
                if tags.site_prevalence is not None
                else ""
            )
            + "."
        )
        if tags.site_labels:
            lines.append(
                "- Labels used: "
                + "; ".join(
                    f"{key.replace('_', ' ')}: {_counts(value)}"
                    for key, value in sorted(tags.site_labels.items())
                )
                + "."
            )
    return lines


def _performance_lines(facts: CardFacts) -> list[str]:
    tags, evaluation = facts.tags, facts.evaluation or {}
    lines = ["", "## Performance"]
    test = (evaluation.get("splits") or {}).get("test")
    if test:
        unit = test.get("interval_unit", "image")
        lines += [
            f"Test split, {test.get('n')} images"
            + (f" from {test['n_patients']} patients" if test.get("n_patients") else "")
            + f"; 95% bootstrap intervals, resampled by {unit}.",
            "",
            *_table(("metric", "value (95% CI)"), _metric_rows(test)),
        ]
    if tags.site and tags.metrics:
        lines += [
            "",
            f"At site `{tags.site}` (held-out part of its labels):",
            "",
            *_table(
                ("metric", "value"),
                [(name, _number(value)) for name, value in sorted(tags.metrics.items())],
            ),
        ]
    elif not test:
        lines += (
            [
                "",
                *_table(
                    ("metric", "value"), [(k, _number(v)) for k, v in sorted(tags.metrics.items())]
                ),
            ]
            if tags.metrics
            else ["No evaluation was recorded for this version."]
        )
    return lines


def _subgroup_lines(evaluation: dict[str, Any]) -> list[str]:
    subgroups = evaluation.get("subgroups") or []
    lines = ["", "## Subgroups"]
    if not subgroups:
        return lines + ["The data names no subgroups (one folder, one file-name family)."]
    return lines + [
        "Groups the data names (source folder, file-name family, projection); 'flagged' "
        "when a rate's whole 95% interval lies below the split's own figure.",
        "",
        *_table(
            (
                "split",
                "by",
                "group",
                "images",
                "AUC",
                "sensitivity (95% CI)",
                "specificity (95% CI)",
                "flagged",
            ),
            _subgroup_rows(subgroups),
        ),
    ]


def _input_gate_lines(gate: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Input gate"]
    if not gate:
        return lines + ["This version has no input gate."]
    limits = gate.get("limits") or {}
    refused = f"{gate.get('val_refused', '?')} of {gate.get('n_val', '?')}" + (
        f" ({100 * gate['val_refusal_rate']:.1f}%)"
        if gate.get("val_refusal_rate") is not None
        else ""
    )
    return lines + [
        "Images that are not chest radiographs, and inverted or degenerate ones, are refused "
        "before scoring (HTTP 422, DICOM failure status) rather than given a probability.",
        "",
        *_table(
            ("", ""),
            [
                ("method", gate.get("method", "ppca-thumbnail")),
                ("components", gate.get("components", "?")),
                ("distance threshold", _number(gate.get("threshold"))),
                ("fitted on (train images)", gate.get("n_train", "?")),
                ("validation images refused", refused),
                *[(f"limit: {name}", value) for name, value in sorted(limits.items())],
            ],
        ),
    ]


def _lineage_lines(facts: CardFacts) -> list[str]:
    tags = facts.tags
    run = f"`{facts.run_id}`" if facts.run_id else "unknown"
    if facts.run_id and facts.run_link:
        run = f"[`{facts.run_id}`]({facts.run_link})"
    lineage = [
        ("training run (MLflow)", run),
        ("data version", f"`{tags.data_version or 'unknown'}`"),
        ("git commit", f"`{tags.git_commit or 'unknown'}`"),
    ]
    if tags.finetuned_from:
        lineage.append(("fine-tuned from version", tags.finetuned_from))
        lineage.append(("why it was fine-tuned", tags.finetune_reason or "not recorded"))
    if tags.recalibrated_from:
        lineage.append(("recalibrated from version", tags.recalibrated_from))
    if tags.parity_onnx_max_abs_diff is not None:
        lineage.append(
            (
                "export parity (largest logit difference)",
                f"ONNX {tags.parity_onnx_max_abs_diff:.1e}, TorchScript "
                f"{(tags.parity_torchscript_max_abs_diff or 0.0):.1e}",
            )
        )
    if tags.int8:
        lineage.append(("INT8 model", tags.int8))
    return ["", "## Lineage", *_table(("", ""), lineage), ""]


def card_markdown(facts: CardFacts) -> str:
    """The card as Markdown (what ``cxr models --card`` prints and MLflow's UI renders), one
    section after another."""
    lines = [
        *_header_lines(facts),
        *_training_lines(facts),
        *_member_lines(facts.evaluation or {}),
        *_operating_point_lines(facts.tags),
        *_performance_lines(facts),
        *_subgroup_lines(facts.evaluation or {}),
        *_input_gate_lines(facts.tags.input_gate),
        "",
        "## Known limitations",
        *[f"- {note}" for note in _limitations(facts)],
        *_lineage_lines(facts),
    ]
    return "\n".join(lines)


def card_summary(facts: CardFacts) -> str:
    """A few lines for the registry's version description; the card has the rest."""
    test = ((facts.evaluation or {}).get("splits") or {}).get("test")
    lines = [f"Made from: {_made_by(facts.tags)}. Data: {_data_source(facts.tags)}."]
    use = facts.tags.intended_use
    if use:
        ages = use.get("age_years")
        lines.append(
            f"Intended use: {use.get('population')}"
            + (f"; ages {ages[0]}-{ages[1]} years" if ages else "")
            + ". Other patients are refused, not answered."
        )
    if test:
        lines.append(
            "Test (95% CI): "
            + ", ".join(f"{_RATE_NAMES[rate]} {_with_interval(test, rate)}" for rate in _RATES[:3])
            + f"; n={test.get('n')}."
        )
    if facts.tags.data_dir is None:
        lines.append("Evaluated on synthetic images only: not for clinical use.")
    lines.append(
        f"Model card (intended use, subgroups, input gate, limitations, lineage): "
        f"{CARD_MARKDOWN} and {CARD_HTML} among this version's files; "
        f"`cxr models --card {facts.version}` prints it."
    )
    return "\n\n".join(lines)


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
    "line-height:1.45;color:#1b1f24}table{border-collapse:collapse;margin:.5rem 0}"
    "td,th{border:1px solid #c9ced6;padding:.25rem .6rem;text-align:left}"
    "th{background:#f0f2f5}code{background:#f0f2f5;padding:0 .2rem}"
)


def card_html(markdown: str, title: str) -> str:
    """A standalone page: opens from the MLflow UI's artifact view or a file browser."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body>\n{body}</body></html>\n"
    )
