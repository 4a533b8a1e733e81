"""Evaluation reports as files people read: Markdown tables and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: Dagster workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from cxr_platform.model_version.operating_point import calibrated_probabilities
from cxr_platform.models.evaluation import EvaluationReport, SplitEvaluation, reliability_curve

HEADLINE_COLUMNS = ("auc", "sensitivity", "specificity", "ppv", "npv", "accuracy", "f1", "ece")


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _with_ci(split: SplitEvaluation, name: str) -> str:
    value = getattr(split, name)
    low, high = getattr(split, f"{name}_ci_low"), getattr(split, f"{name}_ci_high")
    if value is None:
        return "n/a"
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} ({low:.3f}-{high:.3f})"


def report_markdown(report: EvaluationReport) -> str:
    op = report.operating_point
    lines = [
        f"# Evaluation: {report.model_name} ({report.arch})",
        "",
        f"Operating threshold **{op.threshold:.4f}** on the calibrated probability "
        f"(Platt scaling: temperature {op.temperature:.3f}, bias {op.bias:+.3f}), "
        f"chosen on validation: rule `{op.rule}`"
        + (f", target sensitivity {op.target_sensitivity:.2f}" if op.target_sensitivity else "")
        + ". The test split was not used to choose anything.",
        "",
        "| split | n | pneumonia | ROC AUC (95% CI) | sensitivity (CI) | specificity (CI) "
        "| PPV (CI) | NPV (CI) "
        "| accuracy | F1 | ECE (raw -> calibrated) |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in report.splits.values():
        lines.append(
            f"| {s.split} | {s.n} | {s.n_positive} | {_with_ci(s, 'auc')} | "
            f"{_with_ci(s, 'sensitivity')} | {_with_ci(s, 'specificity')} | "
            f"{_with_ci(s, 'ppv')} | {_with_ci(s, 'npv')} | {s.accuracy:.3f} | {_fmt(s.f1)} | "
            f"{s.ece_uncalibrated:.3f} -> {s.ece:.3f} |"
        )
    units = {
        f"{s.split}: {s.n_patients} patients" if s.interval_unit == "patient" else s.split
        for s in report.splits.values()
    }
    lines += [
        "",
        "95% intervals: percentile bootstrap"
        + (
            ", resampling whole patients (" + "; ".join(sorted(units)) + ")"
            if any(s.interval_unit == "patient" for s in report.splits.values())
            else ", resampling images"
        )
        + ".",
    ]
    lines += ["", "Confusion matrices (rows: truth, columns: prediction):", ""]
    for s in report.splits.values():
        lines += [
            f"**{s.split}**",
            "",
            "| | predicted normal | predicted pneumonia |",
            "| --- | ---: | ---: |",
            f"| normal | {s.tn} | {s.fp} |",
            f"| pneumonia | {s.fn} | {s.tp} |",
            "",
        ]
    if report.subgroups:
        lines += subgroup_markdown(report)
    if report.training:
        lines += ["## Training", ""]
        lines += [f"- {key}: {_fmt(value)}" for key, value in report.training.items()]
    return "\n".join(lines) + "\n"


def _rate_with_ci(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return "n/a"
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} ({low:.3f}-{high:.3f})"


def subgroup_markdown(report: EvaluationReport) -> list[str]:
    """The subgroup table; a flagged rate is in bold with a warning sign."""
    lines = [
        "## Subgroups",
        "",
        "At the same threshold, with patient-level 95% intervals. **Flagged**: the upper end "
        "of the subgroup's interval is below the whole split's figure, a shortfall larger "
        "than chance. Groups under 20 images are pooled as (other).",
        "",
        "| split | by | group | n | pneumonia | patients | AUC | sensitivity (CI) "
        "| specificity (CI) | flagged |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for group in report.subgroups:
        rates = {
            rate: _rate_with_ci(
                getattr(group, rate),
                getattr(group, f"{rate}_ci_low"),
                getattr(group, f"{rate}_ci_high"),
            )
            for rate in ("sensitivity", "specificity")
        }
        for rate in group.flagged:
            rates[rate] = f"**{rates[rate]}** ⚠"
        lines.append(
            f"| {group.split} | {group.dimension} | {group.group} | {group.n} | "
            f"{group.n_positive} | {group.n_patients} | {_fmt(group.auc)} | "
            f"{rates['sensitivity']} | {rates['specificity']} | "
            f"{', '.join(group.flagged) or '-'} |"
        )
    return [*lines, ""]


def comparison_markdown(reports: Sequence[EvaluationReport], split: str = "test") -> str:
    header = "| model | pretrained | " + " | ".join(HEADLINE_COLUMNS) + " | threshold |"
    lines = [header, "| --- | --- |" + " ---: |" * (len(HEADLINE_COLUMNS) + 1)]
    for report in reports:
        headline = report.headline(split)
        values = " | ".join(_fmt(headline[c]) for c in HEADLINE_COLUMNS)
        pretrained = report.training.get("pretrained", "n/a")
        lines.append(
            f"| {report.model_name} | {pretrained} | {values} | {headline['threshold']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot_roc(report: EvaluationReport, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    for split, (labels, logits) in report.predictions.items():
        fpr, tpr, _ = roc_curve(labels, logits)
        ax.plot(fpr, tpr, label=f"{split} (AUC {report.splits[split].auc:.3f})")
        s = report.splits[split]
        if s.sensitivity is not None and s.specificity is not None:
            ax.scatter([1 - s.specificity], [s.sensitivity], zorder=3)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC: {report.model_name}")
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_confusion(report: EvaluationReport, path: Path, split: str = "test") -> Path:
    s = report.splits[split]
    matrix = np.array([[s.tn, s.fp], [s.fn, s.tp]])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        share = count / max(matrix[row].sum(), 1)
        colour = "white" if count > matrix.max() / 2 else "black"
        ax.text(col, row, f"{count}\n{share:.0%}", ha="center", va="center", color=colour)
    ax.set_xticks([0, 1], ["normal", "pneumonia"])
    ax.set_yticks([0, 1], ["normal", "pneumonia"])
    ax.set(
        xlabel="predicted",
        ylabel="truth",
        title=f"{split} at threshold {report.operating_point.threshold:.3f}",
    )
    return _save(fig, path)


def plot_reliability(report: EvaluationReport, path: Path, split: str = "test") -> Path:
    labels, logits = report.predictions[split]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    for name, probabilities in (
        ("uncalibrated", calibrated_probabilities(logits, 1.0)),
        (
            f"Platt (T = {report.operating_point.temperature:.2f}, "
            f"b = {report.operating_point.bias:+.2f})",
            report.operating_point.probabilities(logits),
        ),
    ):
        curve = reliability_curve(labels, probabilities)
        ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", label=name)
    ax.set(
        xlabel="predicted probability of pneumonia",
        ylabel="observed rate",
        title=f"Reliability ({split})",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_learning_curves(history: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    auc_ax.plot(epochs, [h["val_auc"] for h in history], label="val AUC", color="tab:green")
    frozen = [h["epoch"] for h in history if h["phase"] == "frozen"]
    for ax in (loss_ax, auc_ax):
        if frozen:
            ax.axvspan(min(frozen) - 0.5, max(frozen) + 0.5, color="grey", alpha=0.15)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.suptitle(f"{title} (shaded: backbone frozen)")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=110)


def save_figure(fig, path: Path, *, dpi: int) -> Path:
    """``fig`` laid out, written to ``path`` (its folder made), and closed."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def image_grid(count: int, *, columns: int, cell: tuple[float, float]) -> tuple[Any, list]:
    """A figure of ``count`` image cells, ``columns`` to a row, axes off; its axes in order."""
    rows = max(1, -(-count // columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(cell[0] * columns, cell[1] * rows), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    return fig, list(axes.ravel())


def write_report_files(
    report: EvaluationReport, out_dir: str | Path, history: Sequence[dict[str, Any]] = ()
) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "json": report.write_json(out_dir / "evaluation.json"),
        "markdown": out_dir / "evaluation.md",
        "roc": plot_roc(report, out_dir / "roc.png"),
    }
    files["markdown"].write_text(report_markdown(report))
    split = "test" if "test" in report.splits else "val"
    files["confusion"] = plot_confusion(report, out_dir / "confusion.png", split)
    files["reliability"] = plot_reliability(report, out_dir / "reliability.png", split)
    if history:
        files["learning_curves"] = plot_learning_curves(
            history, out_dir / "learning_curves.png", report.model_name
        )
    return files
