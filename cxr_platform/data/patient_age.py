"""A patient's age at the time of the image, from what a header or a caller says.

DICOM says it two ways: ``PatientAge`` (an Age String, ``nnnD``, ``nnnW``, ``nnnM`` or
``nnnY``), or ``PatientBirthDate`` with the date the image was taken (``StudyDate``, else
``AcquisitionDate``, else ``ContentDate``). Real headers get both wrong: ``"62"`` without a
unit, ``"081 Y"``, a birth date after the study. An age that cannot be read is *unknown*, never
a guess and never a refusal by itself; the reading says why it is unknown, for the log.

Standard library only: the scoring core reads ages from headers already parsed, and the HTTP
edge from a form field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date

DAYS_PER_YEAR = 365.2425
_UNIT_YEARS = {"D": 1 / DAYS_PER_YEAR, "W": 7 / DAYS_PER_YEAR, "M": 1 / 12, "Y": 1.0}
# DICOM's Age String: exactly three digits and a unit (PS3.5 table 6.2-1). A value with spaces or
# without a unit is read leniently only where its meaning is plain (see ``_AS_LENIENT``).
_AS = re.compile(r"^(\d{3})([DWMY])$")
_AS_LENIENT = re.compile(r"^(\d{1,3})\s*([DWMY])$", re.IGNORECASE)
_YEARS = re.compile(r"^\d{1,3}(\.\d+)?$")
_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
# Nobody imaged is older; a larger value is a typing error, not an age.
MAX_AGE_YEARS = 130.0
STUDY_DATE_KEYWORDS = ("StudyDate", "AcquisitionDate", "ContentDate")

FROM_PATIENT_AGE = "PatientAge"
FROM_BIRTH_DATE = "PatientBirthDate"
FROM_CALLER = "caller"


@dataclass(frozen=True)
class AgeReading:
    """An age in years with where it came from, or why there is none."""

    years: float | None
    source: str | None = None  # FROM_PATIENT_AGE, FROM_BIRTH_DATE, FROM_CALLER
    problem: str | None = None  # why no age was read, when something was there to read

    @property
    def known(self) -> bool:
        return self.years is not None


UNKNOWN = AgeReading(None)


def parse_age_string(text: str) -> float | None:
    """Years from a DICOM Age String (``004Y``, ``018M``, ``010W``, ``003D``); None when the
    value does not say an age plainly."""
    value = text.strip()
    match = _AS.match(value) or _AS_LENIENT.match(value)
    if match is None:
        return None
    years = int(match.group(1)) * _UNIT_YEARS[match.group(2).upper()]
    return years if years <= MAX_AGE_YEARS else None


def _parse_date(text: str) -> date | None:
    match = _DATE.match(text.strip())
    if match is None:
        return None
    try:
        return date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError:
        return None


def _text(header: Mapping[str, object], keyword: str) -> str:
    value = header.get(keyword)
    return "" if value is None else str(value).strip()


def age_from_header(header: Mapping[str, object]) -> AgeReading:
    """The age a DICOM header states: ``PatientAge``, else the birth date against the date of
    the study (or acquisition, or content). Works on a pydicom Dataset or any mapping of
    keywords to values."""
    stated = _text(header, "PatientAge")
    problems = []
    if stated:
        years = parse_age_string(stated)
        if years is not None:
            return AgeReading(years, FROM_PATIENT_AGE)
        problems.append("PatientAge is not a DICOM age string")
    birth_text = _text(header, "PatientBirthDate")
    if birth_text:
        birth = _parse_date(birth_text)
        taken = next(
            (day for k in STUDY_DATE_KEYWORDS if (day := _parse_date(_text(header, k)))), None
        )
        if birth is None:
            problems.append("PatientBirthDate is not a date")
        elif taken is None:
            problems.append("no study, acquisition or content date to age the birth date by")
        elif taken < birth:
            problems.append("the birth date is after the study date")
        else:
            years = (taken - birth).days / DAYS_PER_YEAR
            if years <= MAX_AGE_YEARS:
                return AgeReading(years, FROM_BIRTH_DATE)
            problems.append("the birth date makes the patient older than anyone imaged")
    return AgeReading(None, problem="; ".join(problems) or None)


class InvalidAgeError(ValueError):
    """A caller's age that is not a number of years or a DICOM age string."""


def age_from_caller(text: str | None) -> AgeReading:
    """An age a caller gives explicitly (an HTTP field, a CSV column): years (``4``, ``4.5``) or
    a DICOM age string (``004Y``, ``18M``). Empty means unknown; anything else unreadable raises
    :class:`InvalidAgeError`, because a caller who states an age means it."""
    value = (text or "").strip()
    if not value:
        return UNKNOWN
    if _YEARS.match(value):
        years = float(value)
    else:
        parsed = parse_age_string(value)
        if parsed is None:
            raise InvalidAgeError(
                f"patient age {value[:20]!r} is neither years (e.g. 4 or 4.5) nor a DICOM age "
                "string (e.g. 004Y, 018M)"
            )
        years = parsed
    if years > MAX_AGE_YEARS:
        raise InvalidAgeError(f"patient age {years:g} years is beyond any patient's age")
    return AgeReading(years, FROM_CALLER)


def years_text(years: float) -> str:
    """An age as a report says it: whole years from two years up, months below."""
    if years >= 2:
        return f"{int(years)} years"
    months = int(round(years * 12))
    return f"{months} month" + ("" if months == 1 else "s")
