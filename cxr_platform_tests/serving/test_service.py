"""The real service over HTTP: every endpoint, the bad-input corpus, the log, shadow, hot swap.

One ``bentoml serve`` process for the module (xdist keeps the module on one worker). The alias
move test runs last because it changes which version is production.
"""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    BasicTextSRStorage,
    DigitalXRayImageStorageForPresentation,
    GrayscaleSoftcopyPresentationStateStorage,
)

from cxr_platform.data.synthetic import render_radiograph
from cxr_platform.deployment.registry import PRODUCTION, SHADOW
from cxr_platform.inference.retained import RetainedInputs
from cxr_platform.serving.process import ServiceProcess, free_port

from ..conftest import other_population_images, release_lung_fields
from ..data.dicom_factory import make_dicom, to_bytes
from .conftest import API_KEY, MAX_UPLOAD_MB, RETAIN_INPUTS_MAX_MB, SITE_KEYS


def chest(seed: int = 0, size: tuple[int, int] = (120, 100)) -> np.ndarray:
    """A synthetic frontal chest radiograph (the kind the test models were trained on), uint8:
    the service's input gate refuses anything else."""
    pixels = np.rint(render_radiograph(seed) * 255).astype(np.uint8)
    height, width = size
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR))


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png(seed: int = 0) -> bytes:
    return encode(Image.fromarray(chest(seed)), "PNG")


def unsupported_transfer_syntax() -> bytes:
    ds = make_dicom(chest(3).astype(np.uint16) * 16, bits_stored=12)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 200])
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


def bomb() -> bytes:
    # 6000 x 6000 = 36 MP, over the service's 20 MP limit, in a few kB of PNG.
    return encode(Image.new("L", (6000, 6000)), "PNG", optimize=True)


BAD_INPUTS = {
    "zero_bytes": (lambda: b"", 400, "empty"),
    "not_an_image": (lambda: b"%PDF-1.7\n" + bytes(range(256)) * 8, 415, "unrecognized_format"),
    "truncated_jpeg": (
        lambda: encode(Image.fromarray(chest(1)), "JPEG")[:600],
        422,
        "truncated",
    ),
    "truncated_png": (lambda: png(2)[:400], 422, "truncated"),
    "decompression_bomb": (bomb, 413, "too_large"),
    "huge_upload": (
        lambda: b"\x89PNG" + b"\x00" * (MAX_UPLOAD_MB * 1024 * 1024 + 1024),
        413,
        "upload_too_large",
    ),
    "dicom_without_pixels": (lambda: to_bytes(make_dicom(None)), 422, "dicom_no_pixel_data"),
    "dicom_sr": (
        lambda: to_bytes(make_dicom(None, sop_class=BasicTextSRStorage)),
        422,
        "dicom_not_an_image",
    ),
    "dicom_presentation_state": (
        lambda: to_bytes(make_dicom(None, sop_class=GrayscaleSoftcopyPresentationStateStorage)),
        422,
        "dicom_not_an_image",
    ),
    "dicom_unsupported_transfer_syntax": (
        unsupported_transfer_syntax,
        415,
        "dicom_unsupported_transfer_syntax",
    ),
    "dicom_multi_frame": (
        lambda: to_bytes(make_dicom(np.stack([chest(4), chest(5)]), frames=2)),
        422,
        "dicom_multi_frame",
    ),
}


def _negative(kind: str) -> bytes:
    from cxr_platform.data.negatives import documents, photographs

    source = {"document": documents, "photograph": photographs}[kind]
    pixels = next(iter(source())).pixels
    return encode(Image.fromarray(np.rint(pixels * 255).astype(np.uint8)), "PNG")


# Each kind of image the input gate must refuse, made here: (bytes, the reason it names).
NOT_CHEST_RADIOGRAPHS = {
    "document": (lambda: _negative("document"), None),
    "photograph": (lambda: _negative("photograph"), None),
    "inverted_radiograph": (lambda: encode(Image.fromarray(255 - chest(7)), "PNG"), None),
    "rotated_radiograph": (lambda: encode(Image.fromarray(np.rot90(chest(8)).copy()), "PNG"), None),
    "one_pixel_png": (lambda: encode(Image.new("L", (1, 1), 128), "PNG"), "too_small"),
    "tiny_dicom": (lambda: to_bytes(make_dicom(chest(9, size=(11, 15)))), "too_small"),
    # The header says MONOCHROME1, so the decoder inverts what is a normal radiograph.
    "monochrome1_by_mistake": (
        lambda: to_bytes(make_dicom(chest(10), photometric="MONOCHROME1")),
        None,
    ),
}


def odd_valid_inputs() -> dict[str, tuple[str, bytes]]:
    gray = chest(6)
    rgb = Image.fromarray(np.stack([gray] * 3, axis=-1), "RGB")
    rgba = Image.fromarray(np.dstack([np.stack([gray] * 3, -1), np.full_like(gray, 255)]), "RGBA")
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
    twelve_bit = make_dicom(
        gray.astype(np.uint16) * 16,
        bits_stored=12,
        sop_class=DigitalXRayImageStorageForPresentation,
        extra={"Modality": "DX"},
    )
    return {
        "rgb_png": ("rgb.png", encode(rgb, "PNG")),
        "rgba_png": ("rgba.png", encode(rgba, "PNG")),
        # An adaptive palette holds a grey radiograph's levels; the default web palette has six
        # greys and dithers the rest into noise no export writes.
        "palette_png": (
            "palette.png",
            encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "PNG"),
        ),
        "16bit_png": ("sixteen.png", encode(sixteen, "PNG")),
        "jpeg_named_png": ("really_a_jpeg.png", encode(rgb, "JPEG", quality=90)),
        "12bit_dicom": ("image.dcm", to_bytes(twelve_bit)),
    }


def post_image(client, data: bytes, name: str = "image", route: str = "/predict", **kwargs):
    return client.post(route, files={"file": (name, data)}, **kwargs)


# --------------------------------------------------------------------------------------------


def test_health_openapi_and_model_info(live_service):
    with live_service.client(key=None) as anonymous:
        assert anonymous.get("/livez").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
        spec = anonymous.get("/docs.json").json()
        assert {"/predict", "/explain", "/feedback"} <= set(spec["paths"])
        assert anonymous.get("/model").status_code == 401
    with live_service.client() as client:
        info = client.get("/model").json()
    assert info["production"]["model_version"] == live_service.production_version
    assert info["shadow"]["model_version"] == live_service.shadow_version
    assert info["production"]["preprocessing"]["image_size"] == 96
    assert info["service"]["api_key_required"] is True


def test_predict_returns_the_production_answer_and_logs_the_shadow(live_service):
    with live_service.client() as client:
        response = post_image(client, png(10))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "label",
        "probability",
        "threshold",
        "model_name",
        "model_version",
        "request_id",
    }
    assert body["model_version"] == live_service.production_version
    assert body["label"] in ("NORMAL", "PNEUMONIA")
    assert (body["probability"] >= body["threshold"]) == (body["label"] == "PNEUMONIA")

    rows = live_service.inference_log().records()
    row = rows[rows.request_id == body["request_id"]].iloc[0]
    assert row.source == "http"
    assert row.model_version == live_service.production_version
    assert row.probability == pytest.approx(body["probability"])
    assert row.shadow_version == live_service.shadow_version
    assert 0.0 <= row.shadow_probability <= 1.0
    assert row.source_format == "PNG" and row.original_width == 100
    assert row.latency_ms > 0


def test_api_key_is_required_when_configured(live_service):
    with live_service.client(key=None) as anonymous:
        response = post_image(anonymous, png())
        assert response.status_code == 401
        assert response.json()["error"] == "unauthorized"
    with live_service.client(key="wrong") as wrong:
        assert post_image(wrong, png()).status_code == 401
    with live_service.client(key=None) as bearer:
        headers = {"Authorization": "Bearer test-key-0123"}
        assert post_image(bearer, png(), headers=headers).status_code == 200


def test_each_request_is_logged_with_the_site_it_came_from(live_service):
    """A gateway (the service key) names the site in X-CXR-Site; a site's own key names it
    and cannot claim another; a name that is not plain is refused before decoding."""
    sent: dict[str, str | None] = {}
    with live_service.client() as gateway:
        for header, expected in (
            ("Ward 7", "Ward 7"),
            ("Klinikum Süd".encode(), "Klinikum Süd"),
            (None, None),
        ):
            headers = {"X-CXR-Site": header} if header is not None else {}
            response = post_image(gateway, png(12), headers=headers)
            assert response.status_code == 200, response.text
            sent[response.json()["request_id"]] = expected
        bad = post_image(gateway, png(12), headers={"X-CXR-Site": "<script>"})
        assert bad.status_code == 400 and bad.json()["error"] == "bad_site"
    with live_service.client(key=SITE_KEYS["north"]) as north:
        response = post_image(north, png(13))
        assert response.status_code == 200, response.text
        sent[response.json()["request_id"]] = "north"
        explained = post_image(
            north, png(13), route="/explain", headers={"Accept": "application/json"}
        )
        sent[explained.json()["request_id"]] = "north"
        claimed = post_image(north, png(13), headers={"X-CXR-Site": "south"})
        assert claimed.status_code == 403 and claimed.json()["error"] == "site_mismatch"
        same = post_image(north, png(13), headers={"X-CXR-Site": "north"})
        sent[same.json()["request_id"]] = "north"
        # A site's key is a key like any other for the model route; feedback from a site
        # labels only that site's requests.
        assert north.get("/model").status_code == 200
        own = north.post(
            "/feedback", json={"request_id": same.json()["request_id"], "label": "NORMAL"}
        )
        assert own.status_code == 200, own.text
        gateway_request = next(request for request, site in sent.items() if site is None)
        foreign = north.post("/feedback", json={"request_id": gateway_request, "label": "NORMAL"})
        assert foreign.status_code == 403 and foreign.json()["error"] == "other_site_request"
    rows = live_service.inference_log().records().set_index("request_id")
    assert {request: rows.loc[request, "site"] for request in sent} == sent
    assert live_service.inference_log().records(site="north").index.size >= 3


def test_explain_returns_an_overlay_with_the_prediction(live_service):
    with live_service.client() as client:
        image = post_image(client, png(11), route="/explain")
        as_json = post_image(
            client, png(11), route="/explain", headers={"Accept": "application/json"}
        )
    assert image.status_code == 200, image.text
    assert image.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(image.content))
    assert overlay.size == (100, 120) and overlay.mode == "RGB"  # the original's resolution
    assert image.headers["x-cxr-model-version"] == live_service.production_version
    body = as_json.json()
    assert body["label"] == image.headers["x-cxr-label"]
    assert body["probability"] == pytest.approx(float(image.headers["x-cxr-probability"]))
    decoded = Image.open(io.BytesIO(base64.b64decode(body["overlay_png_base64"])))
    assert decoded.size == overlay.size


def test_explain_says_how_much_relevance_lies_in_the_lung_fields_once_a_version_is_promoted(
    live_service, lung_fields_export
):
    with live_service.client() as client:
        before = post_image(
            client, png(14), route="/explain", headers={"Accept": "application/json"}
        ).json()
        assert "relevance_in_lungs" not in before  # no lung fields version registered yet
        version = release_lung_fields(live_service.settings.registry, lung_fields_export)

        def explained():
            return post_image(
                client, png(14), route="/explain", headers={"Accept": "application/json"}
            )

        deadline = time.monotonic() + 60
        while "lung_fields_version" not in (body := explained().json()):
            assert time.monotonic() < deadline, "the service never loaded the lung fields"
            time.sleep(0.5)
        as_png = post_image(client, png(14), route="/explain")
        predicted = post_image(client, png(14)).json()
    assert body["lung_fields_version"] == version
    assert 0.0 <= body["relevance_in_lungs"] <= 1.0
    assert 0.1 < body["lung_area_share"] < 0.8 and body["lung_field_findings"] == []
    assert as_png.headers["x-cxr-relevance-in-lungs"] == str(body["relevance_in_lungs"])
    assert as_png.headers["x-cxr-lung-field-findings"] == ""
    assert "relevance_in_lungs" not in predicted  # /predict does not run the segmenter
    # Kept on the request's log row, where monitoring reads it per window.
    rows = live_service.inference_log().records().set_index("request_id")
    assert rows.loc[body["request_id"], "relevance_in_lungs"] == pytest.approx(
        body["relevance_in_lungs"]
    )
    assert pd.isna(rows.loc[predicted["request_id"], "relevance_in_lungs"])


def test_feedback_attaches_a_label_to_a_request(live_service):
    with live_service.client() as client:
        request_id = post_image(client, png(12)).json()["request_id"]
        ok = client.post("/feedback", json={"request_id": request_id, "label": "PNEUMONIA"})
        unknown = client.post("/feedback", json={"request_id": "no-such-id", "label": "NORMAL"})
        invalid = client.post("/feedback", json={"request_id": request_id, "label": "MAYBE"})
    assert ok.status_code == 200 and ok.json()["recorded"] is True
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_request_id"
    assert invalid.status_code == 400
    rows = live_service.inference_log().records()
    assert rows[rows.request_id == request_id].feedback_label.iloc[0] == "PNEUMONIA"
    # The labeled request's model input became training data for the fine-tune job.
    assert ok.json()["retained_for_training"] is True
    store = RetainedInputs(live_service.settings.serving.retained_dir)
    ids, images = store.load_labeled([request_id])
    assert ids == [request_id] and images.shape == (1, 96, 96) and images.dtype == np.uint8


def test_past_the_retention_budget_every_request_is_answered_and_the_store_stays_within_it(
    live_service,
):
    store_root = live_service.settings.serving.retained_dir
    budget = int(RETAIN_INPUTS_MAX_MB * 1024 * 1024)
    log = live_service.inference_log()
    before = log.count()
    with live_service.client() as client:
        answers = [post_image(client, png(seed)) for seed in range(40)]
        metrics = client.get("/metrics").text
    assert [answer.status_code for answer in answers] == [200] * 40
    assert log.count() == before + 40
    kept = {path.stem for path in store_root.rglob("*") if path.is_file()}
    assert 0 < sum(p.stat().st_size for p in store_root.rglob("*") if p.is_file()) <= budget
    # The newest inputs are the ones kept: feedback is likeliest on recent requests.
    assert answers[-1].json()["request_id"] in kept
    assert answers[0].json()["request_id"] not in kept
    evicted = re.search(r"^cxr_retained_inputs_evicted_total\S* ([0-9.e+]+)$", metrics, re.M)
    assert evicted is not None and float(evicted.group(1)) >= 12, metrics


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_a_4xx_reason_and_the_service_stays_up(live_service, case):
    make, status, reason = BAD_INPUTS[case]
    log = live_service.inference_log()
    before = log.count()
    with live_service.client() as client:
        response = post_image(client, make(), name=f"{case}.png")
        assert response.status_code == status, response.text
        body = response.json()
        assert body["error"] == reason and body["detail"]
        # Nothing was predicted, so nothing was logged; the next good request still works.
        assert post_image(client, png()).status_code == 200
    assert log.count() == before + 1
    with live_service.client(key=None) as anonymous:
        metrics = anonymous.get("/metrics").text
    assert f'reason="{reason}"' in metrics


@pytest.mark.parametrize("case", sorted(NOT_CHEST_RADIOGRAPHS))
def test_what_is_not_a_chest_radiograph_gets_422_and_no_diagnosis(live_service, case):
    make, expected_reason = NOT_CHEST_RADIOGRAPHS[case]
    log = live_service.inference_log()
    before = log.count()
    with live_service.client() as client:
        for route in ("/predict", "/explain"):
            response = post_image(client, make(), name=f"{case}.png", route=route)
            assert response.status_code == 422, response.text
            body = response.json()
            assert body["error"] == "not_a_chest_radiograph", body
            assert body["detail"] and body["request_id"]
            assert "probability" not in body and "label" not in body
            # The test models know only synthetic images, and their refusals say so.
            assert body["detail"].endswith("(the README's 'A real model')"), body
            if expected_reason:
                assert body["detail"].startswith(expected_reason), body
            if body["detail"].startswith(("unlike", "upside")):
                assert body["gate_score"] > 0
    # No prediction row; the refusal is in the log's own table, with its reason.
    assert log.count() == before
    refusals = log.refusals()
    row = refusals[refusals["request_id"] == body["request_id"]].iloc[0]
    assert body["detail"].startswith(row.reason) and row.source == "http"
    assert row.model_version == live_service.production_version
    with live_service.client(key=None) as anonymous:
        assert 'reason="not_a_chest_radiograph"' in anonymous.get("/metrics").text


def chest_dicom(seed: int, **header) -> bytes:
    """A synthetic chest radiograph as DICOM, with header fields about the patient's age."""
    return to_bytes(make_dicom(chest(seed, size=(240, 200)), extra=header))


# The test models are for children of 1-5 years (declared for the synthetic set): the header,
# or the caller, may say otherwise.
AGE_CASES = {
    "child by PatientAge": ({"PatientAge": "004Y"}, None),
    "adolescent by PatientAge": ({"PatientAge": "017Y"}, "patient age 17 years (PatientAge)"),
    "adult by PatientAge": ({"PatientAge": "081Y"}, "patient age 81 years (PatientAge)"),
    "adult by birth date": (
        {"PatientBirthDate": "19450301", "StudyDate": "20260301"},
        "patient age 81 years (PatientBirthDate)",
    ),
    "malformed age, no birth date": ({"PatientAge": "sixty"}, None),
    "no age at all": ({}, None),
}


@pytest.mark.parametrize("case", sorted(AGE_CASES))
def test_a_header_age_outside_the_intended_use_gets_422_with_the_reason_in_words(
    live_service, case
):
    header, refused_as = AGE_CASES[case]
    log = live_service.inference_log()
    with live_service.client() as client:
        response = post_image(client, chest_dicom(31, **header), name="study.dcm")
    body = response.json()
    if refused_as is None:  # inside, or unknown: the synthetic pixels pass the check by pixels
        assert response.status_code == 200, body
        return
    assert response.status_code == 422, body
    assert body["error"] == "outside_intended_use" and body["why"] == "patient_age"
    assert body["detail"] == f"{refused_as} is outside this model's intended use: 1-5 years"
    assert "probability" not in body and "label" not in body
    refusals = log.refusals()
    row = refusals[refusals["request_id"] == body["request_id"]].iloc[0]
    # The log keeps no patient data: the range the age fell outside of, not the age.
    assert row.reason == "outside_intended_use"
    assert row.detail == (
        "patient_age: the stated age is outside this model's intended use: 1-5 years"
    )
    assert row.gate_score is None or row.gate_score != row.gate_score  # None, or NaN


def test_the_caller_states_an_age_in_a_form_field_or_a_header(live_service):
    with live_service.client() as client:
        child = client.post(
            "/predict", files={"file": ("x.png", png(3))}, data={"patient_age": "4"}
        )
        assert child.status_code == 200, child.text
        adult = client.post(
            "/predict", files={"file": ("x.png", png(3))}, data={"patient_age": "045Y"}
        )
        assert adult.status_code == 422 and adult.json()["error"] == "outside_intended_use"
        assert "45 years (caller)" in adult.json()["detail"]
        by_header = post_image(client, png(3), headers={"X-CXR-Patient-Age": "81"})
        assert by_header.status_code == 422, by_header.text
        explained = post_image(
            client, png(3), route="/explain", headers={"X-CXR-Patient-Age": "81"}
        )
        assert explained.status_code == 422 and explained.json()["why"] == "patient_age"
        # A DICOM that says four and a caller who says 81: every stated age must be inside.
        both = post_image(
            client, chest_dicom(5, PatientAge="004Y"), headers={"X-CXR-Patient-Age": "81"}
        )
        assert both.status_code == 422
        for wrong in ("sixty", "200", "-1"):
            bad = client.post(
                "/predict", files={"file": ("x.png", png(3))}, data={"patient_age": wrong}
            )
            assert bad.status_code == 400 and bad.json()["error"] == "bad_patient_age", wrong
        bad_header = post_image(client, png(3), headers={"X-CXR-Patient-Age": "old"})
        assert bad_header.status_code == 400
        info = client.get("/model").json()["production"]
    assert info["intended_use"]["age_years"] == [1, 5]
    assert info["intended_use"]["age_basis"].startswith("declared: ")
    assert info["population_check"]["n_val"] > 0


def test_the_other_population_without_an_age_is_refused_by_pixels_not_with_an_age_stated(
    live_service, tiny_synthetic, tmp_path
):
    """The test model's check by pixels was fitted against the test population it is not for
    (see ``other_population``); these are of patients it never saw. Unless an age is stated,
    which the check by pixels then leaves to the age check."""
    others = sorted(other_population_images(tiny_synthetic, tmp_path / "others", 6).iterdir())
    with live_service.client() as client:
        answers = [post_image(client, path.read_bytes(), name=path.name) for path in others]
        # None is answered: the check by pixels refuses them (the input gate, the odd one).
        assert all(a.status_code == 422 for a in answers), [a.text for a in answers]
        outside = [
            (path, a.json())
            for path, a in zip(others, answers, strict=True)
            if a.json()["error"] == "outside_intended_use"
        ]
        assert len(outside) >= 4, [a.text for a in answers]
        for _, body in outside:
            assert body["why"] == "unlike_the_training_population"
            assert "looks like a patient this model was not made for" in body["detail"]
        first = outside[0][0]
        stated = client.post(
            "/predict", files={"file": (first.name, first.read_bytes())}, data={"patient_age": "4"}
        )
        assert stated.status_code == 200, stated.text


def test_the_shadows_own_gate_verdict_is_logged_with_each_prediction(live_service):
    with live_service.client() as client:
        response = post_image(client, png(11))
    assert response.status_code == 200, response.text
    row = live_service.inference_log().records().iloc[-1]
    assert row.request_id == response.json()["request_id"]
    assert row.gate_score is not None and row.gate_score > 0
    if row.shadow_version is not None:
        assert row.shadow_gate == "accepted"


def test_a_url_in_place_of_the_file_is_refused_not_fetched(live_service):
    # BentoML would download it; the edge refuses before BentoML sees the form.
    with live_service.client() as client:
        response = client.post("/predict", files={"file": (None, "http://127.0.0.1:9/x.png")})
    assert response.status_code == 400
    assert response.json()["error"] == "file_not_uploaded"


def test_an_image_under_another_form_field_gets_a_400_that_names_the_field(live_service):
    """BentoML parses other fields as JSON: an image under "image" used to be a 500."""
    image = png()
    with live_service.client() as client:
        misnamed = client.post("/predict", files={"image": ("x.png", image, "image/png")})
        extra = client.post(
            "/explain",
            files={"file": ("x.png", image, "image/png"), "notes": ("n.bin", b"\x89\x00")},
        )
        empty = client.post(
            "/predict",
            files={},
            data={},
            headers={"content-type": "multipart/form-data; boundary=x"},
            content=b"--x--\r\n",
        )
    assert misnamed.status_code == 400, misnamed.text
    assert misnamed.json()["error"] == "unexpected_field"
    assert "'file'" in misnamed.json()["detail"] and "image" in misnamed.json()["detail"]
    assert extra.status_code == 400 and extra.json()["error"] == "unexpected_field"
    assert empty.status_code == 400 and empty.json()["error"] == "file_missing"


def test_a_chunked_upload_over_the_limit_is_refused_without_a_declared_length(live_service):
    body = b"\x00" * (MAX_UPLOAD_MB * 1024 * 1024 + 1)

    def chunks():
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    headers = {"Content-Type": "multipart/form-data; boundary=x"}
    with live_service.client() as client:
        response = client.post("/predict", content=chunks(), headers=headers)
        assert response.status_code == 413
        assert response.json()["error"] == "upload_too_large"
        assert post_image(client, png()).status_code == 200


@pytest.mark.parametrize("case", sorted(odd_valid_inputs()))
def test_odd_but_valid_images_are_predicted(live_service, case):
    name, data = odd_valid_inputs()[case]
    with live_service.client() as client:
        response = post_image(client, data, name=name)
    assert response.status_code == 200, response.text
    row = live_service.inference_log().records().iloc[-1]
    assert row.request_id == response.json()["request_id"]
    if case == "12bit_dicom":
        assert row.source_format == "DICOM" and row.bit_depth == 12
        assert row.photometric_interpretation == "MONOCHROME2"
        assert len(row.study_uid_hash) == 64  # a salted hash, never the UID itself


def test_concurrent_requests_write_exactly_one_row_each(live_service):
    log = live_service.inference_log()
    before = log.count()
    n = 48
    ids: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()

    def worker(offset: int) -> None:
        with live_service.client() as client:
            for i in range(offset, n, 8):
                response = post_image(client, png(100 + i))
                with lock:
                    if response.status_code == 200:
                        ids.append(response.json()["request_id"])
                    else:
                        failures.append(response.text)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    assert len(set(ids)) == n
    assert log.count() == before + n
    logged = set(log.records().request_id)
    assert set(ids) <= logged


def test_a_client_that_hangs_up_still_gets_its_prediction_logged(live_service):
    log = live_service.inference_log()
    before = log.count()
    boundary = "cxrboundary"
    payload = png(13)
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /predict HTTP/1.1\r\nHost: localhost\r\nX-API-Key: test-key-0123\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    url = urlparse(live_service.url)
    with socket.create_connection((url.hostname, url.port)) as connection:
        connection.sendall(head + body)
        # Hang up at once, before any response byte.
    deadline = time.monotonic() + 30
    while log.count() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert log.count() == before + 1


RAW_BODY_TYPES = ("application/octet-stream", "application/dicom", "image/png")


@pytest.mark.parametrize("content_type", RAW_BODY_TYPES)
def test_the_image_as_the_body_gets_the_same_answer_as_an_upload(live_service, content_type):
    image = chest_dicom(21) if content_type == "application/dicom" else png(21)
    log = live_service.inference_log()
    before = log.count()
    with live_service.client() as client:
        uploaded = post_image(client, image).json()
        raw = client.post("/predict", content=image, headers={"content-type": content_type})
        assert raw.status_code == 200, raw.text
        explained = client.post(
            "/explain",
            content=image,
            headers={"content-type": content_type, "accept": "application/json"},
        )
    body = raw.json()
    assert body["probability"] == pytest.approx(uploaded["probability"])
    assert body["label"] == uploaded["label"] and body["request_id"] != uploaded["request_id"]
    assert explained.status_code == 200 and explained.json()["overlay_png_base64"]
    assert log.count() == before + 3  # one row each
    rows = log.records()
    assert rows[rows.request_id == body["request_id"]].iloc[0].source == "http"


def test_a_raw_body_is_checked_like_an_upload(live_service):
    with live_service.client() as client:
        octet = {"content-type": "application/octet-stream"}
        garbage = client.post("/predict", content=b"%PDF-1.7\n" + bytes(256), headers=octet)
        assert garbage.status_code == 415 and garbage.json()["error"] == "unrecognized_format"
        empty = client.post("/predict", content=b"", headers=octet)
        assert empty.status_code == 400 and empty.json()["error"] == "empty"
        bad_age = client.post(
            "/predict", content=png(22), headers={**octet, "x-cxr-patient-age": "sixty"}
        )
        assert bad_age.status_code == 400 and bad_age.json()["error"] == "bad_patient_age"
        too_big = b"\x89PNG" + b"\x00" * (MAX_UPLOAD_MB * 1024 * 1024 + 1024)
        refused = client.post("/predict", content=too_big, headers=octet)
        assert refused.status_code == 413 and refused.json()["error"] == "upload_too_large"
        adult = client.post(
            "/predict", content=png(23), headers={**octet, "x-cxr-patient-age": "81"}
        )
        assert adult.status_code == 422 and adult.json()["error"] == "outside_intended_use"
    with live_service.client(key=None) as anonymous:
        assert anonymous.post("/predict", content=png(22), headers=octet).status_code == 401


def post_batch(client, images: list[tuple[str, bytes]], **kwargs):
    return client.post(
        "/predict/batch", files=[("file", (name, data)) for name, data in images], **kwargs
    )


def test_a_batch_answers_each_image_in_order_with_its_own_request_id_and_log_row(live_service):
    images = [(f"chest-{seed}.png", png(seed)) for seed in (30, 31, 32, 33)]
    log = live_service.inference_log()
    before = log.count()
    with live_service.client() as client:
        singles = [post_image(client, data).json() for _, data in images]
        response = post_batch(client, images, headers={"X-CXR-Site": "batch-site"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert [r["filename"] for r in results] == [name for name, _ in images]
    for single, answer in zip(singles, results, strict=True):
        assert answer["status"] == 200
        assert answer["probability"] == pytest.approx(single["probability"])
        assert answer["label"] == single["label"]
    ids = [r["request_id"] for r in results]
    assert len(set(ids)) == 4 and not set(ids) & {s["request_id"] for s in singles}
    assert log.count() == before + 8
    rows = log.records(site="batch-site").set_index("request_id")
    assert sorted(rows.index) == sorted(ids)
    assert (rows.source == "http").all()


def test_bad_input_and_refusals_in_a_batch_get_their_own_answers(live_service):
    make_bad, bad_status, bad_reason = BAD_INPUTS["truncated_png"]
    make_refused, _ = NOT_CHEST_RADIOGRAPHS["document"]
    images = [
        ("good-1.png", png(40)),
        ("truncated.png", make_bad()),
        ("document.png", make_refused()),
        ("empty.png", b""),
        ("adult.dcm", chest_dicom(41, PatientAge="081Y")),
        ("good-2.png", png(42)),
    ]
    log = live_service.inference_log()
    before, refusals_before = log.count(), len(log.refusals())
    with live_service.client() as client:
        response = post_batch(client, images)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [name for name, _ in images]
    statuses = [r["status"] for r in results]
    assert statuses == [200, bad_status, 422, 400, 422, 200]
    assert [r.get("error") for r in results] == [
        None,
        bad_reason,
        "not_a_chest_radiograph",
        "empty",
        "outside_intended_use",
        None,
    ]
    assert "label" not in results[2] and results[2]["request_id"]
    assert "probability" not in results[4] and "81 years" in results[4]["detail"]
    # Two predictions logged, two refusals on record with their reasons; nothing for the
    # images that could not be read.
    assert log.count() == before + 2
    refusals = log.refusals()
    assert len(refusals) == refusals_before + 2
    assert {results[2]["request_id"], results[4]["request_id"]} <= set(refusals.request_id)
    with live_service.client(key=None) as anonymous:
        metrics = anonymous.get("/metrics").text
    assert 'endpoint="predict_batch",reason="not_a_chest_radiograph"' in metrics


def test_a_batch_is_refused_whole_where_the_request_itself_is_wrong(live_service):
    with live_service.client() as client:
        octet = {"content-type": "application/octet-stream"}
        not_a_form = client.post("/predict/batch", content=png(50), headers=octet)
        assert not_a_form.status_code == 400 and "multipart" in not_a_form.json()["detail"]
        other_field = client.post("/predict/batch", files=[("image", ("a.png", png(50)))])
        assert other_field.status_code == 400
        assert other_field.json()["error"] == "unexpected_field"
        limit = live_service.settings.serving.service_max_request_images
        too_many = post_batch(client, [(f"{i}.png", b"x") for i in range(limit + 1)])
        assert too_many.status_code == 413 and too_many.json()["error"] == "too_many_images"
        big = b"\x89PNG" + b"\x00" * (MAX_UPLOAD_MB * 1024 * 1024)
        over = post_batch(client, [("a.png", big), ("b.png", b"x" * 1024)])
        assert over.status_code == 413 and over.json()["error"] == "upload_too_large"
    with live_service.client(key=None) as anonymous:
        assert post_batch(anonymous, [("a.png", png(50))]).status_code == 401


def _cxr_predict_url(live_service, *args: str, key: str = API_KEY):
    import subprocess

    command = [str(Path(sys.executable).with_name("cxr")), "predict", *args]
    env = {**os.environ, "CXR_HOME": str(live_service.settings.home), "CXR_SERVICE_API_KEY": key}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_cxr_predict_url_scores_a_folder_through_the_running_service(live_service, tmp_path):
    import csv

    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(5):
        (folder / f"chest-{seed}.png").write_bytes(png(60 + seed))
    (folder / "truncated.png").write_bytes(png(66)[:400])
    (folder / "document.png").write_bytes(_negative("document"))
    log = live_service.inference_log()
    before = log.count()
    out = tmp_path / "scores.csv"
    # Batches of 3: the answers of several requests come back in the order of the files.
    done = _cxr_predict_url(
        live_service, str(folder), "--url", live_service.url, "--batch-size", "3",
        "--out", str(out), "--site", "url-site",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # two images failed
    assert "5 predicted" in done.stderr and "2 failed" in done.stderr
    rows = {Path(row["path"]).name: row for row in csv.DictReader(out.open())}
    assert sorted(rows) == sorted(p.name for p in folder.iterdir())
    assert rows["truncated.png"]["error"].startswith("truncated: ")
    assert rows["document.png"]["error"].startswith("not_a_chest_radiograph: ")
    assert rows["document.png"]["request_id"]
    predicted = [row for row in rows.values() if not row["error"]]
    assert len(predicted) == 5 and all(row["request_id"] for row in predicted)
    assert {row["model_version"] for row in predicted} == {live_service.production_version}
    # The service logged them, under the site the command named.
    assert log.count() == before + 5
    logged = log.records(site="url-site").set_index("request_id")
    for row in predicted:
        assert logged.loc[row["request_id"]].probability == pytest.approx(
            float(row["probability"]), abs=1e-6
        )


def test_cxr_predict_url_splits_a_request_over_the_upload_limit(live_service, tmp_path):
    """Four 0.8 MB images are more than the service takes in one request (2 MB): the command
    sends them again in halves and each gets the service's own answer; one image alone over
    the limit gets that refusal in its row."""
    import csv

    rng = np.random.default_rng(80)
    folder = tmp_path / "large"
    folder.mkdir()
    for n in range(4):  # noise: incompressible, and no radiograph to the gate
        noise = rng.integers(0, 256, (900, 900), dtype=np.uint8)
        (folder / f"noise-{n}.png").write_bytes(encode(Image.fromarray(noise), "PNG"))
    huge = rng.integers(0, 256, (1700, 1600), dtype=np.uint8)
    (folder / "huge.png").write_bytes(encode(Image.fromarray(huge), "PNG"))
    (folder / "chest.png").write_bytes(png(81))
    assert sum(p.stat().st_size for p in folder.glob("noise-*")) > MAX_UPLOAD_MB * 1024 * 1024
    assert (folder / "huge.png").stat().st_size > MAX_UPLOAD_MB * 1024 * 1024
    out = tmp_path / "scores.csv"
    done = _cxr_predict_url(live_service, str(folder), "--url", live_service.url, "--out", str(out))
    assert done.returncode == 1, done.stderr
    rows = {Path(row["path"]).name: row for row in csv.DictReader(out.open())}
    assert sorted(rows) == sorted(p.name for p in folder.iterdir())
    for n in range(4):
        row = rows[f"noise-{n}.png"]
        assert row["error"].startswith("not_a_chest_radiograph: ") and row["request_id"], row
    assert rows["huge.png"]["error"].startswith("upload_too_large: ")
    assert rows["chest.png"]["label"] and not rows["chest.png"]["error"]


def test_cxr_predict_url_fails_clearly_when_the_service_refuses_or_is_not_there(
    live_service, tmp_path
):
    image = tmp_path / "a.png"
    image.write_bytes(png(70))
    wrong_key = _cxr_predict_url(live_service, str(image), "--url", live_service.url, key="nope")
    assert wrong_key.returncode == 2 and "401" in wrong_key.stderr
    assert "Traceback" not in wrong_key.stderr
    nowhere = _cxr_predict_url(live_service, str(image), "--url", f"http://127.0.0.1:{free_port()}")
    assert nowhere.returncode == 2 and "cannot reach the service" in nowhere.stderr
    mixed = _cxr_predict_url(
        live_service, str(image), "--url", live_service.url, "--model", "1", "--no-log"
    )
    assert mixed.returncode == 2 and "--model, --no-log" in mixed.stderr


def test_cxr_serve_starts_the_same_service_without_an_api_key(live_service, tmp_path):
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("cxr")),
        "--home",
        str(live_service.settings.home),
        "serve",
        "--port",
        str(port),
    ]
    env = {"CXR_SERVICE_THREADS": "1", "CXR_SERVICE_API_KEY": ""}  # empty: no key
    with ServiceProcess(env=env, port=port, command=command, log_path=tmp_path / "serve.log"):
        info = httpx.get(f"http://127.0.0.1:{port}/model", timeout=30).json()
        response = httpx.post(
            f"http://127.0.0.1:{port}/predict", files={"file": ("a.png", png(20))}, timeout=60
        )
    assert info["service"]["api_key_required"] is False
    assert response.status_code == 200
    assert response.json()["model_version"] == info["production"]["model_version"]


def test_alias_moves_under_load_switch_versions_with_no_failed_request(live_service):
    registry = live_service.registry
    old, new = live_service.production_version, live_service.shadow_version
    seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def worker(seed: int) -> None:
        with live_service.client() as client:
            while not stop.is_set():
                response = post_image(client, png(seed))
                with lock:
                    if response.status_code == 200:
                        seen.append(response.json()["model_version"])
                    else:
                        failures.append(f"{response.status_code} {response.text}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        registry.promote(new, triggered_by="test")  # the shadow becomes production
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with lock:
                if seen and seen[-1] == new:
                    break
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert failures == []
    assert old in seen and new in seen
    assert seen[-1] == new
    aliases = registry.aliases()
    assert aliases[PRODUCTION] == new and SHADOW not in aliases
    with live_service.client() as client:
        info = client.get("/model").json()
    assert info["production"]["model_version"] == new and info["shadow"] is None
