"""A training checkpoint as one typed record, written once and read everywhere the same way.

``best.pt`` and ``last.pt`` hold the same record: the kept weights (the average when the run
averages), the recipe, the preprocessing, where the run stood, and what a resume needs (optimizer
state, live weights, averaging counter). Nothing is added to a checkpoint after training: the
operating point that evaluation fits travels in the evaluation report instead.

On disk it is a plain dict of tensors and primitives, so ``torch.load(weights_only=True)``
reads it and no code runs on load. :class:`Checkpoint` is also a read-only mapping of that dict,
which is what inspecting ``torch.load``'s output used to give.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.models.recipe import EpochRecord, TrainConfig, TrainingError
from cxr_platform.models.zoo import FlipAveraged, build_model

CHECKPOINT_FORMAT = 1
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class Checkpoint(Mapping[str, Any]):
    arch: str
    model: StateDict  # the weights that were validated: what is kept, exported and served
    config: TrainConfig
    preprocessing: dict[str, Any]
    epoch: int
    phase: str
    metrics: dict[str, float]  # this epoch's validation loss and AUC
    pretrained: bool
    weights_source: str | None
    pos_weight: float | None
    history: list[EpochRecord]
    best_epoch: int
    best_val_auc: float
    epochs_without_improvement: int
    optimizer: dict[str, Any] = field(repr=False)
    # Averaged runs only: the live weights training continues from, and the average's counter.
    training_model: StateDict | None = field(default=None, repr=False)
    ema_updates: int | None = None

    @property
    def preprocessing_config(self) -> PreprocessingConfig:
        return PreprocessingConfig.from_dict(self.preprocessing)

    @property
    def flip_averaged(self) -> bool:
        return self.config.tta_flip

    def to_payload(self) -> dict[str, Any]:
        """The stored dict (shallow: the tensors are shared, not copied)."""
        payload: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "arch": self.arch,
            "model": self.model,
            "optimizer": self.optimizer,
            "epoch": self.epoch,
            "phase": self.phase,
            "config": self.config.to_dict(),
            "preprocessing": self.preprocessing,
            "metrics": self.metrics,
            "pretrained": self.pretrained,
            "weights_source": self.weights_source,
            "pos_weight": self.pos_weight,
            "history": [record.to_dict() for record in self.history],
            "best": {"epoch": self.best_epoch, "val_auc": self.best_val_auc},
            "epochs_without_improvement": self.epochs_without_improvement,
        }
        if self.training_model is not None:
            payload["training_model"] = self.training_model
            payload["ema_updates"] = self.ema_updates
        return payload

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], *, source: str = "checkpoint") -> Checkpoint:
        if not isinstance(payload, Mapping) or payload.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(
                f"{source} is not a cxr_platform checkpoint (format {CHECKPOINT_FORMAT})"
            )
        try:
            return cls(
                arch=payload["arch"],
                model=payload["model"],
                config=TrainConfig.from_dict(payload["config"]),
                preprocessing=dict(payload["preprocessing"]),
                epoch=int(payload["epoch"]),
                phase=payload["phase"],
                metrics=dict(payload["metrics"]),
                pretrained=bool(payload["pretrained"]),
                weights_source=payload["weights_source"],
                pos_weight=payload["pos_weight"],
                history=[EpochRecord(**record) for record in payload["history"]],
                best_epoch=int(payload["best"]["epoch"]),
                best_val_auc=float(payload["best"]["val_auc"]),
                epochs_without_improvement=int(payload["epochs_without_improvement"]),
                optimizer=payload["optimizer"],
                training_model=payload.get("training_model"),
                ema_updates=payload.get("ema_updates"),
            )
        except (KeyError, TypeError) as error:
            raise TrainingError(f"{source} is an incomplete checkpoint: {error!r}") from error

    def save(self, path: str | Path) -> Path:
        """Write-then-rename: a crash mid-save never leaves a truncated checkpoint behind."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.to_payload(), tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as error:  # pickle and zip errors of a corrupt or foreign file
            raise TrainingError(f"{path} cannot be read as a checkpoint: {error}") from error
        return cls.from_payload(payload, source=str(path))

    # Read-only mapping of the stored dict.
    def __getitem__(self, key: str) -> Any:
        return self.to_payload()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_payload())

    def __len__(self) -> int:
        return len(self.to_payload())

    def bare_model(self) -> nn.Module:
        """The network alone (what Grad-CAM needs: its layers under their usual names)."""
        model = build_model(self.arch, pretrained="none").model
        model.load_state_dict(self.model)
        return model.eval()

    def scoring_model(self) -> nn.Module:
        """The network as the recipe scores it: with flip averaging when trained so."""
        model = self.bare_model()
        return FlipAveraged(model).eval() if self.flip_averaged else model


def load_checkpoint(path: str | Path) -> Checkpoint:
    return Checkpoint.load(path)


def model_from_checkpoint(checkpoint: Checkpoint) -> nn.Module:
    return checkpoint.bare_model()


def scoring_model(checkpoint: Checkpoint) -> nn.Module:
    return checkpoint.scoring_model()


def file_sha256(path: str | Path) -> str:
    """The identity of a written artifact (checkpoints are never rewritten, so it is stable)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
