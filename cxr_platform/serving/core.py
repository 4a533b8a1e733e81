"""What the HTTP service does, without BentoML: plain functions the service module wires up.

An upload is validated and decoded into the production model's uint8 square with the features
the inference log keeps; batches of those are scored by the production model and, when there is
one, the shadow model, and logged in one transaction. All of it is here, so it is tested without
a server and the service module stays thin.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxr_platform.data.imaging import DecodedImage, read_dicom_header, read_image
from cxr_platform.data.preprocessing import PreprocessingConfig, to_square_uint8
from cxr_platform.errors import CxrError, ImageReadError
from cxr_platform.inference.features import ImageFeatures, image_features
from cxr_platform.inference.live import ServingModels
from cxr_platform.inference.log import (
    InferenceLog,
    InferenceRecord,
    hash_uid,
    record_from_prediction,
)
from cxr_platform.inference.predictor import Predictor
from cxr_platform.monitoring.retained import RetainedInputs

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Errors at the HTTP edge
# --------------------------------------------------------------------------------------------


class ServingError(CxrError):
    """An error the service answers with ``status`` and a JSON body naming ``reason``."""

    status = 400
    reason = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.detail = message


class UploadTooLargeError(ServingError):
    status = 413
    reason = "upload_too_large"


class UnknownRequestIdError(ServingError):
    status = 404
    reason = "unknown_request_id"


class NoProductionModelError(ServingError):
    status = 503
    reason = "no_production_model"


class ScoringFailedError(ServingError):
    status = 503
    reason = "scoring_unavailable"


class InferenceLogUnavailableError(ServingError):
    status = 503
    reason = "inference_log_unavailable"


# Decoding failures are the client's: 4xx, with a status that says which kind.
IMAGE_ERROR_STATUS = {
    "empty": 400,
    "unrecognized_format": 415,
    "dicom_unsupported_transfer_syntax": 415,
    "too_large": 413,
    "truncated": 422,
    "unreadable": 422,
    "dicom_no_pixel_data": 422,
    "dicom_not_an_image": 422,
    "dicom_multi_frame": 422,
}


def error_response(exc: Exception) -> tuple[int, dict[str, str]]:
    """(HTTP status, JSON body) for an error a client caused; 500 for anything else."""
    if isinstance(exc, ServingError):
        return exc.status, {"error": exc.reason, "detail": exc.detail}
    if isinstance(exc, ImageReadError):
        return IMAGE_ERROR_STATUS.get(exc.reason, 422), {"error": exc.reason, "detail": exc.detail}
    return 500, {"error": "internal_error", "detail": "unexpected error; see the service log"}


# --------------------------------------------------------------------------------------------
# API side: an upload becomes a prepared image plus what the log records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedUpload:
    pixels: np.ndarray  # uint8 (S, S) in the production model's preprocessing
    features: ImageFeatures
    study_uid_hash: str | None = None
    sop_instance_uid_hash: str | None = None
    decoded: DecodedImage | None = field(default=None, repr=False)


def check_upload_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise UploadTooLargeError(
            f"upload is {size} bytes; this service accepts at most {max_bytes} bytes"
        )


def prepare_upload(
    data: bytes,
    preprocessing: PreprocessingConfig,
    *,
    max_bytes: int,
    max_pixels: int,
    uid_salt: bytes,
) -> PreparedUpload:
    """Decode by content (never by file name) and bring to the model's input. Raises
    :class:`ServingError` or :class:`ImageReadError` with a reason for anything unusable."""
    check_upload_size(len(data), max_bytes)
    decoded = read_image(data, max_pixels=max_pixels, draft_size=2 * preprocessing.image_size)
    pixels = to_square_uint8(decoded.pixels, preprocessing)
    study_hash = sop_hash = None
    if decoded.source_format == "DICOM":
        header = read_dicom_header(data)
        study_hash = hash_uid(header.get("StudyInstanceUID"), uid_salt)
        sop_hash = hash_uid(header.get("SOPInstanceUID"), uid_salt)
    return PreparedUpload(
        pixels=pixels,
        features=image_features(pixels, decoded),
        study_uid_hash=study_hash,
        sop_instance_uid_hash=sop_hash,
        decoded=decoded,
    )


def new_request_id() -> str:
    return uuid.uuid4().hex


def public_prediction(result: dict[str, Any], request_id: str) -> dict[str, Any]:
    """What a client sees: the production model's answer only. The shadow's is logged."""
    production = result["production"]
    return {
        "label": production["label"],
        "probability": production["probability"],
        "threshold": production["threshold"],
        "model_name": production["model_name"],
        "model_version": production["model_version"],
        "request_id": request_id,
    }


def inference_record(
    result: dict[str, Any],
    upload: PreparedUpload,
    *,
    request_id: str,
    source: str,
    latency_ms: float | None,
) -> InferenceRecord:
    shadow = result.get("shadow")
    return record_from_prediction(
        result["production"],
        request_id=request_id,
        source=source,
        features=upload.features,
        shadow_version=shadow["model_version"] if shadow else None,
        shadow_probability=float(shadow["probability"]) if shadow else None,
        shadow_label=shadow["label"] if shadow else None,
        latency_ms=latency_ms,
        study_uid_hash=upload.study_uid_hash,
        sop_instance_uid_hash=upload.sop_instance_uid_hash,
    )


# --------------------------------------------------------------------------------------------
# Scoring: one batch of squares through production and shadow, then the log
# --------------------------------------------------------------------------------------------

STALE_PREPROCESSING = "stale_preprocessing"


def model_summary(predictor: Predictor | None) -> dict[str, Any] | None:
    if predictor is None:
        return None
    metadata = predictor.metadata
    return {
        "model_name": predictor.model_name,
        "model_version": predictor.model_version,
        "arch": metadata.arch,
        "threshold": predictor.threshold,
        "class_names": list(metadata.class_names),
        "preprocessing": predictor.preprocessing.to_dict(),
        "calibration": predictor.calibration.to_dict(),
        "run_id": metadata.mlflow_run_id,
        "data_version": metadata.manifest_hash,
        "git_commit": metadata.git_commit,
        "exported_at": metadata.exported_at,
        "metrics": dict(metadata.metrics),
        "precision": metadata.precision,
    }


def serving_summary(models: ServingModels) -> dict[str, Any]:
    return {
        "production": model_summary(models.production),
        "shadow": model_summary(models.shadow),
    }


@dataclass(frozen=True)
class ScoreRequest:
    """One prepared image waiting for a batch, with what its log row needs."""

    pixels: np.ndarray  # uint8 (S, S)
    preprocessing: PreprocessingConfig  # what produced ``pixels``
    upload: PreparedUpload
    request_id: str
    started: float  # time.perf_counter() when the request arrived
    source: str = "http"


def score_items(models: ServingModels, items: Sequence[ScoreRequest]) -> list[dict[str, Any]]:
    """Score a batch through production and, when there is one, shadow.

    The snapshot is taken once by the caller, so one batch never mixes versions. An item
    prepared for a preprocessing the production model no longer uses (the alias moved between
    decode and scoring) comes back marked stale, and the caller prepares it again. The shadow
    scores only items prepared the way it expects; otherwise its result is simply absent.
    """
    production = models.production
    if production is None:
        return [{"error": NoProductionModelError.reason} for _ in items]
    config = production.preprocessing
    results: list[dict[str, Any]] = [{"error": STALE_PREPROCESSING} for _ in items]
    current = [i for i, item in enumerate(items) if item.preprocessing == config]
    if not current:
        return results
    batch = np.stack([items[i].pixels for i in current])
    main = production.predict_prepared(batch)
    shadow_predictions: list[Any] = [None] * len(current)
    shadow = models.shadow
    if shadow is not None and shadow.preprocessing == config:
        shadow_predictions = shadow.predict_prepared(batch)
    for index, prediction, shadow_prediction in zip(current, main, shadow_predictions, strict=True):
        results[index] = {
            "production": prediction.to_dict(),
            "shadow": shadow_prediction.to_dict() if shadow_prediction is not None else None,
        }
    return results


LOG_UNAVAILABLE = "inference_log_unavailable"


def score_and_log(
    models: ServingModels,
    inference_log: InferenceLog,
    items: Sequence[ScoreRequest],
    retained: RetainedInputs | None = None,
) -> list[dict[str, Any]]:
    """Score a batch and write its log rows in one transaction, before anyone is answered.

    If the log cannot be written, the batch's predictions are withheld (marked
    ``LOG_UNAVAILABLE``): a prediction the log does not hold must not leave the service.
    With ``retained``, each logged model input is kept for a later feedback label; failing to
    keep one costs only that training example, never the answer.
    """
    results = score_items(models, items)
    now = time.perf_counter()
    scored = [
        (item, result)
        for item, result in zip(items, results, strict=True)
        if "production" in result
    ]
    if not scored:
        return results
    records = [
        inference_record(
            result,
            item.upload,
            request_id=item.request_id,
            source=item.source,
            latency_ms=(now - item.started) * 1000.0,
        )
        for item, result in scored
    ]
    try:
        inference_log.write(records)
    except Exception:
        log.exception("inference log write failed; withholding %d predictions", len(records))
        for _, result in scored:
            result.clear()
            result["error"] = LOG_UNAVAILABLE
        return results
    if retained is not None:
        for item, _ in scored:
            try:
                retained.keep(item.request_id, item.pixels)
            except Exception:
                log.exception("could not keep the input of %s for training", item.request_id)
    return results
