"""PACS integration: a DICOM node that classifies routed chest radiographs and returns a
TID 1500 SR, a Grad-CAM SEG and a captioned secondary capture to PACS."""

from __future__ import annotations

from pathlib import Path

from cxr_platform.settings import CxrSettings


def build_node(settings: CxrSettings, **overrides: object):
    """A :class:`DicomNode` on the registry's production model, configured by ``settings``
    (``CXR_DICOM_*``) with keyword overrides on top (the CLI's flags)."""
    from cxr_platform.deployment.pipeline import registry_for
    from cxr_platform.inference.live import LiveModels
    from cxr_platform.inference.log import InferenceLog, uid_salt
    from cxr_platform.pacs.node import DicomNode, NodeConfig, TlsConfig
    from cxr_platform.pacs.processing import InstanceProcessor, ProcessorConfig
    from cxr_platform.pacs.sender import Destination
    from cxr_platform.pacs.storage import NodeStorage

    values = {
        "ae_title": settings.dicom_ae_title,
        "host": settings.dicom_host,
        "port": settings.dicom_port,
        "destination": settings.dicom_destination,
        "allowed_calling_aets": settings.dicom_allowed_aets,
        "max_associations": settings.dicom_max_associations,
        "accept_lateral": settings.dicom_accept_lateral,
        "results": settings.dicom_results,
        "tls_cert": settings.dicom_tls_cert,
        "tls_key": settings.dicom_tls_key,
        "tls_ca": settings.dicom_tls_ca,
        "destination_tls_ca": settings.dicom_destination_tls_ca,
        "retry_initial_seconds": settings.dicom_retry_initial_seconds,
        "retry_max_seconds": settings.dicom_retry_max_seconds,
        "refresh_seconds": settings.service_refresh_seconds,
        "threads": settings.service_threads,
        "state_dir": settings.dicom_dir,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    destination = values["destination"]
    cert, key, ca = values["tls_cert"], values["tls_key"], values["tls_ca"]
    if (cert is None) != (key is None):
        from cxr_platform.pacs.node import NodeConfigError

        raise NodeConfigError("TLS needs both a certificate and its key")
    config = NodeConfig(
        ae_title=values["ae_title"],
        host=values["host"],
        port=int(values["port"]),
        destination=Destination.parse(destination) if destination else None,
        allowed_calling_aets=tuple(values["allowed_calling_aets"]),
        max_associations=int(values["max_associations"]),
        accept_lateral=bool(values["accept_lateral"]),
        tls=TlsConfig(Path(cert), Path(key), Path(ca) if ca else None) if cert else None,
        retry_initial_seconds=float(values["retry_initial_seconds"]),
        retry_max_seconds=float(values["retry_max_seconds"]),
        destination_tls_ca=Path(values["destination_tls_ca"])
        if values["destination_tls_ca"]
        else None,
    )
    registry = registry_for(settings)
    models = LiveModels(registry, threads=values["threads"], max_pixels=settings.max_image_pixels)
    models.refresh()
    models.start_polling(float(values["refresh_seconds"]))
    processor = InstanceProcessor(
        models,
        InferenceLog(settings.inference_log_uri),
        uid_salt=uid_salt(settings.home),
        model_folder=registry.download,
        config=ProcessorConfig(
            results=tuple(values["results"]),
            uid_root=settings.dicom_uid_root,
            institution_name=settings.dicom_institution_name,
            max_pixels=settings.max_image_pixels,
        ),
    )
    return DicomNode(config, processor, NodeStorage(Path(values["state_dir"])))
