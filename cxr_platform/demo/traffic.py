"""Traffic for the live service: in-distribution or shifted images, optionally with feedback.

Images come from a folder in any layout the platform reads, or from fresh synthetic patients
(the demo generator with another seed, so none of them was trained on). Each is decoded,
shifted (:mod:`cxr_platform.data.shifts`), sent to ``POST /predict`` as a PNG and, with
``labels``, its true label goes to ``POST /feedback``, as a radiologist's report would.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from sklearn.metrics import roc_auc_score

from cxr_platform.data.imaging import read_image
from cxr_platform.data.shifts import apply_shift, encode_png
from cxr_platform.data.sources import discover_images
from cxr_platform.data.synthetic import SyntheticSpec, generate_synthetic_dataset
from cxr_platform.errors import CxrError
from cxr_platform.sections import DataSection

IMAGES_PER_SYNTHETIC_PATIENT = 2.5  # the generator's mean (1..4 per patient)


class SimulationError(CxrError):
    pass


@dataclass(frozen=True)
class TrafficImage:
    path: Path
    label: str


def synthetic_traffic(data: DataSection, n: int, seed: int) -> list[TrafficImage]:
    """``n`` images of fresh synthetic patients; generated once per (seed, size) and reused."""
    if seed == data.seed:
        raise SimulationError(
            f"seed {seed} is the training dataset's: traffic must come from other patients"
        )
    patients = max(4, math.ceil(n / IMAGES_PER_SYNTHETIC_PATIENT * 1.3))
    spec = SyntheticSpec(n_patients=patients, seed=seed)
    root = generate_synthetic_dataset(
        data.datasets_dir / f"traffic-seed{seed}-p{patients}",
        spec,
        workers=data.workers,
        progress=False,
    )
    return _ordered(root, n, seed)


def folder_traffic(folder: Path, n: int, seed: int) -> list[TrafficImage]:
    return _ordered(folder, n, seed)


def _ordered(root: Path, n: int, seed: int) -> list[TrafficImage]:
    frame = discover_images(root).records
    if len(frame) < n:
        raise SimulationError(f"{root} has {len(frame)} images; {n} were asked for")
    order = np.random.default_rng(seed).permutation(len(frame))[:n]
    return [TrafficImage(Path(frame["path"].iloc[i]), str(frame["label"].iloc[i])) for i in order]


@dataclass
class SimulationReport:
    shift: str
    severity: float
    sent: int = 0
    failed: Counter = field(default_factory=Counter)
    positives: int = 0
    probabilities: list[float] = field(default_factory=list)
    feedback_sent: int = 0
    retained_for_training: int = 0
    correct: int = 0
    request_ids: list[str] = field(default_factory=list)
    truths: list[bool] = field(default_factory=list)  # per answered image, when labels are sent

    @property
    def auc(self) -> float | None:
        truths = np.asarray(self.truths)
        if len(truths) != self.answered or truths.all() or not truths.any():
            return None
        return float(roc_auc_score(truths, self.probabilities))

    @property
    def answered(self) -> int:
        return len(self.probabilities)

    def summary(self) -> str:
        if not self.answered:
            return f"{self.sent} {self.shift} images sent, none answered ({dict(self.failed)})"
        text = (
            f"{self.answered}/{self.sent} {self.shift} images (severity {self.severity:g}) "
            f"answered: positive rate {self.positives / self.answered:.2f}, mean probability "
            f"{np.mean(self.probabilities):.3f}"
        )
        if self.feedback_sent:
            auc = self.auc
            text += (
                f"; against the {self.feedback_sent} labels sent as feedback: "
                + (f"AUC {auc:.3f}, " if auc is not None else "")
                + f"accuracy {self.correct / self.feedback_sent:.2f}"
            )
        if self.failed:
            text += f"; failed: {dict(self.failed)}"
        return text


def _shifted(images: list[TrafficImage], shift: str, severity: float, seed: int) -> Iterator:
    rng = np.random.default_rng(seed)
    for image in images:
        pixels = read_image(image.path).pixels
        yield image, encode_png(apply_shift(pixels, shift, severity=severity, rng=rng))


def send_traffic(
    url: str,
    images: list[TrafficImage],
    *,
    shift: str = "none",
    severity: float = 1.0,
    labels: bool = False,
    api_key: str | None = None,
    seed: int = 0,
    timeout: float = 60.0,
    stop_after_answers: int | None = None,
    site: str | None = None,
) -> SimulationReport:
    """Send ``images`` (shifted) to ``/predict``, with their labels as feedback if asked;
    ``stop_after_answers``: stop once that many were answered (the input gate may refuse a few,
    so a caller that needs a full drift window passes spare images); ``site``: sent as
    ``X-CXR-Site``, so the log knows where the traffic came from."""
    report = SimulationReport(shift, severity)
    headers = {"X-API-Key": api_key} if api_key else {}
    if site is not None:
        headers["X-CXR-Site"] = site
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout) as client:
        for image, png in _shifted(images, shift, severity, seed):
            if stop_after_answers is not None and report.answered >= stop_after_answers:
                break
            report.sent += 1
            try:
                response = client.post("/predict", files={"file": (image.path.name, png)})
            except httpx.HTTPError as exc:
                report.failed[type(exc).__name__] += 1
                continue
            if response.status_code != 200:
                report.failed[_reason(response)] += 1
                continue
            answer = response.json()
            report.probabilities.append(float(answer["probability"]))
            report.positives += answer["label"] == "PNEUMONIA"
            report.request_ids.append(answer["request_id"])
            report.truths.append(image.label == "PNEUMONIA")
            if not labels:
                continue
            feedback = client.post(
                "/feedback",
                json={
                    "request_id": answer["request_id"],
                    "label": image.label,
                    "reporter": "cxr simulate-drift",
                },
            )
            if feedback.status_code != 200:
                report.failed[f"feedback:{_reason(feedback)}"] += 1
                continue
            report.feedback_sent += 1
            report.correct += answer["label"] == image.label
            report.retained_for_training += bool(feedback.json().get("retained_for_training"))
    return report


def _reason(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.status_code))
    except ValueError:
        return str(response.status_code)
