"""Patient identity from file names (Kaggle conventions) with an explicit fallback.

Images of one patient must never land in two splits, so the patient is derived from the name
alone, never from the folder it sits in: the Kaggle copy re-uses the same person numbers in
its train/val/test folders, and treating equal names as one patient can only prevent leakage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath, PurePosixPath

# Order matters: NORMAL2-IM-... must be tried before the plain IM-... rule.
_PATIENT_PATTERNS: tuple[re.Pattern[str], ...] = (
    # One real file carries an extra suffix: person447_virus_921_1.
    re.compile(r"^(?P<patient>person\d+)_(?:bacteria|virus)_\d+(?:_\d+)?$", re.IGNORECASE),
    # The real data also has NORMAL2-IM-NNNN-NNNN-NNNN, like the IM- form below.
    re.compile(r"^(?P<patient>NORMAL2-IM-\d+)-\d+(?:-\d+)?$", re.IGNORECASE),
    re.compile(r"^(?P<patient>IM-\d+)-\d+(?:-\d+)?$", re.IGNORECASE),
)

FALLBACK_PREFIX = "image:"
_DIGITS = re.compile(r"\d+")
_SEPARATORS = re.compile(r"[-_.\s]+")


@dataclass(frozen=True, slots=True)
class PatientIdentity:
    patient_id: str
    from_filename: bool  # False: the name matched no known rule; one patient per image


def patient_from_filename(name: str | PurePath) -> PatientIdentity:
    """``person12_virus_3.jpeg`` -> ``person12``; unknown names -> one patient per image."""
    path = PurePath(name)
    stem = path.name.split(".", 1)[0]
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(stem)
        if match:
            patient = match.group("patient")
            # Canonical case so "PERSON1" and "person1" are the same patient.
            if patient.lower().startswith("person"):
                patient = "person" + patient[len("person") :]
            else:
                patient = patient.upper()
            return PatientIdentity(patient, True)
    return PatientIdentity(FALLBACK_PREFIX + path.as_posix(), False)


def file_name_family(name: str) -> str:
    """The naming scheme a file belongs to, with its numbers taken out: ``person12_virus_3``
    -> ``person#-virus``, ``NORMAL2-IM-1427-0001`` -> ``NORMAL#-IM``, ``IM-0115-0001`` -> ``IM``.

    Datasets assembled from several sources or eras keep each source's naming, so the family is
    often the only trace of where an image came from.
    """
    stem = PurePosixPath(name).name.split(".", 1)[0]
    tokens = [_DIGITS.sub("#", token) for token in _SEPARATORS.split(stem) if token]
    kept = [token for token in tokens if token.strip("#")]
    return "-".join(kept) or "#"
