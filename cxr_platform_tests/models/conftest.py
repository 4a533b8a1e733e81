from __future__ import annotations

import pytest

from cxr_platform.models.training import TrainingData


@pytest.fixture()
def training_data(learnable_cache) -> TrainingData:
    return TrainingData.from_cache(learnable_cache, "cpu")
