from __future__ import annotations

import pytest

from cxr_platform.data.patients import FALLBACK_PREFIX, patient_from_filename
from cxr_platform.data.sources import discover_images

KNOWN = [
    ("person1_bacteria_1.jpeg", "person1"),
    ("person1000_virus_1681.jpeg", "person1000"),
    ("PERSON12_VIRUS_3.JPEG", "person12"),
    ("person447_virus_921_1.jpeg", "person447"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("IM-0001-0001-0002.jpeg", "IM-0001"),
    ("NORMAL2-IM-0381-0001.jpeg", "NORMAL2-IM-0381"),
    ("NORMAL2-IM-0395-0001-0002.jpeg", "NORMAL2-IM-0395"),
    ("train/NORMAL/IM-0117-0001.jpeg", "IM-0117"),
]


@pytest.mark.parametrize(("name", "patient"), KNOWN)
def test_known_kaggle_names(name, patient):
    identity = patient_from_filename(name)
    assert identity.patient_id == patient
    assert identity.from_filename


def test_normal2_is_not_confused_with_im():
    assert patient_from_filename("NORMAL2-IM-0115-0001.jpeg").patient_id != "IM-0115"


@pytest.mark.parametrize("name", ["scan_42.png", "person_bacteria.jpeg", "IM-12.jpeg", "x.dcm"])
def test_unknown_names_fall_back_to_one_patient_per_image(name):
    identity = patient_from_filename(name)
    assert not identity.from_filename
    assert identity.patient_id == FALLBACK_PREFIX + name


@pytest.mark.real_data
def test_every_real_kaggle_name_has_a_patient(kaggle_dir):
    records = discover_images(kaggle_dir).records
    assert len(records) == 5216
    assert (records["patient_source"] == "filename").all()
    # Kaggle pneumonia patients have several images each; normal mostly one.
    per_patient = records.groupby("patient_id").size()
    assert per_patient.max() > 10 and records["patient_id"].nunique() < len(records)
