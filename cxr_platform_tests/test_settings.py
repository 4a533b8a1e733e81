"""Configuration by one road: every CXR_* setting reaches the Dagster path and the CLI alike.

Settings are declared once (``cxr_platform.sections``); these tests walk that declaration, so a
setting added later is covered without touching them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from cxr_platform import sections
from cxr_platform.data.splits import manifest_hash
from cxr_platform.defs.definitions import DATA_JOB, build_definitions
from cxr_platform.defs.resources import PlatformSettings
from cxr_platform.settings import (
    SECRET_SETTINGS,
    env_name,
    load_settings,
    settings_environment,
    settings_fields,
)

from .conftest import REPO_ROOT

# Values the platform reads beyond its own checks: architectures the zoo knows, a cron Dagster
# accepts, result kinds the node makes.
SPECIAL_VALUES: dict[str, object] = {
    "models": ("densenet121", "resnet50"),  # two: "ensemble" is switched on too
    "drift_report_cron": "30 5 * * *",
    "dicom_results": ("sr", "sc"),
    "dicom_compress_results": ("sc",),
    "dicom_allowed_aets": ("MODALITY", "ROUTER"),
    "split_ratios": (0.6, 0.2, 0.2),
    "device": "cpu",
    "intended_age_years": "1-17",  # a range of completed years
    "silent_trial_start_date": "2024-07-01",
    "uid_salt": "5e" * 20,  # a key long enough to be one
}


def _declared() -> dict[str, dataclasses.Field]:
    fields: dict[str, dataclasses.Field] = {}
    for section in sections.SECTIONS.values():
        for spec in dataclasses.fields(section):
            fields.setdefault(spec.name, spec)
    return fields


def _hints() -> dict[str, object]:
    hints: dict[str, object] = {}
    for section in sections.SECTIONS.values():
        hints.update(typing.get_type_hints(section))
    return hints


def _non_default(name: str, annotation: object, default: object, tmp: Path) -> object:
    """A valid value different from the default, derived from the declared type and bounds."""
    if name in SPECIAL_VALUES:
        return SPECIAL_VALUES[name]
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    base = args[0] if typing.get_origin(annotation) in (typing.Union, type(int | None)) else None
    kind = base if base is not None and len(args) == 1 else annotation
    if kind is bool:
        return not default
    if typing.get_origin(kind) is typing.Literal:
        return next(choice for choice in typing.get_args(kind) if choice != default)
    if kind is Path:
        return (tmp / name).resolve()
    if kind == tuple[Path, ...]:
        return ((tmp / name / "first").resolve(), (tmp / name / "second").resolve())
    if kind is int:
        return 3 if default is None else int(default) + 1
    if kind is float:
        return 0.5 if default in (None, 0) else float(default) / 2
    if kind is str:
        return f"{name}-value" if default is None else f"{default}x"
    raise AssertionError(f"no test value for {name}: {annotation}")


def _as_environment(value: object) -> str:
    """How an operator writes the value, independently of the code under test."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if isinstance(value, tuple) and all(isinstance(v, Path) for v in value):
        return ":".join(map(str, value))  # as PATH lists folders
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return str(value)


@pytest.fixture()
def every_setting_changed(tmp_path, monkeypatch) -> dict[str, object]:
    """Every setting set to a non-default value through its CXR_* variable."""
    hints = _hints()
    expected: dict[str, object] = {}
    for name, spec in _declared().items():
        default = spec.default if spec.default is not dataclasses.MISSING else None
        expected[name] = _non_default(name, hints[name], default, tmp_path)
    expected["home"] = (tmp_path / "home").resolve()
    expected["service_api_key"] = "k-123"
    for variable in list(os.environ):
        if variable.startswith("CXR_"):
            monkeypatch.delenv(variable)
    for name, value in expected.items():
        monkeypatch.setenv(env_name(name), _as_environment(value))
    return expected


def _flat(settings) -> dict[str, object]:
    values = {}
    for name in _declared():
        value = getattr(settings, name)
        values[name] = value.get_secret_value() if name in SECRET_SETTINGS and value else value
    return values


def test_every_setting_is_declared_by_a_section_and_read_from_its_variable(
    every_setting_changed,
):
    assert set(settings_fields()) == set(_declared())
    assert _flat(load_settings()) == every_setting_changed


def test_every_setting_reaches_a_dagster_run(every_setting_changed):
    """The code location reads the environment when it loads; a run sees those values through
    the ``platform`` resource, secrets included (they stay out of run config)."""
    defs = build_definitions()
    platform = defs.resources["platform"]
    assert "service_api_key" not in type(platform).model_fields

    @dg.asset
    def settings_seen(platform: PlatformSettings) -> dict:
        return _flat(platform.settings())

    result = dg.materialize([settings_seen], resources={"platform": platform})
    assert result.success
    assert result.output_for_node("settings_seen") == every_setting_changed


def test_a_launchpad_override_wins_for_that_run_only(tmp_path):
    platform = PlatformSettings.from_settings(load_settings(home=tmp_path / "home"))

    @dg.asset
    def ratios_seen(platform: PlatformSettings) -> list:
        return list(platform.settings().data.split_ratios)

    overridden = dg.materialize(
        [ratios_seen],
        resources={"platform": platform},
        run_config={"resources": {"platform": {"config": {"split_ratios": [0.5, 0.25, 0.25]}}}},
    )
    assert overridden.output_for_node("ratios_seen") == [0.5, 0.25, 0.25]
    plain = dg.materialize([ratios_seen], resources={"platform": platform})
    assert plain.output_for_node("ratios_seen") == [0.7, 0.15, 0.15]


def test_every_setting_reaches_the_cli(every_setting_changed):
    result = subprocess.run(
        [sys.executable, "-m", "cxr_platform.cli", "config", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert set(shown) == set(sections.SECTIONS)
    seen: dict[str, object] = {}
    for values in shown.values():
        seen.update(values)
    for name, value in every_setting_changed.items():
        if name in SECRET_SETTINGS:
            assert seen[name] == "**********", "a secret must never be printed"
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = [str(item) if isinstance(item, Path) else item for item in value]  # JSON
        assert seen[name] == value, name


def test_a_child_process_reads_exactly_the_parents_settings(every_setting_changed, monkeypatch):
    parent = load_settings()
    environment = settings_environment(parent)
    for variable in list(os.environ):
        if variable.startswith("CXR_"):
            monkeypatch.delenv(variable)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    assert _flat(load_settings()) == _flat(parent) == every_setting_changed


def test_the_demos_smaller_windows_yield_to_an_explicit_setting(tmp_path, monkeypatch):
    from cxr_platform.cli.demo import demo_overrides

    monkeypatch.delenv("CXR_DRIFT_WINDOW_SIZE", raising=False)
    monkeypatch.delenv("CXR_SHADOW_MIN_RECORDS", raising=False)
    assert demo_overrides(load_settings(home=tmp_path)) == {
        "drift_window_size": 100,
        "shadow_min_records": 100,
    }
    monkeypatch.setenv("CXR_DRIFT_WINDOW_SIZE", "150")
    assert demo_overrides(load_settings(home=tmp_path)) == {"shadow_min_records": 100}


def test_invalid_values_are_refused_with_the_variable_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update({"CXR_HOME": str(tmp_path), "CXR_SPLIT_RATIOS": "[0.5, 0.2, 0.2]"})
    command = [sys.executable, "-m", "cxr_platform.cli", "config"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "split_ratios must be 3 positive shares summing to 1" in result.stderr
    env.update({"CXR_SPLIT_RATIOS": "[0.7, 0.15, 0.15]", "CXR_DRIFT_WINDOW_SIZE": "3"})
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "drift_window_size (CXR_DRIFT_WINDOW_SIZE)" in result.stderr
    assert "Traceback" not in result.stderr


def test_sections_check_their_bounds_when_built_directly():
    with pytest.raises(ValueError, match="drift_window_size must be >= 10"):
        sections.MonitoringSection(drift_window_size=3)
    with pytest.raises(ValueError, match="dicom_results"):
        sections.DicomSection(dicom_results=("sr", "pdf"))
    assert "k-123" not in repr(sections.ServingSection(service_api_key="k-123"))


def test_split_ratios_from_the_environment_reach_the_dagster_job_and_cxr_split(
    tiny_synthetic, tmp_path, monkeypatch
):
    """The bug this configuration road fixes: the Dagster asset hard-coded 70/15/15."""
    monkeypatch.setenv("CXR_SPLIT_RATIOS", "[0.6, 0.2, 0.2]")
    monkeypatch.setenv("CXR_SEED", "5")
    settings = load_settings(home=tmp_path / "home", data_dir=tiny_synthetic, workers=1)
    assert settings.data.split_ratios == (0.6, 0.2, 0.2)
    result = (
        build_definitions(settings)
        .resolve_job_def(DATA_JOB)
        .execute_in_process(instance=dg.DagsterInstance.ephemeral())
    )
    assert result.success
    from_dagster = result.output_for_node("patient_splits")
    ratios = [
        e.materialization.metadata["ratios"].value
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey("patient_splits")
    ]
    assert ratios == [[0.6, 0.2, 0.2]]

    out = tmp_path / "split.csv"
    command = [sys.executable, "-m", "cxr_platform.cli", "split", str(tiny_synthetic)]
    cli = subprocess.run(
        [*command, "--out", str(out), "--workers", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, "CXR_HOME": str(tmp_path / "cli-home")},
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    from_cli = pd.read_csv(out)
    assert manifest_hash(from_cli) == manifest_hash(from_dagster)
    # 60/20/20 of the patients, not the 70/15/15 default.
    shares = from_cli.groupby("split")["patient_id"].nunique() / from_cli["patient_id"].nunique()
    assert abs(shares["train"] - 0.6) < 0.08 and abs(shares["test"] - 0.2) < 0.08


_STDLIB_ONLY_PROBE = """
import importlib.abc, sys
BLOCKED = {"pydantic", "pydantic_settings", "pydicom", "dagster", "mlflow", "bentoml",
           "evidently", "highdicom", "pynetdicom"}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("the accelerator machine has no " + name)
sys.meta_path.insert(0, Refuse())
import cxr_platform.models.training, cxr_platform.models.zoo, cxr_platform.models.evaluation
import cxr_platform.data.cache, cxr_platform.data.transforms, cxr_platform.data.preprocessing
from cxr_platform.sections import TrainingSection
print(TrainingSection().profile)
"""


def test_training_imports_without_the_rest_of_the_stack():
    """The accelerator machine has torch but not pydicom, pydantic-settings or Dagster; the
    training code also keeps clear of pydantic, which the issue asks of models/."""
    result = subprocess.run(
        [sys.executable, "-c", _STDLIB_ONLY_PROBE], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "demo"


def test_cxr_config_masks_a_password_a_url_carries_and_dagster_needs_psycopg2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        {
            "CXR_HOME": str(tmp_path),
            "CXR_INFERENCE_LOG_URL": "postgresql+psycopg://cxr:s3cret@db:5432/cxr",
            "CXR_DAGSTER_POSTGRES_URL": "postgresql://dagster@db:5432/dagster",
        }
    )
    command = [sys.executable, "-m", "cxr_platform.cli", "config", "--json"]
    shown = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "s3cret" not in shown.stdout
    masked = "postgresql+psycopg://cxr:**********@db:5432/cxr"
    assert json.loads(shown.stdout)["monitoring"]["inference_log_url"] == masked
    assert json.loads(shown.stdout)["registry"]["lock_url"] is None  # the log's, by default

    # Dagster's PostgreSQL storage fails late and obscurely on psycopg 3: refused up front.
    command = [sys.executable, "-m", "cxr_platform.cli", "demo", "--no-loop"]
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2
    assert "must name the psycopg2 driver" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_one_salt_setting_hashes_a_study_alike_in_every_home(tmp_path, monkeypatch):
    """Replicas each have their own home (an emptyDir): with CXR_UID_SALT set alike they hash a
    study alike, so feedback, recalibration and the silent trial group it as one study."""
    from cxr_platform.redaction import hash_uid, uid_salt

    study = "1.2.826.0.1.3680043.8.498.1"
    salt = "0f" * 20
    first = load_settings(home=tmp_path / "a", uid_salt=salt).serving
    second = load_settings(home=tmp_path / "b", uid_salt=salt).dicom
    assert hash_uid(study, uid_salt(first.home, first.uid_salt)) == hash_uid(
        study, uid_salt(second.home, second.uid_salt)
    )
    # Unset, each home makes its own: the failure the setting exists for.
    alone = [load_settings(home=tmp_path / name).serving for name in ("c", "d")]
    assert len({hash_uid(study, uid_salt(s.home, s.uid_salt)) for s in alone}) == 2
    with pytest.raises(ValueError, match="at least 32"):
        uid_salt(tmp_path, "short")
    # Refused where the settings are read: one line, exit 2, before anything is hashed with it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update({"CXR_HOME": str(tmp_path / "f"), "CXR_UID_SALT": "tooshortsecret"})
    command = [sys.executable, "-m", "cxr_platform.cli", "config"]
    short = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert short.returncode == 2 and "CXR_UID_SALT must be at least 32" in short.stderr
    assert "Traceback" not in short.stderr and "tooshortsecret" not in short.stderr
    # From a file (a mounted secret), never both ways at once.
    secret = tmp_path / "uid_salt"
    secret.write_text(salt + "\n")
    monkeypatch.setenv("CXR_UID_SALT_FILE", str(secret))
    assert load_settings(home=tmp_path / "e").monitoring.uid_salt == salt
    # A child process the platform starts inherits the _FILE variable and is handed the value
    # its parent read: the same secret twice is one secret; two different ones are refused.
    monkeypatch.setenv("CXR_UID_SALT", salt)
    assert load_settings(home=tmp_path / "e").monitoring.uid_salt == salt
    monkeypatch.setenv("CXR_UID_SALT", "1e" * 20)
    with pytest.raises(Exception, match="CXR_UID_SALT and CXR_UID_SALT_FILE disagree"):
        load_settings(home=tmp_path / "e")


def test_every_writer_of_the_log_reads_the_salt_setting():
    """Every place that makes the salt passes the configured one along with the home."""
    import re

    calls = []
    for path in (REPO_ROOT / "cxr_platform").rglob("*.py"):
        calls += re.findall(r"\buid_salt\(([^()]*(?:\([^()]*\))?[^()]*)\)", path.read_text())
    made = [call for call in calls if not call.startswith("home")]  # the definition
    assert len(made) >= 5
    assert all(call.count(",") == 1 and "uid_salt" in call for call in made), made


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CXR_SERVICE_API_KEY", "change-me"),
        ("CXR_DICOM_WEB_KEYS", "ORTHANC=CHANGE_ME"),
        ("CXR_DICOM_DESTINATION_DICOMWEB_AUTH", "Bearer replace-me"),
    ],
)
def test_a_placeholder_secret_is_refused_by_name(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(Exception, match=f"{variable} holds a placeholder") as refused:
        load_settings()
    assert value not in str(refused.value)


def test_the_ensemble_is_built_on_real_data_and_left_out_of_the_demo(tmp_path):
    """Unset, CXR_ENSEMBLE follows the profile: the release on a data folder combines its models
    (benchmarks/RESULTS.md, issue 45), the demo keeps its few minutes; set, it decides."""
    real = {"home": tmp_path, "data_dir": tmp_path}
    assert load_settings(**real).training.combines_models
    assert not load_settings(**real, models=("baseline_cnn",)).training.combines_models
    assert not load_settings(**real, ensemble=False).training.combines_models
    assert not load_settings(home=tmp_path).training.combines_models
    assert load_settings(home=tmp_path, ensemble=True).training.combines_models
    with pytest.raises(Exception, match="ensemble needs two models or more"):
        load_settings(home=tmp_path, ensemble=True, models=("baseline_cnn",))
