"""PACS integration: a DICOM node that classifies routed chest radiographs and returns a
TID 1500 SR, the Grad-CAM heatmap as a SEG and a parametric map, and a captioned secondary
capture to PACS."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cxr_platform.disk import DiskBudget
from cxr_platform.sections import DicomSection, RegistrySection

if TYPE_CHECKING:
    from cxr_platform.pacs.node import DicomNode


def build_node(
    dicom: DicomSection, registry_settings: RegistrySection, *, state_dir: Path | None = None
) -> DicomNode:
    """A :class:`DicomNode` on the production model of the registry ``registry_settings``
    name, configured by ``dicom`` (``CXR_DICOM_*``); ``state_dir`` (default: the home's
    ``dicom/``) holds its spool, outbox and ledger. ``CXR_DICOM_WORKERS`` processes score."""
    from cxr_platform.http_keys import parse_client_keys
    from cxr_platform.pacs.node import DicomNode, NodeConfig, NodeConfigError, TlsConfig
    from cxr_platform.pacs.sender import Destination, DicomWebDestination
    from cxr_platform.pacs.storage import NodeStorage
    from cxr_platform.pacs.workers import ProcessorSpec, ScoringPool

    if dicom.dicom_destination and dicom.dicom_destination_dicomweb:
        raise NodeConfigError(
            "results go to one destination: set CXR_DICOM_DESTINATION (DIMSE) or "
            "CXR_DICOM_DESTINATION_DICOMWEB, not both"
        )
    cert, key, ca = dicom.dicom_tls_cert, dicom.dicom_tls_key, dicom.dicom_tls_ca
    if (cert is None) != (key is None):
        raise NodeConfigError("TLS needs both a certificate and its key")
    config = NodeConfig(
        ae_title=dicom.dicom_ae_title,
        host=dicom.dicom_host,
        port=dicom.dicom_port,
        destination=Destination.parse(dicom.dicom_destination)
        if dicom.dicom_destination
        else DicomWebDestination.parse(
            dicom.dicom_destination_dicomweb, dicom.dicom_destination_dicomweb_auth
        )
        if dicom.dicom_destination_dicomweb
        else None,
        allowed_calling_aets=tuple(dicom.dicom_allowed_aets),
        max_associations=dicom.dicom_max_associations,
        accept_lateral=dicom.dicom_accept_lateral,
        tls=TlsConfig(cert, key, ca) if cert is not None and key is not None else None,
        retry_initial_seconds=dicom.dicom_retry_initial_seconds,
        retry_max_seconds=dicom.dicom_retry_max_seconds,
        destination_tls_ca=dicom.dicom_destination_tls_ca,
        compress_results=tuple(dicom.dicom_compress_results),
        send_associations=dicom.dicom_send_associations,
        dicomweb_port=dicom.dicom_web_port,
        dicomweb_keys=parse_client_keys(dicom.dicom_web_keys, "CXR_DICOM_WEB_KEYS"),
        dicomweb_max_body_bytes=int(dicom.dicom_web_max_upload_mb * 1024 * 1024),
    )
    spec = ProcessorSpec(dicom, registry_settings)
    storage = NodeStorage(
        state_dir or dicom.dicom_dir,
        spool_budget=DiskBudget.from_megabytes(dicom.dicom_spool_max_mb, dicom.min_free_disk_mb),
        outbox_budget=DiskBudget.from_megabytes(dicom.dicom_outbox_max_mb, dicom.min_free_disk_mb),
    )
    # The node's own processor answers what the association threads need (the salt, the
    # manufacturer it stamps); with workers, they score.
    processor = spec.build()
    pool = ScoringPool(spec, dicom.dicom_workers) if dicom.dicom_workers > 0 else None
    return DicomNode(config, processor, storage, pool)
