"""The model factory: shapes, gradients, honest pretrained loading, RGB folding."""

from __future__ import annotations

import pytest
import torch
from torchvision import models as tv_models

from cxr_platform.models.zoo import (
    ARCHITECTURES,
    PretrainedWeightsUnavailableError,
    UnknownArchitectureError,
    backbone_parameters,
    build_model,
    fold_rgb_to_gray,
    gradcam_layer,
    head_parameters,
)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_takes_one_channel_and_returns_one_logit(arch):
    model = build_model(arch, pretrained="none").model
    images = torch.randn(2, 1, 64, 64, requires_grad=True)
    logits = model(images)
    assert logits.shape == (2, 1)
    logits.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    head = dict(head_parameters(model, arch))
    backbone = dict(backbone_parameters(model, arch))
    assert head and backbone and not set(head) & set(backbone)
    assert sum(p.numel() for p in head.values()) < sum(p.numel() for p in backbone.values())
    assert isinstance(gradcam_layer(model, arch), torch.nn.Module)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(UnknownArchitectureError, match="available: baseline_cnn"):
        build_model("vgg11")


@pytest.mark.parametrize(
    ("arch", "factory", "stem"),
    [
        ("resnet18", tv_models.resnet18, "conv1.weight"),
        ("densenet121", tv_models.densenet121, "features.conv0.weight"),
    ],
)
def test_local_imagenet_file_loads_with_the_stem_folded_to_gray(tmp_path, arch, factory, stem):
    torch.manual_seed(0)
    imagenet = factory(weights=None)  # the 3-channel, 1000-class layout torchvision ships
    path = tmp_path / f"{arch}.pth"
    torch.save(imagenet.state_dict(), path)
    built = build_model(arch, pretrained="required", weights_path=path)
    assert built.pretrained and built.weights_source == str(path)
    state = built.model.state_dict()
    torch.testing.assert_close(state[stem], fold_rgb_to_gray(imagenet.state_dict()[stem]))
    # A gray image through the folded stem equals the same image repeated over R, G, B.
    gray = torch.rand(1, 1, 32, 32)
    conv = torch.nn.functional.conv2d
    torch.testing.assert_close(
        conv(gray, state[stem]), conv(gray.repeat(1, 3, 1, 1), imagenet.state_dict()[stem])
    )


def test_required_weights_that_cannot_load_fail_clearly(tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a state dict")
    with pytest.raises(PretrainedWeightsUnavailableError, match="required"):
        build_model("resnet18", pretrained="required", weights_path=broken)
    with pytest.raises(PretrainedWeightsUnavailableError, match="no ImageNet weights"):
        build_model("baseline_cnn", pretrained="required")


def test_auto_without_weights_trains_from_scratch_and_says_so(tmp_path, caplog):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x00" * 16)
    with caplog.at_level("WARNING"):
        built = build_model("resnet18", pretrained="auto", weights_path=broken)
    assert built.pretrained is False and built.weights_source is None
    assert sum("training from scratch (pretrained=false)" in r.message for r in caplog.records) == 1


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(tv_models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(PretrainedWeightsUnavailableError, match="do not fit resnet18"):
        build_model("resnet18", pretrained="auto", weights_path=path)
