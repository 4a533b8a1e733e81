"""The BentoML service: ``bentoml serve cxr_platform.serving.service:CxrService``.

One service: the HTTP edge (API key, size limit, decoding, drift features, the inference log)
and the ONNX Runtime sessions that follow the registry's ``production`` and ``shadow`` aliases,
scored with adaptive (continuous) batching in this process. The logic lives in
:mod:`cxr_platform.serving.answers` and :mod:`cxr_platform.serving.batching`.

Why not BentoML's ``batchable`` API: BentoML batches only calls that reach it over HTTP, so
batching needs a second service behind the first. That hop cost 4.4 ms per request at
concurrency 1 and a third of the throughput on two cores (benchmarks/serve_load.py, measured
with both designs); batching in this process does the same job without it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import bentoml
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cxr_platform.data.patient_age import AgeReading, age_from_caller
from cxr_platform.deployment.registry import lung_registry_for, registry_for
from cxr_platform.errors import ImageReadError
from cxr_platform.inference.live import FixedModels, LiveModels
from cxr_platform.inference.log import (
    InferenceLog,
    InferenceLogError,
    OtherSiteError,
    UnknownRequestError,
)
from cxr_platform.inference.retained import RetainedInputs
from cxr_platform.inference.scoring import (
    LOG_UNAVAILABLE,
    PreparedInput,
    RefusedInputError,
    ScoreRequest,
    ScoringOutcome,
    ScoringUnavailableError,
    request_for,
    score_and_log,
)
from cxr_platform.model_version.lung_fields import LungFields
from cxr_platform.model_version.predictor import Prediction
from cxr_platform.redaction import uid_salt, withhold_logged_values
from cxr_platform.serving import answers
from cxr_platform.serving.batching import ContinuousBatcher
from cxr_platform.serving.edge import (
    PATIENT_AGE_HEADER,
    SITE_HEADER,
    UPLOAD_FIELD,
    EdgeMiddleware,
    parse_site_keys,
)
from cxr_platform.settings import load_settings

if TYPE_CHECKING:
    from cxr_platform.inference.explainer import Explainer

log = logging.getLogger(__name__)
withhold_logged_values()  # BentoML's workers import this module: their logs are redacted too
settings = load_settings()
serving = settings.serving
# A Bento built by `cxr bento` names its bundled model in its build arguments (its environment
# variables only reach containers); CXR_SERVING_MODEL overrides.
PINNED_MODEL: str | None = serving.serving_model or getattr(
    bentoml.use_arguments(), "model_tag", None
)

PROTECTED_ROUTES = frozenset({"/predict", "/explain", "/predict/batch", "/model", "/feedback"})
UPLOAD_ROUTES = frozenset({"/predict", "/explain", "/predict/batch"})
RAW_BODY_ROUTES = frozenset({"/predict", "/explain"})
# What a client can get wrong, or a 503 worth retrying: answered with a status and a reason.
CLIENT_ERRORS = (
    answers.ServingError,
    ImageReadError,
    ScoringUnavailableError,
    RefusedInputError,
)

rejected_inputs = bentoml.metrics.Counter(
    name="cxr_rejected_inputs",
    documentation="Requests refused at the edge, by endpoint and reason.",
    labelnames=["endpoint", "reason"],
)
predictions_served = bentoml.metrics.Counter(
    name="cxr_predictions",
    documentation="Predictions returned, by endpoint, model version and label.",
    labelnames=["endpoint", "model_version", "label"],
)
shadow_predictions = bentoml.metrics.Counter(
    name="cxr_shadow_predictions",
    documentation="Shadow-model scores logged (never returned), by agreement with production.",
    labelnames=["shadow_version", "agrees"],
)
batch_sizes = bentoml.metrics.Histogram(
    name="cxr_batch_size",
    documentation="Images per ONNX Runtime call (adaptive batching).",
    labelnames=[],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
retention_skipped = bentoml.metrics.Counter(
    name="cxr_retained_inputs_skipped",
    documentation="Inputs not kept for feedback (the prediction was served), by reason: the "
    "retention budget full of labeled inputs, or the disk at its free-space watermark.",
    labelnames=["reason"],
)
retention_evicted = bentoml.metrics.Counter(
    name="cxr_retained_inputs_evicted",
    documentation="Unlabeled kept inputs deleted early to stay within the retention budget.",
    labelnames=[],
)
log_failures = bentoml.metrics.Counter(
    name="cxr_inference_log_failures",
    documentation="Predictions withheld because the inference log could not be written.",
    labelnames=[],
)


class PredictionResponse(BaseModel):
    label: Literal["NORMAL", "PNEUMONIA"]
    probability: float = Field(description="Calibrated probability of pneumonia.")
    threshold: float = Field(description="The model's operating threshold.")
    model_name: str
    model_version: str | None
    request_id: str = Field(description="Quote it in POST /feedback.")


class FeedbackResponse(BaseModel):
    request_id: str
    label: str
    recorded: bool = True
    # False when the input is no longer kept (retention off or expired): the label still
    # counts for performance monitoring, but the image cannot become fine-tuning data.
    retained_for_training: bool = False


async def model_info(request: Request) -> Response:
    service: CxrService = bentoml.get_current_service()
    return JSONResponse(await service.describe())


async def predict_batch(request: Request) -> Response:
    service: CxrService = bentoml.get_current_service()
    return await service.predict_batch(request)


async def raw_body(request: Request) -> Response:
    service: CxrService = bentoml.get_current_service()
    return await service.raw_body(request)


# Routes outside BentoML's typed APIs, in a small mounted app: GET views (BentoML APIs are
# POST-only) and the batch upload, whose list of files BentoML's form parsing would write to
# temporary files one by one.
mounted_routes = Starlette(
    routes=[
        Route("/model", model_info, methods=["GET"]),
        Route("/predict/batch", predict_batch, methods=["POST"]),
    ]
)
# The edge hands it a body that is one image (octet-stream, DICOM, PNG, JPEG) for these paths.
raw_body_routes = Starlette(
    routes=[Route(path, raw_body, methods=["POST"]) for path in sorted(RAW_BODY_ROUTES)]
)


@bentoml.service(
    name="cxr_pneumonia",
    workers=1,
    traffic={"timeout": 120},
    http={"port": serving.service_port},
)
class CxrService:
    def __init__(self) -> None:
        self.models: LiveModels | FixedModels
        if PINNED_MODEL:
            stored = bentoml.models.get(PINNED_MODEL)
            self.models = FixedModels(
                Path(stored.path),
                version=stored.info.labels.get("registry_version", str(stored.tag.version)),
                threads=serving.service_threads,
            )
        else:
            self.models = LiveModels(
                registry_for(settings.registry),
                threads=serving.service_threads,
                max_pixels=serving.max_image_pixels,
                precision=serving.service_precision,
                lung_registry=lung_registry_for(settings.registry),
            )
        try:
            self.models.refresh()
        except Exception:
            log.exception("could not load models from the registry; will keep trying")
        self.models.start_polling(serving.service_refresh_seconds)
        self.batcher: ContinuousBatcher[ScoreRequest, ScoringOutcome] = ContinuousBatcher(
            self._score_batch,
            max_batch_size=serving.service_max_batch_size,
            on_batch=lambda size: batch_sizes.observe(size),
        )
        self.inference_log = InferenceLog(serving.inference_log_uri)
        self.salt = uid_salt(serving.home, serving.uid_salt)
        self.retained = (
            RetainedInputs(
                serving.retained_dir,
                serving.retained_budget,
                on_skipped=lambda reason: retention_skipped.labels(reason=reason).inc(),
                on_evicted=lambda n: retention_evicted.inc(n),
            )
            if serving.retain_inputs_days > 0
            else None
        )
        if self.retained is not None:
            self._prune_retained()
        self._explainers: dict[str, Explainer] = {}
        self._explainer_lock = threading.Lock()
        self._gradcam_lock = threading.Lock()

    def __is_ready__(self) -> bool:
        return self.models.current().production is not None

    # ---- scoring ---------------------------------------------------------------------------

    def _score_batch(self, items: list[ScoreRequest]) -> list[ScoringOutcome]:
        return score_and_log(self.inference_log, items, self.retained)

    def _prune_retained(self) -> None:
        assert self.retained is not None
        try:
            removed = self.retained.prune(serving.retain_inputs_days * 86400)
        except OSError:
            log.exception("could not prune retained inputs")
        else:
            if removed:
                log.info("deleted %d unlabeled inputs past retention", removed)
        # Daily, on a daemon thread: the service may run for months.
        timer = threading.Timer(86400, self._prune_retained)
        timer.daemon = True
        timer.start()

    def _request(
        self, data: bytes, started: float, site: str | None, age: AgeReading
    ) -> ScoreRequest:
        answers.check_upload_size(len(data), serving.service_max_upload_bytes)
        # One snapshot from decoding to scoring: a promotion in between cannot mismatch them.
        return request_for(
            self.models.current(site),  # the site's own production version, if it has one
            data,
            max_pixels=serving.max_image_pixels,
            uid_salt=self.salt,
            started=started,
            source="http",
            site=site,
            patient_age=age,
        )

    async def _predict_and_log(
        self, data: bytes, endpoint: str, started: float, site: str | None, age: AgeReading
    ) -> tuple[ScoreRequest, Prediction]:
        """Decode, batch-score and log; returns after the log row is written."""
        request = await anyio.to_thread.run_sync(self._request, data, started, site, age)
        outcome = await self.batcher.submit(request)
        return request, self._released(endpoint, outcome)

    def _released(self, endpoint: str, outcome: ScoringOutcome) -> Prediction:
        if outcome.failure == LOG_UNAVAILABLE:
            log_failures.inc()
        prediction = outcome.released()
        self._count(endpoint, prediction, outcome.shadow)
        return prediction

    @staticmethod
    def _count(endpoint: str, production: Prediction, shadow: Prediction | None) -> None:
        predictions_served.labels(
            endpoint=endpoint, model_version=str(production.model_version), label=production.label
        ).inc()
        if shadow is not None:
            shadow_predictions.labels(
                shadow_version=str(shadow.model_version),
                agrees=str(shadow.label == production.label).lower(),
            ).inc()

    # ---- the request path ------------------------------------------------------------------

    async def _guarded(
        self,
        endpoint: str,
        file: Path,
        handler: Callable[[bytes, float], Awaitable[Response]],
        ctx: bentoml.Context,
    ) -> Response:
        """A multipart upload: BentoML wrote it to a temporary file, which it empties when the
        request ends, cancelled or not, so the bytes are read before the shielded part."""
        started = time.perf_counter()
        size = file.stat().st_size  # the edge already refused bodies over the limit
        # A typical radiograph reads in microseconds; only big files are worth a thread.
        if size <= 1 << 20:
            data = file.read_bytes()
        else:
            data = await anyio.to_thread.run_sync(file.read_bytes)
        response = await self._shielded(endpoint, handler(data, started))
        # An API that takes the context answers with its status, not the response's.
        ctx.response.status_code = response.status_code
        return response

    async def _shielded(self, endpoint: str, work: Awaitable[Response]) -> Response:
        """Run the rest shielded from cancellation, so a client that hangs up after sending its
        image still gets its prediction logged; a refusal becomes its status and reason."""
        try:
            return await asyncio.shield(asyncio.ensure_future(work))
        except CLIENT_ERRORS as exc:
            return self._refused(endpoint, exc)

    @staticmethod
    def _refusal(endpoint: str, exc: Exception) -> tuple[int, dict[str, Any]]:
        status, body = answers.error_response(exc)
        rejected_inputs.labels(endpoint=endpoint, reason=body["error"]).inc()
        return status, body

    @classmethod
    def _refused(cls, endpoint: str, exc: Exception) -> JSONResponse:
        status, body = cls._refusal(endpoint, exc)
        return JSONResponse(body, status_code=status)

    def _predict_handler(
        self, site: str | None, age: AgeReading
    ) -> Callable[[bytes, float], Awaitable[Response]]:
        async def handler(data: bytes, started: float) -> Response:
            request, prediction = await self._predict_and_log(data, "predict", started, site, age)
            return JSONResponse(answers.public_prediction(prediction, request.request_id))

        return handler

    def _explain_handler(
        self, site: str | None, age: AgeReading, accept: str
    ) -> Callable[[bytes, float], Awaitable[Response]]:
        wants_json = "application/json" in accept

        async def handler(data: bytes, started: float) -> Response:
            request, scored = await self._predict_and_log(data, "explain", started, site, age)
            prediction = answers.public_prediction(scored, request.request_id)
            version = str(scored.model_version)
            heatmap, overlay = await anyio.to_thread.run_sync(
                self._overlay, version, request.prepared
            )
            fields = await anyio.to_thread.run_sync(self._lung_fields, request)
            if fields is not None:
                # Where the heatmap lies: the share of its relevance inside the lung fields,
                # answered and kept on the request's log row for monitoring.
                lungs = fields.summary(heatmap)
                prediction = {**prediction, **lungs}
                await anyio.to_thread.run_sync(
                    self._record_lung_relevance, request.request_id, lungs["relevance_in_lungs"]
                )
            from cxr_platform.explain.gradcam import png_bytes

            image = png_bytes(overlay)
            if wants_json:
                body = {**prediction, "overlay_png_base64": base64.b64encode(image).decode()}
                return JSONResponse(body)
            headers = {
                f"X-CXR-{key.replace('_', '-').title()}": (
                    ", ".join(value) if isinstance(value, list) else str(value)
                )
                for key, value in prediction.items()
            }
            return Response(image, media_type="image/png", headers=headers)

        return handler

    @bentoml.api(route="/predict")
    async def predict(self, file: Path, ctx: bentoml.Context) -> PredictionResponse:
        """Classify one chest X-ray (PNG, JPEG or DICOM, multipart field `file`, or the image
        itself as the body with `Content-Type: application/octet-stream`, `application/dicom`,
        `image/png` or `image/jpeg`); the sending site in `X-CXR-Site` (or implied by a site's
        API key); the patient's age, when known and not in a DICOM header, in the field
        `patient_age` or `X-CXR-Patient-Age` (years, or a DICOM age string such as 004Y). An
        image outside the version's intended use gets 422 `outside_intended_use` with the
        reason in words. `POST /predict/batch` takes several images at once."""
        headers = ctx.request.headers
        handler = self._predict_handler(_site_in(headers), _age_in(headers))
        return await self._guarded("predict", file, handler, ctx)  # type: ignore[return-value]

    @bentoml.api(route="/explain")
    async def explain(self, file: Path, ctx: bentoml.Context) -> Any:
        """Grad-CAM overlay as PNG, the prediction in X-CXR-* headers; with
        `Accept: application/json`, JSON holding the prediction and the PNG in base64. The
        image as in /predict: multipart field `file`, or the body itself."""
        headers = ctx.request.headers
        handler = self._explain_handler(
            _site_in(headers), _age_in(headers), headers.get("accept", "")
        )
        return await self._guarded("explain", file, handler, ctx)

    async def raw_body(self, request: Request) -> Response:
        """/predict or /explain with the image as the body: the edge already holds it in
        memory, so no form parsing and no temporary file."""
        started = time.perf_counter()
        data = await request.body()
        headers = request.headers
        site, age = _site_in(headers), _age_in(headers)
        if request.url.path == "/explain":
            handler = self._explain_handler(site, age, headers.get("accept", ""))
            return await self._shielded("explain", handler(data, started))
        return await self._shielded("predict", self._predict_handler(site, age)(data, started))

    async def predict_batch(self, request: Request) -> Response:
        """Several images in one request (multipart, each a file field `file`): one answer per
        image, in the order sent, each with its own request id and log row, or its own refusal
        and status. The images share the request's site and stated age."""
        started = time.perf_counter()
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            return self._refused(
                "predict_batch",
                answers.ServingError(
                    "send the images as multipart/form-data, each a file field 'file'"
                ),
            )
        limit = serving.service_max_request_images
        try:
            # Parts stay in memory up to 1 MiB each (Starlette's spooled files); the edge
            # already held the whole body to the upload limit.
            form = await request.form(max_files=limit + 1, max_fields=limit + 1)
        except Exception as exc:  # python-multipart's errors name what was wrong
            return self._refused("predict_batch", answers.ServingError(str(exc)))
        try:
            uploads = [part for part in form.getlist(UPLOAD_FIELD) if not isinstance(part, str)]
            if len(uploads) > limit:
                return self._refused(
                    "predict_batch",
                    answers.TooManyImagesError(
                        f"{len(uploads)} images or more; this service takes at most {limit} "
                        "in one request"
                    ),
                )
            named = [(upload.filename or "", await upload.read()) for upload in uploads]
        finally:
            await form.close()
        site, age = _site_in(request.headers), _age_in(request.headers)
        work = self._score_many(named, started, site, age)
        results = await asyncio.shield(asyncio.ensure_future(work))
        return JSONResponse({"results": results})

    async def _score_many(
        self, named: list[tuple[str, bytes]], started: float, site: str | None, age: AgeReading
    ) -> list[dict[str, Any]]:
        def prepare() -> list[ScoreRequest | Exception]:
            prepared: list[ScoreRequest | Exception] = []
            for _, data in named:
                try:
                    prepared.append(self._request(data, started, site, age))
                except CLIENT_ERRORS as exc:
                    prepared.append(exc)
            return prepared

        # One thread hop for the batch's decoding; the images then join the batcher together,
        # so they share ONNX Runtime calls with each other and with concurrent requests.
        requests = await anyio.to_thread.run_sync(prepare)
        outcomes = await asyncio.gather(
            *(
                self.batcher.submit(request)
                for request in requests
                if isinstance(request, ScoreRequest)
            ),
            return_exceptions=True,
        )
        scored = iter(outcomes)
        results: list[dict[str, Any]] = []
        for index, ((filename, _), request) in enumerate(zip(named, requests, strict=True)):
            entry: dict[str, Any] = {"index": index, "filename": filename}
            try:
                if isinstance(request, Exception):
                    raise request
                outcome = next(scored)
                if isinstance(outcome, BaseException):
                    raise outcome
                prediction = self._released("predict_batch", outcome)
            except CLIENT_ERRORS as exc:
                status, body = self._refusal("predict_batch", exc)
                results.append({**entry, "status": status, **body})
                continue
            public = answers.public_prediction(prediction, request.request_id)
            results.append({**entry, "status": 200, **public})
        return results

    def _overlay(self, version: str, upload: PreparedInput) -> tuple[Any, Any]:
        # Grad-CAM needs torch and the eager model: imported on the first /explain, so the
        # scoring path starts (and stays) without them.
        from cxr_platform.inference.explainer import Explainer

        with self._explainer_lock:
            explainer = self._explainers.get(version)
            if explainer is None:
                explainer = Explainer(self._model_folder(version))
                # Two versions at most: the current one and the one it replaced.
                self._explainers = {
                    **dict(list(self._explainers.items())[-1:]),
                    version: explainer,
                }
        assert upload.decoded is not None
        # Grad-CAM hooks the shared PyTorch model for the duration of a call, so two at once
        # would see each other's activations; explanations are rare enough to take turns.
        with self._gradcam_lock:
            return explainer.heatmap_overlay(upload.pixels, upload.decoded)

    def _record_lung_relevance(self, request_id: str, share: float | None) -> None:
        try:
            self.inference_log.record_lung_relevance(request_id, share)
        except Exception:  # the answer does not wait on a signal for monitoring
            log_failures.inc()
            log.exception("relevance in lungs not logged for %s", request_id)

    @staticmethod
    def _lung_fields(request: ScoreRequest) -> LungFields | None:
        production = request.models.production
        if production is None:
            return None
        return request.models.fields_of(request.prepared.pixels, production)

    def _model_folder(self, version: str) -> Path:
        if isinstance(self.models, FixedModels):  # a Bento: the bundled model is the only one
            return self.models.folder
        return self.models.registry.download(version)

    @bentoml.api(route="/feedback")
    async def feedback(
        self,
        request_id: str,
        label: Literal["NORMAL", "PNEUMONIA"],
        ctx: bentoml.Context,
        reporter: str | None = None,
    ) -> FeedbackResponse:
        """Attach a confirmed label to an earlier prediction (for performance monitoring). A
        request that names a site (its key or X-CXR-Site) labels only that site's requests."""
        site = _site_in(ctx.request.headers)
        try:
            await anyio.to_thread.run_sync(
                lambda: self.inference_log.add_feedback(
                    request_id, label, reporter=reporter, site=site
                )
            )
        except InferenceLogError as exc:
            error: answers.ServingError = (
                answers.UnknownRequestIdError(str(exc))
                if isinstance(exc, UnknownRequestError)
                else answers.OtherSiteRequestError(str(exc))
                if isinstance(exc, OtherSiteError)
                else answers.ServingError(str(exc))
            )
            response = self._refused("feedback", error)
            ctx.response.status_code = response.status_code
            return response
        retained = False
        if self.retained is not None:
            retained = await anyio.to_thread.run_sync(self.retained.mark_labeled, request_id)
        return FeedbackResponse(request_id=request_id, label=label, retained_for_training=retained)

    async def describe(self) -> dict[str, Any]:
        return {
            "registry_model_name": settings.registry.registry_model_name,
            "model_source": f"bento model {PINNED_MODEL}" if PINNED_MODEL else "registry aliases",
            **answers.serving_summary(self.models.current()),
            "service": {
                "max_upload_bytes": serving.service_max_upload_bytes,
                "precision": serving.service_precision,
                "refresh_seconds": serving.service_refresh_seconds,
                "max_batch_size": serving.service_max_batch_size,
                "api_key_required": serving.service_api_key is not None
                or serving.service_site_keys is not None,
            },
        }

    @bentoml.on_shutdown
    def close(self) -> None:
        self.models.stop()
        self.inference_log.dispose()


def _age_in(headers: Mapping[str, str]) -> AgeReading:
    """The patient age the caller stated (form field ``patient_age`` or the header); the edge
    already refused one that does not read as an age."""
    return age_from_caller(headers.get(PATIENT_AGE_HEADER))


def _site_in(headers: Mapping[str, str]) -> str | None:
    """The site the edge resolved (it checked the name and rewrote the header)."""
    value = headers.get(SITE_HEADER)
    # Starlette decodes header bytes as Latin-1; the edge wrote UTF-8.
    return value.encode("latin-1").decode("utf-8") if value else None


CxrService.add_asgi_middleware(
    EdgeMiddleware,
    api_key=serving.service_api_key,
    site_keys=parse_site_keys(serving.service_site_keys),
    max_upload_bytes=serving.service_max_upload_bytes,
    protected_paths=PROTECTED_ROUTES,
    upload_paths=UPLOAD_ROUTES,
    on_reject=lambda path, reason: rejected_inputs.labels(
        endpoint=path.strip("/").replace("/", "_"), reason=reason
    ).inc(),
    raw_body_app=raw_body_routes,
    raw_body_paths=RAW_BODY_ROUTES,
)
CxrService.mount_asgi_app(mounted_routes, path="/")
