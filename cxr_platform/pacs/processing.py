"""One spooled radiograph -> prediction, inference-log row, Grad-CAM, and the result objects.

Scoring goes through the one scoring core (:func:`~cxr_platform.inference.scoring.request_for`,
:func:`~cxr_platform.inference.scoring.score_and_log`), as the HTTP service's does, so the node and
the service cannot disagree on decoding, preprocessing, the input gate, threshold or what the log
records; only the ``source`` column differs.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from cxr_platform.data.imaging import DecodedImage
from cxr_platform.errors import CxrError
from cxr_platform.inference.live import LiveModels, ServingModels
from cxr_platform.inference.log import InferenceLog, site_name
from cxr_platform.inference.scoring import (
    PreparedInput,
    ScoreRequest,
    ScoringOutcome,
    ScoringUnavailableError,
    recorded_refusal_detail,
    request_for,
    score_and_log,
)
from cxr_platform.model_version.input_gate import GateVerdict
from cxr_platform.model_version.intended_use import OUTSIDE_INTENDED_USE
from cxr_platform.model_version.lung_fields import FINDINGS
from cxr_platform.model_version.predictor import Prediction, Predictor
from cxr_platform.pacs.compression import compress_dataset
from cxr_platform.pacs.results import (
    Algorithm,
    LungFieldsOnSource,
    NodeResults,
    build_not_analysed_sr,
    build_pmap,
    build_sc,
    build_seg,
    build_sr,
    heatmap_on_source_grid,
)
from cxr_platform.pacs.sanitize import Repair, sanitize_source
from cxr_platform.pacs.screening import claims_chest
from cxr_platform.pacs.storage import encode_dataset
from cxr_platform.sections import RESULT_KINDS

if TYPE_CHECKING:  # Grad-CAM needs torch: loaded only once a SEG or SC object is wanted
    from cxr_platform.inference.explainer import Explainer

log = logging.getLogger(__name__)


def dicom_site(calling_ae_title: str | None, dataset: Dataset) -> str | None:
    """The calling AE title names the site; without one (an instance put in the spool by
    hand), the image's InstitutionName. Header text is made plain, never refused: the image is
    scored either way."""
    for value in (calling_ae_title, dataset.get("InstitutionName")):
        site = site_name(None if value is None else str(value), strict=False)
        if site is not None:
            return site
    return None


class TransientProcessingError(CxrError):
    """Worth retrying later: no production model yet, the inference log is down, ..."""


@dataclass(frozen=True)
class ProcessorConfig:
    results: tuple[str, ...] = RESULT_KINDS
    manufacturer: str = "cxr_platform"
    uid_root: str = "1.2.826.0.1.3680043.8.498."
    institution_name: str | None = None
    max_pixels: int = 100_000_000
    refusal_sr: bool = True  # answer a refused image that claims to be a chest with an SR
    compress: tuple[str, ...] = ()  # image kinds kept (and sent) in their lossless syntax

    def __post_init__(self) -> None:
        unknown = set(self.results) - set(RESULT_KINDS)
        if unknown:
            raise ValueError(f"unknown result kinds {sorted(unknown)}; use {RESULT_KINDS}")


@dataclass(frozen=True)
class EncodedResult:
    """A result object as the outbox keeps it: Part 10 bytes under its study and its UID."""

    study_instance_uid: str
    sop_instance_uid: str
    data: bytes


@dataclass(frozen=True)
class LungReading:
    """What the ledger keeps of the lung fields: which version drew them, and how much of the
    heatmap's relevance lies inside them."""

    version: str
    relevance_in_lungs: float | None
    findings: tuple[str, ...] = ()  # model_version.lung_fields.FINDINGS

    def describe(self) -> str:
        share = "n/a" if self.relevance_in_lungs is None else f"{self.relevance_in_lungs:.2f}"
        found = "".join(f"; {FINDINGS[name]}" for name in self.findings)
        return f"relevance in lungs {share} (lung fields v{self.version}){found}"


@dataclass(frozen=True)
class Processed:
    prediction: Prediction | None  # None: the input gate refused the image
    results: NodeResults
    request_id: str
    seconds: float
    refusal: GateVerdict | None = None
    refused_as: str | None = None  # not_a_chest_radiograph or outside_intended_use
    # Why, as the ledger keeps it: an age refusal names the range, never the age.
    recorded_refusal: str = ""
    repairs: tuple[Repair, ...] = ()  # what the results could not copy from the header as it was
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage, in order
    # The results already encoded (by a worker process, which sends bytes, not objects).
    encoded: tuple[EncodedResult, ...] = ()
    lung: LungReading | None = None  # where a lung fields version drew the lungs

    def outbox_files(self) -> tuple[EncodedResult, ...]:
        """Every result, encoded as it goes to the outbox."""
        return self.encoded + tuple(
            EncodedResult(
                str(dataset.StudyInstanceUID), str(dataset.SOPInstanceUID), encode_dataset(dataset)
            )
            for dataset in self.results.datasets()
        )


class _Stopwatch:
    """Seconds per named stage, so a benchmark can say where a result's time goes."""

    def __init__(self, started: float) -> None:
        self.last = started
        self.stages: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self.last
        self.last = now


class InstanceProcessor:
    def __init__(
        self,
        models: LiveModels,
        inference_log: InferenceLog,
        *,
        uid_salt: bytes,
        model_folder: Callable[[str], Path],
        config: ProcessorConfig = ProcessorConfig(),
    ) -> None:
        self.models = models
        self.inference_log = inference_log
        self.uid_salt = uid_salt
        self.model_folder = model_folder
        self.config = config
        self._explainers: dict[str, Explainer] = {}
        self._lock = threading.Lock()

    def _explainer(self, version: str, predictor) -> Explainer:
        with self._lock:
            explainer = self._explainers.get(version)
            if explainer is None:
                from cxr_platform.inference.explainer import Explainer

                explainer = Explainer(self.model_folder(version), predictor=predictor)
                # Keep the previous version too: a promotion must not stall the queue.
                self._explainers = {**dict(list(self._explainers.items())[-1:]), version: explainer}
            return explainer

    def warm_up(self) -> None:
        """Load the production model's Grad-CAM network and run it once, so the first routed
        study does not pay for it."""
        production = self.models.current().production
        if production is None or not ({"seg", "pmap", "sc"} & set(self.config.results)):
            return
        explainer = self._explainer(str(production.model_version), production)
        size = production.preprocessing.image_size
        blank = DecodedImage(
            pixels=np.zeros((size, size), np.float32),
            source_format="DICOM",
            width=size,
            height=size,
            mode="MONOCHROME2",
            bit_depth=8,
        )
        explainer.heatmap_overlay(np.zeros((size, size), np.uint8), blank)

    @staticmethod
    def _lung_fields(
        models: ServingModels,
        production: Predictor,
        explainer: Explainer,
        prepared: PreparedInput,
        heatmap: np.ndarray,
        source: Dataset,
    ) -> LungFieldsOnSource | None:
        """The lung fields version's fields on the source's grid, brought there the way the
        heatmap is, and the share of the heatmap's relevance inside them."""
        fields = models.fields_of(prepared.pixels, production)
        if fields is None or prepared.decoded is None:
            return None
        mask = fields.mask.astype(np.float32)
        content = explainer.content_region(mask, prepared.decoded.pixels.shape)
        on_grid = heatmap_on_source_grid(content, int(source.Rows), int(source.Columns)) >= 0.5
        return LungFieldsOnSource(
            on_grid, fields.version, fields.relevance_inside(heatmap), fields.findings
        )

    def _record_lung_relevance(self, request_id: str, share: float | None) -> None:
        """On the instance's log row, for monitoring. The result does not wait on it: a log
        that fails now (it took the row a moment ago) costs the signal, not the study."""
        try:
            self.inference_log.record_lung_relevance(request_id, share)
        except Exception as exc:  # the database's own errors, whatever its driver
            log.warning("relevance in lungs not logged for %s: %s", request_id, exc)

    def _algorithm(self, production: Predictor) -> Algorithm:
        return Algorithm(
            model_name=production.model_name,
            model_version=str(production.model_version),
            threshold=production.threshold,
            manufacturer=self.config.manufacturer,
            uid_root=self.config.uid_root,
            institution_name=self.config.institution_name,
        )

    def _refused(
        self, dataset: Dataset, request: ScoreRequest, outcome: ScoringOutcome, started: float
    ) -> Processed:
        """No diagnosis. Where the header says the image shows the chest, the reading
        radiologist gets a short SR saying the AI saw it and why it did not analyse it: the
        input gate's reason, or the intended use in words ("patient age 81 years is outside
        this model's intended use: 1-5 years")."""
        production, verdict = request.models.production, outcome.refusal
        assert production is not None and verdict is not None
        why = verdict.detail if outcome.failure == OUTSIDE_INTENDED_USE else verdict.describe()
        sr, repairs = None, ()
        if self.config.refusal_sr and claims_chest(dataset):
            clean = sanitize_source(dataset, uid_root=self.config.uid_root)
            repairs = clean.repairs
            sr = build_not_analysed_sr(clean.dataset, self._algorithm(production), why)
        return Processed(
            prediction=None,
            results=NodeResults(sr=sr),
            request_id=request.request_id,
            seconds=time.perf_counter() - started,
            refusal=verdict,
            refused_as=outcome.failure,
            recorded_refusal=f"{verdict.reason}: {recorded_refusal_detail(verdict, production)}",
            repairs=repairs,
        )

    def process(
        self, data: bytes, dataset: Dataset | None = None, *, calling_ae_title: str | None = None
    ) -> Processed:
        """Raises :class:`ImageReadError` for an image that will never decode and
        :class:`TransientProcessingError` for anything worth retrying. ``calling_ae_title``:
        who sent it, the site its log row names (else the image's InstitutionName)."""
        started = time.perf_counter()
        if dataset is None:
            dataset = pydicom.dcmread(io.BytesIO(data), force=True)
        site = dicom_site(calling_ae_title, dataset)
        models = self.models.current(site)  # one snapshot from decoding to scoring
        try:
            request = request_for(
                models,
                data,
                max_pixels=self.config.max_pixels,
                uid_salt=self.uid_salt,
                started=started,
                source="dicom",
                site=site,
                # A worker killed after logging it, or a modality sending it again: one row.
                keyed_by_instance=True,
            )
            outcome = score_and_log(self.inference_log, [request])[0]
            if outcome.refused:
                assert outcome.refusal is not None
                return self._refused(dataset, request, outcome, started)
            prediction = outcome.released()
        except ScoringUnavailableError as exc:  # no production model yet, the log is down
            raise TransientProcessingError(str(exc)) from exc
        production, prepared, request_id = models.production, request.prepared, request.request_id
        assert production is not None
        clock = _Stopwatch(started)
        clock.lap("decode, score and log")
        algorithm = self._algorithm(production)
        kinds = self.config.results
        clean = sanitize_source(dataset, uid_root=self.config.uid_root)
        source = clean.dataset
        clock.lap("sanitize")
        seg = pmap = sc = lung = None
        if {"seg", "pmap", "sc"} & set(kinds):
            explainer = self._explainer(str(prediction.model_version), production)
            decoded = prepared.decoded
            assert decoded is not None
            # Grad-CAM at the model's resolution, brought to the source's grid once: the SEG,
            # the map and the overlay all draw on that one upsampled map.
            heatmap = explainer.heatmap(prepared.pixels)
            content = explainer.content_region(heatmap, decoded.pixels.shape)
            on_grid = heatmap_on_source_grid(content, int(source.Rows), int(source.Columns))
            clock.lap("Grad-CAM")
            lung = self._lung_fields(models, production, explainer, prepared, heatmap, source)
            if lung is not None:
                self._record_lung_relevance(request_id, lung.relevance_in_lungs)
                clock.lap("lung fields")
            if "seg" in kinds:
                seg = build_seg(source, on_grid, algorithm, lung)
                clock.lap("SEG")
            if "pmap" in kinds:
                pmap = build_pmap(source, on_grid, algorithm)
                clock.lap("parametric map")
            if "sc" in kinds:
                # The decoded image has the source's grid, unless a header lied about its size.
                grid = on_grid if on_grid.shape == decoded.pixels.shape else heatmap
                sc = build_sc(source, explainer.overlay(grid, decoded), prediction, algorithm)
                clock.lap("overlay and SC")
        # After the heatmap: the report says where it lies, where lung fields were drawn.
        sr = build_sr(source, prediction, algorithm, lung) if "sr" in kinds else None
        clock.lap("SR")
        for kind, result in (("seg", seg), ("pmap", pmap), ("sc", sc)):
            if result is not None and kind in self.config.compress:
                # Deflate only marks the syntax (the bytes are deflated when encoded); JPEG-LS
                # compresses the pixels here.
                compress_dataset(result)
        clock.lap("compress")
        return Processed(
            prediction=prediction,
            results=NodeResults(sr=sr, seg=seg, pmap=pmap, sc=sc),
            request_id=request_id,
            seconds=time.perf_counter() - started,
            stages=clock.stages,
            repairs=clean.repairs,
            lung=None
            if lung is None
            else LungReading(lung.version, lung.relevance_in_lungs, lung.findings),
        )
