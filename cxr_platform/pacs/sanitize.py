"""What the result objects may take from a received radiograph's header.

Real PACS traffic carries headers no validator would pass: a missing PatientID, an age of "62"
where AS needs "062Y", a PixelSpacing of 0\\0, empty sequences that must have an item, private
tags, character sets nobody declared, big-endian encodings. The results are our own objects and
must be valid whatever came in, so the builders never read the received dataset: they read the
:class:`SanitizedSource` made here, which holds only the attributes they copy or need, each
checked against its value representation.

- A missing or unusable Type 2 attribute (PatientName, PatientID, StudyDate, AccessionNumber...)
  is present and empty, as the standard allows.
- A missing or invalid StudyInstanceUID or SeriesInstanceUID is generated, deterministically from
  the source's SOPInstanceUID, so the results of one instance still share one study.
- A value invalid for its VR is repaired where the intent is unambiguous (an age in bare years, a
  date with separators, a lower-case code string) and dropped otherwise; it is never copied.
- Degenerate pixel spacing (zero, negative, not two numbers) is dropped, not propagated.
- Private tags and everything the builders do not need are never copied.

Every repair is recorded by attribute keyword and reason, never by value: the reasons go to the
node's log, which must stay free of patient data.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime

from pydicom import config
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import validate_value

from cxr_platform.errors import CxrError

UTF8 = "ISO_IR 192"

# Patient, General Study and Patient Study module attributes the results carry (PS3.3 C.7.1.1,
# C.7.2.1, C.7.2.2). Type 2 ones are always present, empty when the source had nothing usable.
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
OPTIONAL_PATIENT_STUDY = (
    "IssuerOfPatientID",
    "PatientBirthTime",
    "OtherPatientIDsSequence",
    "PatientComments",
    "EthnicGroup",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "ProcedureCodeSequence",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
)
# What the builders read about the image itself (geometry, orientation, laterality).
IMAGE_ATTRIBUTES = (
    "Modality",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PatientOrientation",
    "Laterality",
    "ImageLaterality",
    "BodyPartExamined",
    "ViewPosition",
)
PIXEL_SPACINGS = ("PixelSpacing", "ImagerPixelSpacing")
ENUMERATED = {
    "PatientSex": frozenset({"M", "F", "O"}),
    "Laterality": frozenset({"R", "L"}),
    "ImageLaterality": frozenset({"R", "L", "U", "B"}),
    "PatientIdentityRemoved": frozenset({"YES", "NO"}),
}
# Values a VR allows but the attribute does not: anatomical directions (PS3.3 C.7.6.1.1.1).
PATTERNS = {"PatientOrientation": re.compile(r"[LRAPHF]{1,3}")}
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI"}
    | {"UR", "UT"}
)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_MULTILINE_VRS = frozenset({"LT", "ST", "UT"})  # may hold CR/LF/tab/FF, other VRs may not
_CODE_KEYS = ("CodeValue", "LongCodeValue", "URNCodeValue")


class UnusableSourceError(CxrError):
    """The header lacks what no repair can stand in for (a valid SOPInstanceUID/SOPClassUID)."""


@dataclass(frozen=True)
class Repair:
    keyword: str
    action: str  # "created empty", "generated", "repaired", "dropped"
    reason: str  # never the value: the reasons are logged

    def describe(self) -> str:
        return f"{self.keyword} {self.action} ({self.reason})"


@dataclass(frozen=True)
class SanitizedSource:
    dataset: Dataset  # what the builders read; never the received dataset
    repairs: tuple[Repair, ...]
    character_set: str | None  # UTF-8 where a copied value is not plain ASCII, else the default


def is_valid_uid(value: object) -> bool:
    text = str(value or "").strip()
    try:
        validate_value("UI", text, config.RAISE)
    except ValueError:
        return False
    return bool(text)


def sanitize_source(source: Dataset, *, uid_root: str) -> SanitizedSource:
    """The attributes the results copy or need from ``source``, valid for their VRs."""
    repairs: list[Repair] = []
    clean = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        value = _read(source, keyword, repairs)
        if not is_valid_uid(value):
            raise UnusableSourceError(f"{keyword} is missing or not a valid UID")
        setattr(clean, keyword, str(value).strip())
    seed = str(clean.SOPInstanceUID)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        value = _read(source, keyword, repairs)
        if is_valid_uid(value):
            setattr(clean, keyword, str(value).strip())
        else:
            setattr(clean, keyword, str(generate_uid(uid_root, [seed, keyword])))
            missing = value is None or str(value).strip() == ""
            repairs.append(
                Repair(keyword, "generated", "missing" if missing else "not a valid UID")
            )

    for keyword in TYPE2_PATIENT_STUDY:
        value = _checked(source, keyword, repairs)
        if value is None:
            if keyword not in source:
                repairs.append(Repair(keyword, "created empty", "missing (Type 2)"))
            value = ""
        setattr(clean, keyword, value)
    for keyword in (*OPTIONAL_PATIENT_STUDY, *IMAGE_ATTRIBUTES):
        value = _checked(source, keyword, repairs)
        if value is not None and not _empty_value(value):
            setattr(clean, keyword, value)
    for keyword in PIXEL_SPACINGS:
        spacing = _checked(source, keyword, repairs)
        if spacing is None or _empty_value(spacing):
            continue
        if _usable_spacing(spacing):
            setattr(clean, keyword, spacing)
        else:
            repairs.append(Repair(keyword, "dropped", "not two positive finite spacings"))

    clean.file_meta = FileMetaDataset()
    clean.file_meta.MediaStorageSOPClassUID = clean.SOPClassUID
    clean.file_meta.MediaStorageSOPInstanceUID = clean.SOPInstanceUID
    clean.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # whatever the source's encoding
    character_set = UTF8 if _needs_unicode(clean) else None
    if character_set:
        clean.SpecificCharacterSet = character_set
    return SanitizedSource(clean, tuple(repairs), character_set)


def _read(source: Dataset, keyword: str, repairs: list[Repair]):
    """The decoded value, or None where pydicom cannot convert the raw bytes."""
    try:
        element = source.data_element(keyword)
    except Exception:
        repairs.append(Repair(keyword, "dropped", "not decodable"))
        return None
    if element is None:
        return None
    try:
        return element.value
    except Exception:
        repairs.append(Repair(keyword, "dropped", "not decodable"))
        return None


def _empty_value(value) -> bool:
    if value is None:
        return True
    if isinstance(value, (str, bytes, list, MultiValue, Sequence)):
        return len(value) == 0
    return False


def _checked(source: Dataset, keyword: str, repairs: list[Repair]):
    """The value ready to copy, repaired where that is unambiguous; None where there is none to
    copy (absent, empty, or dropped with a recorded reason)."""
    if keyword not in source:
        return None
    value = _read(source, keyword, repairs)
    if value is None or _empty_value(value):
        if dictionary_VR(keyword) == "SQ" and value is not None:
            repairs.append(Repair(keyword, "dropped", "empty sequence"))
        return None
    vr = dictionary_VR(keyword)
    if vr == "SQ":
        problem = _sequence_problem(value)
        if problem:
            repairs.append(Repair(keyword, "dropped", problem))
            return None
        return _copy_sequence(value)
    problem = _value_problem(keyword, vr, value)
    if problem is None:
        return value
    repaired = _repair(keyword, vr, value)
    if repaired is not None and _value_problem(keyword, vr, repaired) is None:
        repairs.append(Repair(keyword, "repaired", problem))
        return repaired
    repairs.append(Repair(keyword, "dropped", problem))
    return None


def _values(value) -> list:
    return list(value) if isinstance(value, (list, MultiValue)) else [value]


def _value_problem(keyword: str, vr: str, value) -> str | None:
    values = _values(value)
    if not _vm_allows(dictionary_VM(keyword), len(values)):
        return f"{len(values)} values where the dictionary allows {dictionary_VM(keyword)}"
    for item in values:
        if vr in _TEXT_VRS:
            text = str(item)
            if _CONTROL.search(text) or (vr not in _MULTILINE_VRS and re.search(r"[\r\n\t]", text)):
                return f"control characters in a {vr} value"
            if vr != "PN" and "\\" in text and vr not in _MULTILINE_VRS:
                return f"a backslash inside a {vr} value"
        try:
            # DS/IS values are numbers holding their original string; validate that string.
            validate_value(vr, str(item) if vr in ("DS", "IS") else item, config.RAISE)
        except (ValueError, TypeError):
            return f"not a valid {vr}"
        if vr == "DA" and not _calendar_date(str(item)):
            return "not a calendar date"
        if vr == "PN" and not _person_name_fits(str(item)):
            return "person name components too long or too many"
        if vr in ("DS", "FL", "FD") and not math.isfinite(float(item)):
            return "not a finite number"
    allowed = ENUMERATED.get(keyword)
    if allowed is not None and any(str(item) not in allowed for item in values):
        return "not one of the enumerated values"
    pattern = PATTERNS.get(keyword)
    if pattern is not None and not all(pattern.fullmatch(str(item)) for item in values):
        return "not made of the defined terms"
    return None


def _vm_allows(vm: str, count: int) -> bool:
    low, _, high = vm.partition("-")
    try:
        minimum = int(low)
    except ValueError:
        return True
    if not high:
        return count == minimum
    if high.endswith("n"):
        return count >= minimum
    return minimum <= count <= int(high)


def _calendar_date(text: str) -> bool:
    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return True


def _person_name_fits(text: str) -> bool:
    for group in text.split("="):
        if len(group) > 64 or group.count("^") > 4:
            return False
    return text.count("=") <= 2


def _repair(keyword: str, vr: str, value):
    """A value whose intent is unambiguous rewritten in the VR's form; None otherwise."""
    text = str(value).strip()
    if vr == "AS" and re.fullmatch(r"\d{1,3}", text) and int(text) < 200:
        return f"{int(text):03d}Y"  # bare years, the usual omission
    if vr == "AS" and re.fullmatch(r"\d{1,3}\s*[DWMY]", text.upper()):
        return f"{int(text[:-1]):03d}{text[-1].upper()}"
    if vr == "DA" and re.fullmatch(r"\d{4}[-./]\d{2}[-./]\d{2}", text):
        return re.sub(r"[-./]", "", text)
    if vr == "CS" and not isinstance(value, (list, MultiValue)) and text.upper() != text:
        return text.upper()
    if vr == "TM" and re.fullmatch(r"\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?", text):
        return text.replace(":", "")
    return None


def _sequence_problem(sequence) -> str | None:
    for item in sequence:
        if len(item) == 0:
            return "an empty item"
        if any(key in item for key in ("CodingSchemeDesignator", "CodeMeaning", *_CODE_KEYS)):
            has_value = any(str(item.get(key, "") or "").strip() for key in _CODE_KEYS)
            complete = has_value and all(
                str(item.get(key, "") or "").strip()
                for key in ("CodingSchemeDesignator", "CodeMeaning")
            )
            if not complete:
                return "a code item without value, scheme and meaning"
        for element in item:
            if element.tag.is_private:
                continue
            if element.VR == "SQ":
                problem = _sequence_problem(element.value)
                if problem:
                    return problem
                continue
            if _empty_value(element.value):
                continue
            try:
                keyword = element.keyword
                problem = _value_problem(keyword, element.VR, element.value) if keyword else None
            except Exception:
                problem = "an undecodable value"
            if problem:
                return f"an item's {element.keyword or 'element'}: {problem}"
    return None


def _copy_sequence(sequence) -> list[Dataset]:
    """Items without private elements (their creators' meaning does not travel)."""
    copies = []
    for item in sequence:
        copy = Dataset()
        for element in item:
            if element.tag.is_private:
                continue
            if element.VR == "SQ":
                copy.add_new(element.tag, "SQ", _copy_sequence(element.value))
            else:
                copy.add_new(element.tag, element.VR, element.value)
        copies.append(copy)
    return copies


def _usable_spacing(spacing) -> bool:
    values = _values(spacing)
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        return False
    return len(numbers) == 2 and all(math.isfinite(n) and n > 0 for n in numbers)


def _needs_unicode(dataset: Dataset) -> bool:
    def text_of(ds: Dataset):
        for element in ds:
            if element.VR == "SQ":
                for item in element.value:
                    yield from text_of(item)
            elif element.VR in _TEXT_VRS:
                for item in _values(element.value):
                    yield str(item)

    return any(not text.isascii() for text in text_of(dataset))
