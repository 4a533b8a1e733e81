"""A test modality: a pynetdicom SCU that echoes and stores into a DICOM node."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
    Verification,
)

SOP_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
    Comprehensive3DSRStorage,
)


@dataclass
class Association:
    established: bool
    rejected: bool
    statuses: list[int]


def modality(ae_title: str = "MODALITY") -> AE:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    for sop_class in SOP_CLASSES:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(ComputedRadiographyImageStorage, [JPEGLSLossless])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def send(
    port: int,
    datasets: list[Dataset],
    *,
    calling: str = "MODALITY",
    called: str = "CXR_AI",
    tls: ssl.SSLContext | None = None,
) -> Association:
    """C-STORE each dataset (C-ECHO when the list is empty) in one association."""
    ae = modality(calling)
    kwargs = {"tls_args": (tls, "localhost")} if tls is not None else {}
    assoc = ae.associate("127.0.0.1", port, ae_title=called, **kwargs)
    if not assoc.is_established:
        return Association(False, assoc.is_rejected, [])
    statuses = []
    try:
        if not datasets:
            statuses.append(int(assoc.send_c_echo().Status))
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if status else -1)
    finally:
        assoc.release()
    return Association(True, False, statuses)
