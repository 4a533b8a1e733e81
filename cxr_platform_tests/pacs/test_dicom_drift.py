"""DICOM traffic and the drift rule: in-distribution radiographs arriving over DICOM must not
look like drift only because a detector's matrix is not a PNG export's size.

The traffic is the validation split of the model's own data, each image enlarged four times (a
detector-like matrix, aspect kept), stored as 12-bit CR in both photometric interpretations
with a window that displays it as it was,
sent to a real node over C-STORE, scored and logged by it. The reference holds the same
images as the PNG files the model was trained from.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cxr_platform.deployment.pipeline import registry_for
from cxr_platform.deployment.reference import load_reference
from cxr_platform.inference.log import InferenceLog
from cxr_platform.monitoring.drift import acquisition_markdown, evaluate_window
from cxr_platform.sections import sqlite_url
from cxr_platform_tests.synthetic_dicom import RadiographSpec, radiograph_dataset

from .conftest import wait_for
from .scu import send

ENLARGED = 4


def _as_detector_image(png, photometric: str):
    with Image.open(png) as image:
        gray = image.convert("L")
        large = gray.resize(
            (gray.width * ENLARGED, gray.height * ENLARGED), Image.Resampling.BICUBIC
        )
    spec = RadiographSpec(photometric=photometric)
    dataset = radiograph_dataset(np.asarray(large), spec)
    # The window spans the whole stored range, so the displayed image is the PNG's. The test
    # modality's default window (95% of this image's own range) stretches the contrast: the
    # model sees a different image, and the rule rightly calls that drift in the intensity
    # features (8 of 9, when this test was first written with it).
    slope, intercept = spec.rescale
    low, high = intercept, (2**spec.bits_stored - 1) * slope + intercept
    dataset.WindowCenter = (low + high) / 2 + 0.5
    dataset.WindowWidth = high - low + 1
    return dataset


def test_a_dicom_only_window_of_in_distribution_radiographs_is_not_drift(
    node_factory, pacs_model, learnable_cache, tmp_path
):
    validation = list(learnable_cache.index("val")["path"])
    assert len(validation) >= 40
    log_url = sqlite_url(tmp_path / "dicom_traffic.db")
    node = node_factory(dicom_results=("sr",), inference_log_url=log_url)
    node.start()
    datasets = [
        _as_detector_image(path, "MONOCHROME1" if i % 3 == 0 else "MONOCHROME2")
        for i, path in enumerate(validation)
    ]
    for start in range(0, len(datasets), 20):
        assert set(send(node.port, datasets[start : start + 20]).statuses) == {0x0000}
    wait_for(
        lambda: (
            node.storage.counts().get("processed", 0) + node.storage.counts().get("refused", 0)
            == len(datasets)
        ),
        timeout=120,
        what="every instance scored",
    )
    records = InferenceLog(log_url).records()
    assert (records["source_format"] == "DICOM").all()
    assert records["original_width"].min() >= 100 * ENLARGED  # the detector's matrix is logged

    registry = registry_for(pacs_model.settings.registry)
    reference = load_reference(registry.download(pacs_model.version))
    assert reference is not None and set(reference["source_format"]) <= {"PNG", "JPEG"}
    result = evaluate_window(reference, records, window="dicom", model_version=pacs_model.version)
    assert not result.model_drift, result.summary()
    (group,) = result.acquisition
    assert group.source == "dicom" and group.site == "MODALITY"  # the calling AE title
    assert group.not_compared == "the reference holds no dicom images"
    assert "intensity_mean" in result.feature_p_values  # what the model sees is still compared
    assert "the reference holds no dicom images" in acquisition_markdown(result)

    # The same rows taken for image files (compared with the PNGs' sizes, as before) fire: the
    # detector matrix alone would have requested a fine-tune.
    as_files = records.assign(source_format="PNG", bit_depth=8)
    mistaken = evaluate_window(
        reference, as_files, window="dicom", model_version=pacs_model.version
    )
    assert mistaken.input_drift, mistaken.summary()
    assert "original_width [image @ MODALITY]" in mistaken.drifted_features
