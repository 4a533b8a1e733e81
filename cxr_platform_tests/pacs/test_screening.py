"""Which received objects the node takes in, and the reason it gives for the others."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    SegmentationStorage,
)

from cxr_platform.pacs.screening import claims_chest, screen
from cxr_platform_tests.synthetic_dicom import RadiographSpec, radiograph_dataset

OURS = "cxr_platform"


def chest(**changes) -> Dataset:
    ds = radiograph_dataset(np.full((64, 48), 128, np.uint8), RadiographSpec(modality="CR"))
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def test_frontal_chest_radiographs_are_classified():
    assert screen(chest(), own_manufacturer=OURS).accepted
    assert screen(
        chest(ViewPosition="AP", BodyPartExamined="THORAX"), own_manufacturer=OURS
    ).accepted
    dx = radiograph_dataset(np.zeros((32, 32), np.uint8), RadiographSpec(modality="DX"))
    assert screen(dx, own_manufacturer=OURS).accepted
    # Many CR readers send no body part at all: that is not a reason to ignore an image.
    assert screen(chest(BodyPartExamined=None), own_manufacturer=OURS).accepted


@pytest.mark.parametrize(
    ("sop_class", "name"),
    [
        (Comprehensive3DSRStorage, "Comprehensive 3D SR"),
        (SegmentationStorage, "Segmentation"),
        (GrayscaleSoftcopyPresentationStateStorage, "Presentation State"),
        (KeyObjectSelectionDocumentStorage, "Key Object Selection"),
        (CTImageStorage, "CT Image"),
    ],
)
def test_non_radiograph_objects_are_ignored_with_their_class_named(sop_class, name):
    verdict = screen(chest(SOPClassUID=sop_class), own_manufacturer=OURS)
    assert not verdict.accepted
    assert verdict.reason.startswith("not a radiograph")
    assert name in verdict.reason


def test_the_body_part_never_decides_it_only_says_whether_a_refusal_is_answered():
    # The header's body part is evidence for the pixel gate's answer, not a verdict: a "HAND"
    # header on what may well be a chest film (or an abdomen code) is let through to be judged.
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = (
        "818983003",
        "SCT",
        "Abdomen",
    )
    hand = chest(BodyPartExamined="HAND")
    by_code = chest(BodyPartExamined=None, AnatomicRegionSequence=[region])
    assert screen(hand, own_manufacturer=OURS).accepted
    assert screen(by_code, own_manufacturer=OURS).accepted
    assert not claims_chest(hand) and not claims_chest(by_code)
    assert not claims_chest(chest(BodyPartExamined=None))
    assert claims_chest(chest()) and claims_chest(chest(BodyPartExamined="THORAX"))


def test_lateral_views_are_ignored_unless_configured():
    lateral = chest(ViewPosition="LL")
    verdict = screen(lateral, own_manufacturer=OURS)
    assert not verdict.accepted and "lateral" in verdict.reason
    assert screen(lateral, own_manufacturer=OURS, accept_lateral=True).accepted
    view = Dataset()
    view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning = "260412", "SCT", "lateral"
    assert not screen(
        chest(ViewPosition=None, ViewCodeSequence=[view]), own_manufacturer=OURS
    ).accepted


def test_a_secondary_capture_without_a_body_part_is_judged_by_its_pixels():
    # The way a large public chest X-ray collection is distributed: SC, no body part.
    sc = "1.2.840.10008.5.1.4.1.1.7"
    assert screen(chest(SOPClassUID=sc), own_manufacturer=OURS).accepted
    assert screen(chest(SOPClassUID=sc, BodyPartExamined=None), own_manufacturer=OURS).accepted


def test_the_nodes_own_results_are_never_classified_again():
    verdict = screen(chest(Manufacturer=OURS), own_manufacturer=OURS)
    assert not verdict.accepted and "result of this node" in verdict.reason


def test_images_the_model_cannot_read_are_ignored_before_spooling():
    assert "pixel data" in screen(chest(PixelData=None), own_manufacturer=OURS).reason
    assert "multi-frame" in screen(chest(NumberOfFrames=4), own_manufacturer=OURS).reason
