"""OHIF v3, the viewer radiologists read in, served on one origin with the PACS's DICOMweb root.

The viewer is the prebuilt ``@ohif/app`` package from the npm registry: pinned to one version,
its tarball checked against the integrity the registry published for it, never built here. nginx
serves its ``dist/`` with our ``app-config.js`` (one DICOMweb data source: ``/dicom-web`` on the
same origin) and proxies ``/dicom-web/`` to Orthanc. The nginx server block is one template,
filled from the environment by the nginx image in a deployment and by :class:`ViewerServer`
here, so what a test opens is what a hospital runs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from urllib.parse import quote

import httpx

from cxr_platform.errors import CxrError
from cxr_platform.sections import ViewerSection


class ViewerError(CxrError):
    """The viewer could not be fetched, verified or started."""


@dataclass(frozen=True)
class OhifRelease:
    package: str
    version: str
    # The registry's Subresource Integrity string for the tarball (``npm view PKG dist``).
    integrity: str

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"


OHIF = OhifRelease(
    package="@ohif/app",
    version="3.13.2",
    integrity="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==",
)

DICOMWEB_PATH = "/dicom-web"
_FILES = resources.files("cxr_platform.pacs") / "viewer_files"


def app_config_text() -> str:
    return (_FILES / "app-config.js").read_text()


def server_template_text() -> str:
    return (_FILES / "server.conf.template").read_text()


def integrity_of(path: Path, algorithm: str = "sha512") -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return f"{algorithm}-{base64.b64encode(digest.digest()).decode()}"


def verify_tarball(path: Path, release: OhifRelease) -> None:
    algorithm = release.integrity.split("-", 1)[0]
    found = integrity_of(path, algorithm)
    if found != release.integrity:
        raise ViewerError(
            f"{path.name} does not match the pinned {release.spec}: integrity {found}, "
            f"expected {release.integrity}. Not using it."
        )


def ohif_dist(cache_dir: Path, release: OhifRelease = OHIF) -> Path:
    """The built viewer (``dist/``) of ``release``, fetched and verified once per cache.

    ``npm pack`` downloads the package's tarball from the configured registry without installing
    its dependencies (the build needs none); the tarball is checked against the pinned integrity
    before anything is unpacked, and the unpacked folder appears whole or not at all.
    """
    cache = Path(cache_dir)
    dist = cache / release.version / "dist"
    if (dist / "index.html").is_file():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise ViewerError(
            f"npm is not installed: it fetches the prebuilt viewer {release.spec} "
            "(Debian: apt-get install npm)"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as work:
        packed = subprocess.run(
            [npm, "pack", release.spec, "--pack-destination", work, "--silent"],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        tarballs = list(Path(work).glob("*.tgz"))
        if packed.returncode != 0 or len(tarballs) != 1:
            raise ViewerError(f"npm pack {release.spec} failed: {packed.stderr.strip()[-2000:]}")
        verify_tarball(tarballs[0], release)
        unpacked = Path(work) / "unpacked"
        with tarfile.open(tarballs[0]) as archive:
            archive.extractall(unpacked, filter="data")
        built = unpacked / "package" / "dist"
        if not (built / "index.html").is_file():
            raise ViewerError(f"{release.spec} has no built viewer (package/dist/index.html)")
        dist.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError, OSError):
            # Another process may have finished the same fetch first; either copy is the same.
            built.rename(dist)
    if not (dist / "index.html").is_file():
        raise ViewerError(f"could not place the viewer in {dist}")
    return dist


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def render_server_block(viewer: ViewerSection, *, dist: Path, app_config: Path) -> str:
    """The shipped server block with its placeholders filled, as the nginx image fills them
    from the environment (``CXR_VIEWER_*`` are the viewer's settings; ``OHIF_*`` where the
    image keeps the files); nginx's own ``$variables`` stay as they are.

    Without a certificate the TLS lines are dropped, on a loopback address only: anywhere else
    readers would send their PACS credentials across the network in clear."""
    cert, key = viewer.viewer_tls_cert, viewer.viewer_tls_key
    if cert is None and viewer.viewer_host not in LOOPBACK_HOSTS:
        raise ViewerError(
            f"the viewer listens on {viewer.viewer_host} without TLS: readers' credentials "
            "would cross the network in clear; set CXR_VIEWER_TLS_CERT and CXR_VIEWER_TLS_KEY "
            "(or listen on 127.0.0.1)"
        )
    for name, path in (("CXR_VIEWER_TLS_CERT", cert), ("CXR_VIEWER_TLS_KEY", key)):
        if path is not None and not Path(path).is_file():
            raise ViewerError(f"{name}: {path} is not a file")
    values = {
        "CXR_VIEWER_HOST": viewer.viewer_host,
        "CXR_VIEWER_PORT": str(viewer.viewer_port),
        "CXR_VIEWER_PACS_URL": viewer.viewer_pacs_url.rstrip("/"),
        "CXR_VIEWER_TLS_CERT": str(Path(cert).resolve()) if cert else "",
        "CXR_VIEWER_TLS_KEY": str(Path(key).resolve()) if key else "",
        "OHIF_ROOT": str(dist),
        "OHIF_APP_CONFIG": str(app_config),
    }
    text = Template(server_template_text()).safe_substitute(values)
    return text if cert is not None else _without_tls(text)


def _without_tls(text: str) -> str:
    """The server block for loopback without a certificate: no ``ssl_`` lines, plain
    ``listen``."""
    lines = []
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("ssl_"):
            continue
        if stripped.startswith("listen ") and stripped.endswith(" ssl;"):
            line = line.replace(" ssl;", ";")
        lines.append(line)
    return "".join(lines)


def write_site_files(folder: Path, dist: Path) -> list[Path]:
    """What a viewer image serves, in one folder: the built viewer (``dist/``), our
    ``app-config.js`` and the unfilled nginx server block."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "dist"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(dist, target)
    written = [target, folder / "app-config.js", folder / "server.conf.template"]
    written[1].write_text(app_config_text())
    written[2].write_text(server_template_text())
    return written


def study_url(base_url: str, study_instance_uid: str) -> str:
    """Where a reader opens one study in OHIF's basic viewer mode."""
    return f"{base_url.rstrip('/')}/viewer?StudyInstanceUIDs={quote(study_instance_uid)}"


_MAIN_CONF = """\
# nginx for one user, started by cxr_platform: everything it writes stays in this folder.
daemon off;
{user}worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 256; }}
http {{
    include {mime_types};
    default_type application/octet-stream;
    access_log off;  # the server block logs, in a format without identifiers
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    sendfile on;
    include {work}/server.conf;
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise ViewerError("nginx is not installed (Debian: apt-get install nginx)")
    return found


class ViewerServer:
    """OHIF over a PACS's DICOMweb root, served by a local nginx as ``viewer`` says."""

    def __init__(
        self,
        viewer: ViewerSection,
        workdir: Path,
        *,
        dist: Path | None = None,
        mime_types: Path = Path("/etc/nginx/mime.types"),
    ) -> None:
        self.viewer = viewer
        self.workdir = Path(workdir)
        self.dist = dist
        self.mime_types = mime_types
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = self.viewer.viewer_host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        scheme = "https" if self.viewer.viewer_tls_cert is not None else "http"
        return f"{scheme}://{shown}:{self.viewer.viewer_port}"

    def study_url(self, study_instance_uid: str) -> str:
        return study_url(self.url, study_instance_uid)

    def write_config(self) -> Path:
        work = self.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
        dist = self.dist or ohif_dist(self.viewer.viewer_cache_dir)
        app_config = work / "app-config.js"
        app_config.write_text(app_config_text())
        (work / "server.conf").write_text(
            render_server_block(self.viewer, dist=dist.resolve(), app_config=app_config)
        )
        main = work / "nginx.conf"
        # Started by root, nginx would hand its workers to an unprivileged user who cannot read
        # a root's cache or this folder; they stay with whoever started it, as without root.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
        main.write_text(_MAIN_CONF.format(work=work, mime_types=self.mime_types, user=user))
        return main

    def start(self, timeout: float = 30.0) -> ViewerServer:
        main = self.write_config()
        nginx = nginx_binary()
        checked = subprocess.run(
            [nginx, "-t", "-q", "-p", str(self.workdir.resolve()), "-c", str(main)],
            capture_output=True,
            text=True,
            check=False,
        )
        if checked.returncode != 0:
            raise ViewerError(f"nginx refused the viewer's configuration: {checked.stderr}")
        log = (self.workdir / "nginx.out").open("ab")
        self.process = subprocess.Popen(
            [nginx, "-p", str(self.workdir.resolve()), "-c", str(main)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error_log = self.workdir / "error.log"
                detail = error_log.read_text()[-2000:] if error_log.exists() else ""
                raise ViewerError(f"nginx exited at start-up: {detail}")
            with contextlib.suppress(httpx.HTTPError):
                if self._get("/app-config.js", timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise ViewerError(f"the viewer did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None:
            return
        # QUIT lets nginx finish the responses in flight before it goes.
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _get(self, path: str, **kwargs) -> httpx.Response:
        # This process asking the nginx it started, on this machine: the certificate is the
        # one it was given, whoever signed it.
        return httpx.get(f"{self.url}{path}", verify=False, **kwargs)

    def latest_study(self, auth: tuple[str, str] | None = None) -> str | None:
        """The most recent study the viewer can open (QIDO-RS through the viewer's own proxy,
        so it also proves the PACS answers there), or None when PACS holds none."""
        response = self._get(
            f"{DICOMWEB_PATH}/studies",
            params={"includefield": "00080020,00080030"},
            auth=auth,
            timeout=30,
        )
        if response.status_code == 401:
            raise ViewerError("PACS asks for credentials to list its studies")
        if response.status_code >= 400:
            raise ViewerError(
                f"PACS did not list its studies through the viewer: HTTP {response.status_code} "
                f"{response.text[:300]}"
            )
        studies = response.json() if response.content else []

        def when(study: dict) -> str:
            date = (study.get("00080020", {}).get("Value") or [""])[0]
            time_of_day = (study.get("00080030", {}).get("Value") or [""])[0]
            return f"{date}{time_of_day}"

        if not studies:
            return None
        latest = max(studies, key=when)
        return str(latest["0020000D"]["Value"][0])
