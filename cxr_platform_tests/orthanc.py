"""A real Orthanc started from ``deploy/orthanc/`` on local ports, for the tests, the benchmark
and trying the node on one machine.

The configuration shipped for hospitals is loaded as-is; only what must differ on a laptop is
overridden (ports, storage folder, the node's host and port, no HTTP authentication on
127.0.0.1). The Lua routing script is the shipped file itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cxr_platform.errors import CxrError
from cxr_platform.ports import free_port

DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "orthanc"
CONFIG_TEMPLATE = DEPLOY_DIR / "orthanc.json"
ROUTING_SCRIPT = DEPLOY_DIR / "route-to-cxr-ai.lua"
DICOMWEB_ROUTING_SCRIPT = DEPLOY_DIR / "route-to-cxr-ai-dicomweb.lua"
READERS_SCRIPT = DEPLOY_DIR / "readers-read-only.lua"
AI_MODALITY = "cxr-ai"
AI_DICOMWEB_SERVER = "cxr-ai"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class OrthancError(CxrError):
    """Orthanc is not installed, did not start, or refused a request."""


def orthanc_binary() -> str:
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise OrthancError("Orthanc is not installed (Debian: apt-get install orthanc)")
    return found


@dataclass(frozen=True)
class NodeAddress:
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class DicomWebPeer:
    """The node's STOW-RS root as Orthanc's DICOMweb client reaches it, and its key."""

    url: str
    key: str | None = None


def _require_dicomweb_plugin() -> None:
    if not DICOMWEB_PLUGIN.exists():
        raise OrthancError(
            "Orthanc's DICOMweb plugin is not installed (Debian: apt-get install orthanc-dicomweb)"
        )


class OrthancProcess:
    def __init__(
        self,
        workdir: Path,
        node: NodeAddress,
        *,
        aet: str = "ORTHANC",
        http_port: int | None = None,
        dicom_port: int | None = None,
        routing: bool = True,
        modalities: dict[str, NodeAddress] | None = None,
        dicomweb: DicomWebPeer | None = None,
        archive_users: dict[str, str] | None = None,
        dicomweb_root: bool = False,
        readers_read_only: bool = False,
    ) -> None:
        """``dicomweb``: route to the node over DICOMweb (the DICOMweb plugin and its routing
        script) instead of C-STORE; Orthanc then also takes the results by STOW-RS.
        ``archive_users``: a site archive that a silent trial searches: its DICOMweb root
        (QIDO-RS, WADO-RS) served behind HTTP basic authentication for these users.
        ``dicomweb_root``: serve the DICOMweb root (what a viewer reads) without routing by it.
        ``readers_read_only``: the shipped filter that lets every account but the administrator
        only read (with ``archive_users``, the first of which the helpers here log in as)."""
        self.workdir = Path(workdir)
        self.node = node
        self.aet = aet
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.routing = routing
        self.modalities = modalities or {}  # more peers allowed to C-STORE (modalities)
        self.dicomweb = dicomweb
        self.archive_users = archive_users
        self.dicomweb_root = dicomweb_root
        self.readers_read_only = readers_read_only
        self.auth = next(iter(archive_users.items())) if archive_users else None
        self.process: subprocess.Popen | None = None
        self.log_path = self.workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        config = json.loads(CONFIG_TEMPLATE.read_text())
        storage = self.workdir / "storage"
        modality = config["DicomModalities"][AI_MODALITY]
        modality.update({"AET": self.node.ae_title, "Host": self.node.host, "Port": self.node.port})
        for name, peer in self.modalities.items():
            config["DicomModalities"][name] = {
                "AET": peer.ae_title,
                "Host": peer.host,
                "Port": peer.port,
                "AllowStore": True,
            }
        config.update(
            {
                "Name": f"cxr-test-{self.dicom_port}",
                "StorageDirectory": str(storage),
                "IndexDirectory": str(storage),
                "HttpPort": self.http_port,
                "DicomPort": self.dicom_port,
                "DicomAet": self.aet,
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "LuaScripts": [str(ROUTING_SCRIPT)] if self.routing else [],
                "Plugins": [],
            }
        )
        if self.dicomweb is not None:
            _require_dicomweb_plugin()
            server = config["DicomWeb"]["Servers"][AI_DICOMWEB_SERVER]
            server["Url"] = self.dicomweb.url.rstrip("/") + "/"
            server["HttpHeaders"] = (
                {"Authorization": f"Bearer {self.dicomweb.key}"} if self.dicomweb.key else {}
            )
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            config["LuaScripts"] = [str(DICOMWEB_ROUTING_SCRIPT)] if self.routing else []
        if self.dicomweb_root:
            _require_dicomweb_plugin()
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
        if self.archive_users:
            _require_dicomweb_plugin()
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            config["AuthenticationEnabled"] = True
            config["RegisteredUsers"] = dict(self.archive_users)
        if self.readers_read_only:
            config["LuaScripts"] = [*config["LuaScripts"], str(READERS_SCRIPT)]
        return config

    def start(self, timeout: float = 30.0) -> OrthancProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.process = subprocess.Popen(
            [orthanc_binary(), str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OrthancError(f"Orthanc exited at start-up; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/system", timeout=2, auth=self.auth).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise OrthancError(f"Orthanc did not answer within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> OrthancProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- REST helpers ----------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs) -> Any:
        response = httpx.request(method, f"{self.url}{path}", timeout=30, auth=self.auth, **kwargs)
        if response.status_code >= 400:
            raise OrthancError(f"{method} {path}: HTTP {response.status_code} {response.text}")
        return response.json() if response.content else None

    def upload(self, dicom: bytes) -> dict[str, Any]:
        """Store one instance over REST, as a modality's upload or a PACS import would."""
        return self._request("POST", "/instances", content=dicom)

    def study_instances(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Every instance of a study, each with its simplified main tags and SOP class."""
        found = self._request("POST", "/tools/lookup", content=study_instance_uid)
        studies = [item["ID"] for item in found if item["Type"] == "Study"]
        if not studies:
            return []
        instances = self._request("GET", f"/studies/{studies[0]}/instances")
        for instance in instances:
            instance["SOPClassUID"] = self.instance_tag(instance["ID"], "0008-0016")
        return instances

    def instance_tag(self, instance_id: str, tag: str) -> str:
        response = httpx.get(
            f"{self.url}/instances/{instance_id}/content/{tag}", timeout=30, auth=self.auth
        )
        if response.status_code >= 400:
            raise OrthancError(f"tag {tag} of {instance_id}: HTTP {response.status_code}")
        return response.text.strip().rstrip("\x00").strip()

    def instance_file(self, instance_id: str) -> bytes:
        response = httpx.get(f"{self.url}/instances/{instance_id}/file", timeout=30, auth=self.auth)
        if response.status_code >= 400:
            raise OrthancError(f"file of {instance_id}: HTTP {response.status_code}")
        return response.content

    def echo_node(self) -> bool:
        """C-ECHO from Orthanc to the AI node (what a PACS admin's "test" button does)."""
        response = httpx.post(f"{self.url}/modalities/{AI_MODALITY}/echo", content="{}", timeout=30)
        return response.status_code == 200
