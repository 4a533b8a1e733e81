"""The DICOM objects the node returns to PACS for one classified radiograph (any subset).

1. A Comprehensive 3D SR holding a TID 1500 measurement report: the coded finding (pneumonia
   present or absent), the calibrated probability, the algorithm and the device that made them.
2. Where the Grad-CAM heatmap reaches half its peak, as a BINARY segmentation on the source
   image's grid (a region viewers outline over the image).
3. The heatmap itself as a float Parametric Map with a real-world value mapping, which viewers
   show as a heat overlay.
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
# The segmentation outlines where Grad-CAM relevance reaches half its peak (maps are scaled to
# peak 1), the usual cut for drawing a Grad-CAM region.
SEG_RELEVANCE_THRESHOLD = 0.5
PMAP_LEVELS = 1024
SEG_DISPLAY_COLOR = hd.color.CIELabColor(53.24, 80.09, 67.2)  # red, as heatmaps mark "hot"
LUNG_SEGMENT_LABEL = "lung fields (AI)"
LUNG_DISPLAY_COLOR = hd.color.CIELabColor(70.0, -30.0, -25.0)  # cyan: apart from the red map
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
NOT_FOR_DIAGNOSIS_ALONE = "not for diagnosis alone"

# What each result is, in the words a radiologist reads in the study browser (LO: 64 at most).
# Grad-CAM shows where the network looked, not a probability per pixel: the heatmaps say so.
SR_DESCRIPTION = "AI: pneumonia classification report, not for diagnosis alone"
NOT_ANALYSED_SR_DESCRIPTION = "AI: image not analysed for pneumonia (see report)"
SEG_DESCRIPTION = "AI: pneumonia heatmap (Grad-CAM) overlay, not for diagnosis"
PMAP_DESCRIPTION = "AI: pneumonia heatmap (Grad-CAM), not for diagnosis alone"
SC_DESCRIPTION = "AI: pneumonia heatmap picture, NOT FOR DIAGNOSTIC USE"


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


def build_sr(
    source: Dataset,
    prediction: Prediction,
    algorithm: Algorithm,
    lung: LungFieldsOnSource | None = None,
) -> Dataset:
    """Comprehensive 3D SR with a TID 1500 measurement report about ``source``; with the lung
    fields, the finding's line also says how much of the heatmap lies on the lungs, or that the
    lungs are not all in view."""
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
            # The group's algorithm identification covers this measurement too. Repeating it
            # inside the NUM gives the NUM a content sequence, which OHIF reads as a spatial
            # reference and, finding no SCOORD, drops the measurement from view.
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=round(float(prediction.probability), 6),
                unit=codes.UCUM.NoUnits,
                referenced_coordinates=[_whole_image(source)],
            )
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    _add_comments(
        group,
        [
            # What the lung fields say rides on the finding's line: OHIF shows five lines, its
            # own rendering of the probability among them, and about 40 characters of each.
            f"AI: pneumonia {'present' if present else 'absent'}"
            + (f"; {lung.comment}" if lung is not None else ""),
            f"probability {prediction.probability:.3f}, threshold {algorithm.threshold:.3f}",
            *_algorithm_comments(algorithm),
        ],
    )
    return _sr_document(source, algorithm, uids, group, SR_DESCRIPTION)


def _whole_image(source: Dataset) -> hd.sr.CoordinatesForMeasurement:
    """The whole of ``source`` as the image region a measurement is INFERRED FROM (TID 300): the
    classification is about the image, not a part of it.

    Said explicitly because a reading environment places a result by its region: OHIF shows an
    SR's measurements only where one has a spatial coordinate, and draws this one as the
    image's outline with the report's words beside it.
    """
    rows, columns = float(source.Rows), float(source.Columns)
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array(
            [[0.0, 0.0], [columns, 0.0], [columns, rows], [0.0, rows], [0.0, 0.0]]
        ),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
        ),
    )


def _without_values(report: Dataset) -> Dataset:
    """``report`` with every NUM's value removed and qualified "Measurement not attempted"
    (CID 42): the standard's way to say a measurement is absent, not zero. Done on the finished
    document because highdicom only builds NUMs that have a value."""
    pending = list(report.ContentSequence)
    while pending:
        item = pending.pop()
        if item.ValueType == "NUM":
            item.MeasuredValueSequence = []  # Type 2: present and empty when there is no value
            item.NumericValueQualifierCodeSequence = [
                hd.sr.CodedConcept.from_code(codes.DCM.MeasurementNotAttempted)
            ]
        pending.extend(item.get("ContentSequence", []))
    return report


def _algorithm_comments(algorithm: Algorithm) -> list[str]:
    return [
        f"model {algorithm.version} ({algorithm.manufacturer} {algorithm.software_version})",
        NOT_FOR_DIAGNOSIS_ALONE,
    ]


def _add_comments(group: hd.sr.MeasurementsAndQualitativeEvaluations, texts: list[str]) -> None:
    """The report in words, as Comment items of the measurement group: what a reading
    environment that does not render coded TID 1500 content (OHIF outside its own reports)
    still shows a radiologist, one short line each beside the image (OHIF shows five lines).
    The coded items stay the machine-readable result."""
    for text in texts:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=text[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )


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
        # No value: the probability was not measured, and the qualifier says so (CID 42).
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=0.0,  # removed from the finished report: see _without_values
                unit=codes.UCUM.NoUnits,
                referenced_coordinates=[_whole_image(source)],
            )
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    _add_comments(group, [f"Not analysed by the AI: {why}", *_algorithm_comments(algorithm)])
    return _without_values(
        _sr_document(source, algorithm, uids, group, NOT_ANALYSED_SR_DESCRIPTION)
    )


def heatmap_on_source_grid(heatmap: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """A [0, 1] map (already cropped to the image's content) resized to Rows x Columns."""
    resized = Image.fromarray(np.asarray(heatmap, dtype=np.float32)).resize(
        (columns, rows), Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


@dataclass(frozen=True)
class LungFieldsOnSource:
    """The lung segmentation version's fields of one image, on the source's grid."""

    mask: np.ndarray  # bool (Rows, Columns)
    version: str  # the lung fields version that drew them
    relevance_in_lungs: float | None  # the share of the heatmap's relevance inside them
    findings: tuple[str, ...] = ()  # whether the lungs are wholly in the picture

    @property
    def algorithm_version(self) -> str:
        return f"lung fields v{self.version}"

    @property
    def comment(self) -> str:
        """A few words for the reader, after the finding: that the lungs are not wholly in
        the picture where the fields say so (it matters more), else how much of the heatmap
        lies on the lungs. The version that drew them is the SEG's second segment's."""
        if self.findings:
            return "lungs not all in view"
        share = self.relevance_in_lungs
        return "map empty" if share is None else f"map {share:.0%} on lungs"


def _lung_segment(lung: LungFieldsOnSource) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=2,
        segment_label=LUNG_SEGMENT_LABEL,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Lung,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="cxr_platform lung fields (U-Net)",
            family=codes.cid7162.ArtificialIntelligence,
            version=lung.algorithm_version,
        ),
        display_color=LUNG_DISPLAY_COLOR,
    )


def build_seg(
    source: Dataset,
    heatmap: np.ndarray,
    algorithm: Algorithm,
    lung: LungFieldsOnSource | None = None,
) -> Dataset:
    """Where the heatmap is at least :data:`SEG_RELEVANCE_THRESHOLD` of its peak, as a one-frame
    BINARY segmentation on ``source``'s grid, in the map's own frame of reference; with the
    lung fields where a lung segmentation version drew them, as a second segment on the same
    frame, so a reader sees at once whether the hot region lies on the lungs.

    Binary, not FRACTIONAL: viewers draw a segment as an outlined region, and OHIF refuses a
    fractional SEG that is not already 0-or-maximum. The continuous heatmap is the parametric
    map's; this is the region a reader can switch on over the image.
    """
    rows, columns = int(source.Rows), int(source.Columns)
    if heatmap.shape != (rows, columns):
        heatmap = heatmap_on_source_grid(heatmap, rows, columns)
    if lung is not None and lung.mask.shape != (rows, columns):
        raise ValueError(f"lung fields {lung.mask.shape} are not on the source's grid")
    uids = result_uids(source, algorithm, "seg")
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=f"AI pneumonia heatmap >= {SEG_RELEVANCE_THRESHOLD:g}",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=PNEUMONIA,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm.name,
            family=codes.cid7162.ArtificialIntelligence,
            version=algorithm.version,
            parameters={"Grad-CAM relevance threshold": f"{SEG_RELEVANCE_THRESHOLD:g}"},
        ),
        # Without a recommended colour each viewer picks its own (OHIF warns that it did).
        display_color=SEG_DISPLAY_COLOR,
    )
    region = np.asarray(heatmap) >= SEG_RELEVANCE_THRESHOLD
    segments, pixels = [description], region[None]
    if lung is not None:
        # One frame, two segments that may overlap: (frames, rows, columns, segments).
        segments.append(_lung_segment(lung))
        pixels = np.stack([region, lung.mask], axis=-1)[None]
    seg = hd.seg.Segmentation(
        source_images=[_map_geometry(source, algorithm)],
        pixel_array=pixels.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=uids.series_instance_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        omit_empty_frames=False,  # an empty region ("no evidence") is still a result
        content_label="GRADCAM",
        content_description=(
            "Grad-CAM heatmap of the pneumonia logit, thresholded"
            if lung is None
            else "Grad-CAM of the pneumonia logit, thresholded; lung fields"  # LO: 64 at most
        ),
        series_description=SEG_DESCRIPTION,
        specific_character_set=source.get("SpecificCharacterSet"),
        **algorithm.equipment(),
    )
    # General Image: the source's row/column directions (Type 2C), empty when it did not say.
    seg.PatientOrientation = source.get("PatientOrientation") or None
    return seg


def _map_geometry(source: Dataset, algorithm: Algorithm) -> Dataset:
    """``source`` with the spatial attributes the Parametric Map and Segmentation IODs need.

    A projection radiograph has no frame of reference, and both IODs want one where they carry
    plane geometry. The maps get their own (derived from the source instance, so a re-sent
    image gets the same one), with the source's rows and columns, the source's pixel spacing
    (1 mm, nominal, where it has none), rows along +x and columns along +y, at the origin. That
    is exactly the plane a viewer assumes for an image without geometry, so it lays a map on
    its source pixel for pixel (OHIF refuses a map whose plane differs as "oblique"). It claims
    nothing about the patient: the frame of reference is the maps' own, and the source is
    referenced as their derivation source.
    """
    geometry = Dataset()
    geometry.update(source)
    geometry.file_meta = source.file_meta
    geometry.FrameOfReferenceUID = str(
        generate_uid(algorithm.uid_root, [str(source.SOPInstanceUID), "frame-of-reference"])
    )
    geometry.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    geometry.ImagePositionPatient = [0.0, 0.0, 0.0]
    spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing") or [1.0, 1.0]
    geometry.PixelSpacing = [float(v) for v in spacing]
    geometry.SliceThickness = 1.0  # a projection has no thickness; the macro needs a value
    geometry.SpacingBetweenSlices = 1.0
    return geometry


def build_pmap(source: Dataset, heatmap: np.ndarray, algorithm: Algorithm) -> Dataset:
    """The heatmap as a DICOM Parametric Map on the source's grid: 32-bit float Grad-CAM
    relevance in [0, 1] in steps of 1/:data:`PMAP_LEVELS` (OHIF's parametric-map display shows
    float maps; a 16-bit integer map loads but is not drawn), with an identity real-world value
    mapping that names the quantity."""
    rows, columns = int(source.Rows), int(source.Columns)
    if heatmap.shape != (rows, columns):
        heatmap = heatmap_on_source_grid(heatmap, rows, columns)
    # Steps of 1/1024, exact in float32: far finer than Grad-CAM's own resolution (a 7x7 or
    # 14x14 map, resized) or a colour map's 256 levels, and they deflate ~13x where the full
    # float values deflate ~1.5x (benchmarks/result_sizes.py).
    levels = np.rint(np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0) * PMAP_LEVELS)
    relevance = (levels / PMAP_LEVELS).astype(np.float32)
    uids = result_uids(source, algorithm, "pmap")
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="GRADCAM",
        lut_explanation="Grad-CAM relevance for pneumonia, 0 (none) to 1 (highest)",
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    pmap = hd.pm.ParametricMap(
        source_images=[_map_geometry(source, algorithm)],
        pixel_array=relevance,
        series_instance_uid=uids.series_instance_uid,
        series_number=PMAP_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="GRADCAM",
        content_description="Grad-CAM heatmap of the pneumonia logit",
        series_description=PMAP_DESCRIPTION,
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
        series_description=SC_DESCRIPTION,
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
