"""The DICOM node's health probe: a C-ECHO to the node this host's settings describe.

It calls under the node's own AE title, which the node answers for Verification (and refuses
for storage), so the probe passes a strict allow-list without borrowing a PACS's title, and it
speaks TLS when the node does. Compose's healthcheck and Kubernetes' liveness probe run it as
``cxr dicom-echo``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from cxr_platform.sections import DicomSection

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    detail: str


def _probe_tls(dicom: DicomSection) -> ssl.SSLContext | None:
    if dicom.dicom_tls_cert is None or dicom.dicom_tls_key is None:
        return None
    # A liveness check on the node's own address proves it answers, not who it is: the server
    # certificate is not verified. The node's own certificate answers a mutual-TLS demand.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(dicom.dicom_tls_cert, dicom.dicom_tls_key)
    return context


def echo_node(dicom: DicomSection, *, host: str | None = None, timeout: float = 5.0) -> EchoResult:
    """C-ECHO the node at ``host`` (default: this machine) on its configured port and title."""
    target = host or (LOOPBACK if dicom.dicom_host in ("0.0.0.0", "") else dicom.dicom_host)
    ae = AE(ae_title=dicom.dicom_ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    try:
        context = _probe_tls(dicom)
    except (OSError, ssl.SSLError) as exc:
        return EchoResult(False, f"cannot load the node's TLS certificate: {exc}")
    where = f"{dicom.dicom_ae_title}@{target}:{dicom.dicom_port}"
    assoc = ae.associate(
        target,
        dicom.dicom_port,
        ae_title=dicom.dicom_ae_title,
        tls_args=(context, None) if context is not None else None,
    )
    if assoc.is_rejected:
        return EchoResult(False, f"{where} rejected the association")
    if not assoc.is_established:
        return EchoResult(False, f"no association with {where} (not listening, or aborted)")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        return EchoResult(False, f"{where} answered C-ECHO with {code!r}")
    return EchoResult(True, f"{where} answered C-ECHO")
