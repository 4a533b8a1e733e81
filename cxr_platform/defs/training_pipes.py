"""Both ends of Dagster Pipes for training launched outside the run's process.

The launched `cxr train` opens the session (:func:`pipes_session`), sends its epochs as log
lines and its result as one :class:`TrainingMessage`; the asset that launched it
(:mod:`cxr_platform.defs.training_launch`) reads that message back into the same types, so it
builds its output and metadata as if it had trained itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cxr_platform.models.pipeline import TrainedModel
from cxr_platform.models.recipe import TrainConfig


@dataclass(frozen=True)
class TrainingMessage:
    """What `cxr train` reports when Dagster launched it: the model and the recipe it ran."""

    trained_model: TrainedModel
    config: TrainConfig

    def to_message(self) -> dict[str, Any]:
        return {"trained_model": self.trained_model.to_json(), "config": self.config.to_dict()}

    @classmethod
    def from_messages(cls, messages: Sequence[object]) -> TrainingMessage | None:
        """The last training report among a run's custom messages; None when there is none."""
        reported = [m for m in messages if isinstance(m, Mapping) and "trained_model" in m]
        if not reported:
            return None
        last = reported[-1]
        return cls(
            TrainedModel.from_json(last["trained_model"]), TrainConfig.from_dict(last["config"])
        )


@contextlib.contextmanager
def pipes_session() -> Iterator[Any]:
    """The Dagster Pipes session when a Dagster asset launched this process; None otherwise.
    Imported only then: `cxr train` by hand needs no Dagster."""
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

    if DAGSTER_PIPES_CONTEXT_ENV_VAR not in os.environ:
        yield None
        return
    with open_dagster_pipes() as pipes:
        yield pipes
