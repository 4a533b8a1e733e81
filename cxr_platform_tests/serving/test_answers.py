"""The service's logic and the scoring core without a server: batching, scoring with shadow,
logging, error mapping."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from cxr_platform.data.features import image_features
from cxr_platform.errors import EmptyImageError, TruncatedImageError
from cxr_platform.inference.live import ServingModels
from cxr_platform.inference.log import InferenceLog
from cxr_platform.inference.scoring import (
    LOG_UNAVAILABLE,
    NO_PRODUCTION_MODEL,
    NOT_A_CHEST_RADIOGRAPH,
    NotAChestRadiographError,
    PreparedInput,
    ScoreRequest,
    ScoringUnavailableError,
    score_and_log,
    score_items,
)
from cxr_platform.model_version.input_gate import GateVerdict
from cxr_platform.model_version.predictor import Predictor
from cxr_platform.serving import answers
from cxr_platform.serving.batching import ContinuousBatcher

from ..deployment.conftest import export_untracked

# --------------------------------------------------------------------------------------------
# Continuous batching


def test_a_lone_request_is_scored_alone_and_load_grows_the_batches():
    sizes: list[int] = []
    release = threading.Event()

    def score(items: list[int]) -> list[int]:
        sizes.append(len(items))
        release.wait(5)  # the first batch holds the scorer while the others queue
        return [item * 10 for item in items]

    async def scenario() -> list[int]:
        batcher = ContinuousBatcher(score, max_batch_size=4)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)  # the first call is already running, alone
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 10)]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(first, *rest)

    results = asyncio.run(scenario())
    assert results == [i * 10 for i in range(10)]  # every caller gets its own result
    assert sizes == [1, 4, 4, 1]  # then whatever queued, at most max_batch_size at a time


def test_a_failing_batch_fails_its_callers_and_the_next_batch_still_runs():
    calls = 0

    def score(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("model crashed")
        return items

    async def scenario():
        batcher = ContinuousBatcher(score, max_batch_size=8)
        with pytest.raises(RuntimeError, match="model crashed"):
            await batcher.submit(1)
        return await batcher.submit(2)

    assert asyncio.run(scenario()) == 2


def test_a_cancelled_caller_does_not_disturb_the_batch():
    def score(items: list[int]) -> list[int]:
        time.sleep(0.1)
        return items

    async def scenario():
        batcher = ContinuousBatcher(score, max_batch_size=8)
        doomed = asyncio.ensure_future(batcher.submit(1))
        kept = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.01)
        doomed.cancel()
        return await kept, await batcher.submit(3)

    assert asyncio.run(scenario()) == (2, 3)


# --------------------------------------------------------------------------------------------
# Scoring, shadow, logging


@pytest.fixture(scope="module")
def predictors(trained_checkpoint, untrained_checkpoint, learnable_cache, tmp_path_factory):
    base = tmp_path_factory.mktemp("core")
    good = export_untracked(trained_checkpoint, learnable_cache, base / "good")
    bad = export_untracked(untrained_checkpoint, learnable_cache, base / "bad")
    return (
        Predictor(good.directory, model_version="1", threads=1),
        Predictor(bad.directory, model_version="2", threads=1),
    )


def requests_for(models: ServingModels, images: np.ndarray) -> list[ScoreRequest]:
    return [
        ScoreRequest(
            models=models,
            prepared=PreparedInput(pixels=image, features=image_features(image)),
            request_id=f"r{i}",
            started=time.perf_counter(),
        )
        for i, image in enumerate(images)
    ]


def test_shadow_scores_the_same_batch_and_matches_its_own_predictor(predictors, learnable_cache):
    production, shadow = predictors
    images = learnable_cache.images("test", mmap=False)[:6]
    outcomes = score_items(requests_for(ServingModels(production, shadow), images))
    expected_main = production.predict_prepared(images)
    expected_shadow = shadow.predict_prepared(images)
    for outcome, main, other in zip(outcomes, expected_main, expected_shadow, strict=True):
        assert outcome.production.model_version == "1"
        assert outcome.production.probability == pytest.approx(main.probability)
        assert outcome.shadow.model_version == "2"
        assert outcome.shadow.probability == pytest.approx(other.probability)


def test_each_request_is_scored_by_the_snapshot_it_was_prepared_for(predictors, learnable_cache):
    """A promotion between decoding and scoring: the request prepared before it is answered by
    the version it was prepared for, the next by the new production; no retry, no error."""
    first, second = predictors
    images = learnable_cache.images("test", mmap=False)[:2]
    before, after = ServingModels(first, None), ServingModels(second, None)
    items = [
        requests_for(before, images[:1])[0],
        replace(requests_for(after, images[1:])[0], request_id="r1"),
    ]
    outcomes = score_items(items)
    assert [o.production.model_version for o in outcomes] == ["1", "2"]
    assert outcomes[0].production.probability == pytest.approx(
        first.predict_prepared(images[:1])[0].probability
    )
    assert outcomes[1].production.probability == pytest.approx(
        second.predict_prepared(images[1:])[0].probability
    )
    nobody = score_items(requests_for(ServingModels(None, None), images))
    assert [o.failure for o in nobody] == [NO_PRODUCTION_MODEL] * 2
    with pytest.raises(ScoringUnavailableError) as refused:
        nobody[0].released()
    assert refused.value.reason == NO_PRODUCTION_MODEL
    assert answers.error_response(refused.value)[0] == 503


def test_a_batch_is_logged_in_one_go_and_withheld_when_the_log_fails(
    predictors, learnable_cache, tmp_path
):
    production, shadow = predictors
    images = learnable_cache.images("test", mmap=False)[:3]
    log = InferenceLog(f"sqlite:///{tmp_path / 'log.db'}")
    outcomes = score_and_log(log, requests_for(ServingModels(production, shadow), images))
    rows = log.records()
    assert list(rows.request_id) == ["r0", "r1", "r2"]
    assert list(rows.probability) == pytest.approx([o.production.probability for o in outcomes])
    assert rows.shadow_version.tolist() == ["2"] * 3

    log.dispose()
    for leftover in tmp_path.glob("log.db*"):
        leftover.unlink()
    (tmp_path / "log.db").mkdir()  # the database path is now a folder: every write fails
    withheld = score_and_log(log, requests_for(ServingModels(production, None), images))
    assert [o.failure for o in withheld] == [LOG_UNAVAILABLE] * 3
    assert all(o.production is None for o in withheld)
    with pytest.raises(ScoringUnavailableError, match="no prediction is released"):
        withheld[0].released()


def test_a_refused_image_gets_no_diagnosis_from_either_model_and_is_logged_with_its_batch(
    predictors, learnable_cache, tmp_path
):
    production, shadow = predictors
    images = learnable_cache.images("test", mmap=False)[:3]
    items = requests_for(ServingModels(production, shadow), images)
    verdict = GateVerdict(False, "unlike_a_frontal_chest_radiograph", "distance 9 > 3", 9.0, 3.0)
    items[1] = replace(items[1], prepared=replace(items[1].prepared, gate=verdict))
    log = InferenceLog(f"sqlite:///{tmp_path / 'log.db'}")
    outcomes = score_and_log(log, items)
    assert [o.failure for o in outcomes] == [None, NOT_A_CHEST_RADIOGRAPH, None]
    assert outcomes[1].production is None and outcomes[1].shadow is None
    assert outcomes[0].shadow_gate is not None and outcomes[0].shadow_gate.accepted
    with pytest.raises(NotAChestRadiographError) as refused:
        outcomes[1].released()
    status, body = answers.error_response(refused.value)
    assert status == 422 and body["error"] == "not_a_chest_radiograph"
    assert body["gate_score"] == 9.0 and body["request_id"] == "r1"
    assert list(log.records().request_id) == ["r0", "r2"]
    refusals = log.refusals()
    assert list(refusals.request_id) == ["r1"] and refusals.iloc[0].gate_score == 9.0
    # The refused image's batch-mates match what the models say of them alone.
    alone = production.predict_prepared(images[[0, 2]])
    assert [o.production.probability for o in outcomes if o.production] == pytest.approx(
        [p.probability for p in alone]
    )


# --------------------------------------------------------------------------------------------
# Uploads and errors


def test_error_statuses_say_what_was_wrong():
    assert answers.error_response(EmptyImageError("file is empty")) == (
        400,
        {"error": "empty", "detail": "file is empty"},
    )
    assert answers.error_response(TruncatedImageError("cut"))[0] == 422
    assert answers.error_response(answers.UploadTooLargeError("big"))[0] == 413
    status, body = answers.error_response(ValueError("secret internals"))
    assert status == 500 and "secret" not in body["detail"]


def test_an_oversized_upload_is_refused_before_decoding():
    with pytest.raises(answers.UploadTooLargeError, match="at most 10 bytes"):
        answers.check_upload_size(len(b"x" * 11), max_bytes=10)


def test_site_keys_are_parsed_and_a_malformed_entry_never_echoes_a_key():
    from cxr_platform.serving.edge import parse_site_keys

    assert parse_site_keys("north=k1, Klinikum Süd=k2,") == {"k1": "north", "k2": "Klinikum Süd"}
    assert parse_site_keys(None) == {}
    for text, message in (
        ("secret-key-123", "entry 1 must be site=key"),
        ("north=k1,south=k1", "reuses another site's key"),
        ("north=", "entry 1 must be site=key"),
        ("<x>=k", "entry 1: site names are at most"),
    ):
        with pytest.raises(ValueError, match=message) as refused:
            parse_site_keys(text)
        assert "secret-key-123" not in str(refused.value) and "k1" not in str(refused.value)
