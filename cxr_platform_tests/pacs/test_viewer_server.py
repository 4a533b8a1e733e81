"""`cxr viewer` as a PACS administrator runs it over a real Orthanc, and the checks that keep a
tampered viewer package out (the browser test, test_viewer.py, shows what it serves)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from cxr_platform.pacs.storage import encode_dataset
from cxr_platform.pacs.viewer import (
    OHIF,
    OhifRelease,
    ViewerError,
    integrity_of,
    nginx_binary,
    ohif_dist,
    verify_tarball,
)
from cxr_platform.ports import free_port
from cxr_platform_tests.orthanc import NodeAddress, OrthancProcess

from .conftest import VARIANTS, cxr_process, radiograph, viewer_dist

pytestmark = pytest.mark.xdist_group("pacs")


def _tarball(path: Path, text: str) -> Path:
    source = path.with_suffix(".txt")
    source.write_text(text)
    with tarfile.open(path, "w:gz") as archive:
        archive.add(source, arcname="package/dist/index.html")
    return path


def test_a_tarball_is_used_only_when_it_matches_the_pinned_integrity(tmp_path):
    genuine = _tarball(tmp_path / "genuine.tgz", "<html>viewer</html>")
    release = OhifRelease("@ohif/app", "0.0.0", integrity_of(genuine))
    verify_tarball(genuine, release)  # no error
    tampered = _tarball(tmp_path / "tampered.tgz", "<html>viewer + something</html>")
    with pytest.raises(ViewerError, match="does not match the pinned @ohif/app@0.0.0"):
        verify_tarball(tampered, release)


def test_a_downloaded_viewer_that_fails_its_check_is_never_unpacked(tmp_path):
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed (.ci/run installs it)")
    wrong = OhifRelease(OHIF.package, OHIF.version, "sha512-" + "A" * 86 + "==")
    with pytest.raises(ViewerError, match="does not match the pinned"):
        ohif_dist(tmp_path / "cache", wrong)
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == [] and not (tmp_path / "cache" / OHIF.version).exists()


@pytest.fixture(scope="module")
def orthanc_with_a_study(tmp_path_factory, chest_pngs):
    try:
        nginx_binary()
    except ViewerError as exc:
        pytest.skip(str(exc))
    base = tmp_path_factory.mktemp("viewer-cli")
    orthanc = OrthancProcess(
        base / "orthanc",
        NodeAddress("CXR_AI", "127.0.0.1", free_port()),
        routing=False,
        dicomweb_root=True,
    ).start()
    source = radiograph(chest_pngs[9], VARIANTS["cr-mono2-12bit"])
    orthanc.upload(encode_dataset(source))
    yield orthanc, source
    orthanc.stop()


def _viewer_process(home, *args) -> subprocess.Popen:
    return cxr_process(home, "viewer", *args)


def _lines_until(process: subprocess.Popen, prefix: str, timeout_s: float = 120) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"viewer exited: {''.join(lines)}")
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no {prefix!r} line: {''.join(lines)}")


def test_the_viewer_command_serves_ohif_over_orthanc_and_prints_a_study(
    orthanc_with_a_study, tmp_path
):
    orthanc, source = orthanc_with_a_study
    viewer_dist()
    port = free_port()
    process = _viewer_process(tmp_path / "home", "--pacs-url", orthanc.url, "--port", str(port))
    try:
        lines = _lines_until(process, "study: ")
        url = lines[-1].removeprefix("study: ").strip()
        assert url == (
            f"http://127.0.0.1:{port}/viewer?StudyInstanceUIDs={source.StudyInstanceUID}"
        )
        page = httpx.get(url, timeout=10)  # a viewer route: the single-page app's index
        assert page.status_code == 200 and "<html" in page.text.lower()
        config = httpx.get(f"http://127.0.0.1:{port}/app-config.js", timeout=10)
        assert "qidoRoot: '/dicom-web'" in config.text  # ours, not the package's demo server
        studies = httpx.get(f"http://127.0.0.1:{port}/dicom-web/studies", timeout=10).json()
        assert [s["0020000D"]["Value"][0] for s in studies] == [source.StudyInstanceUID]
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    with pytest.raises(httpx.HTTPError):  # nginx went with it
        httpx.get(f"http://127.0.0.1:{port}/app-config.js", timeout=2)


def test_a_port_in_use_is_a_clear_error(orthanc_with_a_study, tmp_path):
    orthanc, _ = orthanc_with_a_study
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = _viewer_process(tmp_path / "home", "--pacs-url", orthanc.url, "--port", str(port))
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 2, output
    assert "error: nginx exited at start-up" in output and "Address already in use" in output


def test_a_pacs_address_that_is_not_a_url_is_refused_with_its_name(tmp_path):
    process = _viewer_process(tmp_path / "home", "--pacs-url", "pacs.example:8042")
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2, output
    assert "viewer_pacs_url must be an http:// or https:// URL" in output


def test_site_files_hold_what_an_image_serves(tmp_path):
    viewer_dist()
    process = _viewer_process(tmp_path / "home", "--site-files", str(tmp_path / "site"))
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert (tmp_path / "site" / "dist" / "index.html").is_file()
    assert "${CXR_VIEWER_PACS_URL}" in (tmp_path / "site" / "server.conf.template").read_text()
    assert "dataSources" in (tmp_path / "site" / "app-config.js").read_text()
