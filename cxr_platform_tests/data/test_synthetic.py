"""The synthetic set: deterministic, imbalanced like Kaggle, lesions in the lungs, learnable
but not trivially so."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict

from cxr_platform.data.synthetic import SyntheticSpec, generate_synthetic_dataset, lesion_mask_path


def _digest(root) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_deterministic_by_seed_and_independent_of_workers(tmp_path):
    spec = SyntheticSpec(n_patients=6, seed=11)
    a = generate_synthetic_dataset(tmp_path / "a", spec, progress=False)
    b = generate_synthetic_dataset(tmp_path / "b", spec, workers=2, progress=False)
    c = generate_synthetic_dataset(
        tmp_path / "c", SyntheticSpec(n_patients=6, seed=12), progress=False
    )
    assert _digest(a) == _digest(b) != _digest(c)


def test_class_balance_patients_and_masks(tiny_synthetic):
    labels = pd.read_csv(tiny_synthetic / "labels.csv")
    counts = labels["label"].value_counts()
    assert 2.0 < counts["PNEUMONIA"] / counts["NORMAL"] < 4.0  # Kaggle: 2.9
    assert labels.groupby("patient_id")["label"].nunique().max() == 1
    assert labels.groupby("patient_id").size().max() > 1  # several images per patient
    for row in labels.itertuples():
        mask = lesion_mask_path(tiny_synthetic, row.file)
        assert (mask is not None) == (row.label == "PNEUMONIA")
        if mask is not None:
            lesion = np.asarray(Image.open(mask)) > 0
            image = np.asarray(Image.open(tiny_synthetic / row.file).convert("L"))
            assert lesion.shape == image.shape and 0 < lesion.mean() < 0.25


def test_lesions_lie_inside_the_lung_fields(tiny_synthetic):
    labels = pd.read_csv(tiny_synthetic / "labels.csv")
    positives = labels[labels["label"] == "PNEUMONIA"]
    for row in positives.itertuples():
        lesion = np.asarray(Image.open(tiny_synthetic / row.mask)) > 0
        ys, xs = np.nonzero(lesion)
        # Lung fields sit in the middle band of the image, away from the borders.
        assert 0.05 < xs.mean() / lesion.shape[1] < 0.95
        assert 0.15 < ys.mean() / lesion.shape[0] < 0.9


def test_learnable_but_not_trivial(tmp_path):
    root = generate_synthetic_dataset(
        tmp_path / "s", SyntheticSpec(n_patients=120, seed=5), workers=2, progress=False
    )
    labels = pd.read_csv(root / "labels.csv")
    y = (labels["label"] == "PNEUMONIA").to_numpy()
    images = np.stack(
        [
            np.asarray(Image.open(root / f).convert("L").resize((32, 32)), dtype=np.float32) / 255
            for f in labels["file"]
        ]
    )
    # Not trivial: overall brightness alone does not separate the classes.
    brightness_auc = roc_auc_score(y, images.mean(axis=(1, 2)))
    assert max(brightness_auc, 1 - brightness_auc) < 0.8
    # Learnable: even a linear model on 32x32 pixels beats chance (patient-grouped CV).
    features = images.reshape(len(images), -1)
    scores = cross_val_predict(
        LogisticRegression(C=0.1, max_iter=2000),
        features,
        y,
        groups=labels["patient_id"],
        cv=GroupKFold(4),
        method="predict_proba",
    )[:, 1]
    assert roc_auc_score(y, scores) > 0.6
