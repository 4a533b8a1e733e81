"""The Dagster batch path: a folder scored from the launchpad through the scoring core, with the
version's intended use enforced as on every other path."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
from PIL import Image

from cxr_platform.defs.batch_assets import BATCH_JOB
from cxr_platform.defs.definitions import build_definitions
from cxr_platform.deployment.pipeline import register_exported, registry_for
from cxr_platform.inference.log import InferenceLog
from cxr_platform.settings import load_settings
from cxr_platform_tests.conftest import other_population_images
from cxr_platform_tests.deployment.conftest import export_for_registry
from cxr_platform_tests.synthetic_dicom import RadiographSpec, radiograph_dataset


def test_a_folder_scored_from_dagster_refuses_patients_outside_the_intended_use(
    trained_checkpoint, learnable_cache, other_population, tiny_synthetic, tmp_path
):
    settings = load_settings(home=tmp_path / "home", models=("baseline_cnn",))
    exported = export_for_registry(
        settings, trained_checkpoint, learnable_cache, tmp_path / "x", "cxr", other_population
    )
    info = register_exported(settings.registry, exported, triggered_by="test", shadow=False)
    registry_for(settings.registry).promote(info.version, triggered_by="test")

    folder = tmp_path / "to-score"
    folder.mkdir()
    pngs = sorted((tiny_synthetic / "NORMAL").glob("*.png"))[:3]
    for png in pngs:
        (folder / png.name).write_bytes(png.read_bytes())
    pixels = np.asarray(Image.open(pngs[0]).convert("L"))
    adult = radiograph_dataset(pixels, RadiographSpec(patient_age="081Y"))
    adult.save_as(folder / "adult.dcm", enforce_file_format=True)
    # The test population the model is not for, as PNG with no age anywhere: refused by pixels.
    (other,) = sorted(other_population_images(tiny_synthetic, tmp_path / "others", 1).iterdir())
    (folder / "other.png").write_bytes(other.read_bytes())
    ages = tmp_path / "ages.csv"
    ages.write_text(f"path,patient_age\n{folder / pngs[1].name},45\n{folder / pngs[2].name},4\n")

    result = (
        build_definitions(settings)
        .resolve_job_def(BATCH_JOB)
        .execute_in_process(
            run_config={
                "ops": {
                    "batch_predictions": {
                        "config": {
                            "inputs": [str(folder)],
                            "ages_csv": str(ages),
                            "site": "north",
                        }
                    }
                }
            },
            instance=dg.DagsterInstance.ephemeral(),
        )
    )
    assert result.success
    output = result.output_for_node("batch_predictions")
    assert output["refused"] == {"outside_intended_use": 3}
    assert output["n_predicted"] == 2 and output["n_files"] == 5
    assert rows_error(output["csv"], folder / "other.png").startswith(
        "outside_intended_use: unlike_the_training_population"
    )
    rows = pd.read_csv(output["csv"]).set_index("path")
    assert rows.loc[str(folder / "adult.dcm"), "error"].startswith(
        "outside_intended_use: patient_age: patient age 81 years (PatientAge)"
    )
    assert "45 years (caller)" in rows.loc[str(folder / pngs[1].name), "error"]
    refusals = InferenceLog(settings.serving.inference_log_uri).refusals()
    assert list(refusals["reason"]) == ["outside_intended_use"] * 3
    assert set(refusals["source"]) == {"batch"} and set(refusals["site"]) == {"north"}


def rows_error(csv_path: str, path) -> str:
    return str(pd.read_csv(csv_path).set_index("path").loc[str(path), "error"])
