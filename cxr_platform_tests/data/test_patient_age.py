"""A patient's age from a header or a caller: read when it is plain, unknown (never guessed, never
a refusal by itself) when it is not."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from cxr_platform.data.patient_age import (
    FROM_BIRTH_DATE,
    FROM_CALLER,
    FROM_PATIENT_AGE,
    InvalidAgeError,
    age_from_caller,
    age_from_header,
    parse_age_string,
    years_text,
)


@pytest.mark.parametrize(
    ("text", "years"),
    [
        ("004Y", 4.0),
        ("017Y", 17.0),
        ("081Y", 81.0),
        ("018M", 1.5),
        ("010W", 70 / 365.2425),
        ("003D", 3 / 365.2425),
        ("081 Y", 81.0),  # a space real modalities write
        ("4y", 4.0),
    ],
)
def test_age_strings_read_as_years(text, years):
    assert parse_age_string(text) == pytest.approx(years)


@pytest.mark.parametrize("text", ["62", "sixty", "062", "", "999Y", "Y004", "4.5Y"])
def test_age_strings_that_do_not_say_an_age_plainly_are_unknown(text):
    assert parse_age_string(text) is None


def _header(**values) -> Dataset:
    header = Dataset()
    for keyword, value in values.items():
        setattr(header, keyword, value)
    return header


def test_a_header_says_the_age_by_patient_age_first():
    reading = age_from_header(
        _header(PatientAge="081Y", PatientBirthDate="20200101", StudyDate="20240101")
    )
    assert reading.years == 81 and reading.source == FROM_PATIENT_AGE


def test_a_birth_date_is_aged_by_the_study_then_acquisition_then_content_date():
    by_study = age_from_header(_header(PatientBirthDate="20200315", StudyDate="20240314"))
    assert by_study.source == FROM_BIRTH_DATE and 3.99 < by_study.years < 4.0
    by_acquisition = age_from_header(
        _header(PatientBirthDate="19450101", AcquisitionDate="20260101")
    )
    assert int(by_acquisition.years) == 81
    by_content = age_from_header(_header(PatientBirthDate="20220601", ContentDate="20260601"))
    assert int(by_content.years) == 4


def test_a_malformed_age_falls_back_to_the_birth_date_and_says_what_was_wrong():
    reading = age_from_header(
        _header(PatientAge="62", PatientBirthDate="20210101", StudyDate="20250601")
    )
    assert int(reading.years) == 4 and reading.source == FROM_BIRTH_DATE
    unknown = age_from_header(_header(PatientAge="sixty"))
    assert not unknown.known and "PatientAge" in unknown.problem


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({}, None),
        ({"PatientBirthDate": "1970-01-01", "StudyDate": "20240101"}, "not a date"),
        ({"PatientBirthDate": "20300101", "StudyDate": "20240101"}, "after the study"),
        ({"PatientBirthDate": "20200101"}, "no study"),
        ({"PatientBirthDate": "17000101", "StudyDate": "20240101"}, "older than anyone"),
    ],
)
def test_headers_that_do_not_say_an_age_are_unknown_with_the_reason(values, problem):
    reading = age_from_header(_header(**values))
    assert reading.years is None
    assert reading.problem == problem or (problem and problem in reading.problem)


def test_a_caller_states_years_or_an_age_string_and_a_wrong_one_is_an_error():
    assert age_from_caller("4").years == 4 and age_from_caller("4").source == FROM_CALLER
    assert age_from_caller("4.5").years == 4.5
    assert age_from_caller("081Y").years == 81
    assert not age_from_caller("").known and not age_from_caller(None).known
    for wrong in ("four", "-3", "200", "4 years old"):
        with pytest.raises(InvalidAgeError):
            age_from_caller(wrong)


def test_ages_read_as_a_report_says_them():
    assert years_text(81.4) == "81 years"
    assert years_text(4.9) == "4 years"
    assert years_text(1.5) == "18 months"
    assert years_text(1 / 12) == "1 month"
