"""Patient-level, label-stratified train/val/test splits with no leakage by construction.

The unit of assignment is a *group*: a patient, merged with every other patient that shares an
identical image (same content hash). Assigning groups, never images, makes it impossible for a
patient or a duplicated image to appear in two splits; the checks below verify it anyway.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_platform.data.labels import POSITIVE_LABEL
from cxr_platform.errors import SplitError

SPLIT_NAMES = ("train", "val", "test")
MANIFEST_COLUMNS = ["path", "label", "patient_id", "split", "relative_path", "content_hash"]


def _group_ids(patients: pd.Series, hashes: pd.Series | None) -> pd.Series:
    """Union-find over patients: two patients with an identical image become one group."""
    parent: dict[str, str] = {patient: patient for patient in patients.unique()}

    def find(node: str) -> str:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    if hashes is not None:
        first_patient_for_hash: dict[str, str] = {}
        for patient, content_hash in zip(patients, hashes, strict=True):
            if not isinstance(content_hash, str) or not content_hash:
                continue
            other = first_patient_for_hash.setdefault(content_hash, patient)
            root_a, root_b = find(patient), find(other)
            if root_a != root_b:
                # Keep the lexicographically smaller root so group ids do not depend on row order.
                low, high = sorted((root_a, root_b))
                parent[high] = low
    return patients.map(find)


def assign_splits(
    records: pd.DataFrame,
    *,
    ratios: Sequence[float] = (0.70, 0.15, 0.15),
    seed: int = 0,
    restarts: int = 32,
) -> pd.Series:
    """Split name for every row of ``records`` (needs ``label`` and ``patient_id`` columns;
    ``content_hash`` is used when present). Deterministic for a given seed and record set."""
    if len(ratios) != len(SPLIT_NAMES):
        raise SplitError(f"need {len(SPLIT_NAMES)} ratios (train, val, test), got {list(ratios)}")
    ratio_array = np.asarray(ratios, dtype=float)
    if (ratio_array <= 0).any() or abs(ratio_array.sum() - 1.0) > 1e-6:
        raise SplitError(f"ratios must be positive and sum to 1, got {list(ratios)}")
    if records.empty:
        raise SplitError("no readable images to split")

    hashes = records.get("content_hash")
    groups = _group_ids(records["patient_id"].astype(str), hashes)
    frame = pd.DataFrame({"group": groups.values, "label": records["label"].values})

    per_group = frame.groupby("group")
    sizes = per_group.size()
    positives = per_group["label"].apply(lambda labels: int((labels == POSITIVE_LABEL).sum()))
    # A group's stratum is its majority label (ties go to the positive class).
    strata = np.where(positives * 2 >= sizes, POSITIVE_LABEL, "NORMAL")
    group_table = pd.DataFrame({"size": sizes, "stratum": strata})

    rng = np.random.default_rng(seed)
    best: dict[str, str] = {}
    best_loss = np.inf
    # Patients are indivisible, so one greedy pass can miss the ratios or class shares on small
    # datasets. A few seeded restarts cost little and the best one is kept (still deterministic).
    for _ in range(restarts):
        assignment = _greedy_fill(group_table, ratio_array, rng)
        loss = _assignment_loss(group_table, positives, assignment, ratio_array)
        if not best or loss < best_loss - 1e-12:
            best, best_loss = assignment, loss
    assignment = best
    return pd.Series(groups.map(assignment).values, index=records.index, name="split")


def _greedy_fill(
    group_table: pd.DataFrame, ratios: np.ndarray, rng: np.random.Generator
) -> dict[str, str]:
    """Per label stratum: shuffle, take largest groups first, give each to the split that is
    furthest (relatively) below its target. Large patients land first, small ones even out."""
    assignment: dict[str, str] = {}
    for stratum in sorted(group_table["stratum"].unique()):
        members = group_table[group_table["stratum"] == stratum]
        order = np.sort(members.index.to_numpy())  # canonical order before shuffling
        order = order[rng.permutation(len(order))]
        order = order[np.argsort(-members.loc[order, "size"].to_numpy(), kind="stable")]
        targets = ratios * members["size"].sum()
        filled = np.zeros(len(SPLIT_NAMES))
        for group, size in zip(order, members.loc[order, "size"].to_numpy(), strict=True):
            choice = int(np.argmax((targets - filled) / targets))
            assignment[group] = SPLIT_NAMES[choice]
            filled[choice] += size
    return assignment


def _assignment_loss(
    group_table: pd.DataFrame, positives: pd.Series, assignment: dict[str, str], ratios: np.ndarray
) -> float:
    """Worst per-split gap to the overall pneumonia share, plus the deviation from the ratios."""
    split_of = group_table.index.map(assignment)
    sizes = group_table["size"].groupby(split_of).sum().reindex(SPLIT_NAMES, fill_value=0)
    pos = positives.groupby(split_of).sum().reindex(SPLIT_NAMES, fill_value=0)
    total, total_pos = sizes.sum(), pos.sum()
    if (sizes == 0).any():
        return np.inf
    share_gap = np.abs(pos / sizes - total_pos / total).max()
    ratio_gap = np.abs(sizes / total - ratios).sum()
    return float(share_gap + 0.5 * ratio_gap)


def make_manifest(
    records: pd.DataFrame, *, ratios: Sequence[float] = (0.70, 0.15, 0.15), seed: int = 0
) -> pd.DataFrame:
    """``path,label,patient_id,split`` (plus relative path and content hash) for readable images."""
    if "readable" in records:
        records = records[records["readable"].astype(bool)]
    records = records.reset_index(drop=True)
    manifest = records.assign(split=assign_splits(records, ratios=ratios, seed=seed))
    for column in MANIFEST_COLUMNS:
        if column not in manifest:
            manifest[column] = None
    order = {name: i for i, name in enumerate(SPLIT_NAMES)}
    manifest = manifest.sort_values(
        ["split", "relative_path"],
        key=lambda col: col.map(order) if col.name == "split" else col,
        kind="stable",
    )
    return manifest[MANIFEST_COLUMNS].reset_index(drop=True)


def manifest_hash(manifest: pd.DataFrame) -> str:
    """A machine-independent fingerprint of a split (relative paths, not absolute ones)."""
    digest = hashlib.sha256()
    columns = ["relative_path", "label", "patient_id", "split", "content_hash"]
    for row in manifest.sort_values("relative_path")[columns].itertuples(index=False):
        digest.update("\x1f".join("" if v is None else str(v) for v in row).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def write_manifest(manifest: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    manifest.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"patient_id": str, "content_hash": str})


def split_summary(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images, patients and positive share per split (rows: train/val/test/all)."""
    rows = []
    for name, part in [
        *((s, manifest[manifest["split"] == s]) for s in SPLIT_NAMES),
        ("all", manifest),
    ]:
        n = len(part)
        positives = int((part["label"] == POSITIVE_LABEL).sum())
        rows.append(
            {
                "split": name,
                "images": n,
                "patients": int(part["patient_id"].nunique()),
                "NORMAL": n - positives,
                "PNEUMONIA": positives,
                "pneumonia_share": positives / n if n else float("nan"),
                "image_share": n / len(manifest) if len(manifest) else float("nan"),
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Checks: plain functions returning an outcome, so tests and Dagster asset checks share them.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def check_no_patient_leakage(manifest: pd.DataFrame) -> CheckOutcome:
    splits_per_patient = manifest.groupby("patient_id")["split"].nunique()
    leaked = sorted(splits_per_patient[splits_per_patient > 1].index.astype(str))
    return CheckOutcome(
        passed=not leaked,
        description=(
            f"{len(leaked)} patients appear in more than one split"
            if leaked
            else "every patient is in exactly one split"
        ),
        metadata={"leaked_patients": len(leaked), "examples": ", ".join(leaked[:10])},
    )


def check_no_content_leakage(manifest: pd.DataFrame) -> CheckOutcome:
    hashed = manifest.dropna(subset=["content_hash"])
    splits_per_hash = hashed.groupby("content_hash")["split"].nunique()
    leaked = splits_per_hash[splits_per_hash > 1].index
    examples = hashed[hashed["content_hash"].isin(leaked)]["relative_path"].astype(str).head(10)
    return CheckOutcome(
        passed=len(leaked) == 0,
        description=(
            f"{len(leaked)} identical images appear in more than one split"
            if len(leaked)
            else "no identical image content in two splits"
        ),
        metadata={"leaked_images": int(len(leaked)), "examples": ", ".join(examples)},
    )


def check_both_classes_per_split(manifest: pd.DataFrame) -> CheckOutcome:
    missing = []
    labels = sorted(manifest["label"].unique())
    for name in SPLIT_NAMES:
        present = set(manifest.loc[manifest["split"] == name, "label"])
        missing += [
            f"{name}: no {label}" for label in ("NORMAL", POSITIVE_LABEL) if label not in present
        ]
    return CheckOutcome(
        passed=not missing,
        description="; ".join(missing) if missing else "both classes in every split",
        metadata={"labels_overall": ", ".join(labels), "missing": "; ".join(missing)},
    )


def check_class_balance(manifest: pd.DataFrame, *, max_points: float = 5.0) -> CheckOutcome:
    overall = float((manifest["label"] == POSITIVE_LABEL).mean())
    gaps = {}
    for name in SPLIT_NAMES:
        part = manifest[manifest["split"] == name]
        share = float((part["label"] == POSITIVE_LABEL).mean()) if len(part) else float("nan")
        gaps[name] = abs(share - overall) * 100 if len(part) else float("inf")
    worst = max(gaps, key=gaps.get)
    passed = all(gap <= max_points for gap in gaps.values())
    return CheckOutcome(
        passed=passed,
        description=(
            f"pneumonia share per split within {max_points:g} points of the overall "
            f"{overall:.1%} (worst: {worst}, {gaps[worst]:.2f} points)"
        ),
        metadata={
            "overall_pneumonia_share": overall,
            **{f"{name}_gap_points": round(gap, 3) for name, gap in gaps.items()},
        },
    )


def run_split_checks(manifest: pd.DataFrame, *, max_points: float = 5.0) -> dict[str, CheckOutcome]:
    return {
        "no_patient_leakage": check_no_patient_leakage(manifest),
        "no_content_leakage": check_no_content_leakage(manifest),
        "both_classes_in_every_split": check_both_classes_per_split(manifest),
        "class_share_balanced": check_class_balance(manifest, max_points=max_points),
    }
