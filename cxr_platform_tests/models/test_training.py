"""Two-phase training: it learns, stops early, keeps a true copy of the best epoch, resumes
exactly, and freezing freezes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxr_platform.data.transforms import NO_AUGMENTATION, AugmentationConfig
from cxr_platform.models.training import (
    ResumeMismatchError,
    TrainingData,
    load_checkpoint,
    model_from_checkpoint,
    predict_logits,
    seed_everything,
    train,
    training_profile,
)
from cxr_platform.models.zoo import architecture, build_model


def test_baseline_learns_well_above_chance(training_data, tmp_path):
    config = training_profile(
        "demo", "baseline_cnn", finetune_epochs=30, patience=30, batch_size=16, finetune_lr=3e-3
    )
    result = train(config, training_data, tmp_path, progress=False)
    assert result.best_val_auc >= 0.75, [round(r.val_auc, 3) for r in result.history]
    # The first epochs are near chance: the gain comes from training, not from the setup.
    assert result.history[0].val_auc < result.best_val_auc - 0.15


def test_early_stopping_stops_after_patience(training_data, tmp_path):
    # No epoch can beat the first by a full AUC point, so the run must stop after `patience`.
    config = training_profile("demo", "baseline_cnn", finetune_epochs=10, patience=2, min_delta=1.0)
    result = train(config, training_data, tmp_path, progress=False)
    assert result.stopped_early
    assert [r.epoch for r in result.history] == [1, 2, 3]
    assert result.best_epoch == 1


def test_best_checkpoint_is_a_copy_that_reproduces_its_validation_auc(training_data, tmp_path):
    # A constant rate: a decaying one tends to peak on the last epoch, and this needs a run
    # whose best epoch is not its last.
    config = training_profile(
        "demo",
        "baseline_cnn",
        finetune_epochs=8,
        patience=8,
        batch_size=16,
        finetune_lr=3e-3,
        lr_schedule="constant",
    )
    result = train(config, training_data, tmp_path, progress=False)
    best = load_checkpoint(result.best_checkpoint)
    last = load_checkpoint(result.last_checkpoint)
    assert set(best) >= {"model", "optimizer", "epoch", "config", "preprocessing", "metrics"}
    assert best["epoch"] == result.best_epoch
    # This seeded run peaks before its last epoch, so a reference to the live model would show.
    assert result.best_epoch < last["epoch"]
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in best["model"])

    model = model_from_checkpoint(best)
    auc = roc_auc_score(training_data.val.labels_np, predict_logits(model, training_data.val))
    assert auc == result.history[result.best_epoch - 1].val_auc == best["metrics"]["val_auc"]


def test_resume_continues_from_the_saved_epoch_exactly(training_data, tmp_path):
    # Both phases on random weights (no scratch schedule), and a constant rate: the first part
    # stands in for an interruption by being a shorter schedule, which equals stopping only
    # when the rate does not depend on the schedule's length (the cosine schedule is resumed
    # after a real interruption in test_recipe_options.py).
    full = training_profile(
        "demo",
        "resnet18",
        pretrained="none",
        frozen_epochs=1,
        finetune_epochs=2,
        patience=5,
        scratch_schedule=False,
        lr_schedule="constant",
    )
    full = replace(full, augmentation=replace(full.augmentation, rotation_degrees=5.0))
    uninterrupted = train(full, training_data, tmp_path / "a", progress=False)

    first_part = replace(full, finetune_epochs=1)
    train(first_part, training_data, tmp_path / "b", progress=False)
    resumed = train(full, training_data, tmp_path / "b", resume=True, progress=False)

    assert [r.epoch for r in resumed.history] == [1, 2, 3]
    assert resumed.history[2].val_auc == uninterrupted.history[2].val_auc
    a = load_checkpoint(uninterrupted.last_checkpoint)["model"]
    b = load_checkpoint(resumed.last_checkpoint)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_checkpoint_of_another_architecture(training_data, tmp_path):
    train(
        training_profile("demo", "baseline_cnn", finetune_epochs=1),
        training_data,
        tmp_path,
        progress=False,
    )
    other = training_profile(
        "demo", "resnet18", pretrained="none", frozen_epochs=0, finetune_epochs=2
    )
    with pytest.raises(ResumeMismatchError):
        train(other, training_data, tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("arch", ["baseline_cnn", "resnet18"])
def test_phase_one_changes_the_head_only(training_data, tmp_path, arch):
    config = training_profile(
        "demo",
        arch,
        pretrained="none",
        frozen_epochs=1,
        finetune_epochs=0,
        augmentation=NO_AUGMENTATION,
        scratch_schedule=False,  # keep the frozen phase although the weights are random
    )
    seed_everything(config.seed)
    initial = build_model(arch, pretrained="none").model.state_dict()
    result = train(config, training_data, tmp_path, progress=False)
    trained = load_checkpoint(result.best_checkpoint)["model"]
    head = architecture(arch).head_prefix
    changed = {k for k in initial if not torch.equal(initial[k], trained[k])}
    assert changed and all(k.startswith(head) for k in changed), sorted(changed)[:5]


def test_training_never_touches_the_test_split(learnable_cache, tmp_path):
    # Training data is built from train and val only; with the test array gone it still runs.
    test_file = learnable_cache.splits["test"].images_path
    backup = test_file.read_bytes()
    test_file.unlink()
    try:
        data = TrainingData.from_cache(learnable_cache, "cpu")
        train(
            training_profile("demo", "baseline_cnn", finetune_epochs=1),
            data,
            tmp_path,
            progress=False,
        )
    finally:
        test_file.write_bytes(backup)


def test_pos_weight_auto_balances_the_classes(training_data):
    from cxr_platform.models.training import resolve_pos_weight

    labels = training_data.train.labels_np
    weight = resolve_pos_weight(training_profile("demo", "baseline_cnn"), labels)
    assert weight == pytest.approx((labels == 0).sum() / (labels == 1).sum())
    assert resolve_pos_weight(training_profile("demo", "baseline_cnn", pos_weight=2.0), labels) == 2
    assert np.isclose(weight * labels.sum(), (labels == 0).sum())


@pytest.mark.parametrize(
    ("epochs", "frozen", "finetune"), [(1, 0, 1), (3, 1, 2), (10, 2, 8), (30, 5, 25)]
)
def test_epoch_override_keeps_both_phases(epochs, frozen, finetune):
    from cxr_platform.models.training import with_epochs

    config = with_epochs(training_profile("full", "resnet18"), epochs)
    assert (config.frozen_epochs, config.finetune_epochs) == (frozen, finetune)
    assert with_epochs(training_profile("full", "baseline_cnn"), 3).frozen_epochs == 0


def test_full_profile_holds_the_searched_recipe_and_demo_stays_short():
    full = training_profile("full", "resnet18")
    assert full.ema_half_life_epochs == 1.0 and full.scratch_schedule
    assert full.augmentation.blur_sigma > 0 and full.augmentation.noise_std > 0
    assert not full.tta_flip  # no measured gain for twice the inference cost
    assert full.lr_schedule == "constant" and full.batch_size == 32
    demo = training_profile("demo", "resnet18")
    assert demo.ema_half_life_epochs is None and demo.scratch_schedule
    assert demo.augmentation == AugmentationConfig()
    assert (demo.lr_schedule, demo.batch_size, demo.total_epochs) == ("cosine", 16, 3)
    baseline = training_profile("demo", "baseline_cnn")
    assert (baseline.finetune_epochs, baseline.finetune_lr) == (10, 2e-3)
