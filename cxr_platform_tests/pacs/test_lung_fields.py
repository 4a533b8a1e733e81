"""The node with a lung fields version in production: the SEG gains a second segment, "lung
fields (AI)", on the heatmap's frame of reference, drawn where the generator drew the lungs,
and the ledger records how much of the heatmap's relevance lies inside them."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pydicom
from PIL import Image

from cxr_platform.data.synthetic import LUNG_MASK_FOLDER
from cxr_platform.inference.log import InferenceLog
from cxr_platform.pacs import build_node
from cxr_platform.pacs.results import LUNG_SEGMENT_LABEL
from cxr_platform.ports import free_port
from cxr_platform.redaction import hash_uid
from cxr_platform_tests.conftest import release_lung_fields

from .conftest import VARIANTS, dciodvfy_errors, radiograph, wait_for
from .scu import send


def _frames_by_segment(seg: pydicom.Dataset) -> dict[int, np.ndarray]:
    pixels = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    return {
        int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber): pixels[i].astype(bool)
        for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence)
    }


def test_the_seg_draws_the_lung_fields_beside_the_heatmap_and_the_ledger_says_where_it_lies(
    pacs_model, lung_fields_export, chest_pngs, tiny_synthetic, tmp_path
):
    # Its own registered model name, so no other node test's registry has a lung version.
    registry = replace(pacs_model.settings.registry, registry_lung_model_name="cxr-lung-fields-n")
    version = release_lung_fields(registry, lung_fields_export)
    dicom = replace(
        pacs_model.settings.dicom,
        dicom_port=free_port(),
        dicom_host="127.0.0.1",
        dicom_allowed_aets=("MODALITY",),
    )
    node = build_node(dicom, registry, state_dir=tmp_path / "node")
    try:
        node.start()
        png = chest_pngs[3]
        source = radiograph(png, VARIANTS["cr-mono2-12bit"])
        uid = str(source.SOPInstanceUID)
        assert send(node.port, [source]).statuses == [0x0000]
        wait_for(lambda: node.storage.status(uid) == "processed", timeout=120, what="processing")
        detail = node.storage.detail(uid) or ""
        share = re.search(rf"relevance in lungs (\d\.\d\d) \(lung fields v{version}\)", detail)
        assert share and 0.0 <= float(share.group(1)) <= 1.0, detail
        # On the instance's log row too, where monitoring reads it per window.
        log = InferenceLog(dicom.inference_log_uri)
        rows = log.records().set_index("sop_instance_uid_hash")
        log.dispose()
        share_logged = rows.loc[hash_uid(uid, node.processor.uid_salt), "relevance_in_lungs"]
        assert f"relevance in lungs {share_logged:.2f}" in detail
        seg_path = next(
            path
            for study in node.storage.outbox()
            for path in study.files
            if pydicom.dcmread(path, stop_before_pixels=True).Modality == "SEG"
        )
    finally:
        node.stop()
    seg = pydicom.dcmread(seg_path)
    assert [item.SegmentLabel for item in seg.SegmentSequence][1] == LUNG_SEGMENT_LABEL
    lung_item = seg.SegmentSequence[1]
    assert lung_item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"  # SCT lung
    algorithm = lung_item.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == f"lung fields v{version}"
    assert dciodvfy_errors(seg_path) == []

    # On the source's grid, where the generator drew this image's lungs.
    relative = png.relative_to(tiny_synthetic)
    drawn = Image.open(tiny_synthetic / LUNG_MASK_FOLDER / relative).convert("L")
    truth = np.asarray(drawn.resize((source.Columns, source.Rows), Image.Resampling.NEAREST)) > 127
    fields = _frames_by_segment(seg)[2]
    assert fields.shape == truth.shape
    dice = 2 * (fields & truth).sum() / (fields.sum() + truth.sum())
    assert dice >= 0.85, dice
