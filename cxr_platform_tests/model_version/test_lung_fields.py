"""What a lung fields version says about one image, on drawn fields with known answers: the
area and border shares, the limits fitted on images whose lungs are in the picture, the
findings when they are not, and the share of a heatmap's relevance inside the fields."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_platform.model_version.lung_fields import (
    LUNGS_BROKEN,
    LUNGS_CUT,
    LUNGS_ONE_SIDED,
    LUNGS_SMALL,
    FieldLimits,
    LungFields,
    crop_to_boxes,
    field_measures,
    fit_field_limits,
    lung_crop_boxes,
)

SIZE = 100


def _lungs(top: int = 20, bottom: int = 80, left: int = 15, right: int = 85) -> np.ndarray:
    """Two rectangular fields with a mediastinum between them."""
    mask = np.zeros((SIZE, SIZE), bool)
    mask[top:bottom, left:right] = True
    mask[:, 45:55] = False
    return mask


def _speckled(seed: int = 0) -> np.ndarray:
    """What a segmenter draws on an image it does not understand: fields in pieces."""
    return np.random.default_rng(seed).random((SIZE, SIZE)) < 0.3


def test_measures_of_drawn_fields():
    measures = field_measures(np.stack([_lungs(), _lungs(bottom=SIZE), _speckled()]))
    assert measures.area_share[0] == pytest.approx(60 * 60 / SIZE**2)
    assert measures.side_share[0] == 0.0
    assert measures.side_share[1] == pytest.approx(0.6)  # 60 of the bottom row's 100 pixels
    # Two 60 x 30 fields: 2 x 176 boundary pixels over the square root of 3600.
    assert measures.raggedness[0] == pytest.approx(352 / 60)
    assert measures.raggedness[2] > 4 * measures.raggedness[0]
    assert measures.balance[0] == 1.0 and measures.balance[1] == 1.0
    assert field_measures(np.zeros((1, SIZE, SIZE), bool)).raggedness[0] == 0.0


def test_limits_from_fields_in_the_picture_flag_small_cut_and_broken_fields():
    rng = np.random.default_rng(0)
    typical = [
        _lungs(top=int(rng.integers(15, 25)), bottom=int(rng.integers(75, 85))) for _ in range(200)
    ]
    limits = fit_field_limits(field_measures(np.stack(typical)))
    assert limits.fitted_on["images"] == 200
    assert limits.max_side_share == 0.05  # none touched the border: the floor holds
    assert limits.min_balance == 0.5  # all symmetric: the cap holds
    assert limits.min_area_share == pytest.approx(0.75 * limits.fitted_on["area_share_p1"])

    assert LungFields(typical[0], "1", limits).findings == ()
    collimated = LungFields(_lungs(top=40, bottom=65, left=30, right=70), "1", limits)
    assert collimated.findings == (LUNGS_SMALL,)
    cropped = LungFields(_lungs(top=0, bottom=60), "1", limits)
    assert cropped.findings == (LUNGS_CUT,)
    assert LUNGS_BROKEN in LungFields(_speckled(), "1", limits).findings
    one_lung = _lungs()
    one_lung[:, 50:] = False
    assert LUNGS_ONE_SIDED in LungFields(one_lung, "1", limits).findings  # and small
    assert LungFields(_lungs(top=0, bottom=SIZE), "1", None).findings == ()  # no limits: none

    restored = FieldLimits.from_dict(limits.to_dict())
    assert restored == limits
    with pytest.raises(ValueError, match="no images"):
        fit_field_limits(field_measures(np.zeros((0, SIZE, SIZE), bool)))


def test_relevance_inside_the_fields():
    fields = LungFields(_lungs(), "3")
    heatmap = np.zeros((SIZE, SIZE), np.float32)
    assert fields.relevance_inside(heatmap) is None  # a map with no relevance points nowhere
    heatmap[30:40, 20:30] = 1.0  # inside the left field
    heatmap[0:10, 0:10] = 1.0  # a shoulder
    heatmap[50:60, 48:52] = -1.0  # negative relevance is not relevance
    assert fields.relevance_inside(heatmap) == pytest.approx(0.5)
    summary = fields.summary(heatmap)
    assert summary == {
        "lung_fields_version": "3",
        "lung_area_share": pytest.approx(0.36),
        "lung_field_findings": [],
        "relevance_in_lungs": 0.5,
    }
    with pytest.raises(ValueError, match="differ"):
        fields.relevance_inside(np.zeros((10, 10)))


def test_the_crop_box_is_a_square_around_the_fields_with_a_margin_and_stays_in_the_image():
    # Fields 60 rows by 70 columns: the box is 70 * 1.2 = 84 on a side, centred on them.
    boxes = lung_crop_boxes(np.stack([_lungs(), _lungs(top=0, bottom=60, left=0, right=70)]))
    left, top, right, bottom = boxes[0]
    assert right - left == bottom - top == 84
    assert (left + right) / 2 == pytest.approx(50, abs=1)
    assert (top + bottom) / 2 == pytest.approx(50, abs=1)
    # Fields against the top-left corner: the box keeps its size and moves inside the image.
    assert tuple(boxes[1]) == (0, 0, 84, 84)


def test_no_crop_without_fields_to_place_it_on():
    few = np.zeros((SIZE, SIZE), bool)
    few[10:12, 10:12] = True
    assert [tuple(box) for box in lung_crop_boxes(np.stack([few, ~few & False]))] == [
        (0, 0, SIZE, SIZE)
    ] * 2


def test_cropping_brings_the_box_back_to_the_full_square():
    # A bright square inside the box fills the box's middle after the crop.
    image = np.zeros((SIZE, SIZE), np.uint8)
    image[40:60, 40:60] = 200
    boxes = np.array([[25, 25, 75, 75], [0, 0, SIZE, SIZE]])
    cropped = crop_to_boxes(np.stack([image, image]), boxes)
    assert cropped.shape == (2, SIZE, SIZE) and cropped.dtype == np.uint8
    assert cropped[0, 35:65, 35:65].min() > 150  # the 20-pixel square is now 40 pixels wide
    assert cropped[0, :25].max() == 0 and cropped[0, 75:].max() == 0
    np.testing.assert_array_equal(cropped[1], image)  # the whole square is left as it was
    with pytest.raises(ValueError, match="boxes"):
        crop_to_boxes(np.stack([image]), boxes)
