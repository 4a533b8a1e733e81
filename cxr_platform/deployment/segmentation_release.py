"""The lung segmentation version's way into the registry: its own registered model, a card that
says what it was trained on and how well it draws lungs, a gate, and promotion.

There is no shadow phase: a segmenter answers no clinical question of its own, and its test
Dice on the classifier's patient split is the whole comparison the gate needs. A version that
passes goes straight to ``production`` (the one before becomes ``previous-production``, so
``cxr models --rollback`` style recovery works as for classifiers); one that fails is tagged
refused with the gate's figures and never served.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path, PurePath
from typing import Any

from cxr_platform.deployment.model_card import CARD_HTML, CARD_MARKDOWN, CardFacts
from cxr_platform.deployment.registry import (
    ModelRegistry,
    ModelVersionInfo,
    RegistryEvent,
)
from cxr_platform.model_version.aliases import PRODUCTION
from cxr_platform.model_version.lung_fields import SEGMENTER_ONNX_FILE, SEGMENTER_REPORT_FILE
from cxr_platform.model_version.tags import VersionTags, record_json

# A retrained segmenter judged on the same patients may lose at most this much mean Dice against
# production: about a fifth of the width of the real test split's 95% interval (0.0045), so
# noise between two trainings passes and a real loss does not.
MAX_DICE_DROP = 0.001
SEGMENTER_MODEL_NAME = "lung_unet"
SEGMENTER_ARCH = "monai-unet"


@dataclass(frozen=True)
class LungGateDecision:
    passed: bool
    dice_mean: float
    floor: float
    parity_passed: bool
    production_version: str | None
    production_dice_mean: float | None
    compared: bool  # False where production was judged on other data: the floor alone decides
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["reasons"] = list(self.reasons)
        return values


def lung_gate(
    candidate: VersionTags,
    production: ModelVersionInfo | None,
    *,
    floor: float,
    parity_passed: bool,
) -> LungGateDecision:
    """The floor, the export's parity, and no loss against production on the same patients.
    ``candidate``: the tags the version is registered with (its test Dice, its data version)."""
    dice = float(candidate.metrics["test_dice_mean"])
    reasons = []
    if dice < floor:
        reasons.append(f"test Dice {dice:.4f} is below the floor {floor:.2f}")
    if not parity_passed:
        reasons.append("the ONNX file does not draw the same fields as PyTorch")
    production_dice = None
    compared = False
    if production is not None:
        production_dice = production.metrics.get("test_dice_mean")
        same_data = production.release.data_version == candidate.data_version
        compared = same_data and production_dice is not None
        if compared and dice < float(production_dice) - MAX_DICE_DROP:
            reasons.append(
                f"test Dice {dice:.4f} is below production's {production_dice:.4f} "
                f"(version {production.version}) on the same patients"
            )
    return LungGateDecision(
        passed=not reasons,
        dice_mean=dice,
        floor=floor,
        parity_passed=parity_passed,
        production_version=production.version if production else None,
        production_dice_mean=None if production_dice is None else float(production_dice),
        compared=compared,
        reasons=tuple(reasons),
    )


@dataclass(frozen=True)
class SegmenterRelease:
    version: ModelVersionInfo
    decision: LungGateDecision
    event: RegistryEvent | None  # the promotion or the refusal
    card: str


def release_segmenter(
    registry: ModelRegistry,
    onnx_path: Path,
    report: Mapping[str, Any],
    evaluation_markdown: str,
    *,
    run_id: str,
    tags: VersionTags,
    floor: float,
    parity: Mapping[str, Any],
    masks_dir: str,
    triggered_by: str,
) -> SegmenterRelease:
    """Register the exported segmenter with its test report (``report``: the split's summary
    and groups), judge it, and promote it or record the refusal."""
    # Judged before it is registered, so the card written with the version carries the verdict.
    production = registry.find(PRODUCTION)
    decision = lung_gate(
        tags, production, floor=floor, parity_passed=bool(parity.get("passed", False))
    )
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        shutil.copy2(onnx_path, folder / SEGMENTER_ONNX_FILE)
        (folder / SEGMENTER_REPORT_FILE).write_text(
            record_json({**report, "parity": dict(parity)}, indent=1)
        )
        info = registry.register_folder(
            folder,
            run_id=run_id,
            tags=tags,
            triggered_by=triggered_by,
            card=partial(
                segmentation_card,
                decision=decision,
                evaluation_markdown=evaluation_markdown,
                masks_dir=masks_dir,
            ),
            summary=partial(segmentation_card_summary, decision=decision),
        )
    if decision.passed:
        event = registry.promote(
            info.version,
            triggered_by=triggered_by,
            gate=decision.to_dict(),
            replacing=production.version if production else None,
        )
    else:
        event = registry.retire_shadow(
            info.version, triggered_by=triggered_by, gate=decision.to_dict()
        )
    return SegmenterRelease(
        registry.get(info.version), decision, event, registry.card(info.version)
    )


def _verdict(decision: LungGateDecision) -> str:
    if decision.passed:
        return "passed: promoted to production"
    return "refused, never served: " + "; ".join(decision.reasons)


def _trained_on(tags: VersionTags, masks_dir: str | None = None) -> str:
    if tags.data_dir is None:
        return (
            "the synthetic demo set: the generator drew both the radiographs and their lung "
            "fields, so this version's figures say nothing about real radiographs"
        )
    # Folder names only: full paths are a machine's, not the data's.
    masks = f" with the lung-field masks of `{PurePath(masks_dir).name}`" if masks_dir else ""
    return f"the image folder `{PurePath(tags.data_dir).name}`{masks}"


def segmentation_card_summary(facts: CardFacts, *, decision: LungGateDecision) -> str:
    metrics = facts.tags.metrics
    lines = [
        f"Lung-field segmentation trained on {_trained_on(facts.tags)}.",
        f"Test Dice {metrics.get('test_dice_mean', float('nan')):.4f} (5th percentile "
        f"{metrics.get('test_dice_p5', float('nan')):.4f}), HD95 "
        f"{metrics.get('test_hd95_px_mean', float('nan')):.2f} px. Gate: {_verdict(decision)}.",
        f"Model card: {CARD_MARKDOWN} and {CARD_HTML} among this version's files.",
    ]
    return "\n\n".join(lines)


def segmentation_card(
    facts: CardFacts, *, decision: LungGateDecision, evaluation_markdown: str, masks_dir: str
) -> str:
    tags = facts.tags
    preprocessing = tags.preprocessing or {}
    size = preprocessing.get("image_size", "?")
    mode = preprocessing.get("resize_mode", "?")
    run = f"`{facts.run_id}`" if facts.run_id else "unknown"
    if facts.run_id and facts.run_link:
        run = f"[`{facts.run_id}`]({facts.run_link})"
    recipe = {key: value for key, value in facts.run_params.items() if not key.startswith("cxr.")}
    lines = [
        f"# Model card: {facts.registered_model} version {facts.version}",
        "",
        f"Registered {facts.created_at:%Y-%m-%d %H:%M} UTC.",
        "",
        "## What it is",
        "",
        f"A U-Net (MONAI) that draws the lung fields of a frontal chest radiograph, one "
        f"lung/background call per pixel, on the classifier's own prepared square ({size} x "
        f"{size}, {mode}). Its fields include the lung behind the heart, as its reference "
        "masks do.",
        "",
        "## What it is for",
        "",
        "- Saying where a classifier's heatmap lies: the share of the Grad-CAM relevance inside "
        "the lung fields travels with every explanation, so a reader sees when the classifier "
        "looked at a shoulder, a marker or the bowel instead of the lungs.",
        "- Saying whether the lungs are in the field: the fields' share of the image, and "
        "whether the image's border cuts them.",
        "- Drawing the fields for the reading radiologist, as a second segment of the node's "
        "SEG result.",
        "",
        "It is not a diagnostic device and makes no measurement meant for care (lung volume, "
        "area for a report). Lateral views, adult patients and images it was not trained on "
        "may get fields drawn badly; nothing here checks them.",
        "",
        "## Trained on",
        "",
        f"Trained on {_trained_on(tags, masks_dir)}; the classifier's own patient split (no "
        "test patient trained or stopped it).",
        "",
    ]
    if recipe:
        lines += ["| recipe | value |", "| --- | --- |"]
        lines += [f"| {key} | `{value}` |" for key, value in sorted(recipe.items())]
        lines.append("")
    lines += ["## How well it draws lungs", "", evaluation_markdown.strip(), ""]
    comparison = (
        f" Compared with production (version {decision.production_version}, Dice "
        f"{decision.production_dice_mean:.4f}) on the same patients."
        if decision.compared and decision.production_dice_mean is not None
        else " No production version judged on the same patients to compare with."
    )
    lines += [
        "## Gate",
        "",
        f"Floor on mean test Dice {decision.floor:.2f}; ONNX parity "
        f"{'passed' if decision.parity_passed else 'failed'}.{comparison} "
        f"{_verdict(decision)[0].upper()}{_verdict(decision)[1:]}.",
        "",
    ]
    lines += [
        "## Limitations",
        "",
        "- The Hausdorff distance is in pixels of the square: the training images carried no "
        "pixel spacing, so no figure in millimetres is claimed.",
        "- Its reference masks were drawn from an automatic start and reviewed; where they "
        "reach below the visible diaphragm, the version does not follow them (see the worst "
        "cases in the training run's evaluation).",
        "",
        "## Lineage",
        "",
        "| | |",
        "| --- | --- |",
        f"| training run (MLflow) | {run} |",
        f"| data version | `{tags.data_version or 'unknown'}` |",
        f"| git commit | `{tags.git_commit or 'unknown'}` |",
        "",
    ]
    return "\n".join(lines)
