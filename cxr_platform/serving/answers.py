"""The HTTP edge's own logic, without BentoML: errors and statuses, the upload limit, what a
client sees, the model summary of ``GET /model``.

Scoring itself is :mod:`cxr_platform.inference.scoring`, shared with the DICOM node; this module
is tested without a server and keeps the service module thin.
"""

from __future__ import annotations

import logging
from typing import Any

from cxr_platform.errors import CxrError, ImageReadError
from cxr_platform.inference.live import ServingModels
from cxr_platform.inference.scoring import RefusedInputError, ScoringUnavailableError
from cxr_platform.model_version.predictor import Prediction, Predictor

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


class TooManyImagesError(ServingError):
    status = 413
    reason = "too_many_images"


class UnknownRequestIdError(ServingError):
    status = 404
    reason = "unknown_request_id"


class OtherSiteRequestError(ServingError):
    """Feedback from one site for a request another site sent."""

    status = 403
    reason = "other_site_request"


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


def error_response(exc: Exception) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for an error a client caused or a 503 worth retrying; 500 for
    anything else."""
    if isinstance(exc, ServingError):
        return exc.status, {"error": exc.reason, "detail": exc.detail}
    if isinstance(exc, ScoringUnavailableError):
        return 503, {"error": exc.reason, "detail": str(exc)}
    if isinstance(exc, RefusedInputError):  # not a chest radiograph, or outside intended use
        return 422, {
            "error": exc.reason,
            "detail": exc.detail,
            "why": exc.verdict.reason,
            "gate_score": exc.verdict.score,
            "request_id": exc.request_id,
        }
    if isinstance(exc, ImageReadError):
        return IMAGE_ERROR_STATUS.get(exc.reason, 422), {"error": exc.reason, "detail": exc.detail}
    return 500, {"error": "internal_error", "detail": "unexpected error; see the service log"}


# --------------------------------------------------------------------------------------------
# What the client sees
# --------------------------------------------------------------------------------------------


def check_upload_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise UploadTooLargeError(
            f"upload is {size} bytes; this service accepts at most {max_bytes} bytes"
        )


def public_prediction(prediction: Prediction, request_id: str) -> dict[str, Any]:
    """What a client sees: the production model's answer only. The shadow's is logged."""
    return {
        "label": prediction.label,
        "probability": prediction.probability,
        "threshold": prediction.threshold,
        "model_name": prediction.model_name,
        "model_version": prediction.model_version,
        "request_id": request_id,
    }


def model_summary(predictor: Predictor | None) -> dict[str, Any] | None:
    if predictor is None:
        return None
    metadata = predictor.metadata
    summary = metadata.summary()
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
        "input_gate": summary.get("input_gate"),
        # Who the version is for; answers outside it are refused (422 outside_intended_use).
        "intended_use": summary.get("intended_use") or "not stated (exported before it existed)",
        "population_check": summary.get("population_check"),
    }


def serving_summary(models: ServingModels) -> dict[str, Any]:
    return {
        "production": model_summary(models.production),
        "shadow": model_summary(models.shadow),
        # Sites served by their own (recalibrated) version instead of production.
        "sites": {
            site: model_summary(site_models.production)
            for site, site_models in models.sites.items()
        },
    }
