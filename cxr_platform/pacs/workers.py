"""Scoring spooled instances in worker processes, so the node uses every core.

Decoding, scoring, Grad-CAM and building the result objects are CPU work that holds the
interpreter lock for most of an image; threads would take turns on one core. Each worker process
holds its own live models, explainer and log connection, built from the node's settings
(:class:`ProcessorSpec`), and answers one instance at a time with an :class:`Processed` whose
results are already encoded, or a :class:`Failure` that says why not.

Workers write only the inference-log row of what they score. The spool, the outbox and the
ledger stay the node's own: a worker that dies mid-image (killed, out of memory, a decoder that
crashes) leaves its instance in the spool, and the node sends it again to a fresh worker.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import pydicom
from pydicom.dataset import Dataset

from cxr_platform.errors import ImageReadError
from cxr_platform.pacs.processing import (
    InstanceProcessor,
    Processed,
    ProcessorConfig,
    TransientProcessingError,
)
from cxr_platform.pacs.results import NodeResults
from cxr_platform.pacs.sanitize import UnusableSourceError
from cxr_platform.redaction import redact
from cxr_platform.sections import DicomSection, RegistrySection, usable_cores

log = logging.getLogger(__name__)

FailureKind = Literal["unreadable", "unusable_header", "transient", "internal"]


@dataclass(frozen=True)
class Failure:
    """Why an instance has no results: ``transient`` is worth retrying as it is (no production
    model yet, the log down); the others keep the instance aside for a person."""

    kind: FailureKind
    reason: str


def score_spooled(
    processor: InstanceProcessor, data: bytes, dataset: Dataset, calling_ae_title: str | None
) -> Processed | Failure:
    """One spooled instance through ``processor``, every failure turned into a record that
    names it (the same in the node's own thread and in a worker process)."""
    try:
        return processor.process(data, dataset, calling_ae_title=calling_ae_title)
    except ImageReadError as exc:
        return Failure("unreadable", f"{exc.reason}: {redact(exc.detail)}")
    except UnusableSourceError as exc:
        return Failure("unusable_header", f"unusable header: {exc}")
    except TransientProcessingError as exc:
        return Failure("transient", str(exc))
    except Exception as exc:  # a bug or a model failure: keep the instance for a person
        # The exception's text may quote header values: the log gets its type, a withheld
        # message and where it happened.
        where = "".join(traceback.format_tb(exc.__traceback__)[-3:])
        reason = f"internal error: {type(exc).__name__}: {redact(str(exc))}"
        log.error("processing failed: %s\n%s", reason, where)
        return Failure("internal", reason)


@dataclass(frozen=True)
class ProcessorSpec:
    """Everything a process needs to build the node's :class:`InstanceProcessor`: plain
    settings, so it crosses into a worker process as it is."""

    dicom: DicomSection
    registry: RegistrySection
    threads: int | None = None  # ONNX Runtime and torch threads; None: the setting's

    def build(self) -> InstanceProcessor:
        from cxr_platform.deployment.registry import lung_registry_for, registry_for
        from cxr_platform.inference.live import LiveModels
        from cxr_platform.inference.log import InferenceLog
        from cxr_platform.redaction import uid_salt

        dicom = self.dicom
        registry = registry_for(self.registry)
        models = LiveModels(
            registry,
            threads=self.threads or dicom.service_threads,
            max_pixels=dicom.max_image_pixels,
            lung_registry=lung_registry_for(self.registry),
        )
        models.refresh()
        models.start_polling(dicom.service_refresh_seconds)
        return InstanceProcessor(
            models,
            InferenceLog(dicom.inference_log_uri),
            uid_salt=uid_salt(dicom.home, dicom.uid_salt),
            model_folder=registry.download,
            config=ProcessorConfig(
                results=tuple(dicom.dicom_results),
                uid_root=dicom.dicom_uid_root,
                institution_name=dicom.dicom_institution_name,
                max_pixels=dicom.max_image_pixels,
                refusal_sr=dicom.dicom_refusal_sr,
                compress=tuple(dicom.dicom_compress_results),
            ),
        )


# The worker process's own processor, built once by its initializer.
_processor: InstanceProcessor | None = None


def _start_worker(spec: ProcessorSpec, log_level: int) -> None:
    global _processor
    from cxr_platform.redaction import withhold_logged_values

    withhold_logged_values()
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s worker {os.getpid()}: %(message)s"
    )
    if spec.threads:
        import torch  # Grad-CAM's threads, like ONNX Runtime's, are this worker's share

        torch.set_num_threads(spec.threads)
    _processor = spec.build()
    try:
        _processor.warm_up()
    except Exception:
        log.exception("warm-up failed; the first image will load the explainer")


def _score_in_worker(path: str, calling_ae_title: str | None) -> Processed | Failure:
    assert _processor is not None, "worker started without its initializer"
    try:
        data = Path(path).read_bytes()
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        return Failure("unreadable", f"unreadable spool file: {type(exc).__name__}")
    outcome = score_spooled(_processor, data, dataset, calling_ae_title)
    if isinstance(outcome, Processed):
        # Encoded here, in the worker's core, and sent back as bytes (highdicom's objects
        # are not made to be pickled).
        started = time.perf_counter()
        encoded = outcome.outbox_files()
        stages = {**outcome.stages, "encode results": time.perf_counter() - started}
        return replace(outcome, encoded=encoded, results=NodeResults(), stages=stages)
    return outcome


def default_threads(workers: int) -> int:
    """Each worker's share of the cores, so the workers together do not oversubscribe them."""
    return max(1, usable_cores() // max(1, workers))


class ScoringPool:
    """``workers`` processes scoring spooled instances; :meth:`restart` replaces them all after
    one died (Python's pool cannot replace a single worker, and fails every pending call)."""

    def __init__(self, spec: ProcessorSpec, workers: int) -> None:
        if workers < 1:
            raise ValueError("a scoring pool needs at least one worker")
        self.spec = spec if spec.threads else replace(spec, threads=default_threads(workers))
        self.workers = workers
        # What a worker runs on a spool file: importable by name (workers are spawned).
        self.task: Callable[[str, str | None], Processed | Failure] = _score_in_worker
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        # spawn: the node's process runs association, sender and polling threads, which a
        # forked child would inherit mid-lock.
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(self.spec, logging.getLogger().getEffectiveLevel()),
        )

    def submit(self, path: Path, calling_ae_title: str | None) -> Future[Processed | Failure]:
        return self._executor.submit(self.task, str(path), calling_ae_title)

    def start(self) -> None:
        """Start every worker now (each loads its models and warms up), not on the first
        instances: Python's pool starts them on demand."""
        for _ in range(self.workers):
            self._executor.submit(os.getpid)

    def pids(self) -> list[int]:
        """The worker processes' ids."""
        # The executor's own table of its processes: the public API names none.
        processes = getattr(self._executor, "_processes", None) or {}
        return sorted(int(pid) for pid in processes)

    def restart(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()
        self.start()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
