"""The one scoring core: decode -> the model's preprocessing -> production and shadow -> the log.

Every edge that scores an image for a caller goes through here: the HTTP service (in batches),
the DICOM node (one instance at a time). Each request is prepared for, and scored by, one
snapshot of the serving models, so a promotion between decoding and scoring cannot hand an image
to a model that expects other preprocessing: the request simply gets the version that was
production when it arrived, and its log row says so. Results are typed (:class:`ScoringOutcome`).
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cxr_platform.data.decoded import DecodedImage
from cxr_platform.data.features import ImageFeatures, image_features
from cxr_platform.data.imaging import read_dicom_header, read_image
from cxr_platform.data.patient_age import UNKNOWN, AgeReading, age_from_header
from cxr_platform.data.preprocessing import to_square_uint8
from cxr_platform.errors import CxrError
from cxr_platform.inference.live import ServingModels
from cxr_platform.inference.log import InferenceLog, InferenceRecord, RefusalRecord
from cxr_platform.inference.retained import RetainedInputs
from cxr_platform.model_version.input_gate import ACCEPTED_WITHOUT_GATE, GateVerdict
from cxr_platform.model_version.intended_use import OUTSIDE_INTENDED_USE, PATIENT_AGE
from cxr_platform.model_version.predictor import Prediction, Predictor
from cxr_platform.redaction import hash_uid

log = logging.getLogger(__name__)

# Why a request got no prediction (``ScoringOutcome.failure``); edges map these to their own
# answers (HTTP 503, a DICOM instance left in the spool for later).
NO_PRODUCTION_MODEL = "no_production_model"
LOG_UNAVAILABLE = "inference_log_unavailable"
NOT_A_CHEST_RADIOGRAPH = "not_a_chest_radiograph"
# A chest radiograph, but of a patient the version was not made for (its intended use): by the
# age a header or the caller states, else by the model's own features.
REFUSALS = (NOT_A_CHEST_RADIOGRAPH, OUTSIDE_INTENDED_USE)
_FAILURE_MESSAGES = {
    NO_PRODUCTION_MODEL: "no model holds the production alias (see `cxr models` / `cxr promote`)",
    LOG_UNAVAILABLE: "the inference log is unavailable, so no prediction is released",
}


class ScoringUnavailableError(CxrError):
    """No prediction can be released now; worth trying again later."""

    def __init__(self, reason: str) -> None:
        super().__init__(_FAILURE_MESSAGES.get(reason, reason))
        self.reason = reason


class RefusedInputError(CxrError):
    """The production model refused the image before any diagnosis: no answer is given."""

    reason = NOT_A_CHEST_RADIOGRAPH

    def __init__(self, verdict: GateVerdict, request_id: str | None = None) -> None:
        super().__init__(f"{self.reason}: {self.detail_of(verdict)}")
        self.verdict = verdict
        self.request_id = request_id

    @staticmethod
    def detail_of(verdict: GateVerdict) -> str:
        return verdict.describe()

    @property
    def detail(self) -> str:
        return self.detail_of(self.verdict)


class NotAChestRadiographError(RefusedInputError):
    """The production model's input gate refused the image: no diagnosis is given."""

    reason = NOT_A_CHEST_RADIOGRAPH


class OutsideIntendedUseError(RefusedInputError):
    """A chest radiograph of a patient outside the version's intended use: no diagnosis."""

    reason = OUTSIDE_INTENDED_USE

    @staticmethod
    def detail_of(verdict: GateVerdict) -> str:
        return verdict.detail  # already in words: "patient age 81 years is outside ..."


@dataclass(frozen=True)
class PreparedInput:
    """An image decoded by content and brought to one model's input, with what the log keeps."""

    pixels: np.ndarray  # uint8 (S, S) in the model's preprocessing
    features: ImageFeatures
    study_uid_hash: str | None = None
    sop_instance_uid_hash: str | None = None
    decoded: DecodedImage | None = field(default=None, repr=False)
    gate: GateVerdict = ACCEPTED_WITHOUT_GATE  # the production model's input gate
    age: AgeReading = UNKNOWN  # what the header or the caller says of the patient's age
    age_refusal: GateVerdict | None = None  # a stated age outside the intended use


def prepare_input(
    data: bytes,
    production: Predictor,
    *,
    max_pixels: int,
    uid_salt: bytes,
    patient_age: AgeReading = UNKNOWN,
) -> PreparedInput:
    """Decode (never by file name), preprocess the way ``production`` expects, and put the
    result before its input gate and its intended use. Raises
    :class:`~cxr_platform.errors.ImageReadError` with a reason for anything unusable; a refusal
    is recorded (``gate``, ``age_refusal``), not raised, so it is logged with the rest of its
    batch. ``patient_age``: what the caller states; a DICOM header's own age is read here."""
    preprocessing = production.preprocessing
    decoded = read_image(data, max_pixels=max_pixels, draft_size=2 * preprocessing.image_size)
    pixels = to_square_uint8(decoded.pixels, preprocessing)
    study_hash = sop_hash = None
    readings = [patient_age]
    if decoded.source_format == "DICOM":
        header = read_dicom_header(data)
        study_hash = hash_uid(header.get("StudyInstanceUID"), uid_salt)
        sop_hash = hash_uid(header.get("SOPInstanceUID"), uid_salt)
        readings.insert(0, age_from_header(header))
    # Every stated age must lie inside: a header and a caller that disagree are not resolved
    # by picking the convenient one.
    refusals = [v for reading in readings if (v := production.judge_age(reading)) is not None]
    return PreparedInput(
        pixels=pixels,
        features=image_features(pixels, decoded),
        study_uid_hash=study_hash,
        sop_instance_uid_hash=sop_hash,
        decoded=decoded,
        gate=production.judge_input(decoded.pixels, pixels),
        age=next((reading for reading in readings if reading.known), UNKNOWN),
        age_refusal=refusals[0] if refusals else None,
    )


def new_request_id() -> str:
    return uuid.uuid4().hex


def instance_request_id(sop_instance_uid_hash: str, model_version: str | None) -> str:
    """One DICOM instance scored by one version is one request, however often it is scored:
    a worker that died after logging it, a modality that sends it again."""
    key = f"{sop_instance_uid_hash}:{model_version}".encode()
    return hashlib.sha256(key).hexdigest()[:32]


@dataclass(frozen=True)
class ScoreRequest:
    """One prepared image, the snapshot it was prepared for, and what its log row needs."""

    models: ServingModels
    prepared: PreparedInput
    request_id: str
    started: float  # time.perf_counter() when the request arrived
    source: str = "http"
    site: str | None = None  # which site sent it, as the log keeps it (``site_name``)


_REFUSAL_ERRORS: dict[str, type[RefusedInputError]] = {
    NOT_A_CHEST_RADIOGRAPH: NotAChestRadiographError,
    OUTSIDE_INTENDED_USE: OutsideIntendedUseError,
}


@dataclass(frozen=True)
class ScoringOutcome:
    request_id: str
    production: Prediction | None = None
    shadow: Prediction | None = None  # logged, never returned to the caller
    # NO_PRODUCTION_MODEL, LOG_UNAVAILABLE, or one of REFUSALS
    failure: str | None = None
    refusal: GateVerdict | None = None  # with one of REFUSALS: why
    shadow_gate: GateVerdict | None = None  # the shadow's own verdict, when it scored

    @property
    def refused(self) -> bool:
        return self.refusal is not None and self.failure in REFUSALS

    def released(self) -> Prediction:
        """The production prediction, or the typed error that says why there is none."""
        if self.refused:
            assert self.refusal is not None and self.failure is not None
            raise _REFUSAL_ERRORS[self.failure](self.refusal, self.request_id)
        if self.production is None:
            raise ScoringUnavailableError(self.failure or NO_PRODUCTION_MODEL)
        return self.production


def request_for(
    models: ServingModels,
    data: bytes,
    *,
    max_pixels: int,
    uid_salt: bytes,
    started: float,
    source: str,
    site: str | None = None,
    patient_age: AgeReading = UNKNOWN,
    keyed_by_instance: bool = False,
) -> ScoreRequest:
    """Prepare ``data`` for the production model of ``models`` (one snapshot, taken by the
    caller). Raises :class:`ScoringUnavailableError` when there is no production model.
    ``keyed_by_instance``: the request id is the DICOM instance's with this version
    (:func:`instance_request_id`), so scoring it again logs nothing more."""
    if models.production is None:
        raise ScoringUnavailableError(NO_PRODUCTION_MODEL)
    prepared = prepare_input(
        data, models.production, max_pixels=max_pixels, uid_salt=uid_salt, patient_age=patient_age
    )
    request_id = (
        instance_request_id(prepared.sop_instance_uid_hash, models.production.model_version)
        if keyed_by_instance and prepared.sop_instance_uid_hash
        else new_request_id()
    )
    return ScoreRequest(models, prepared, request_id, started, source, site)


def _refusal_before_scoring(item: ScoreRequest) -> ScoringOutcome | None:
    """The input gate first (is it a chest radiograph at all?), then the stated age."""
    prepared = item.prepared
    if not prepared.gate.accepted:
        return ScoringOutcome(
            item.request_id, failure=NOT_A_CHEST_RADIOGRAPH, refusal=prepared.gate
        )
    if prepared.age_refusal is not None:
        return ScoringOutcome(
            item.request_id, failure=OUTSIDE_INTENDED_USE, refusal=prepared.age_refusal
        )
    return None


def score_items(items: Sequence[ScoreRequest]) -> list[ScoringOutcome]:
    """Each item by the production (and shadow) of the snapshot it was prepared for.

    Items sharing a snapshot, which is all of them except while an alias moves, go through each
    model in one ONNX Runtime call; no call mixes versions. An image refused by the input gate
    or by a stated age is not scored; one whose age nobody states is judged by the production's
    population check on the features of the same run, and refused before its answer leaves. The
    shadow scores only when it expects the production's preprocessing; otherwise its result is
    simply absent.
    """
    outcomes: list[ScoringOutcome | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(id(item.models), []).append(index)
    for indices in groups.values():
        models = items[indices[0]].models
        production, shadow = models.production, models.shadow
        if production is None:
            for index in indices:
                outcomes[index] = ScoringOutcome(
                    items[index].request_id, failure=NO_PRODUCTION_MODEL
                )
            continue
        accepted = []
        for index in indices:
            outcomes[index] = _refusal_before_scoring(items[index])
            if outcomes[index] is None:
                accepted.append(index)
        if not accepted:
            continue
        batch = np.stack([items[index].prepared.pixels for index in accepted])
        main, features = production.predict_with_features(batch)
        population = production.judge_population(features)
        shadows: list[Prediction | None] = [None] * len(accepted)
        shadow_gates: list[GateVerdict | None] = [None] * len(accepted)
        if shadow is not None and shadow.preprocessing == production.preprocessing:
            shadows = list(shadow.predict_prepared(batch))
            shadow_gates = [_shadow_verdict(shadow, items[index].prepared) for index in accepted]
        for position, index in enumerate(accepted):
            item = items[index]
            unlike = population[position] if population else None
            if unlike is not None and not item.prepared.age.known:
                outcomes[index] = ScoringOutcome(
                    item.request_id, failure=OUTSIDE_INTENDED_USE, refusal=unlike
                )
                continue
            outcomes[index] = ScoringOutcome(
                item.request_id,
                main[position],
                shadows[position],
                shadow_gate=shadow_gates[position],
            )
    return [outcome for outcome in outcomes if outcome is not None]


def _shadow_verdict(shadow: Predictor, prepared: PreparedInput) -> GateVerdict:
    # Same preprocessing as production, so the model input is the same square.
    original = prepared.decoded.pixels if prepared.decoded is not None else prepared.pixels / 255.0
    return shadow.judge_input(original, prepared.pixels)


def inference_record(
    outcome: ScoringOutcome, item: ScoreRequest, latency_ms: float | None
) -> InferenceRecord:
    production, shadow = outcome.production, outcome.shadow
    assert production is not None
    prepared = item.prepared
    return InferenceRecord(
        request_id=item.request_id,
        source=item.source,
        model_name=production.model_name,
        model_version=production.model_version,
        probability=float(production.probability),
        label=production.label,
        threshold=float(production.threshold),
        features=prepared.features,
        shadow_version=shadow.model_version if shadow else None,
        shadow_probability=float(shadow.probability) if shadow else None,
        shadow_label=shadow.label if shadow else None,
        latency_ms=latency_ms,
        study_uid_hash=prepared.study_uid_hash,
        sop_instance_uid_hash=prepared.sop_instance_uid_hash,
        gate_score=prepared.gate.score,
        shadow_gate=(
            None
            if outcome.shadow_gate is None
            else ("accepted" if outcome.shadow_gate.accepted else outcome.shadow_gate.reason)
        ),
        site=item.site,
    )


def recorded_refusal_detail(verdict: GateVerdict, production: Predictor) -> str:
    """What a record (the inference log, the DICOM node's ledger) keeps of why an image was
    refused: the verdict's own words, except that an age refusal names the range the age fell
    outside, never the age (records keep no patient data; the radiologist's not-analysed
    report and the caller's answer say the age)."""
    if verdict.reason == PATIENT_AGE and production.intended_use is not None:
        ages = production.intended_use.ages_text()
        return f"the stated age is outside this model's intended use: {ages}"
    return verdict.detail


def refusal_record(outcome: ScoringOutcome, item: ScoreRequest) -> RefusalRecord:
    """The input gate's refusals keep their own reason (``too_small``, ``upside_down``, ...);
    intended-use refusals are ``outside_intended_use``, with how it was judged (by the stated
    age, by pixels) at the front of the detail."""
    verdict, production, prepared = outcome.refusal, item.models.production, item.prepared
    assert verdict is not None and production is not None
    decoded = prepared.decoded
    intended_use = outcome.failure == OUTSIDE_INTENDED_USE
    by_age = intended_use and verdict.reason == PATIENT_AGE
    detail = recorded_refusal_detail(verdict, production)
    return RefusalRecord(
        request_id=item.request_id,
        source=item.source,
        model_name=production.model_name,
        model_version=production.model_version,
        reason=OUTSIDE_INTENDED_USE if intended_use else verdict.reason or NOT_A_CHEST_RADIOGRAPH,
        detail=f"{verdict.reason}: {detail}" if intended_use else detail,
        gate_score=None if by_age else verdict.score,
        gate_threshold=verdict.threshold,
        original_width=decoded.width if decoded else None,
        original_height=decoded.height if decoded else None,
        source_format=decoded.source_format if decoded else None,
        photometric_interpretation=decoded.photometric_interpretation if decoded else None,
        study_uid_hash=prepared.study_uid_hash,
        sop_instance_uid_hash=prepared.sop_instance_uid_hash,
        site=item.site,
    )


def score_and_log(
    inference_log: InferenceLog,
    items: Sequence[ScoreRequest],
    retained: RetainedInputs | None = None,
) -> list[ScoringOutcome]:
    """Score a batch and write its log rows in one transaction, before anyone is answered.

    If the log cannot be written, the batch's predictions are withheld (``LOG_UNAVAILABLE``): a
    prediction the log does not hold must not leave the platform. With ``retained``, each logged
    model input is kept for a later feedback label; failing to keep one costs only that training
    example, never the answer.
    """
    outcomes = score_items(items)
    now = time.perf_counter()
    pairs = list(zip(items, outcomes, strict=True))
    scored = [(item, outcome) for item, outcome in pairs if outcome.production is not None]
    refused = [(item, outcome) for item, outcome in pairs if outcome.refused]
    if not scored and not refused:
        return outcomes
    records = [
        inference_record(outcome, item, (now - item.started) * 1000.0) for item, outcome in scored
    ]
    try:
        inference_log.write(records, [refusal_record(outcome, item) for item, outcome in refused])
    except Exception:
        log.exception(
            "inference log write failed; withholding %d answers", len(records) + len(refused)
        )
        # A refusal the log does not hold is withheld too: the edges answer 503, not 422.
        return [
            ScoringOutcome(outcome.request_id, failure=LOG_UNAVAILABLE)
            if outcome.production is not None or outcome.refusal is not None
            else outcome
            for outcome in outcomes
        ]
    if retained is not None:
        for item, _ in scored:
            try:
                retained.keep(item.request_id, item.prepared.pixels)
            except Exception:
                log.exception("could not keep the input of %s for training", item.request_id)
    return outcomes
