"""Who the training images are of: measured from DICOM headers where they say, or declared by
the documentation of a dataset the platform recognises.

A model is valid for the population it was trained and validated on. DICOM headers state age
(``PatientAge``, or the birth date against the study date), projection (``ViewPosition``) and
modality; a folder of PNG or JPEG files states none of them, and then only the dataset's own
documentation can say who is in it. The platform recognises two such datasets by their
file-name families (:func:`~cxr_platform.data.patients.file_name_family`): the Kaggle "Chest
X-Ray Images (Pneumonia)" set and its own synthetic demo set.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxr_platform.data.imaging import read_dicom_header
from cxr_platform.data.patient_age import age_from_header
from cxr_platform.data.patients import file_name_family
from cxr_platform.errors import ImageReadError

DICOM_SUFFIXES = {".dcm", ".dicom", ""}
# An age range is measured only from enough ages to have one: fewer, and the range would be a
# handful of patients' ages rather than the population's.
MIN_AGES_TO_MEASURE = 20
# The measured range drops the most extreme 1% of ages at each end, and at least one: one
# mistyped birth date must not stretch a children's model to adults.
AGE_TRIM_SHARE = 0.01
MIN_SHARE_TO_NAME = 0.02  # a projection or modality seen on fewer images is not "what it is for"


@dataclass(frozen=True)
class DocumentedPopulation:
    """What a dataset's documentation says of the people in it."""

    name: str
    population: str
    age_years: tuple[int, int] | None  # completed years, both ends included
    projections: tuple[str, ...]
    modalities: tuple[str, ...]
    documentation: str  # where it is written
    file_families: frozenset[str]  # the naming schemes that identify the dataset's files


KERMANY_2018 = DocumentedPopulation(
    name="Chest X-Ray Images (Pneumonia), Kermany et al. 2018",
    population="children aged one to five years, one hospital (Guangzhou Women and Children's "
    "Medical Center)",
    age_years=(1, 5),
    projections=("AP",),
    modalities=(),  # the published JPEGs do not say CR or DX
    documentation="Kermany, Zhang, Goldbaum et al., Cell 172(5), 2018: 'anterior-posterior chest "
    "X-ray images ... of pediatric patients of one to five years old'",
    file_families=frozenset({"person#-bacteria", "person#-virus", "IM", "NORMAL#-IM"}),
)
# The demo's rendered images stand in for the paediatric set: the demo's models say so, so the
# demo, the tests and a newcomer meet the same intended-use checks a real model has.
SYNTHETIC_DEMO = DocumentedPopulation(
    name="cxr_platform synthetic demo set",
    population="synthetic radiographs standing in for children aged one to five years; no patients",
    age_years=(1, 5),
    projections=("AP", "PA"),
    modalities=(),
    documentation="cxr_platform.data.synthetic: rendered to stand in for the Kaggle paediatric "
    "set; not a population of patients",
    file_families=frozenset({"SYN-P#"}),  # SYN-P0012-01.png
)
KNOWN_POPULATIONS = (KERMANY_2018, SYNTHETIC_DEMO)


def recognise(file_families: Iterable[str]) -> DocumentedPopulation | None:
    """The documented dataset whose naming every training file follows, if any."""
    families = set(file_families)
    for known in KNOWN_POPULATIONS:
        if families and families <= known.file_families:
            return known
    return None


@dataclass(frozen=True)
class MeasuredPopulation:
    """What the training images' own headers say, counted."""

    n_images: int
    n_dicom: int
    ages: tuple[float, ...] = ()  # years, one per DICOM image whose header states an age
    projections: dict[str, int] = field(default_factory=dict)  # ViewPosition -> images
    modalities: dict[str, int] = field(default_factory=dict)
    sites: dict[str, int] = field(default_factory=dict)  # InstitutionName -> images
    manufacturers: dict[str, int] = field(default_factory=dict)
    file_families: dict[str, int] = field(default_factory=dict)
    folders: dict[str, int] = field(default_factory=dict)

    @property
    def age_range(self) -> tuple[int, int] | None:
        """Completed years of the ages left when the extreme 1% (at least one) at each end are
        dropped, when enough ages are known."""
        if len(self.ages) < MIN_AGES_TO_MEASURE:
            return None
        ordered = np.sort(np.asarray(self.ages))
        trim = max(1, math.ceil(AGE_TRIM_SHARE * len(ordered)))
        kept = ordered[trim:-trim]
        return int(math.floor(kept[0])), int(math.floor(kept[-1]))

    def named(self, counts: dict[str, int]) -> tuple[str, ...]:
        """The values seen on at least 2% of the DICOM images, most common first."""
        if not self.n_dicom:
            return ()
        return tuple(
            value
            for value, count in sorted(counts.items(), key=lambda kv: -kv[1])
            if count / self.n_dicom >= MIN_SHARE_TO_NAME
        )

    def source(self, documented: DocumentedPopulation | None = None) -> dict[str, Any]:
        """Where the images came from, for the intended-use record, which travels inside every
        model file. Folder names, file-name families and InstitutionName are a site's own words
        (some name folders and files after patients): each is kept as :func:`withheld` unless
        it is the ``documented`` dataset's own naming. Counts, modalities and manufacturers stay
        as they are."""
        known = documented.file_families if documented is not None else frozenset()
        return {
            "n_images": self.n_images,
            "n_dicom": self.n_dicom,
            "n_with_age": len(self.ages),
            "folders": _withheld_counts(self.folders, keep={"."}),
            "file_families": _withheld_counts(self.file_families, keep=known),
            "sites": _withheld_counts(self.sites),
            "manufacturers": dict(self.manufacturers),
        }


def withheld(name: str) -> str:
    """A name as a model file may keep it: a short digest, the same for the same name (so two
    versions trained on one folder say so), saying nothing of what it was."""
    return "sha256:" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]


def _withheld_counts(counts: dict[str, int], keep: Iterable[str] = ()) -> dict[str, int]:
    kept = set(keep)
    out: dict[str, int] = {}
    for name, count in counts.items():
        key = name if name in kept else withheld(name)
        out[key] = out.get(key, 0) + count
    return out


def _header_value(header: Any, keyword: str) -> str:
    value = header.get(keyword)
    return "" if value is None else str(value).strip().upper()


def measure_population(
    paths: Sequence[str | Path], relative_paths: Sequence[str] | None = None
) -> MeasuredPopulation:
    """Count what the headers of ``paths`` (the training split) say. Non-DICOM files count
    towards the folders and file families only; an unreadable header counts as saying nothing."""
    ages: list[float] = []
    projections: Counter[str] = Counter()
    modalities: Counter[str] = Counter()
    sites: Counter[str] = Counter()
    manufacturers: Counter[str] = Counter()
    families: Counter[str] = Counter()
    folders: Counter[str] = Counter()
    n_dicom = 0
    for position, path in enumerate(paths):
        path = Path(path)
        relative = Path(relative_paths[position]) if relative_paths is not None else path
        families[file_name_family(path.name)] += 1
        folders[relative.parent.parent.as_posix() if relative.parent.parent.parts else "."] += 1
        if path.suffix.lower() not in DICOM_SUFFIXES:
            continue
        try:
            header = read_dicom_header(path)
        except ImageReadError:
            continue
        if not header.get("SOPClassUID") and not header.get("Modality"):
            continue  # read by force, but not a DICOM object
        n_dicom += 1
        reading = age_from_header(header)
        if reading.years is not None:
            ages.append(reading.years)
        for counter, keyword in (
            (projections, "ViewPosition"),
            (modalities, "Modality"),
            (sites, "InstitutionName"),
            (manufacturers, "Manufacturer"),
        ):
            value = _header_value(header, keyword)
            if value:
                counter[value] += 1
    return MeasuredPopulation(
        n_images=len(paths),
        n_dicom=n_dicom,
        ages=tuple(ages),
        projections=dict(projections),
        modalities=dict(modalities),
        sites=dict(sites),
        manufacturers=dict(manufacturers),
        file_families=dict(families),
        folders=dict(folders),
    )
