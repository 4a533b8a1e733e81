"""The objects returned to PACS, built from real model output on realistic radiographs:
valid by dciodvfy, rendered by dsrdump, and equal to the prediction when read back."""

from __future__ import annotations

import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from cxr_platform.deployment.registry import registry_for
from cxr_platform.inference.explainer import content_region
from cxr_platform.inference.live import LiveModels
from cxr_platform.inference.log import InferenceLog
from cxr_platform.model_version.predictor import Predictor
from cxr_platform.pacs.processing import InstanceProcessor, ProcessorConfig
from cxr_platform.pacs.results import (
    ABSENT,
    NOT_FOR_DIAGNOSIS_ALONE,
    PMAP_LEVELS,
    PNEUMONIA,
    PRESENT,
    SEG_RELEVANCE_THRESHOLD,
    Algorithm,
    heatmap_on_source_grid,
)
from cxr_platform.pacs.screening import screen
from cxr_platform.redaction import hash_uid, uid_salt

from .conftest import VARIANTS, dciodvfy_errors, radiograph_bytes, require_tool


@pytest.fixture(scope="module")
def processor(pacs_model):
    settings = pacs_model.settings
    registry = registry_for(settings.registry)
    models = LiveModels(registry)
    models.refresh()
    return InstanceProcessor(
        models,
        InferenceLog(settings.dicom.inference_log_uri),
        uid_salt=uid_salt(settings.home),
        model_folder=registry.download,
        config=ProcessorConfig(),
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_results_are_valid_dicom_and_say_what_the_model_said(
    variant, processor, pacs_model, chest_pngs, tmp_path
):
    source, data = radiograph_bytes(chest_pngs[3], VARIANTS[variant])
    assert screen(source, own_manufacturer="cxr_platform").accepted
    processed = processor.process(data)
    prediction = processed.prediction

    # The single predictor: the same bytes through the platform's Predictor give the same answer.
    folder = registry_for(pacs_model.settings.registry).download(pacs_model.version)
    direct = Predictor(folder).predict(data)
    assert prediction.probability == pytest.approx(direct.probability, abs=1e-6)
    assert prediction.label == direct.label
    assert prediction.model_version == pacs_model.version

    results = processed.results
    paths = {}
    kinds = {"sr": results.sr, "seg": results.seg, "pmap": results.pmap, "sc": results.sc}
    for kind, ds in kinds.items():
        assert ds is not None
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.SOPInstanceUID != source.SOPInstanceUID
        assert ds.PatientID == source.PatientID
        (equipment,) = [
            item
            for item in ds.ContributingEquipmentSequence
            if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing
            and item.Manufacturer == "cxr_platform"
        ]
        assert pacs_model.version in " ".join(equipment.SoftwareVersions)
        algorithm = Algorithm("cxr", pacs_model.version, prediction.threshold)
        assert equipment.DeviceUID == algorithm.device_uid
        paths[kind] = tmp_path / f"{kind}.dcm"
        ds.save_as(paths[kind], enforce_file_format=True)
        assert dciodvfy_errors(paths[kind]) == [], f"{kind} of {variant}"

    # SR: TID 1500 content, read back with highdicom.
    sr = hd.sr.srread(paths["sr"])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.VerificationFlag == "UNVERIFIED"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    group = groups[0]
    assert group.finding_type == PNEUMONIA
    (probability,) = group.get_measurements(name=codes.DCM.Probability)
    assert probability.value == pytest.approx(prediction.probability, abs=1e-6)
    assert probability.unit == codes.UCUM.NoUnits
    (finding,) = group.get_qualitative_evaluations(name=PNEUMONIA)
    assert finding.value == (PRESENT if prediction.label == "PNEUMONIA" else ABSENT)
    rendered = subprocess.run(
        [require_tool("dsrdump"), str(paths["sr"])], capture_output=True, text=True, check=True
    ).stdout
    assert "Imaging Measurement Report" in rendered
    assert "Pneumonia" in rendered
    assert "Device Observer UID" in rendered
    assert f'"Algorithm Version")="cxr v{pacs_model.version}"' in rendered
    assert f"{prediction.probability:.6f}".rstrip("0")[:6] in rendered
    # The probability is inferred from the whole image, as a region a viewer can place.
    (region,) = [item for item in sr.iterall() if item.keyword == "GraphicData"]
    corners = {(x, y) for x, y in zip(region.value[::2], region.value[1::2], strict=True)}
    assert corners == {(0, 0), (source.Columns, 0), (source.Columns, source.Rows), (0, source.Rows)}
    # The same report in words, for a reader whose viewer does not render coded content.
    texts = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]
    finding_words = "present" if prediction.label == "PNEUMONIA" else "absent"
    assert f"AI: pneumonia {finding_words}" in texts
    assert (
        f"probability {prediction.probability:.3f}, threshold {prediction.threshold:.3f}" in texts
    )
    assert any(t.startswith(f"model cxr v{pacs_model.version} (cxr_platform ") for t in texts)
    assert NOT_FOR_DIAGNOSIS_ALONE in texts

    # What a reading environment needs to place and trust each result (IHE AIR): the
    # algorithm's name, version and maker, the evidence it was made from, and a series
    # description in a reader's words.
    for kind, ds in kinds.items():
        assert ds.Manufacturer == "cxr_platform"
        assert ds.ManufacturerModelName == "cxr_platform pneumonia classifier (cxr)"
        assert f"cxr v{pacs_model.version}" in list(ds.SoftwareVersions)
        assert ds.SeriesDescription.startswith("AI: ") and len(ds.SeriesDescription) <= 64
        assert "not for diagnos" in ds.SeriesDescription.lower(), kind

    # SEG: one binary frame on the source's grid, referencing the source: where the heatmap
    # reaches half its peak, in the colour and with the algorithm a viewer shows.
    # pydicom, not highdicom's segread: segread insists on SliceThickness in the pixel measures,
    # which a projection radiograph (DX with PixelSpacing) does not have and the IOD does not need.
    seg = pydicom.dcmread(paths["seg"])
    assert seg.SegmentationType == "BINARY"
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    assert int(seg.NumberOfFrames) == 1
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[
        0
    ].ReferencedSOPInstanceUID == (source.SOPInstanceUID)
    (segment,) = seg.SegmentSequence
    assert len(segment.RecommendedDisplayCIELabValue) == 3
    algorithm_id = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm_id.AlgorithmVersion == f"cxr v{pacs_model.version}"
    explainer = processor._explainer(pacs_model.version, processor.models.current().production)
    prepared = explainer.predictor.prepare(data)
    heatmap, _ = explainer.heatmap_overlay(prepared.pixels, prepared.decoded)
    content = content_region(
        heatmap, prepared.decoded.pixels.shape, explainer.predictor.preprocessing
    )
    expected = heatmap_on_source_grid(content, int(source.Rows), int(source.Columns))
    region = seg.pixel_array.astype(bool)
    assert region.any() and not region.all()
    assert (region == (expected >= SEG_RELEVANCE_THRESHOLD)).mean() > 0.999
    # The SEG and the map lie in one frame of reference of their own, in the plane a viewer
    # gives a radiograph without geometry (rows +x, columns +y).
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    assert [float(v) for v in orientation.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]

    # Parametric map: the same heatmap as 32-bit float relevance in steps of 1/1024, with an
    # identity real-world value mapping; highdicom reads it back as a parametric map.
    pmap = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(paths["pmap"]))
    assert (pmap.Rows, pmap.Columns) == (source.Rows, source.Columns)
    assert pmap.FrameOfReferenceUID == seg.FrameOfReferenceUID
    mapping = pmap.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert (
        mapping.LUTLabel == "GRADCAM" and mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    )
    assert pmap.BitsAllocated == 32 and "FloatPixelData" in pmap
    relevance = pmap.pixel_array.astype(np.float64) * float(mapping.RealWorldValueSlope) + float(
        mapping.RealWorldValueIntercept
    )
    assert np.abs(relevance - expected).max() <= 0.5 / PMAP_LEVELS + 1e-6
    derivation = pmap.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    # SC: derived, burned-in caption, RGB at the source's size.
    sc = pydicom.dcmread(paths["sc"])
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES"
    assert sc.PhotometricInterpretation == "RGB"
    assert (sc.Rows, sc.Columns) == (source.Rows, source.Columns)
    assert "NOT FOR DIAGNOSTIC USE" in sc.SeriesDescription
    band = sc.pixel_array[: sc.Rows // 20]
    assert (band == 255).all(axis=-1).any(), "the caption's white text is burned into the top"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    # The node's results never pass its own screening (no loop back into the AI).
    for kind in kinds:
        verdict = screen(pydicom.dcmread(paths[kind]), own_manufacturer="cxr_platform")
        assert not verdict.accepted

    # The inference log has the row, with hashed UIDs only.
    rows = InferenceLog(pacs_model.settings.dicom.inference_log_uri).records()
    (row,) = rows[rows["request_id"] == processed.request_id].to_dict("records")
    assert row["source"] == "dicom"
    salt = uid_salt(pacs_model.settings.home)
    assert row["sop_instance_uid_hash"] == hash_uid(source.SOPInstanceUID, salt)
    assert row["study_uid_hash"] == hash_uid(source.StudyInstanceUID, salt)
    assert source.SOPInstanceUID not in str(row)


def test_result_uids_are_stable_per_instance_and_model_version(processor, chest_pngs):
    source, data = radiograph_bytes(chest_pngs[0], VARIANTS["cr-mono2-12bit"])
    first = processor.process(data).results
    again = processor.process(data).results
    assert [d.SOPInstanceUID for d in first.datasets()] == [
        d.SOPInstanceUID for d in again.datasets()
    ]
    assert len({d.SeriesInstanceUID for d in first.datasets()}) == 4
    one = Algorithm("resnet18", "3", 0.5)
    two = Algorithm("resnet18", "4", 0.5)
    assert one.device_uid != two.device_uid
    assert one.device_uid == Algorithm("resnet18", "3", 0.7).device_uid


def _returning(processor: InstanceProcessor, kinds: tuple[str, ...]) -> InstanceProcessor:
    return InstanceProcessor(
        processor.models,
        processor.inference_log,
        uid_salt=processor.uid_salt,
        model_folder=processor.model_folder,
        config=ProcessorConfig(results=kinds),
    )


def test_results_can_be_switched_off(pacs_model, processor, chest_pngs):
    _, data = radiograph_bytes(chest_pngs[1], VARIANTS["cr-mono2-12bit"])
    results = _returning(processor, ("sr",)).process(data).results
    assert results.sr is not None and results.seg is None and results.sc is None
    assert results.pmap is None
    results = _returning(processor, ("pmap",)).process(data).results
    assert [d.SOPClassUID for d in results.datasets()] == ["1.2.840.10008.5.1.4.1.1.30"]
    with pytest.raises(ValueError, match="unknown result kinds"):
        ProcessorConfig(results=("sr", "pdf"))
