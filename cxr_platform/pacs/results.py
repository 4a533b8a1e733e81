"""The DICOM objects the node returns to PACS for one classified radiograph (any subset).

1. A Comprehensive 3D SR holding a TID 1500 measurement report: the coded finding (pneumonia
   present or absent), the calibrated probability, the algorithm and the device that made them.
2. The Grad-CAM heatmap as a FRACTIONAL / PROBABILITY segmentation on the source image's grid.
3. The same heatmap as a Parametric Map with a real-world value mapping, which viewers that do
   not show fractional SEG (OHIF among them) display.
4. A secondary capture with the heatmap and a "not for diagnostic use" caption burned in, for
   viewers that show neither.

All are built with highdicom from a :class:`~cxr_platform.pacs.sanitize.SanitizedSource` (never
the received header: what they copy must be valid whatever came in), share the source's
StudyInstanceUID, and get UIDs derived from the source SOPInstanceUID and the model version: a
re-sent image, or a retried send-back, produces the same instances again instead of new copies
in PACS.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_platform import __version__
from cxr_platform.model_version.predictor import Prediction

# pydicom's UID root; a site with its own root sets CXR_DICOM_UID_ROOT.
DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498."

# SNOMED CT concepts (pydicom's code dictionary only has codes that DICOM CIDs use).
PNEUMONIA = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")

SR_SERIES_NUMBER = 9901
SEG_SERIES_NUMBER = 9902
SC_SERIES_NUMBER = 9903
PMAP_SERIES_NUMBER = 9904
# The Parametric Map IOD stores integers (16 bits at least); a real-world value mapping turns
# them back into the heatmap's [0, 1]. 65535 steps are far finer than Grad-CAM's resolution.
PMAP_STORED_MAX = 65535
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"


@dataclass(frozen=True)
class Algorithm:
    """Who made the results: the platform and the exact model version that scored the image."""

    model_name: str
    model_version: str
    threshold: float
    manufacturer: str = "cxr_platform"
    software_version: str = __version__
    uid_root: str = DEFAULT_UID_ROOT
    institution_name: str | None = None

    @property
    def name(self) -> str:
        return f"cxr_platform pneumonia classifier ({self.model_name})"

    @property
    def version(self) -> str:
        return f"{self.model_name} v{self.model_version}"

    @property
    def device_uid(self) -> str:
        """Stable per model version, so PACS can tell results of different versions apart."""
        return str(
            generate_uid(self.uid_root, [self.manufacturer, self.model_name, self.model_version])
        )

    @property
    def serial_number(self) -> str:
        return f"{self.model_name}-v{self.model_version}"

    def equipment(self) -> dict:
        """The General Equipment attributes and contributing-equipment item every result
        carries, as highdicom keyword arguments."""
        return {
            "manufacturer": self.manufacturer,
            "manufacturer_model_name": self.name,
            "software_versions": [self.software_version, self.version],
            "device_serial_number": self.serial_number,
            "institution_name": self.institution_name,
            "contributing_equipment": [self.contributing_equipment()],
        }

    def contributing_equipment(self) -> hd.ContributingEquipment:
        # CID 7005 has no "Processing Algorithm" purpose; Processing Equipment (DCM 109102) is
        # the standard code for software that derived an object, and the description says which.
        item = hd.ContributingEquipment(
            manufacturer=self.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.name,
            software_versions=[self.software_version, self.version],
            device_serial_number=self.serial_number,
            institution_name=self.institution_name,
            contribution_datetime=datetime.now(UTC),
            contribution_description="Processing Algorithm: automated pneumonia classification",
        )
        item.DeviceUID = self.device_uid
        return item


@dataclass(frozen=True)
class ResultUids:
    series_instance_uid: str
    sop_instance_uid: str


def result_uids(source: Dataset, algorithm: Algorithm, kind: str) -> ResultUids:
    """Deterministic per (source instance, model version, kind of result)."""
    seed = [str(source.SOPInstanceUID), algorithm.model_name, algorithm.model_version, kind]
    return ResultUids(
        series_instance_uid=str(generate_uid(algorithm.uid_root, [*seed, "series"])),
        sop_instance_uid=str(generate_uid(algorithm.uid_root, [*seed, "instance"])),
    )


@dataclass(frozen=True)
class NodeResults:
    sr: Dataset | None = None
    seg: Dataset | None = None
    pmap: Dataset | None = None
    sc: Dataset | None = None

    def datasets(self) -> list[Dataset]:
        return [ds for ds in (self.sr, self.seg, self.pmap, self.sc) if ds is not None]


def _device_observer(algorithm: Algorithm) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=algorithm.name,
            manufacturer_name=algorithm.manufacturer,
            model_name=algorithm.version,
            serial_number=algorithm.serial_number,
        ),
    )


def build_sr(source: Dataset, prediction: Prediction, algorithm: Algorithm) -> Dataset:
    """Comprehensive 3D SR with a TID 1500 measurement report about ``source``."""
    uids = result_uids(source, algorithm, "sr")
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"operating threshold {algorithm.threshold:.6f}"],
    )
    present = prediction.label.upper() == "PNEUMONIA"
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=str(generate_uid(algorithm.uid_root, [uids.sop_instance_uid, "tracking"])),
            identifier="pneumonia classification",
        ),
        finding_type=PNEUMONIA,
        algorithm_id=algorithm_id,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=PNEUMONIA, value=PRESENT if present else ABSENT)
        ],
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=round(float(prediction.probability), 6),
                unit=codes.UCUM.NoUnits,
                algorithm_id=algorithm_id,
            )
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    return _sr_document(source, algorithm, uids, group, "AI pneumonia classification (SR)")


def _sr_document(
    source: Dataset,
    algorithm: Algorithm,
    uids: ResultUids,
    group: hd.sr.MeasurementsAndQualitativeEvaluations,
    description: str,
) -> Dataset:
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=_device_observer(algorithm)
        ),
        procedure_reported=CHEST_XRAY,
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=uids.series_instance_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        is_complete=True,
        is_final=False,
        is_verified=False,  # VerificationFlag UNVERIFIED: no human has signed this
        series_description=description,
        specific_character_set=source.get("SpecificCharacterSet"),
        **algorithm.equipment(),
    )


def build_not_analysed_sr(source: Dataset, algorithm: Algorithm, why: str) -> Dataset:
    """A TID 1500 report that says the AI did not analyse ``source``, and why: no finding, no
    probability, so nothing in it can be read as a result about the patient."""
    uids = result_uids(source, algorithm, "not-analysed-sr")
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=str(generate_uid(algorithm.uid_root, [uids.sop_instance_uid, "tracking"])),
            identifier="pneumonia classification not performed",
        ),
        finding_type=PNEUMONIA,
        algorithm_id=algorithm_id,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=f"Not analysed by the AI: {why}"[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return _sr_document(
        source, algorithm, uids, group, "AI pneumonia classification: image not analysed (SR)"
    )


def heatmap_on_source_grid(heatmap: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """A [0, 1] map (already cropped to the image's content) resized to Rows x Columns."""
    resized = Image.fromarray(np.asarray(heatmap, dtype=np.float32)).resize(
        (columns, rows), Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def build_seg(source: Dataset, heatmap: np.ndarray, algorithm: Algorithm) -> Dataset:
    """The heatmap as a one-frame FRACTIONAL / PROBABILITY segmentation of ``source``."""
    rows, columns = int(source.Rows), int(source.Columns)
    if heatmap.shape != (rows, columns):
        heatmap = heatmap_on_source_grid(heatmap, rows, columns)
    uids = result_uids(source, algorithm, "seg")
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Grad-CAM pneumonia evidence",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=PNEUMONIA,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm.name,
            family=codes.cid7162.ArtificialIntelligence,
            version=algorithm.version,
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=heatmap[None].astype(np.float32),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[description],
        series_instance_uid=uids.series_instance_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        omit_empty_frames=False,  # an all-zero map ("no evidence") is still a result
        content_label="GRADCAM",
        content_description="Grad-CAM heatmap of the pneumonia logit",
        series_description="AI pneumonia heatmap (SEG)",
        specific_character_set=source.get("SpecificCharacterSet"),
        **algorithm.equipment(),
    )
    # General Image: a projection radiograph's SEG has no plane orientation, so it carries the
    # source's row/column directions (Type 2C), empty when the source did not say.
    seg.PatientOrientation = source.get("PatientOrientation") or None
    return seg


# Patient directions (PS3.3 C.7.6.1.1.1) as unit vectors of the patient coordinate system (LPS).
_DIRECTION_VECTORS = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0),
    "F": (0.0, 0.0, -1.0),
}


def _map_geometry(source: Dataset, algorithm: Algorithm) -> Dataset:
    """``source`` with the spatial attributes the Parametric Map IOD requires.

    A projection radiograph has no frame of reference, and the IOD makes one mandatory. The map
    gets its own (derived from the source instance, so a re-sent image gets the same one), in
    plane at the origin, with rows and columns along the source's PatientOrientation where it
    names two directions (row +x, column +y otherwise) and the source's pixel spacing (1 mm,
    nominal, where it has none). The map has the source's rows and columns and references it
    as its derivation source, so a viewer matches the two pixel for pixel; nothing here claims
    more about the patient's position than the source did.
    """
    geometry = Dataset()
    geometry.update(source)
    geometry.file_meta = source.file_meta
    geometry.FrameOfReferenceUID = str(
        generate_uid(algorithm.uid_root, [str(source.SOPInstanceUID), "frame-of-reference"])
    )
    orientation = _patient_orientation(source)
    if orientation is not None:
        row, column = (_DIRECTION_VECTORS[d] for d in orientation)
    else:
        row, column = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)
    geometry.ImageOrientationPatient = [*row, *column]
    geometry.ImagePositionPatient = [0.0, 0.0, 0.0]
    spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing") or [1.0, 1.0]
    geometry.PixelSpacing = [float(v) for v in spacing]
    geometry.SliceThickness = 1.0  # a projection has no thickness; the macro needs a value
    return geometry


def build_pmap(source: Dataset, heatmap: np.ndarray, algorithm: Algorithm) -> Dataset:
    """The heatmap as a DICOM Parametric Map on the source's grid: stored 0-65535, mapped back
    to Grad-CAM relevance in [0, 1] by a real-world value mapping. Unlike a fractional SEG, OHIF
    (3.9+) and other viewers that read parametric maps can display it."""
    rows, columns = int(source.Rows), int(source.Columns)
    if heatmap.shape != (rows, columns):
        heatmap = heatmap_on_source_grid(heatmap, rows, columns)
    stored = np.rint(np.clip(heatmap, 0.0, 1.0) * PMAP_STORED_MAX).astype(np.uint16)
    uids = result_uids(source, algorithm, "pmap")
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="GRADCAM",
        lut_explanation="Grad-CAM relevance for pneumonia, 0 (none) to 1 (highest)",
        unit=codes.UCUM.NoUnits,
        value_range=(0, PMAP_STORED_MAX),
        slope=1.0 / PMAP_STORED_MAX,
        intercept=0.0,
    )
    pmap = hd.pm.ParametricMap(
        source_images=[_map_geometry(source, algorithm)],
        pixel_array=stored,
        series_instance_uid=uids.series_instance_uid,
        series_number=PMAP_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=PMAP_STORED_MAX / 2.0, window_width=float(PMAP_STORED_MAX + 1)
            )
        ],
        content_label="GRADCAM",
        content_description="Grad-CAM heatmap of the pneumonia logit",
        series_description="AI pneumonia heatmap (parametric map)",
        specific_character_set=source.get("SpecificCharacterSet"),
        **algorithm.equipment(),
    )
    pmap.Laterality = source.get("Laterality") or None  # General Series, Type 2C
    return pmap


def caption_lines(prediction: Prediction, algorithm: Algorithm) -> list[str]:
    return [
        f"{NOT_FOR_DIAGNOSTIC_USE} - AI heatmap (Grad-CAM)",
        f"{prediction.label} p={prediction.probability:.3f} (threshold {prediction.threshold:.3f})",
        f"{algorithm.manufacturer} {algorithm.version}",
    ]


def burn_caption(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """White text on a black band at the top, sized to the image so it stays legible."""
    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    size = max(10, image.width // 45)
    font = ImageFont.load_default(size=size)
    band = int(size * 1.35 * len(lines) + size)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, image.width, band), fill=(0, 0, 0))
    for index, line in enumerate(lines):
        draw.text(
            (size // 2, size // 2 + int(index * size * 1.35)), line, fill=(255, 255, 255), font=font
        )
    return np.asarray(image)


def build_sc(
    source: Dataset, overlay_rgb: np.ndarray, prediction: Prediction, algorithm: Algorithm
) -> Dataset:
    """The overlay with its caption burned in, as a secondary capture in the source's study."""
    uids = result_uids(source, algorithm, "sc")
    pixels = burn_caption(overlay_rgb, caption_lines(prediction, algorithm))
    orientation = _patient_orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=orientation or ("L", "F"),
        series_instance_uid=uids.series_instance_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"AI pneumonia heatmap overlay - {NOT_FOR_DIAGNOSTIC_USE}",
        specific_character_set=source.get("SpecificCharacterSet"),
        **algorithm.equipment(),
    )
    # General Series Laterality is Type 2C: the source's value, or present and empty.
    sc.Laterality = source.get("Laterality") or None
    if orientation is None:
        sc.PatientOrientation = None  # Type 2: present and empty means "unknown", not a guess
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = "Grad-CAM heatmap blended over the source radiograph"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc


_BIPED_DIRECTIONS = frozenset("APRLHF")


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's row/column directions when they are two simple ones highdicom accepts."""
    values = list(source.get("PatientOrientation") or [])
    if len(values) == 2 and all(str(v) in _BIPED_DIRECTIONS for v in values):
        return str(values[0]), str(values[1])
    return None
