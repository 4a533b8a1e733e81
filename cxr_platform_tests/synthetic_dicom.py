"""Realistic chest radiograph DICOM instances from grayscale pixels (the synthetic generator's
PNGs), for tests, the benchmark and trying a node without a modality.

What a CR/DX modality actually sends, rather than the minimum pydicom accepts: patient and study
identification, 12-bit stored values with a rescale and a VOI window, MONOCHROME1 as CR readers
often write it, view position and body part, and optionally a lossless compressed transfer
syntax.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

SOP_CLASS_BY_MODALITY = {
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
}


@dataclass(frozen=True)
class RadiographSpec:
    modality: str = "CR"
    photometric: str = "MONOCHROME2"
    bits_stored: int = 12
    compression: str | None = None  # None, "jpeg-ls" or "rle"
    view_position: str = "PA"
    body_part: str = "CHEST"
    patient_id: str = "CXR-0001"
    patient_name: str = "TEST^PATIENT"
    study_instance_uid: str | None = None
    accession_number: str = "ACC0001"
    rescale: tuple[float, float] = (1.0, -1024.0)  # (slope, intercept)
    # Who the header says the patient is: a child of four by default, as the paediatric set the
    # synthetic images stand in for (its demo models are for ages 1-5). ``birth_date``
    # overrides the one four years before the study; ``patient_age`` adds a PatientAge.
    birth_date: str | None = None
    patient_age: str | None = None


def radiograph_dataset(pixels: np.ndarray, spec: RadiographSpec = RadiographSpec()) -> Dataset:
    """A single-frame CR or DX instance whose displayed image (after rescale, window and the
    photometric interpretation) is ``pixels`` (grayscale, uint8 or float in [0, 1])."""
    if spec.modality not in SOP_CLASS_BY_MODALITY:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASS_BY_MODALITY)}")
    gray = np.asarray(pixels, dtype=np.float64)
    if np.asarray(pixels).dtype == np.uint8:
        gray = gray / 255.0
    top = 2**spec.bits_stored - 1
    stored = np.rint(np.clip(gray, 0.0, 1.0) * top)
    if spec.photometric == "MONOCHROME1":
        stored = top - stored  # low values display white
    stored = stored.astype(np.uint16)

    now = datetime.now()
    sop_class = SOP_CLASS_BY_MODALITY[spec.modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = spec.study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = spec.accession_number
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyDescription = "XR CHEST"
    ds.SeriesDescription = f"CHEST {spec.view_position}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.birth_date if spec.birth_date is not None else _years_before(now, 4)
    if spec.patient_age is not None:
        ds.PatientAge = spec.patient_age
    ds.PatientSex = "O"
    ds.Modality = spec.modality
    ds.Manufacturer = "cxr_platform test modality"
    ds.BodyPartExamined = spec.body_part
    ds.ViewPosition = spec.view_position
    ds.PatientOrientation = ["L", "F"] if spec.view_position in ("AP", "PA") else ["A", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if spec.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "U"
        ds.BurnedInAnnotation = "NO"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if spec.photometric == "MONOCHROME2" else -1
        ds.DetectorType = "SCINTILLATOR"
        ds.ImagerPixelSpacing = ds.PixelSpacing = [0.15, 0.15]
        ds.LossyImageCompression = "00"
        ds.PresentationLUTShape = "INVERSE" if spec.photometric == "MONOCHROME1" else "IDENTITY"
        ds.AcquisitionContextSequence = []
        ds.PositionerType = ""
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = (
            "51185008",
            "SCT",
            "Thorax",
        )
        ds.AnatomicRegionSequence = [region]
    else:
        ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = 0
    # DX images are stored in presentation values: no rescale (the IOD fixes slope 1, intercept 0).
    slope, intercept = spec.rescale if spec.modality == "CR" else (1.0, 0.0)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.RescaleType = "US"
    # A window a little inside the stored range, as modalities send.
    low, high = float(stored.min()) * slope + intercept, float(stored.max()) * slope + intercept
    ds.WindowCenter = round((low + high) / 2.0, 1)
    ds.WindowWidth = round(max(1.0, (high - low) * 0.95), 1)
    ds.PixelData = stored.tobytes()
    if spec.compression == "jpeg-ls":
        ds.compress(JPEGLSLossless, stored)
    elif spec.compression == "rle":
        ds.compress(RLELossless, stored)
    elif spec.compression is not None:
        raise ValueError(f"compression must be None, 'jpeg-ls' or 'rle', not {spec.compression!r}")
    return ds


def _years_before(day: datetime, years: int) -> str:
    try:
        earlier = day.replace(year=day.year - years)
    except ValueError:  # 29 February
        earlier = day.replace(year=day.year - years, day=28)
    return earlier.strftime("%Y%m%d")
