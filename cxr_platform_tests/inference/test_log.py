"""The inference log on SQLite (WAL) and on a real PostgreSQL server."""

from __future__ import annotations

import multiprocessing
import stat
import uuid

import numpy as np
import pandas as pd
import pytest

from cxr_platform.data.features import ImageFeatures, intensity_features
from cxr_platform.inference.log import (
    InferenceLog,
    InferenceLogError,
    InferenceRecord,
    InvalidSiteError,
    RefusalRecord,
    UnknownRequestError,
    site_name,
)
from cxr_platform.redaction import hash_uid, uid_salt


def _record(request_id: str, probability: float = 0.7, **extra) -> InferenceRecord:
    pixels = np.full((8, 8), 128, dtype=np.uint8)
    return InferenceRecord(
        request_id=request_id,
        source=extra.pop("source", "http"),
        model_name="resnet18",
        model_version="3",
        probability=probability,
        label="PNEUMONIA" if probability >= 0.5 else "NORMAL",
        threshold=0.5,
        features=ImageFeatures(**intensity_features(pixels), original_width=8, bit_depth=8),
        **extra,
    )


def test_intensity_features_match_numpy():
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64)).astype(np.uint8)
    features = intensity_features(pixels)
    assert features["intensity_mean"] == pytest.approx(pixels.mean() / 255)
    assert features["intensity_std"] == pytest.approx(pixels.std() / 255)
    for q in (1, 5, 50, 95, 99):
        expected = np.percentile(pixels, q, method="inverted_cdf") / 255
        assert features[f"intensity_p{q:02d}"] == pytest.approx(expected)
    assert 7.9 < features["entropy"] <= 8.0  # near-uniform 8-bit noise
    assert intensity_features(np.zeros((4, 4), dtype=np.uint8))["entropy"] == 0.0
    with pytest.raises(ValueError):
        intensity_features(pixels.astype(np.float32))


def _exercise(log: InferenceLog) -> None:
    log.write([_record("a", 0.9), _record("b", 0.2, shadow_version="4", shadow_probability=0.3)])
    log.add_feedback("a", "NORMAL", reporter="dr-x")
    log.add_feedback("a", "PNEUMONIA")  # a corrected label: the latest one counts
    rows = log.records()
    assert list(rows["request_id"]) == ["a", "b"]
    assert list(rows["feedback_label"].fillna("")) == ["PNEUMONIA", ""]
    assert rows.loc[1, "shadow_probability"] == pytest.approx(0.3)
    assert rows.loc[0, "intensity_mean"] == pytest.approx(128 / 255)
    assert log.count() == 2 and log.count(since_id=int(rows.loc[0, "id"])) == 1
    with pytest.raises(UnknownRequestError):
        log.add_feedback("never-seen", "NORMAL")
    with pytest.raises(InferenceLogError):
        log.add_feedback("a", "maybe")
    with pytest.raises(InferenceLogError):
        _record("c", source="email")
    # An explanation's share of relevance on the lungs, on its row after it was scored.
    assert log.record_lung_relevance("b", 0.25) is True
    assert log.record_lung_relevance("never-seen", 0.5) is False
    with pytest.raises(InferenceLogError, match="within"):
        log.record_lung_relevance("b", 1.5)
    shares = log.records().set_index("request_id")["relevance_in_lungs"]
    assert shares["b"] == pytest.approx(0.25) and pd.isna(shares["a"])
    _exercise_sites(log)


def _exercise_sites(log: InferenceLog) -> None:
    """Rows, refusals and feedback cut per site."""
    log.write(
        [_record("north-1", 0.8, site="north"), _record("south-1", 0.3, site="Klinikum Süd")],
        [_refusal("north-refused", site="north"), _refusal("anonymous-refused")],
    )
    log.add_feedback("south-1", "NORMAL")
    assert list(log.records(site="north")["request_id"]) == ["north-1"]
    south = log.records(site="Klinikum Süd", labeled_only=True)
    assert list(south["request_id"]) == ["south-1"] and south["feedback_label"].tolist() == [
        "NORMAL"
    ]
    assert list(log.refusals(site="north")["request_id"]) == ["north-refused"]
    assert log.records().set_index("request_id").loc["a", "site"] is None
    assert log.refusals()["site"].tolist() == ["north", None]


def _refusal(request_id: str, **extra) -> RefusalRecord:
    return RefusalRecord(
        request_id=request_id,
        source="http",
        model_name="resnet18",
        model_version="3",
        reason="not_a_chest_radiograph",
        detail="a photograph",
        **extra,
    )


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("north", "north"),
        ("  Klinikum   Süd ", "Klinikum Süd"),
        ("St. Mary's (Radiology) / ED-2", "St. Mary's (Radiology) / ED-2"),
        ("", None),
        (None, None),
    ],
)
def test_site_names_are_kept_trimmed(given, kept):
    assert site_name(given) == kept


@pytest.mark.parametrize("given", ["<script>", "-leading-dash", "a" * 65, "line\x00break"])
def test_a_client_given_site_that_is_not_a_plain_name_is_refused(given):
    with pytest.raises(InvalidSiteError):
        site_name(given)


def test_a_site_from_a_dicom_header_is_made_plain_not_refused():
    assert site_name("<Klinik>; DROP", strict=False) == "Klinik DROP"
    assert site_name("x" * 80, strict=False) == "x" * 64
    assert site_name("***", strict=False) is None
    with pytest.raises(InvalidSiteError):
        _record("z", site="not trimmed ")


def test_sqlite_log_round_trip(tmp_path):
    _exercise(InferenceLog(f"sqlite:///{tmp_path / 'log.db'}"))


def test_postgresql_log_round_trip(postgres_url):
    log = InferenceLog(postgres_url)
    try:
        _exercise(log)
    finally:
        from cxr_platform.inference.log import metadata

        metadata.drop_all(log.engine)
        log.dispose()


def _writer(url: str, worker: int, n: int) -> None:
    log = InferenceLog(url)
    for i in range(n):
        log.write([_record(f"w{worker}-{i}-{uuid.uuid4().hex[:8]}", source="batch")])
    log.dispose()


def test_concurrent_writers_lose_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'log.db'}"
    InferenceLog(url).dispose()  # create the tables once, as the service does at start-up
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(url, w, 60)) for w in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
        assert process.exitcode == 0
    rows = InferenceLog(url).records()
    assert len(rows) == 240 and rows["request_id"].is_unique


def test_uids_are_salted_hashes_and_the_salt_is_private(tmp_path):
    salt = uid_salt(tmp_path)
    assert uid_salt(tmp_path) == salt  # created once, then reused
    assert stat.S_IMODE((tmp_path / "uid_salt").stat().st_mode) == 0o600
    uid = "1.2.826.0.1.3680043.8.498.1"
    hashed = hash_uid(uid, salt)
    assert hashed == hash_uid(uid, salt) and uid not in hashed and len(hashed) == 64
    assert hashed != hash_uid(uid, uid_salt(tmp_path / "other"))
    assert hash_uid(None, salt) is None
    # A configured salt wins over the home's file (and must be long enough to be a key).
    configured = "site-secret-" + "7" * 20
    assert uid_salt(tmp_path, configured=configured) == configured.encode()


def test_a_log_created_before_a_new_column_is_upgraded_in_place(tmp_path):
    """A deployment's existing log gains columns added later (here: sharpness) and keeps its
    rows, instead of failing every insert after an upgrade."""
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "CREATE TABLE inference_records (id INTEGER PRIMARY KEY, request_id VARCHAR(64) "
                "NOT NULL UNIQUE, created_at DATETIME NOT NULL, source VARCHAR(16) NOT NULL, "
                "model_name VARCHAR(128) NOT NULL, probability FLOAT NOT NULL, label VARCHAR(16) "
                "NOT NULL, threshold FLOAT NOT NULL)"
            )
        )
        connection.execute(
            sa.text(
                "INSERT INTO inference_records (request_id, created_at, source, model_name, "
                "probability, label, threshold) VALUES ('old-row-1', '2026-01-01 00:00:00', "
                "'http', 'm', 0.7, 'PNEUMONIA', 0.5)"
            )
        )
    engine.dispose()
    log = InferenceLog(url)
    log.write([_record("new-row-1")])
    rows = log.records()
    assert list(rows["request_id"]) == ["old-row-1", "new-row-1"]
    assert rows["sharpness"].isna().tolist() == [True, False]
    log.dispose()


def test_labels_for_many_requests_land_once(tmp_path):
    """A silent trial's report labels: more request ids than one SQLite statement binds, and
    the same labels joined again add nothing."""
    log = InferenceLog(f"sqlite:///{tmp_path / 'log.db'}")
    ids = [f"trial-{n:05d}" for n in range(1200)]
    log.write([_record(request_id) for request_id in ids])
    labels = {request_id: ("PNEUMONIA" if n % 3 else "NORMAL") for n, request_id in enumerate(ids)}
    assert log.label_requests(labels, reporter="report labels") == 1200
    assert log.label_requests(labels, reporter="report labels") == 0
    changed = {ids[0]: "PNEUMONIA"}  # a corrected report: the latest label counts
    assert log.label_requests(changed, reporter="report labels") == 1
    rows = log.records(labeled_only=True).set_index("request_id")
    assert len(rows) == 1200 and rows.loc[ids[0], "feedback_label"] == "PNEUMONIA"
    with pytest.raises(UnknownRequestError):
        log.label_requests({"never-seen": "NORMAL"}, reporter="report labels")
    with pytest.raises(InferenceLogError, match="must be one of"):
        log.label_requests({ids[1]: "CONSOLIDATION"}, reporter="report labels")
    log.dispose()
