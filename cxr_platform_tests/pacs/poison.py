"""A scoring worker's task that dies on one image, as a decoder crashing on it would (the kernel
ends the process: SIGKILL). The node's workers run it by name, so it lives in a module."""

from __future__ import annotations

import os
import signal

import pydicom

from cxr_platform.pacs.workers import _score_in_worker

POISON = "kills its scoring worker"


def score_or_die(path: str, calling_ae_title: str | None):
    if pydicom.dcmread(path, stop_before_pixels=True).get("SeriesDescription") == POISON:
        os.kill(os.getpid(), signal.SIGKILL)
    return _score_in_worker(path, calling_ae_title)
