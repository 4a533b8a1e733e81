"""The model factory: every architecture the platform trains, with one input channel and one logit.

Each entry knows how to build its network, which parameters form the classification head (what
phase 1 of fine-tuning trains), where its torchvision ImageNet weights come from, and which layer
Grad-CAM should read. Pretrained loading never pretends: the returned :class:`BuiltModel` says
whether weights were actually loaded and from where.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv_models

from cxr_platform.errors import CxrError
from cxr_platform.sections import PRETRAINED_MODES, PretrainedMode

log = logging.getLogger(__name__)


class UnknownArchitectureError(CxrError):
    pass


class PretrainedWeightsUnavailableError(CxrError):
    """`pretrained=required`, but no weights came from the torch cache, a download or a file."""


class BaselineCNN(nn.Module):
    """A strided stem and three conv-BN-ReLU-pool stages (~0.1 GFLOP at 224x224, ResNet18 is 1.8).

    Downsampling early keeps it fast enough to train on a laptop CPU, which is its job: a
    sanity check that the data pipeline carries signal, and a floor the transfer models must beat.
    """

    def __init__(self, widths: tuple[int, ...] = (48, 96, 192), dropout: float = 0.2) -> None:
        super().__init__()
        stem_width = widths[0] // 2
        layers: list[nn.Module] = [
            nn.Conv2d(1, stem_width, kernel_size=5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
        in_channels = stem_width
        for width in widths:
            layers += [
                nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_channels, 1)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(images)))


@dataclass(frozen=True)
class ArchitectureSpec:
    name: str
    build: Callable[[], nn.Module]  # randomly initialized, 1 input channel, 1 output logit
    head_prefix: str  # state-dict prefix of the classification head
    stem_conv: str | None  # the RGB convolution to fold when loading ImageNet weights
    gradcam_layer: str  # module path whose activations Grad-CAM weights
    # The end of each stage, coarse to fine: the population check reads the mean and spread of
    # each channel there (see WithFeatures).
    population_layers: tuple[str, ...] = ()
    imagenet_weights: Callable[[], tv_models.WeightsEnum] | None = None


def _resnet(factory: Callable[..., tv_models.ResNet]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = factory(weights=None, num_classes=1)
        model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return model

    return build


def _densenet121() -> nn.Module:
    model = tv_models.densenet121(weights=None, num_classes=1)
    model.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    spec.name: spec
    for spec in (
        ArchitectureSpec(
            "baseline_cnn",
            BaselineCNN,
            head_prefix="classifier.",
            stem_conv=None,
            gradcam_layer="features.14",  # ReLU after the last convolution
            population_layers=("features.3", "features.7", "features.11", "features.15"),
        ),
        ArchitectureSpec(
            "resnet18",
            _resnet(tv_models.resnet18),
            head_prefix="fc.",
            stem_conv="conv1",
            gradcam_layer="layer4",
            population_layers=("layer1", "layer2", "layer3", "layer4"),
            imagenet_weights=lambda: tv_models.ResNet18_Weights.IMAGENET1K_V1,
        ),
        ArchitectureSpec(
            "resnet50",
            _resnet(tv_models.resnet50),
            head_prefix="fc.",
            stem_conv="conv1",
            gradcam_layer="layer4",
            population_layers=("layer1", "layer2", "layer3", "layer4"),
            imagenet_weights=lambda: tv_models.ResNet50_Weights.IMAGENET1K_V2,
        ),
        ArchitectureSpec(
            "densenet121",
            _densenet121,
            head_prefix="classifier.",
            stem_conv="features.conv0",
            gradcam_layer="features.norm5",
            population_layers=tuple(f"features.denseblock{block}" for block in range(1, 5)),
            imagenet_weights=lambda: tv_models.DenseNet121_Weights.IMAGENET1K_V1,
        ),
    )
}


ENSEMBLE_PREFIX = "ensemble:"


class Ensemble(nn.Module):
    """Several trained networks as one: each member's logit through its own Platt calibration
    (``scale * logit + offset``, the member's ``1 / temperature`` and bias), then the mean.

    Averaging calibrated logits, not raw ones, keeps a member whose logits run on a wider scale
    from outvoting the others. The calibrations are buffers, so they travel in the state dict and
    the exported graph; built empty they are the identity, which is what a randomly initialised
    ensemble (the Grad-CAM randomisation check) should have. Grad-CAM and the population check
    read the first member: the one an ensemble is explained by.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise UnknownArchitectureError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.register_buffer("scale", torch.ones(len(members)))
        self.register_buffer("offset", torch.zeros(len(members)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.cat([member(images) for member in self.members], dim=1)
        return (logits * self.scale + self.offset).mean(dim=1, keepdim=True)


def ensemble_arch(member_archs: list[str] | tuple[str, ...]) -> str:
    """The architecture name of an ensemble of these members, the explained one first."""
    for name in member_archs:
        architecture(name)  # a member is a trained architecture, not another ensemble
        if name.startswith(ENSEMBLE_PREFIX):
            raise UnknownArchitectureError("an ensemble's member cannot be an ensemble")
    if not member_archs:
        raise UnknownArchitectureError("an ensemble needs at least one member")
    return ENSEMBLE_PREFIX + "+".join(member_archs)


def ensemble_members(arch: str) -> tuple[str, ...]:
    """The member architectures an ensemble's name lists; () for a single network."""
    if not arch.startswith(ENSEMBLE_PREFIX):
        return ()
    return tuple(arch.removeprefix(ENSEMBLE_PREFIX).split("+"))


def _ensemble_spec(name: str) -> ArchitectureSpec:
    member_archs = ensemble_members(name)
    specs = [ARCHITECTURES.get(member) for member in member_archs]
    if not member_archs or any(spec is None for spec in specs):
        raise UnknownArchitectureError(
            f"unknown ensemble {name!r}: members must be among {', '.join(ARCHITECTURES)}"
        )
    explained = specs[0]
    assert explained is not None
    return ArchitectureSpec(
        name,
        lambda: Ensemble([spec.build() for spec in specs if spec is not None]),
        # Nothing is trained after combining: the whole ensemble would be "head".
        head_prefix="members.",
        stem_conv=None,
        gradcam_layer=f"members.0.{explained.gradcam_layer}",
        population_layers=tuple(f"members.0.{layer}" for layer in explained.population_layers),
    )


def architecture(name: str) -> ArchitectureSpec:
    if name.startswith(ENSEMBLE_PREFIX):
        return _ensemble_spec(name)
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; available: {', '.join(ARCHITECTURES)}"
        ) from None


@dataclass
class BuiltModel:
    model: nn.Module
    arch: str
    pretrained: bool  # True only when ImageNet weights were really loaded
    weights_source: str | None  # torchvision enum name or local file, when pretrained


def fold_rgb_to_gray(weight: torch.Tensor) -> torch.Tensor:
    """(out, 3, k, k) -> (out, 1, k, k): a gray image equals R=G=B, so the sum is exact."""
    return weight.sum(dim=1, keepdim=True)


def _load_imagenet_state(
    spec: ArchitectureSpec, weights_path: Path | None
) -> tuple[dict[str, torch.Tensor], str]:
    if weights_path is not None:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise ValueError(f"{weights_path} holds no state dict")
        return state, str(weights_path)
    assert spec.imagenet_weights is not None
    weights = spec.imagenet_weights()
    # Reads the normal torch hub cache first and downloads only when the file is missing.
    return weights.get_state_dict(progress=False, check_hash=True), f"torchvision:{weights}"


def _adapt_imagenet_state(
    spec: ArchitectureSpec, state: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    adapted = {k: v for k, v in state.items() if not k.startswith(spec.head_prefix)}
    stem_key = f"{spec.stem_conv}.weight"
    if stem_key in adapted and adapted[stem_key].shape[1] == 3:
        adapted[stem_key] = fold_rgb_to_gray(adapted[stem_key])
    # Old DenseNet checkpoints name layers "norm.1"; torchvision's loader renames them the same way.
    expected = model.state_dict()
    renamed = {}
    for key, value in adapted.items():
        if key not in expected and spec.name.startswith("densenet"):
            key = key.replace("norm.1", "norm1").replace("norm.2", "norm2")
            key = key.replace("conv.1", "conv1").replace("conv.2", "conv2")
        renamed[key] = value
    return renamed


def build_model(
    arch: str,
    *,
    pretrained: PretrainedMode = "none",
    weights_path: str | Path | None = None,
) -> BuiltModel:
    """Build ``arch``; with ``auto`` fall back to random init (logged) when no weights exist."""
    spec = architecture(arch)
    if pretrained not in PRETRAINED_MODES:
        raise CxrError(f"pretrained must be one of {PRETRAINED_MODES}, not {pretrained!r}")
    model = spec.build()
    if pretrained == "none":
        return BuiltModel(model, arch, pretrained=False, weights_source=None)
    if spec.imagenet_weights is None and weights_path is None:
        if pretrained == "required":
            raise PretrainedWeightsUnavailableError(
                f"{arch} has no ImageNet weights; pass a weights file or use pretrained=none"
            )
        log.info("%s has no pretrained weights; training from scratch (pretrained=false)", arch)
        return BuiltModel(model, arch, pretrained=False, weights_source=None)
    try:
        state, source = _load_imagenet_state(spec, Path(weights_path) if weights_path else None)
    except Exception as error:  # noqa: BLE001 - offline (URLError), unreadable or corrupt file
        if pretrained == "required":
            raise PretrainedWeightsUnavailableError(
                f"pretrained weights for {arch} are required but could not be loaded: {error}. "
                "Put the torchvision file in the torch hub cache or pass weights_path."
            ) from error
        log.warning(
            "pretrained weights for %s unavailable (%s); training from scratch (pretrained=false)",
            arch,
            error,
        )
        return BuiltModel(model, arch, pretrained=False, weights_source=None)
    try:
        missing, unexpected = model.load_state_dict(
            _adapt_imagenet_state(spec, state, model), strict=False
        )
    except RuntimeError as error:  # shape mismatches: weights of another architecture
        raise PretrainedWeightsUnavailableError(
            f"weights from {source} do not fit {arch}: {str(error).splitlines()[0]}"
        ) from error
    head_only = all(key.startswith(spec.head_prefix) for key in missing)
    if unexpected or not head_only:
        raise PretrainedWeightsUnavailableError(
            f"weights from {source} do not fit {arch}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return BuiltModel(model, arch, pretrained=True, weights_source=source)


def head_parameters(model: nn.Module, arch: str) -> Iterator[tuple[str, nn.Parameter]]:
    prefix = architecture(arch).head_prefix
    return ((n, p) for n, p in model.named_parameters() if n.startswith(prefix))


def backbone_parameters(model: nn.Module, arch: str) -> Iterator[tuple[str, nn.Parameter]]:
    prefix = architecture(arch).head_prefix
    return ((n, p) for n, p in model.named_parameters() if not n.startswith(prefix))


def backbone_modules(model: nn.Module, arch: str) -> list[nn.Module]:
    """Top-level children outside the head: put in eval mode so frozen BN statistics stay put."""
    head_root = architecture(arch).head_prefix.split(".")[0]
    return [module for name, module in model.named_children() if name != head_root]


def gradcam_layer(model: nn.Module, arch: str) -> nn.Module:
    return model.get_submodule(architecture(arch).gradcam_layer)


class FlipAveraged(nn.Module):
    """Test-time augmentation: the mean logit of an image and its mirror image.

    Models trained with horizontal flips see both orientations; averaging the two reads removes
    the orientation noise from a single read. It is a module, not a loop in the scoring code, so
    the exported ONNX graph, and therefore every serving path, scores exactly what was evaluated.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.model(images) + self.model(torch.flip(images, dims=(3,)))) * 0.5


class WithFeatures(nn.Module):
    """The logit and the population check's features from one pass: for each stage end of
    ``population_layers`` (coarse to fine), every channel's mean and spread over the image.

    Those statistics describe how an image looks to the network at every scale: bone texture,
    the size of structures against the field, contrast. On the real data they tell an adult's
    chest from a small child's where the classifier's own penultimate features do not
    (``benchmarks/population_check.py``). The exported ONNX graph returns both outputs, so the
    check costs a few reductions in the run that scores the image. The layers are read through
    torchvision's feature extractor (an FX graph sharing the network's weights). With ``flip``
    (the version's test-time augmentation) both outputs are the mean of the image and its
    mirror.
    """

    def __init__(self, model: nn.Module, arch: str, *, flip: bool = False) -> None:
        super().__init__()
        from torchvision.models.feature_extraction import (
            create_feature_extractor,
            get_graph_node_names,
        )

        self.layers = architecture(arch).population_layers
        if not self.layers:
            raise UnknownArchitectureError(f"{arch} names no layers for the population check")
        _, nodes = get_graph_node_names(model.eval())
        nodes_wanted = {layer: f"stage{index}" for index, layer in enumerate(self.layers)}
        self.extractor = create_feature_extractor(
            model.eval(), return_nodes={**nodes_wanted, nodes[-1]: "logit"}
        )
        self.flip = flip

    def _read(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.extractor(images)
        statistics = []
        for index in range(len(self.layers)):
            stage = outputs[f"stage{index}"]
            statistics += [stage.mean(dim=(2, 3)), stage.std(dim=(2, 3))]
        return outputs["logit"], torch.cat(statistics, dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self._read(images)
        if self.flip:
            mirrored_logits, mirrored = self._read(torch.flip(images, dims=(3,)))
            logits, features = (logits + mirrored_logits) * 0.5, (features + mirrored) * 0.5
        return logits, features
