from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxr_platform.data.sources import discover_images
from cxr_platform.errors import DatasetLayoutError, LabelsFileError
from cxr_platform_tests.data.dicom_factory import make_dicom, to_bytes


def _png(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def test_kaggle_split_folders_are_pooled_and_patients_not_namespaced(tmp_path):
    _png(tmp_path / "train/NORMAL/IM-0001-0001.jpeg")
    _png(tmp_path / "train/PNEUMONIA/person1_virus_1.jpeg")
    _png(tmp_path / "test/PNEUMONIA/person1_bacteria_7.jpeg")  # same person number elsewhere
    _png(tmp_path / "val/NORMAL/NORMAL2-IM-0002-0001.jpeg")
    (tmp_path / "train/NORMAL/.DS_Store").write_bytes(b"finder metadata")  # hidden: ignored
    index = discover_images(tmp_path)
    assert index.layout == "kaggle-splits"
    assert index.n_images == 4
    person1 = index.records[index.records["patient_id"] == "person1"]
    assert set(person1["source_folder"]) == {"train/PNEUMONIA", "test/PNEUMONIA"}


def test_plain_class_folders_any_case(tmp_path):
    _png(tmp_path / "normal/a.png")
    _png(tmp_path / "Pneumonia/b.png")
    index = discover_images(tmp_path)
    assert index.layout == "class-folders"
    assert sorted(index.records["label"]) == ["NORMAL", "PNEUMONIA"]
    assert index.records["patient_source"].eq("fallback").all()


def test_dicom_folder_with_labels_by_uid_and_patient_from_header(tmp_path):
    pixels = np.zeros((8, 8), dtype=np.uint16)
    uids = []
    for i, patient in enumerate(["A", "A", "B"]):
        ds = make_dicom(pixels, patient_id=patient)
        (tmp_path / "studies").mkdir(exist_ok=True)
        (tmp_path / "studies" / f"img{i}.dcm").write_bytes(to_bytes(ds))
        uids.append(ds.SOPInstanceUID)
    (tmp_path / "labels.csv").write_text(
        "sop_instance_uid,label\n"
        + "".join(f"{u},{lab}\n" for u, lab in zip(uids, ["1", "1", "0"], strict=True))
    )
    index = discover_images(tmp_path)
    assert index.layout == "labels-csv"
    records = index.records.set_index("relative_path")
    assert records.loc["studies/img0.dcm", "patient_id"] == "A"
    assert records.loc["studies/img2.dcm", "label"] == "NORMAL"
    assert (index.records["patient_source"] == "dicom").all()


def test_labels_csv_by_file_name(tmp_path):
    _png(tmp_path / "x/person3_virus_1.png")
    (tmp_path / "labels.csv").write_text("file,label\nx/person3_virus_1.png,pneumonia\n")
    record = discover_images(tmp_path).records.iloc[0]
    assert (record["label"], record["patient_id"], record["patient_source"]) == (
        "PNEUMONIA",
        "person3",
        "filename",
    )


def test_bad_labels_are_reported_with_line_number(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("file,label\na.png,maybe\n")
    with pytest.raises(LabelsFileError, match=r"labels.csv:2: unknown label 'maybe'"):
        discover_images(tmp_path)


def test_unrecognised_folder_names_the_accepted_layouts(tmp_path):
    _png(tmp_path / "images/a.png")
    with pytest.raises(DatasetLayoutError, match=r"\{train,val,test\}/\{NORMAL,PNEUMONIA\}"):
        discover_images(tmp_path)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        discover_images(tmp_path / "missing")
