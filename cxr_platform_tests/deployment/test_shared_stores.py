"""The platform on the stores a shared deployment runs, all real and started here on 127.0.0.1:
PostgreSQL (Dagster's storage, MLflow's backend store, the inference log, the promotion lock), an
S3-compatible server (moto) holding MLflow's artifacts, and an MLflow tracking server between
them. The release job runs through `cxr demo`, as a person would start it; then the service, the
DICOM node and `cxr predict` write the log at once; then two machines promote at once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from mlflow.tracking import MlflowClient

from cxr_platform.data.sources import discover_images
from cxr_platform.deployment.registry import (
    PREVIOUS_PRODUCTION,
    PRODUCTION,
    registry_for,
)
from cxr_platform.inference.log import InferenceLog
from cxr_platform.locks import advisory_key, exclusive
from cxr_platform.pacs import build_node
from cxr_platform.ports import free_port
from cxr_platform.serving.process import ServiceProcess
from cxr_platform.settings import CxrSettings, load_settings
from cxr_platform_tests.pacs.conftest import radiograph, wait_for
from cxr_platform_tests.pacs.scu import send
from cxr_platform_tests.postgres import create_database
from cxr_platform_tests.servers import mlflow_server, s3_server
from cxr_platform_tests.synthetic_dicom import RadiographSpec

BUCKET = "mlflow"


@dataclass(frozen=True)
class SharedStores:
    tracking_uri: str
    log_url: str
    dagster_url: str
    s3: object
    environment: dict[str, str]  # what every machine of the deployment sets


@pytest.fixture(scope="module")
def stores(postgres_url, tmp_path_factory):
    base = tmp_path_factory.mktemp("stores")
    suffix = uuid.uuid4().hex[:8]
    mlflow_db = create_database(postgres_url, f"mlflow_{suffix}")
    log_url = create_database(postgres_url, f"cxr_{suffix}")
    # Dagster's PostgreSQL storage speaks psycopg2.
    dagster_url = create_database(postgres_url, f"dagster_{suffix}").replace(
        "postgresql+psycopg://", "postgresql+psycopg2://"
    )
    with (
        s3_server(base, buckets=(BUCKET,)) as s3,
        mlflow_server(
            base,
            backend_store_uri=mlflow_db,
            artifacts_destination=f"s3://{BUCKET}/",
            s3=s3,
        ) as tracking_uri,
    ):
        yield SharedStores(
            tracking_uri=tracking_uri,
            log_url=log_url,
            dagster_url=dagster_url,
            s3=s3,
            environment={
                "CXR_MLFLOW_TRACKING_URI": tracking_uri,
                "CXR_INFERENCE_LOG_URL": log_url,
                "CXR_DAGSTER_POSTGRES_URL": dagster_url,
            },
        )


# The demo profile at its smallest: one baseline CNN on 64 px images, floors off (a briefly
# trained model on ~95 images is not what this test judges).
TINY = {
    "CXR_IMAGE_SIZE": "64",
    "CXR_WORKERS": "1",
    "CXR_TRAINING_PROFILE": "demo",
    "CXR_DEVICE": "cpu",
    "CXR_MODELS": "baseline_cnn",
    "CXR_MIN_TEST_AUC": "0",
    "CXR_MIN_TEST_SENSITIVITY": "0",
    "CXR_MIN_TEST_SPECIFICITY": "0",
    "CXR_EXPORT_INT8": "false",
}


def _cxr(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cxr_platform.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=timeout,
    )


@dataclass(frozen=True)
class Released:
    home: Path
    env: dict[str, str]
    settings: CxrSettings
    images: list[Path]


@pytest.fixture(scope="module")
def released(stores, tiny_synthetic, tmp_path_factory) -> Released:
    home = tmp_path_factory.mktemp("machine-a") / "home"
    env = {
        **stores.environment,
        **TINY,
        "CXR_HOME": str(home),
        "BENTOML_HOME": str(home.parent / "bentoml"),
    }
    done = _cxr(["demo", "--no-loop", "--data", str(tiny_synthetic)], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    settings = load_settings(
        home=home,
        mlflow_tracking_uri=stores.tracking_uri,
        inference_log_url=stores.log_url,
        dagster_postgres_url=stores.dagster_url,
        image_size=64,
    )
    images = [Path(p) for p in discover_images(tiny_synthetic).records["path"]]
    return Released(home, env, settings, images)


def test_the_release_job_and_predictions_land_on_the_servers_and_nothing_local(
    stores, released, monkeypatch
):
    predicted = _cxr(["predict", *map(str, released.images[:3]), "--site", "north"], released.env)
    assert predicted.returncode == 0, predicted.stderr[-3000:]

    # Dagster: the run is in PostgreSQL, where the shipped instance file finds it too; the file
    # cxr wrote into the home names the database and only its owner can read it.
    written = released.home / "dagster" / "dagster.yaml"
    assert stores.dagster_url in written.read_text()
    assert written.stat().st_mode & 0o777 == 0o600
    import dagster as dg

    shipped = Path(__file__).parents[2] / "deploy" / "dagster" / "dagster.yaml"
    dagster_home = released.home.parent / "dagster-home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(shipped.read_text())
    monkeypatch.setenv("CXR_DAGSTER_POSTGRES_URL", stores.dagster_url)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        runs = instance.get_runs()
        assert [(run.job_name, run.status) for run in runs] == [
            ("train_and_release", dg.DagsterRunStatus.SUCCESS)
        ]
        materialized = instance.get_latest_materialization_event(dg.AssetKey("production_model"))
        assert materialized is not None and materialized.run_id == runs[0].run_id
    engine = sa.create_engine(stores.dagster_url)
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM runs")).scalar_one() == 1
    engine.dispose()

    # MLflow: the run, the version, its aliases and its files on the server; files in S3.
    client = MlflowClient(stores.tracking_uri)
    experiment = client.get_experiment_by_name("cxr-training")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["cxr.arch"] == "baseline_cnn"
    registry = registry_for(released.settings.registry)
    (version,) = registry.versions()
    assert registry.aliases()[PRODUCTION] == version.version
    assert version.run_id == run.info.run_id
    keys = stores.s3.keys(BUCKET)
    model_files = [key for key in keys if f"{run.info.run_id}/artifacts/registry/" in key]
    assert any(key.endswith(".onnx") for key in model_files), keys
    assert any("/artifacts/evaluation/" in key for key in keys), keys  # the evaluation report

    # The inference log: the three predictions, on PostgreSQL.
    log = InferenceLog(stores.log_url)
    rows = log.records(site="north")
    log.dispose()
    assert len(rows) == 3
    assert set(rows["source"]) == {"batch"} and set(rows["model_version"]) == {version.version}

    # Nothing of the stores on this machine: no SQLite database, no MLflow artifact folder.
    local = sorted(str(p.relative_to(released.home)) for p in released.home.rglob("*"))
    assert not [p for p in local if p.endswith((".db", ".db-wal", ".sqlite"))], local
    assert not released.settings.registry.mlflow_dir.exists() or not any(
        released.settings.registry.mlflow_dir.iterdir()
    ), local
    assert not (released.home / "dagster" / "history").exists(), local


def _post_images(url: str, images: list[Path], sent: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        for image in images:
            response = client.post(
                "/predict",
                files={"file": (image.name, image.read_bytes(), "image/png")},
                headers={"X-CXR-Site": "web"},
            )
            sent.append(response.status_code)


def test_the_service_the_node_and_predict_write_the_log_at_once(stores, released, tmp_path):
    http_images, dicom_images, batch_images = (
        released.images[0:24],
        released.images[24:36],
        released.images[36:60],
    )
    log = InferenceLog(stores.log_url)
    before = log.records()
    log.dispose()

    settings = released.settings
    node = build_node(
        replace(
            settings.dicom,
            dicom_port=free_port(),
            dicom_host="127.0.0.1",
            dicom_allowed_aets=("MODALITY",),
        ),
        settings.registry,
        state_dir=tmp_path / "node",
    )
    service_env = {**released.env, "CXR_SERVICE_THREADS": "2"}
    statuses: list[int] = []
    with (
        node,
        ServiceProcess(env=service_env, log_path=tmp_path / "service.log") as service,
    ):
        # Three writers at once: two client threads into the service, a modality into the
        # node, and a `cxr predict` process.
        clients = [
            threading.Thread(target=_post_images, args=(service.url, half, statuses))
            for half in (http_images[0::2], http_images[1::2])
        ]
        batch = subprocess.Popen(
            [sys.executable, "-m", "cxr_platform.cli", "predict", *map(str, batch_images)],
            env={**os.environ, **released.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for client in clients:
            client.start()
        datasets = [radiograph(png, RadiographSpec(), size=(256, 224)) for png in dicom_images]
        stored = send(node.port, datasets)
        for client in clients:
            client.join()
        _, errors = batch.communicate(timeout=600)
        assert batch.returncode == 0, errors[-3000:]
        assert stored.statuses == [0] * len(dicom_images)
        wait_for(
            lambda: node.counters.processed + node.counters.refused >= len(dicom_images),
            timeout=300,
            what="the node to score every instance",
        )
    assert statuses == [200] * len(http_images)

    log = InferenceLog(stores.log_url)
    rows, refused = log.records(), log.refusals()
    log.dispose()
    new = rows[~rows["request_id"].isin(before["request_id"])]
    written = new["source"].value_counts().to_dict()
    written["dicom"] = written.get("dicom", 0) + int((refused["source"] == "dicom").sum())
    assert written == {"http": 24, "dicom": 12, "batch": 24}, written
    assert new["request_id"].is_unique
    assert new["id"].is_unique
    assert new.loc[new["source"] == "dicom", "sop_instance_uid_hash"].is_unique


def _promote_in_process(env: dict[str, str], version: str, done: dict[str, str]) -> None:
    promoted = _cxr(["promote", version], env, timeout=600)
    done[version] = f"{promoted.returncode}: {promoted.stdout[-500:]} {promoted.stderr[-1500:]}"


def test_two_machines_promote_one_at_a_time_through_the_database_lock(stores, released, tmp_path):
    """Two promoters with homes of their own (so no shared file could serialize them) against
    one MLflow server: the lock in the shared database makes them take turns."""
    registry = registry_for(released.settings.registry)
    (first,) = [v.version for v in registry.versions()][:1]
    # Two more versions of the released model's files, as two retrainings would register.
    source = registry.download(first)
    run_id = registry.get(first).run_id
    candidates = [
        registry.register_folder(
            source, run_id=run_id, tags=registry.get(first).release, triggered_by="test"
        ).version
        for _ in range(2)
    ]
    machines = []
    for name in ("machine-b", "machine-c"):
        home = tmp_path / name
        machines.append({**released.env, "CXR_HOME": str(home)})

    lock_name = f"cxr.registry.aliases.{registry.name}"
    outcomes: dict[str, str] = {}
    with exclusive(stores.log_url, lock_name):  # a third machine mid-promotion
        promoters = [
            threading.Thread(target=_promote_in_process, args=(env, version, outcomes))
            for env, version in zip(machines, candidates, strict=True)
        ]
        for promoter in promoters:
            promoter.start()
        # Both wait on the lock in the database: their sessions show up there as waiting.
        wait_for(
            lambda: _waiting_on(stores.log_url, lock_name) == 2,
            timeout=300,
            what="both promoters to wait on the database lock",
        )
        assert registry.aliases()[PRODUCTION] == first
    for promoter in promoters:
        promoter.join(timeout=300)
    assert all(text.startswith("0:") for text in outcomes.values()), outcomes
    assert sum("running the gate again" in text for text in outcomes.values()) == 1, outcomes

    promotions = [event for event in registry.events() if event.action == "promoted"]
    last_two = promotions[-2:]
    # Each promoter saw what the one before it left: the chain of replaced versions is unbroken.
    assert last_two[0].previous_version == first
    assert last_two[1].previous_version == last_two[0].version
    assert registry.aliases()[PRODUCTION] == last_two[1].version
    assert registry.aliases()[PREVIOUS_PRODUCTION] == last_two[0].version
    assert {event.version for event in last_two} == set(candidates)
    # The second was gated again, against the version the first had just promoted.
    second_gate = last_two[1].details["gate"]["evaluated_on"]
    assert second_gate["production_version"] == last_two[0].version


def _waiting_on(url: str, name: str) -> int:
    """Sessions waiting for the advisory lock ``name`` right now (the holder excluded)."""
    key = advisory_key(name)
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            held = connection.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                    "AND ((classid::bigint << 32) | objid::bigint) = :key"
                ),
                {"key": key},
            ).scalar_one()
    finally:
        engine.dispose()
    return int(held)
