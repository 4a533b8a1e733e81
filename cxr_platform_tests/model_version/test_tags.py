"""Registry version tags: one record, written and read the same way."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_platform.model_version.tags import VersionTags, record_json


def test_a_release_record_round_trips_through_mlflows_string_tags():
    release = VersionTags(
        model_name="resnet18",
        arch="resnet18",
        threshold=0.3125,
        threshold_rule="sensitivity_target",
        preprocessing={"image_size": 224, "mean": 0.5},
        data_version="abc123",
        parity_onnx_max_abs_diff=2.5e-6,
        int8="refused",
        int8_val_auc_change=-0.013,
        labeled_examples=64,
        metrics={"test_auc": 0.9531, "test_sensitivity": 0.97},
        replaced_version="",
        gate={"passed": True, "checks": [{"name": "auc", "value": 0.95}]},
    )
    tags = release.to_tags()
    assert all(isinstance(v, str) for v in tags.values())
    # The names and formats already stored in existing registries.
    assert tags["cxr.threshold"] == "0.3125"
    assert json.loads(tags["cxr.preprocessing"]) == {"image_size": 224, "mean": 0.5}
    assert tags["cxr.metric.test_auc"] == "0.9531"
    assert tags["cxr.replaced_version"] == ""
    assert "cxr.data_dir" not in tags  # None is not written
    assert VersionTags.from_tags(tags) == release


def test_foreign_and_damaged_tags_are_left_out_not_fatal():
    read = VersionTags.from_tags(
        {
            "cxr.threshold": "not-a-number",
            "cxr.gate": '{"passed": tr',  # cut at MLflow's tag length limit
            "cxr.metric.test_auc": "0.9",
            "cxr.metric.broken": "n/a",
            "mlflow.user": "someone",
            "cxr.something_new": "from a later version",
        }
    )
    assert read.threshold is None and read.gate is None
    assert read.metrics == {"test_auc": 0.9}


def test_updated_writes_the_other_records_fields_over_this_one():
    base = VersionTags(model_name="a", metrics={"test_auc": 0.9})
    lineage = VersionTags(finetuned_from="3", metrics={"best_val_auc": 0.8})
    merged = base.updated(lineage)
    assert merged.model_name == "a" and merged.finetuned_from == "3"
    assert merged.metrics == {"test_auc": 0.9, "best_val_auc": 0.8}


def test_a_gate_decided_on_numpy_figures_is_written_as_plain_json():
    """The site gate's checks come out of numpy (a bool from a comparison, a float64 bound);
    the record holds them as JSON's own values and reads them back."""
    gate = {
        "passed": np.bool_(True),
        "checks": [
            {
                "name": "site_specificity_gain",
                "passed": np.bool_(False),
                "value": np.float64(0.0125),
                "limit": 0.02,
                "n": np.int64(26),
            }
        ],
    }
    tags = VersionTags(gate=gate).to_tags()
    assert VersionTags.from_tags(tags).gate == {
        "passed": True,
        "checks": [
            {
                "name": "site_specificity_gain",
                "passed": False,
                "value": 0.0125,
                "limit": 0.02,
                "n": 26,
            }
        ],
    }
    with pytest.raises(TypeError, match="set"):
        record_json({"not a record": {1, 2}})
