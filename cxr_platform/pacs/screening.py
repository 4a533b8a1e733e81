"""Which received objects the node takes in, and why it ignores the others.

Screening reads the header only, so it runs inside the C-STORE handler before anything is
spooled. It ignores, with a logged reason, what cannot be a single radiograph to look at: other
SOP classes (a router may send a whole study), the node's own results looped back, objects
without pixels, multi-frame objects, and views the header says are lateral. Whether the image is
a chest radiograph at all is for the input gate to say from the pixels: a CR or a Secondary
Capture with no body part, or with a wrong one, is judged by its content, in both directions.
The header's body part only decides whether a refusal is answered with a short SR
(:func:`claims_chest`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

CLASSIFIED_SOP_CLASSES = frozenset(
    {
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        DigitalXRayImageStorageForProcessing,
        SecondaryCaptureImageStorage,
    }
)

# BodyPartExamined values (PS3.16 Annex L) and anatomic region codes that mean the chest.
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "PORTABLECHEST", "PORTABLE CHEST"})
CHEST_REGION_CODES = frozenset(
    {"51185008", "43799004", "816094009", "39607008", "T-D3000", "T-D3300", "T-28000"}
)
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})


@dataclass(frozen=True)
class Screening:
    accepted: bool
    reason: str  # why it was ignored; "chest radiograph" when accepted

    @classmethod
    def accept(cls) -> Screening:
        return cls(True, "chest radiograph")

    @classmethod
    def ignore(cls, reason: str) -> Screening:
        return cls(False, reason)


def screen(dataset: Dataset, *, accept_lateral: bool = False, own_manufacturer: str) -> Screening:
    sop_class = UID(str(dataset.get("SOPClassUID", "")))
    if sop_class not in CLASSIFIED_SOP_CLASSES:
        name = sop_class.name if sop_class else "no SOP class"
        return Screening.ignore(f"not a radiograph: {name}")
    if _made_by_us(dataset, own_manufacturer):
        return Screening.ignore("a result of this node (never classified again)")
    if "PixelData" not in dataset:
        return Screening.ignore("image without pixel data")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return Screening.ignore(f"multi-frame image ({frames} frames)")
    view = str(dataset.get("ViewPosition", "") or "").strip().upper()
    if not accept_lateral and (view in LATERAL_VIEWS or _lateral_view_code(dataset)):
        return Screening.ignore(f"lateral view ({view or 'view code'}); only frontal views")
    return Screening.accept()


def _made_by_us(dataset: Dataset, own_manufacturer: str) -> bool:
    if str(dataset.get("Manufacturer", "")) == own_manufacturer:
        return True
    return any(
        str(item.get("Manufacturer", "")) == own_manufacturer
        for item in dataset.get("ContributingEquipmentSequence", [])
    )


def _body_part(dataset: Dataset) -> tuple[str, bool] | None:
    """(what the header says, whether it is the chest); None when it says nothing."""
    value = str(dataset.get("BodyPartExamined", "") or "").strip().upper()
    if value:
        return value, value in CHEST_BODY_PARTS
    regions = dataset.get("AnatomicRegionSequence", [])
    if regions:
        item = regions[0]
        code = str(item.get("CodeValue", ""))
        return str(item.get("CodeMeaning", code)), code in CHEST_REGION_CODES
    return None


def _lateral_view_code(dataset: Dataset) -> bool:
    return any(
        "lateral" in str(item.get("CodeMeaning", "")).lower()
        for item in dataset.get("ViewCodeSequence", [])
    )


def claims_chest(dataset: Dataset) -> bool:
    """The header says the image shows the chest (body part or anatomic region)."""
    body_part = _body_part(dataset)
    return body_part is not None and body_part[1]
