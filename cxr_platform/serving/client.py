"""A client of a running service: ``cxr predict --url`` scores a folder through it.

Images go by ``POST /predict/batch``, several to a request, so the service logs, gates and
answers them exactly as it would any caller's; the CSV has the same columns as a local run, plus
each image's ``request_id`` (what ``POST /feedback`` quotes). A batch the service finds too big
(bytes or images) is split in two and sent again; only a single image over the limit gets the
refusal in its row.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx
from tqdm import tqdm

from cxr_platform.data.patient_age import UNKNOWN, AgeReading
from cxr_platform.errors import CxrError
from cxr_platform.inference.batch import CSV_COLUMNS, BatchSummary
from cxr_platform.terminal import progress_stream

SERVICE_CSV_COLUMNS = (*CSV_COLUMNS, "request_id")
BATCH_ROUTE = "/predict/batch"
# The whole request refused for its size: split it and try the halves.
SPLITTABLE = frozenset({"upload_too_large", "too_many_images"})


class ServiceClientError(CxrError):
    """The service could not be reached, or refused the requests themselves (a key, a site)."""


@dataclass(frozen=True)
class ServiceTarget:
    url: str
    api_key: str | None = None
    site: str | None = None
    timeout_seconds: float = 300.0

    def client(self) -> httpx.Client:
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        if self.site:
            headers["X-CXR-Site"] = self.site
        return httpx.Client(
            base_url=self.url.rstrip("/"), headers=headers, timeout=self.timeout_seconds
        )


def _age_header(age: AgeReading) -> dict[str, str]:
    return {} if age.years is None else {"X-CXR-Patient-Age": f"{age.years:g}"}


def _groups(
    files: list[Path], ages: dict[Path, AgeReading], size: int
) -> Iterator[tuple[AgeReading, list[Path]]]:
    """Consecutive files sharing a stated age, ``size`` at most: a request states one age."""
    group: list[Path] = []
    current = UNKNOWN
    for path in files:
        age = ages.get(path.resolve(), UNKNOWN)
        if group and (age != current or len(group) >= size):
            yield current, group
            group = []
        current = age
        group.append(path)
    if group:
        yield current, group


def _row(path: Path, answer: dict[str, Any]) -> dict[str, str]:
    if answer.get("status") == 200:
        return {
            "path": str(path),
            "probability": f"{float(answer['probability']):.6f}",
            "label": str(answer["label"]),
            "model_version": str(answer.get("model_version") or ""),
            "error": "",
            "request_id": str(answer.get("request_id") or ""),
        }
    return {
        "path": str(path),
        "probability": "",
        "label": "",
        "model_version": "",
        "error": f"{answer.get('error', 'error')}: {answer.get('detail', '')}",
        "request_id": str(answer.get("request_id") or ""),
    }


def _send(client: httpx.Client, paths: list[Path], age: AgeReading) -> list[dict[str, Any]]:
    """One answer per path, in order: the service's, or the reason nothing was sent."""
    answers: dict[int, dict[str, Any]] = {}
    parts: list[tuple[int, str, bytes]] = []
    for index, path in enumerate(paths):
        try:
            parts.append((index, path.name, path.read_bytes()))
        except OSError as exc:
            answers[index] = {"status": 0, "error": "unreadable_file", "detail": str(exc)}
    answers.update(_post(client, parts, age))
    return [answers[index] for index in range(len(paths))]


def _post(
    client: httpx.Client, parts: list[tuple[int, str, bytes]], age: AgeReading
) -> dict[int, dict[str, Any]]:
    """The service's answer to each part, by its index; a request too big for the service is
    split in two and each half sent again."""
    if not parts:
        return {}
    files = [("file", (name, data)) for _, name, data in parts]
    try:
        response = client.post(BATCH_ROUTE, files=files, headers=_age_header(age))
    except httpx.HTTPError as exc:
        raise ServiceClientError(f"cannot reach the service at {client.base_url}: {exc}") from exc
    body = _json(response)
    if response.status_code == 200:
        return {index: answer for (index, _, _), answer in zip(parts, body["results"], strict=True)}
    reason = body.get("error", "")
    if reason in SPLITTABLE and len(parts) > 1:
        half = len(parts) // 2
        return {**_post(client, parts[:half], age), **_post(client, parts[half:], age)}
    if reason in SPLITTABLE:  # one image alone over the limit: its row says so
        return {parts[0][0]: {"status": response.status_code, **body}}
    raise ServiceClientError(
        f"the service answered {response.status_code}: {reason or 'error'}: "
        f"{body.get('detail', response.text[:200])}"
    )


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"detail": response.text[:200]}
    return body if isinstance(body, dict) else {"detail": str(body)[:200]}


def predict_through_service(
    target: ServiceTarget,
    files: list[Path],
    out: TextIO,
    *,
    batch_size: int = 32,
    ages: dict[Path, AgeReading] | None = None,
    progress: bool = False,
) -> BatchSummary:
    """Rows written and flushed request by request, as a local run's are. Raises
    :class:`ServiceClientError` when the service cannot be reached or refuses the requests
    (rows already written stay)."""
    summary = BatchSummary()
    writer = csv.DictWriter(out, fieldnames=SERVICE_CSV_COLUMNS)
    writer.writeheader()
    bar = tqdm(
        total=len(files), desc="scoring", unit="img", disable=not progress, file=progress_stream()
    )
    with target.client() as client:
        for age, paths in _groups(files, ages or {}, batch_size):
            for path, answer in zip(paths, _send(client, paths, age), strict=True):
                row = _row(path, answer)
                summary.n_files += 1
                if row["error"]:
                    summary.n_failed += 1
                    reason = str(answer.get("error", ""))
                    if reason in ("not_a_chest_radiograph", "outside_intended_use"):
                        summary.refused[reason] = summary.refused.get(reason, 0) + 1
                else:
                    summary.n_predicted += 1
                    summary.n_pneumonia += row["label"] == "PNEUMONIA"
                    summary.n_logged += 1  # the service logs every answer it gives
                writer.writerow(row)
            out.flush()
            bar.update(len(paths))
    bar.close()
    return summary
