"""What a radiologist sees: the node's results opened in OHIF (the pinned prebuilt viewer, served
by nginx on one origin with a real Orthanc's DICOMweb root, exactly as ``cxr viewer`` and the
deployment serve it: over TLS, read-only), in headless chromium, logged in with a reader's
account of a PACS that asks for one (its administrator's account is another).

Three studies, all in one PACS:
- a chest radiograph the node analysed (sent to the node as a router would; the node, with a lung
  fields version in production, returns its SR, SEG with the heatmap and the lung fields,
  parametric map and secondary capture to Orthanc);
- a document the node refused (it returns the not-analysed SR and nothing else);
- a synthetic case whose heatmap is a known rectangle (the "lesion"), built by the same result
  builders the node uses, so the overlays' place on screen can be checked against it.

Screenshots of every view are saved to ``$TMPDIR/cxr-ohif-screenshots`` (or
``CXR_VIEWER_SCREENSHOTS``).
"""

from __future__ import annotations

import base64
import contextlib
import re
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

from cxr_platform.model_version.predictor import Prediction
from cxr_platform.pacs import build_node
from cxr_platform.pacs import results as made
from cxr_platform.pacs.storage import encode_dataset
from cxr_platform.pacs.viewer import ViewerError, ViewerServer, nginx_binary
from cxr_platform.ports import free_port
from cxr_platform_tests.browser import chromium, require_chromium, screenshot_folder, wait_for
from cxr_platform_tests.conftest import release_lung_fields
from cxr_platform_tests.orthanc import NodeAddress, OrthancProcess
from cxr_platform_tests.synthetic_dicom import RadiographSpec, radiograph_dataset

from .conftest import VARIANTS, radiograph, radiograph_bytes, tls_viewer, viewer_dist
from .scu import send
from .test_node import _pixels_of
from .test_orthanc import CR, RESULTS, Pacs

# The PACS's accounts: the administrator uploads the studies, the radiologist reads them.
ADMIN, READER = ("admin", "admin-secret-9c"), ("radiologist", "reader-secret-4d")

# The lesion of the synthetic case, as fractions of the image: rows, then columns.
LESION_ROWS = (0.20, 0.45)
LESION_COLUMNS = (0.55, 0.80)


@dataclass
class ReadingRoom:
    pacs: Pacs
    viewer: ViewerServer
    analysed: pydicom.Dataset
    refused: pydicom.Dataset
    lesion: pydicom.Dataset

    def result_of(self, study_uid: str, sop_class: str) -> pydicom.Dataset:
        orthanc = self.pacs.orthanc
        (found,) = [i for i in orthanc.study_instances(study_uid) if i["SOPClassUID"] == sop_class]
        return pydicom.dcmread(BytesIO(orthanc.instance_file(found["ID"])))

    def sr_of(self, study_uid: str) -> pydicom.Dataset:
        return self.result_of(study_uid, RESULTS[0])

    def lung_fields_of(self, study_uid: str) -> np.ndarray:
        """The lung fields segment of the study's SEG, on the source's grid."""
        seg = self.result_of(study_uid, RESULTS[1])
        pixels = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
        (frame,) = [
            i
            for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence)
            if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == 2
        ]
        assert seg.SegmentSequence[1].SegmentLabel == made.LUNG_SEGMENT_LABEL
        return pixels[frame].astype(bool)


def _lesion_case(source: pydicom.Dataset, pacs_model) -> list[pydicom.Dataset]:
    """The four results for ``source`` with a heatmap that is 1 inside the lesion, 0 outside."""
    rows, columns = int(source.Rows), int(source.Columns)
    heatmap = np.zeros((rows, columns), np.float32)
    top, bottom = (int(f * rows) for f in LESION_ROWS)
    left, right = (int(f * columns) for f in LESION_COLUMNS)
    heatmap[top:bottom, left:right] = 1.0
    algorithm = made.Algorithm("cxr", pacs_model.version, 0.5)
    prediction = Prediction(0.9, "PNEUMONIA", 2.2, 0.5, "cxr", pacs_model.version)
    gray = np.stack([source.pixel_array.astype(np.float32)] * 3, axis=-1)
    rgb = (255 * (gray - gray.min()) / max(float(np.ptp(gray)), 1.0)).astype(np.uint8)
    rgb[top:bottom, left:right, 0] = 255
    return [
        made.build_sr(source, prediction, algorithm),
        made.build_seg(source, heatmap, algorithm),
        made.build_pmap(source, heatmap, algorithm),
        made.build_sc(source, rgb, prediction, algorithm),
    ]


@pytest.fixture(scope="module")
def reading_room(pacs_model, lung_fields_export, chest_pngs, tmp_path_factory):
    require_chromium()
    try:
        nginx_binary()
    except ViewerError as exc:  # it says what to install
        pytest.skip(str(exc))
    viewer_dist()  # fetched before the servers start: a missing npm skips, never half-starts
    base = tmp_path_factory.mktemp("reading-room")
    node_port, orthanc_port = free_port(), free_port()
    # The node is sent images by the test, as a router would; Orthanc only receives results and
    # serves DICOMweb (its own routing is tested in test_orthanc).
    orthanc = OrthancProcess(
        base / "orthanc",
        NodeAddress("CXR_AI", "127.0.0.1", node_port),
        dicom_port=orthanc_port,
        routing=False,
        dicomweb_root=True,
        archive_users=dict([ADMIN, READER]),  # the test uploads as the administrator
        readers_read_only=True,
    ).start()
    dicom = replace(
        pacs_model.settings.dicom,
        dicom_port=node_port,
        dicom_host="127.0.0.1",
        dicom_destination=f"ORTHANC@127.0.0.1:{orthanc_port}",
        dicom_allowed_aets=("MODALITY",),
        dicom_retry_initial_seconds=0.5,
        dicom_retry_max_seconds=2.0,
    )
    # With a lung fields version of its own: the SEG carries the fields beside the heatmap.
    registry = replace(
        pacs_model.settings.registry, registry_lung_model_name="cxr-lung-fields-viewer"
    )
    release_lung_fields(registry, lung_fields_export)
    node = build_node(dicom, registry, state_dir=base / "node")
    node.start()
    viewer = tls_viewer(base, orthanc.url)
    pacs = Pacs(orthanc, node)
    try:
        analysed, data = radiograph_bytes(
            chest_pngs[5], replace(VARIANTS["cr-mono2-12bit"], patient_id="CXR-READ-1")
        )
        refused = radiograph_dataset(
            _pixels_of("document"), RadiographSpec(body_part="CHEST", patient_id="CXR-READ-2")
        )
        orthanc.upload(data)
        orthanc.upload(encode_dataset(refused))
        assert send(node.port, [analysed, refused]).statuses == [0, 0]
        pacs.wait_for_results(analysed.StudyInstanceUID, [CR, *RESULTS], timeout=120)
        pacs.wait_for_results(refused.StudyInstanceUID, [CR, RESULTS[0]], timeout=120)

        lesion = radiograph(chest_pngs[6], RadiographSpec(patient_id="CXR-READ-3"))
        for dataset in (lesion, *_lesion_case(lesion, pacs_model)):
            orthanc.upload(encode_dataset(dataset))
        yield ReadingRoom(pacs, viewer, analysed, refused, lesion)
    finally:
        viewer.stop()
        node.stop()
        orthanc.stop()


@contextlib.contextmanager
def reading(width: int = 1600, height: int = 1000):
    """Chromium as a radiologist's browser: it takes the test's self-signed certificate and
    sends the reader's credentials with every request (as after the login prompt)."""
    token = base64.b64encode(":".join(READER).encode()).decode()
    with chromium(width, height, ("--ignore-certificate-errors",)) as driver:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}}
        )
        yield driver


@pytest.fixture(scope="module")
def shots() -> Path:
    return screenshot_folder("cxr-ohif-screenshots", "CXR_VIEWER_SCREENSHOTS")


# -- the viewer as a person uses it -------------------------------------------------------------


def _clicked(driver, label: str) -> bool:
    for element in driver.find_elements(By.XPATH, f"//button[normalize-space()='{label}']"):
        with contextlib.suppress(StaleElementReferenceException, ElementClickInterceptedException):
            element.click()
            return True
    return False


def open_study(driver, room: ReadingRoom, study_uid: str, series: list[str]) -> None:
    """The study in OHIF's basic viewer, once its series list shows every description in
    ``series`` and the radiograph is drawn.

    A fresh browser profile meets OHIF's first-visit tour, a modal that swallows clicks until it
    is skipped, and its investigational-use banner; both are put away as a reader would.
    """
    driver.get(room.viewer.study_url(study_uid))
    wait_for(
        lambda: all(d in page_text(driver) for d in series),
        120,
        f"the series {series} in OHIF's study browser",
    )
    # The window/level overlay appears once the first image is rendered.
    wait_for(lambda: _source_shown(driver) and "W:" in page_text(driver), 60, "the radiograph")
    if not getattr(driver, "welcomed", False):
        wait_for(lambda: _clicked(driver, "Skip all"), 30, "OHIF's first-visit tour")
        wait_for(lambda: _clicked(driver, "Confirm and hide"), 30, "OHIF's investigational banner")
        wait_for(lambda: "Skip all" not in page_text(driver), 10, "the tour to close")
        driver.welcomed = True  # OHIF remembers both in the profile's local storage


def page_text(driver) -> str:
    try:
        return driver.find_element(By.TAG_NAME, "body").text
    except StaleElementReferenceException:
        return ""


def drawn_text(driver) -> str:
    """The words OHIF draws over the image (SVG annotations), whether or not the viewport
    clips them: a reader can pan to any of them."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('svg text'))"
        ".map(t => t.textContent).join('\\n');"
    )


def wait_until_drawn(driver, words: str, what: str) -> None:
    """Until ``words`` are drawn over the image. OHIF 3.13's SR viewport sometimes registers a
    report's annotation after its last render, so it shows at the reader's next interaction
    with the viewport; a resize of the window is that interaction here."""
    try:
        wait_for(lambda: words in drawn_text(driver), 10, what)
    except AssertionError:
        size = driver.get_window_size()
        driver.set_window_size(size["width"] + 10, size["height"])
        wait_for(lambda: words in drawn_text(driver), 30, f"{what} ({words!r})")


def open_report(driver, description: str, words: str, what: str, picture: Path) -> str:
    """Open the report listed as ``description``, wait until ``words`` are drawn (a screenshot
    either way), and return all the words drawn over the image; OHIF refused nothing."""
    load_series(driver, description)
    try:
        wait_until_drawn(driver, words, what)
    finally:
        screenshot(driver, picture)
    assert_no_refusal(driver)
    return drawn_text(driver)


def comments_of(sr: pydicom.Dataset) -> list[str]:
    return [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]


def toasts(driver) -> list[str]:
    """OHIF's notifications (sonner toasts) now on the page."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('[data-sonner-toast]'))"
        ".map(t => t.textContent);"
    )


def hide_toasts(driver) -> None:
    """Notifications float over the image in colour; they are read (:func:`toasts`), then kept
    out of the screenshots that measure overlays."""
    driver.execute_script(
        "const s = document.createElement('style');"
        "s.textContent = '[data-sonner-toaster] { display: none !important; }';"
        "document.head.appendChild(s);"
    )


REFUSALS_BY_OHIF = ("not supported", "not yet supported", "error", "failed", "unable")


def assert_no_refusal(driver) -> None:
    for toast in toasts(driver):
        assert not any(word in toast.lower() for word in REFUSALS_BY_OHIF), toast


def _source_shown(driver) -> bool:
    rect = viewport_rect(driver)
    return rect is not None and rect[2] > 100


def load_series(driver, description: str) -> None:
    """Double-click the series in the study browser, as a reader does, and accept OHIF's offer
    to open a segmentation."""

    def listed() -> list:
        path = f"//*[normalize-space()='{description}']"
        return [e for e in driver.find_elements(By.XPATH, path) if e.is_displayed()]

    # The innermost element with the words: its ancestors (a tooltip button) take no clicks.
    item = wait_for(listed, 30, f"{description!r} in the study browser")[-1]
    ActionChains(driver).double_click(item).perform()


def viewport_rect(driver) -> tuple[float, float, float, float] | None:
    """The active viewport's canvas on the page (left, top, width, height), in screenshot
    pixels."""
    return driver.execute_script(
        """
        const canvas = document.querySelector('canvas.cornerstone-canvas');
        if (!canvas) return null;
        const r = canvas.getBoundingClientRect();
        const k = window.devicePixelRatio || 1;
        return [r.left * k, r.top * k, r.width * k, r.height * k];
        """
    )


def screenshot(driver, path: Path) -> np.ndarray:
    driver.save_screenshot(str(path))
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def image_on_screen(driver, rows: int, columns: int) -> tuple[float, float, float]:
    """Where OHIF put a rows x columns image (square pixels): fitted whole and centred in the
    viewport. Returns (left, top, scale)."""
    left, top, width, height = viewport_rect(driver)
    scale = min(width / columns, height / rows)
    return left + (width - columns * scale) / 2, top + (height - rows * scale) / 2, scale


def coloured_box(picture: np.ndarray, area: tuple[int, int, int, int]) -> tuple | None:
    """The bounding box (left, top, right, bottom) of the coloured pixels inside ``area`` of a
    screenshot: the radiograph is grey, so colour is an overlay. Rows and columns with a
    handful of coloured pixels (OHIF's orientation letters) do not count."""
    x0, y0, x1, y1 = area
    region = picture[y0:y1, x0:x1]
    coloured = (region.max(axis=-1) - region.min(axis=-1)) > 40
    rows = np.flatnonzero(coloured.sum(axis=1) > 20)
    columns = np.flatnonzero(coloured.sum(axis=0) > 20)
    if rows.size == 0 or columns.size == 0:
        return None
    return x0 + columns[0], y0 + rows[0], x0 + columns[-1] + 1, y0 + rows[-1] + 1


def cyan_box(picture: np.ndarray, area: tuple[int, int, int, int]) -> tuple | None:
    """The bounding box of the cyan pixels inside ``area``: the lung fields segment's colour,
    apart from the red heatmap segment and the grey radiograph."""
    x0, y0, x1, y1 = area
    region = picture[y0:y1, x0:x1]
    red, green, blue = region[..., 0], region[..., 1], region[..., 2]
    cyan = (green - red > 40) & (blue - red > 40)
    rows = np.flatnonzero(cyan.sum(axis=1) > 5)
    columns = np.flatnonzero(cyan.sum(axis=0) > 5)
    if rows.size == 0 or columns.size == 0:
        return None
    return x0 + columns[0], y0 + rows[0], x0 + columns[-1] + 1, y0 + rows[-1] + 1


def _image_area(driver, source: pydicom.Dataset) -> tuple[tuple[int, int, int, int], tuple]:
    left, top, scale = image_on_screen(driver, int(source.Rows), int(source.Columns))
    right, bottom = left + int(source.Columns) * scale, top + int(source.Rows) * scale
    inset = 3  # the viewport's own border is drawn in colour
    area = (int(left) + inset, int(top) + inset, int(right) - inset, int(bottom) - inset)
    return area, (left, top, scale)


def _expected_lesion_box(source: pydicom.Dataset, placement: tuple) -> np.ndarray:
    left, top, scale = placement
    rows, columns = int(source.Rows), int(source.Columns)
    r0, r1 = (int(f * rows) for f in LESION_ROWS)
    c0, c1 = (int(f * columns) for f in LESION_COLUMNS)
    return np.array([left + c0 * scale, top + r0 * scale, left + c1 * scale, top + r1 * scale])


# -- what a radiologist sees ---------------------------------------------------------------------


def test_the_report_is_listed_and_readable_beside_the_image(reading_room, pacs_model, shots):
    room = reading_room
    study = room.analysed.StudyInstanceUID
    sr = room.sr_of(study)
    texts = comments_of(sr)
    finding = next(t for t in texts if t.startswith("AI: pneumonia "))
    series = [
        made.SR_DESCRIPTION,
        made.SEG_DESCRIPTION,
        made.PMAP_DESCRIPTION,
        made.SC_DESCRIPTION,
    ]
    with reading() as driver:
        open_study(driver, room, study, series)
        screenshot(driver, shots / "analysed-study.png")
        shown = open_report(
            driver,
            made.SR_DESCRIPTION,
            finding,
            "the report's finding in OHIF",
            shots / "analysed-report.png",
        )
    # Finding, probability and operating point, model and version: as the node wrote them.
    # With the lung fields, a few words on where the heatmap lies ride on the finding's line.
    assert re.fullmatch(r"AI: pneumonia (present|absent); map \d+% on lungs", finding), finding
    (point,) = [t for t in texts if t.startswith("probability ")]
    assert point in shown and "threshold" in point
    probability = float(point.split()[1].rstrip(","))
    (value,) = [e.value for e in sr.iterall() if e.keyword == "NumericValue"]
    assert probability == pytest.approx(float(value), abs=5e-4)
    (model,) = [t for t in texts if t.startswith("model ")]
    assert model in shown and model.startswith(f"model cxr v{pacs_model.version} (cxr_platform ")
    assert made.NOT_FOR_DIAGNOSIS_ALONE in shown
    assert f"Probability: {float(value):.2f}" in shown  # OHIF's own rendering of the NUM


def overlay_box(driver, area: tuple, picture: Path, timeout_s: float, what: str) -> tuple:
    """The box of the overlay once drawn over ``area``, OHIF having refused nothing on the way;
    its notifications are read, then kept out of the screenshot."""

    def drawn() -> tuple | None:
        assert_no_refusal(driver)
        hide_toasts(driver)
        return coloured_box(screenshot(driver, picture), area)

    return wait_for(drawn, timeout_s, what)


def assert_on_the_lesion(box: tuple, room: ReadingRoom, area: tuple, placement: tuple) -> None:
    expected = _expected_lesion_box(room.lesion, placement)
    tolerance = max(4.0, 0.01 * (area[2] - area[0]))  # 1% of the image's width on screen
    assert np.abs(np.array(box) - expected).max() <= tolerance, (box, expected)


def test_the_segmentation_lies_on_the_lesion(reading_room, shots):
    room = reading_room
    with reading() as driver:
        open_study(driver, room, room.lesion.StudyInstanceUID, [made.SEG_DESCRIPTION])
        area, placement = _image_area(driver, room.lesion)
        before = screenshot(driver, shots / "lesion-source.png")
        assert coloured_box(before, area) is None, "no overlay before the SEG is opened"
        load_series(driver, made.SEG_DESCRIPTION)
        wait_for(lambda: _clicked(driver, "Yes"), 60, "OHIF's offer to open the segmentation")
        box = overlay_box(driver, area, shots / "lesion-seg.png", 60, "the SEG over the image")
    assert_on_the_lesion(box, room, area, placement)


def test_the_parametric_map_is_a_heat_overlay_on_the_lesion(reading_room, shots):
    room = reading_room
    with reading() as driver:
        open_study(driver, room, room.lesion.StudyInstanceUID, [made.PMAP_DESCRIPTION])
        area, placement = _image_area(driver, room.lesion)
        load_series(driver, made.PMAP_DESCRIPTION)
        box = overlay_box(driver, area, shots / "lesion-pmap.png", 90, "the map over the image")
    assert_on_the_lesion(box, room, area, placement)


def test_the_node_heatmaps_open_as_overlays(reading_room, shots):
    """The node's own SEG and parametric map (its Grad-CAM, wherever it fell) both open over
    the radiograph they were made from; the SEG's lung fields segment lies where the SEG says."""
    room = reading_room
    source = room.analysed
    with reading() as driver:
        open_study(driver, room, source.StudyInstanceUID, [made.PMAP_DESCRIPTION])
        area, placement = _image_area(driver, source)
        load_series(driver, made.PMAP_DESCRIPTION)
        overlay_box(driver, area, shots / "analysed-pmap.png", 90, "the node's map")
        open_study(driver, room, source.StudyInstanceUID, [made.SEG_DESCRIPTION])
        load_series(driver, made.SEG_DESCRIPTION)
        wait_for(lambda: _clicked(driver, "Yes"), 60, "OHIF's offer to open the segmentation")
        overlay_box(driver, area, shots / "analysed-seg.png", 60, "the node's segmentation")
        # The second segment, the lung fields, drawn in its own colour where the SEG has them.
        lungs = room.lung_fields_of(source.StudyInstanceUID)
        drawn = cyan_box(screenshot(driver, shots / "analysed-seg.png"), area)
    rows, columns = np.flatnonzero(lungs.any(axis=1)), np.flatnonzero(lungs.any(axis=0))
    left, top, scale = placement
    expected = np.array(
        [
            left + columns[0] * scale,
            top + rows[0] * scale,
            left + (columns[-1] + 1) * scale,
            top + (rows[-1] + 1) * scale,
        ]
    )
    assert drawn is not None, "no lung fields on screen"
    tolerance = max(4.0, 0.01 * (area[2] - area[0]))
    assert np.abs(np.array(drawn) - expected).max() <= tolerance, (drawn, expected)


def test_the_secondary_capture_opens_as_an_image_with_its_caption(reading_room, shots):
    room = reading_room
    source = room.analysed
    with reading() as driver:
        open_study(driver, room, source.StudyInstanceUID, [made.SC_DESCRIPTION])
        area, placement = _image_area(driver, source)
        load_series(driver, made.SC_DESCRIPTION)

        def captioned() -> tuple[np.ndarray] | None:
            picture = screenshot(driver, shots / "analysed-sc.png")
            x0, y0, x1, _ = area
            band = picture[y0 : y0 + int(0.06 * (area[3] - y0)), x0:x1].max(axis=-1)
            dark, white = (band < 40).mean(), (band > 200).mean()
            return (picture,) if dark > 0.6 and 0.005 < white < 0.4 else None

        (picture,) = wait_for(captioned, 60, "the captioned secondary capture in the viewport")
    # Below the caption band, the radiograph itself (with its heat overlay).
    x0, y0, x1, y1 = area
    body = picture[y0 + int(0.2 * (y1 - y0)) : y1, x0:x1]
    assert body.mean() > 30


def test_a_refused_study_shows_the_not_analysed_report_and_nothing_else(reading_room, shots):
    room = reading_room
    study = room.refused.StudyInstanceUID
    sr = room.sr_of(study)
    (why,) = [t for t in comments_of(sr) if t.startswith("Not analysed by the AI: ")]
    with reading() as driver:
        open_study(driver, room, study, [made.NOT_ANALYSED_SR_DESCRIPTION])
        listed = page_text(driver)
        shown = open_report(
            driver,
            made.NOT_ANALYSED_SR_DESCRIPTION,
            why,
            "the reason the AI did not analyse it",
            shots / "refused-report.png",
        )
    for description in (made.SEG_DESCRIPTION, made.PMAP_DESCRIPTION, made.SC_DESCRIPTION):
        assert description not in listed
    assert made.SR_DESCRIPTION not in listed
    assert "Probability: " not in shown  # no number, not even an empty one
    assert made.NOT_FOR_DIAGNOSIS_ALONE in shown


def test_a_reader_in_the_viewer_cannot_write_and_neither_can_the_admin_through_it(
    reading_room, shots
):
    """From the reading page itself (the browser's own requests, with the reader's login):
    STOW-RS, the DICOMweb client's peers and deleting one are refused; the administrator's
    account through the same origin is refused them too; the study still displays."""
    room = reading_room
    study = room.analysed.StudyInstanceUID
    asks = [
        ("POST", "/dicom-web/studies"),
        ("GET", "/dicom-web/servers"),
        ("DELETE", "/dicom-web/servers/cxr-ai"),
        ("PUT", f"/dicom-web/studies/{study}"),
    ]
    with reading() as driver:
        open_study(driver, room, study, [made.SR_DESCRIPTION])
        from_the_page = driver.execute_async_script(
            """
            const [asks, done] = arguments;
            Promise.all(asks.map(([method, path]) =>
                fetch(path, {method, body: method === 'GET' ? undefined : 'x'})
                    .then(r => r.status))).then(done);
            """,
            asks,
        )
        admin = [
            httpx.request(
                method, f"{room.viewer.url}{path}", auth=ADMIN, content=b"x", verify=False
            ).status_code
            for method, path in asks
        ]
        open_study(driver, room, study, [made.SR_DESCRIPTION])
        screenshot(driver, shots / "after-refused-writes.png")
        assert "W:" in page_text(driver)
    assert from_the_page == admin == [405, 403, 405, 405], (from_the_page, admin)
    assert len(room.pacs.orthanc.study_instances(study)) == 5  # the source and its 4 results
