"""`cxr viewer` as a PACS administrator runs it over a real Orthanc, and the checks that keep a
tampered viewer package out (the browser test, test_viewer.py, shows what it serves)."""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
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

from .conftest import VARIANTS, cxr_process, radiograph, self_signed, viewer_dist


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


def _viewer_process(home, *args, env: dict[str, str] | None = None) -> subprocess.Popen:
    return cxr_process(home, "viewer", *args, env=env)


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


def _on_a_terminal(home: Path, *args: str) -> tuple[subprocess.Popen, int]:
    """``cxr viewer`` with its output on a pseudo-terminal, as an administrator at a shell sees
    it; returns the process and the terminal's reading end."""
    reader, writer = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "cxr_platform.cli", "viewer", *args],
        stdout=writer,
        stderr=writer,
        env={**os.environ, "CXR_HOME": str(home)},
    )
    os.close(writer)
    return process, reader


def _terminal_lines_until(reader: int, prefix: str, timeout_s: float = 120) -> list[str]:
    text, deadline = "", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([reader], [], [], 1)
        if ready:
            try:
                text += os.read(reader, 4096).decode()
            except OSError:  # the terminal closed: the command exited
                break
        lines = text.replace("\r", "").splitlines()
        if any(line.startswith(prefix) for line in lines):
            return lines
    raise AssertionError(f"no {prefix!r} line: {text}")


def test_the_viewer_command_serves_ohif_over_orthanc_and_prints_a_study(
    orthanc_with_a_study, tmp_path
):
    orthanc, source = orthanc_with_a_study
    viewer_dist()
    port = free_port()
    process, terminal = _on_a_terminal(
        tmp_path / "home", "--pacs-url", orthanc.url, "--port", str(port)
    )
    try:
        lines = _terminal_lines_until(terminal, "study: ")
        (line,) = [line for line in lines if line.startswith("study: ")]
        url = line.removeprefix("study: ").strip()
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
        process.wait(timeout=30)
        os.close(terminal)
    assert process.returncode == 0
    with pytest.raises(httpx.HTTPError):  # nginx went with it
        httpx.get(f"http://127.0.0.1:{port}/app-config.js", timeout=2)


def test_output_that_is_not_a_terminal_names_no_study(orthanc_with_a_study, tmp_path):
    """A service's journal or a container's log gets the study list's address, never a UID."""
    orthanc, source = orthanc_with_a_study
    viewer_dist()
    port = free_port()
    process = _viewer_process(tmp_path / "home", "--pacs-url", orthanc.url, "--port", str(port))
    try:
        lines = _lines_until(process, "study list: ")
        assert lines[-1].startswith(f"study list: http://127.0.0.1:{port}/")
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    printed = "".join(lines) + output
    assert source.StudyInstanceUID not in printed and "StudyInstanceUIDs" not in printed
    assert process.returncode == 0, printed


def test_a_viewer_off_loopback_without_tls_is_refused(tmp_path):
    process = _viewer_process(tmp_path / "home", "--host", "0.0.0.0", "--port", str(free_port()))
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2, output
    assert "without TLS" in output and "CXR_VIEWER_TLS_CERT" in output


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


ADMIN, READER = ("admin", "admin-secret-1f"), ("reader", "reader-secret-2e")


@pytest.fixture(scope="module")
def guarded_orthanc(tmp_path_factory, chest_pngs):
    """Orthanc as deploy/orthanc ships it for readers: authentication on, an administrator and
    a reader account, the shipped read-only filter, and a DICOMweb peer a writer could push
    studies to."""
    try:
        nginx_binary()
    except ViewerError as exc:
        pytest.skip(str(exc))
    base = tmp_path_factory.mktemp("guarded")
    orthanc = OrthancProcess(
        base / "orthanc",
        NodeAddress("CXR_AI", "127.0.0.1", free_port()),
        routing=False,
        dicomweb_root=True,
        archive_users=dict([ADMIN, READER]),
        readers_read_only=True,
    ).start()
    source = radiograph(chest_pngs[9], VARIANTS["cr-mono2-12bit"])
    orthanc.upload(encode_dataset(source))
    yield orthanc, source
    orthanc.stop()


def _stow_body(dataset) -> dict:
    boundary = "cxr-boundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + encode_dataset(dataset)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    kind = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return {"content": body, "headers": {"Content-Type": kind}}


def _statuses(root: str, source, account, verify) -> dict[str, int]:
    """What an account gets from ``root``: search, STOW-RS, the DICOMweb client's peers, and
    deleting one."""
    study = source.StudyInstanceUID
    asks = {
        "QIDO-RS search": ("GET", "/dicom-web/studies?PatientID=CXR*", {}),
        "WADO-RS metadata": ("GET", f"/dicom-web/studies/{study}/metadata", {}),
        "STOW-RS": ("POST", "/dicom-web/studies", _stow_body(source)),
        "GET /dicom-web/servers": ("GET", "/dicom-web/servers", {}),
        "DELETE /dicom-web/servers/cxr-ai": ("DELETE", "/dicom-web/servers/cxr-ai", {}),
    }
    return {
        name: httpx.request(
            method, f"{root}{path}", auth=account, verify=verify, timeout=30, **kwargs
        ).status_code
        for name, (method, path, kwargs) in asks.items()
    }


def test_through_the_reading_room_readers_and_admin_read_and_nothing_else(
    guarded_orthanc, tmp_path
):
    """`cxr viewer` over TLS (a certificate made here) in front of a PACS with authentication:
    a reader and the administrator both search and read through it; STOW-RS, the DICOMweb
    client's peers and deleting one are refused for both. On Orthanc's own port the reader's
    account is refused them too (the shipped filter); only the administrator writes there."""
    orthanc, source = guarded_orthanc
    viewer_dist()
    cert, key = self_signed(tmp_path)
    port = free_port()
    process = _viewer_process(
        tmp_path / "home",
        *("--pacs-url", orthanc.url, "--port", str(port)),
        env={"CXR_VIEWER_TLS_CERT": str(cert), "CXR_VIEWER_TLS_KEY": str(key)},
    )
    try:
        _lines_until(process, "study list: ")
        viewer = f"https://127.0.0.1:{port}"
        through = {
            who: _statuses(viewer, source, account, str(cert))
            for who, account in (("reader", READER), ("admin", ADMIN))
        }
        unauthenticated = httpx.get(f"{viewer}/dicom-web/studies", verify=str(cert), timeout=30)
        # HTTPS only: nginx answers plain HTTP on its port with 400, and serves nothing.
        plain = httpx.get(f"http://127.0.0.1:{port}/app-config.js", timeout=5)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    direct = {
        who: _statuses(orthanc.url, source, account, True)
        for who, account in (("reader", READER), ("admin", ADMIN))
    }
    print("\n| request | reader, viewer | admin, viewer | reader, Orthanc | admin, Orthanc |")
    for name in through["reader"]:
        print(
            f"| {name} | {through['reader'][name]} | {through['admin'][name]} | "
            f"{direct['reader'][name]} | {direct['admin'][name]} |"
        )
    for who in ("reader", "admin"):
        seen = through[who]
        assert seen["QIDO-RS search"] == seen["WADO-RS metadata"] == 200, (who, seen)
        assert seen["STOW-RS"] == seen["DELETE /dicom-web/servers/cxr-ai"] == 405, (who, seen)
        assert seen["GET /dicom-web/servers"] == 403, (who, seen)
    assert unauthenticated.status_code == 401  # Orthanc asks; nginx holds no credential
    assert plain.status_code == 400 and "qidoRoot" not in plain.text
    reader = direct["reader"]
    assert reader["QIDO-RS search"] == reader["WADO-RS metadata"] == 200
    assert all(reader[name] == 403 for name in list(reader)[2:]), reader
    admin = direct["admin"]
    assert admin["STOW-RS"] == admin["GET /dicom-web/servers"] == 200, admin
    assert process.returncode == 0, output
