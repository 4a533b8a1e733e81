"""The recipe's options: weight averaging, flip test-time augmentation and torch.compile.

Each one must change what it claims to (the kept weights, the scores, the speed path) and
nothing else: checkpoints stay loadable by the bare architecture, resumes stay exact, and the
exported graph scores what evaluation scored.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from sklearn.metrics import roc_auc_score
from torch import nn

from cxr_platform.deployment.export import export_checkpoint
from cxr_platform.deployment.pipeline import parity_inputs
from cxr_platform.deployment.quantize import quantize_int8
from cxr_platform.model_version.predictor import Predictor
from cxr_platform.models.recipe import describe_schedule
from cxr_platform.models.training import (
    TrainingError,
    WeightAverage,
    ema_decay_per_step,
    load_checkpoint,
    model_from_checkpoint,
    predict_logits,
    scoring_model,
    train,
    training_profile,
)
from cxr_platform.models.zoo import FlipAveraged, build_model
from cxr_platform_tests.conftest import _trained_and_evaluated


def _config(**overrides):
    # A constant rate: these tests stand in for an interruption by running a shorter schedule,
    # which equals stopping only when the rate does not depend on the schedule's length. The
    # cosine schedule is resumed after a real interruption below.
    values = dict(
        finetune_epochs=3, patience=9, batch_size=16, finetune_lr=3e-3, lr_schedule="constant"
    )
    values.update(overrides)
    return training_profile("demo", "baseline_cnn", **values)


def test_weight_average_follows_the_warmed_up_closed_form_and_copies_batch_counters():
    live = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    average = WeightAverage(live, 0.9)
    expected = live[0].weight.detach().clone()
    for step in range(40):
        with torch.no_grad():
            live[0].weight.add_(1.0)
        live[1].num_batches_tracked += 1
        average.update(live)
        keep = min(0.9, (1 + step) / (10 + step))
        expected = keep * expected + (1 - keep) * live[0].weight.detach()
        assert torch.allclose(average.module[0].weight, expected, atol=1e-5), step
    assert average.updates == 40
    assert average.module[1].num_batches_tracked == live[1].num_batches_tracked
    # The average lags the live weights, as an average of a rising sequence must, and is a
    # separate copy that training never updates through autograd.
    assert (average.module[0].weight < live[0].weight).all()
    assert not any(p.requires_grad for p in average.module.parameters())


@pytest.mark.parametrize("steps_per_epoch", [7, 115, 2000])
def test_ema_half_life_is_in_epochs_whatever_the_batch_size(steps_per_epoch):
    decay = ema_decay_per_step(1.5, steps_per_epoch)
    assert decay ** (1.5 * steps_per_epoch) == pytest.approx(0.5)


def test_ema_half_life_must_be_positive():
    with pytest.raises(TrainingError, match="ema_half_life_epochs"):
        _config(ema_half_life_epochs=0.0)


def test_averaged_run_validates_keeps_and_resumes_the_average(training_data, tmp_path):
    config = _config(ema_half_life_epochs=0.5)
    result = train(config, training_data, tmp_path / "a", progress=False)
    last = load_checkpoint(result.last_checkpoint)
    assert last["ema_updates"] == 3 * training_data.train.num_batches(16)
    assert any(not torch.equal(last["model"][k], last["training_model"][k]) for k in last["model"])

    # What was validated (and kept as best.pt) is the average, loadable by the bare network.
    best = load_checkpoint(result.best_checkpoint)
    auc = roc_auc_score(
        training_data.val.labels_np, predict_logits(model_from_checkpoint(best), training_data.val)
    )
    assert auc == best["metrics"]["val_auc"]
    live = build_model("baseline_cnn").model
    live.load_state_dict(best["training_model"])
    live_auc = roc_auc_score(training_data.val.labels_np, predict_logits(live, training_data.val))
    assert live_auc != auc

    # Stopping after two epochs and resuming restores both the live weights and the average.
    train(
        _config(ema_half_life_epochs=0.5, finetune_epochs=2),
        training_data,
        tmp_path / "b",
        progress=False,
    )
    resumed = train(config, training_data, tmp_path / "b", resume=True, progress=False)
    again = load_checkpoint(resumed.last_checkpoint)
    assert again["ema_updates"] == last["ema_updates"]
    for key in ("model", "training_model"):
        assert all(torch.equal(again[key][k], last[key][k]) for k in last[key]), key


def test_flip_averaging_is_the_mean_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    bare = build_model("baseline_cnn").model.eval()
    images = torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        expected = (bare(images) + bare(images.flip(3))) / 2
        assert torch.allclose(FlipAveraged(bare)(images), expected, atol=1e-6)
        # Mirror-invariant by construction, and not the bare score (the test would be vacuous).
        assert torch.allclose(FlipAveraged(bare)(images.flip(3)), expected, atol=1e-5)
        assert not torch.allclose(bare(images), expected, atol=1e-4)


def test_flip_averaging_travels_from_training_into_the_exported_model(learnable_cache, tmp_path):
    evaluated = _trained_and_evaluated(
        learnable_cache, tmp_path / "train", finetune_epochs=2, tta_flip=True
    )
    checkpoint = load_checkpoint(evaluated.path)
    assert isinstance(scoring_model(checkpoint), FlipAveraged)
    exported = export_checkpoint(
        evaluated.path,
        evaluated.operating_point,
        tmp_path / "export",
        parity_inputs(learnable_cache, 8),
        model_name="baseline_cnn",
        mlflow_run_id=None,
        manifest_hash=None,
        git_commit=None,
    )
    assert exported.parity.passed, exported.parity.to_dict()
    assert exported.metadata.test_time_augmentation == "flip"

    served = Predictor(exported.onnx_path).logits(learnable_cache.images("test", mmap=False)[:8])
    images = parity_inputs(learnable_cache, 8)
    with torch.no_grad():
        bare = model_from_checkpoint(checkpoint)
        averaged = FlipAveraged(bare)(images).numpy().ravel()
        single = bare(images).numpy().ravel()
    assert np.allclose(served, averaged, atol=1e-4)
    assert not np.allclose(served, single, atol=1e-3)

    # The mirror op survives INT8 quantization, so the quantized variant averages too.
    int8 = quantize_int8(
        exported.onnx_path, learnable_cache.images("val", mmap=False), tmp_path / "int8.onnx"
    )
    test_images = learnable_cache.images("test", mmap=False)
    fp32_logits = Predictor(exported.onnx_path).logits(test_images)
    int8_logits = Predictor(int8).logits(test_images)
    assert np.corrcoef(fp32_logits, int8_logits)[0, 1] > 0.95


def test_compiled_training_saves_plain_weights_that_reproduce_its_scores(training_data, tmp_path):
    config = _config(finetune_epochs=1, compile=True)
    # Inductor draws dropout masks from its own generator unless told to use eager's.
    with torch._inductor.config.patch(fallback_random=True):
        result = train(config, training_data, tmp_path, progress=False)
    best = load_checkpoint(result.best_checkpoint)
    assert not any(key.startswith("_orig_mod.") for key in best["model"])
    eager = model_from_checkpoint(best)  # strict load into the bare network
    auc = roc_auc_score(training_data.val.labels_np, predict_logits(eager, training_data.val))
    assert auc == pytest.approx(best["metrics"]["val_auc"], abs=1e-3)

    # Same seed without compiling: the same training, up to kernel rounding.
    plain = train(_config(finetune_epochs=1), training_data, tmp_path / "eager", progress=False)
    assert result.history[0].train_loss == pytest.approx(plain.history[0].train_loss, rel=1e-2)


def test_without_pretrained_weights_the_scratch_schedule_skips_the_frozen_phase(
    training_data, tmp_path, caplog
):
    config = training_profile(
        "demo",
        "resnet18",
        pretrained="auto",
        weights_path=str(tmp_path / "missing.pth"),  # offline: nothing to load
        frozen_epochs=1,
        finetune_epochs=1,
        scratch_schedule=True,
        lr_schedule="constant",  # each epoch's rate is then the phase's rate
    )
    result = train(config, training_data, tmp_path / "scratch", progress=False)
    assert not result.pretrained
    assert result.schedule == "2 full at 0.001"
    assert [r.phase for r in result.history] == ["finetune", "finetune"]
    assert [r.lr for r in result.history] == [1e-3, 1e-3]
    assert load_checkpoint(result.last_checkpoint)["config"]["frozen_epochs"] == 0
    assert "no frozen phase" in caplog.text


def test_with_pretrained_weights_the_scratch_schedule_keeps_both_phases(training_data, tmp_path):
    weights = tmp_path / "imagenet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    config = training_profile(
        "demo",
        "resnet18",
        pretrained="required",
        weights_path=str(weights),
        frozen_epochs=1,
        finetune_epochs=1,
        scratch_schedule=True,
        lr_schedule="constant",  # each epoch's rate is then the phase's rate
    )
    result = train(config, training_data, tmp_path / "pretrained", progress=False)
    assert result.pretrained
    assert [r.phase for r in result.history] == ["frozen", "finetune"]
    assert result.schedule == f"1 frozen at 0.001 + 1 full at {config.finetune_lr:g}"


def test_a_scratch_schedule_run_resumes_exactly(training_data, tmp_path):
    # The baseline never has pretrained weights, so asking it for two frozen epochs exercises
    # the rescheduling; resuming at epoch 2, which the unadjusted schedule calls "frozen", must
    # still restore the optimizer state of the full-training phase.
    def config(frozen: int, finetune: int):
        return _config(frozen_epochs=frozen, finetune_epochs=finetune, scratch_schedule=True)

    uninterrupted = train(config(2, 1), training_data, tmp_path / "a", progress=False)
    assert uninterrupted.schedule == "3 full at 0.001"
    train(config(1, 0), training_data, tmp_path / "b", progress=False)
    resumed = train(config(2, 1), training_data, tmp_path / "b", resume=True, progress=False)
    assert [r.val_auc for r in resumed.history] == [r.val_auc for r in uninterrupted.history]
    a = load_checkpoint(uninterrupted.last_checkpoint)
    b = load_checkpoint(resumed.last_checkpoint)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


class _Interrupted(Exception):
    pass


def test_cosine_rate_warms_up_decays_to_a_hundredth_and_resumes_exactly(training_data, tmp_path):
    config = _config(lr_schedule="cosine", finetune_epochs=3)
    steps = training_data.train.num_batches(config.batch_size)
    rates = [config.learning_rate("finetune", e, s, steps) for e in (1, 2, 3) for s in range(steps)]
    peak = rates.index(max(rates))
    assert max(rates) == config.finetune_lr and 0 < peak <= len(rates) // 10 + 1
    assert all(a <= b for a, b in zip(rates[:peak], rates[1 : peak + 1], strict=True))
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1 :], strict=False))
    assert rates[-1] == pytest.approx(config.finetune_lr / 100, rel=0.05)
    assert "(cosine)" in describe_schedule(config)

    uninterrupted = train(config, training_data, tmp_path / "a", progress=False)
    assert uninterrupted.history[-1].lr == pytest.approx(rates[-1])

    # Stopped as a person stops a run, after its second epoch was saved and reported.
    def stop_after_two(line: str) -> None:
        if "epoch 2/3" in line:
            raise _Interrupted(line)

    with pytest.raises(_Interrupted):
        train(config, training_data, tmp_path / "b", progress=False, on_epoch=stop_after_two)
    resumed = train(config, training_data, tmp_path / "b", resume=True, progress=False)
    assert [r.val_auc for r in resumed.history] == [r.val_auc for r in uninterrupted.history]
    a = load_checkpoint(uninterrupted.last_checkpoint)
    b = load_checkpoint(resumed.last_checkpoint)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_every_epoch_is_reported_with_its_losses_speed_and_time_left(training_data, tmp_path):
    lines: list[str] = []
    result = train(_config(), training_data, tmp_path, progress=False, on_epoch=lines.append)
    assert len(lines) == len(result.history) == 3
    for number, (line, record) in enumerate(zip(lines, result.history, strict=True), start=1):
        assert line.startswith(f"baseline_cnn epoch {number}/3 (finetune): ")
        assert f"train loss {record.train_loss:.4f}" in line
        assert f"val loss {record.val_loss:.4f}, val AUC {record.val_auc:.4f}" in line
        assert f"{record.train_images_per_s:.1f} img/s" in line
    assert "at most" in lines[0] and lines[0].endswith(" left")
    assert lines[-1].endswith("; last epoch")
