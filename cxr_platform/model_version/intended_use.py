"""A version's intended use: the population it was trained and validated on, and the checks
that refuse the rest before any answer leaves the platform.

Each field says where it came from: *measured* from the training images' own headers, or
*declared* by a dataset's documentation or by whoever trained or deployed the version (a
setting, with its reason). A declared range that a site widened keeps the range it replaced, so
the model card can show the change plainly.

Two checks enforce it, both before scoring, on every path (HTTP, DICOM node, ``cxr predict``):

- **by header**: a patient age the header (or the caller) states, outside the range, is refused;
  an age nobody states, or one that cannot be read, is no refusal by itself;
- **by pixels**, when no age is known: the version's population check on the model's own
  features (:mod:`cxr_platform.model_version.population_check`).

A refusal is a :class:`~cxr_platform.model_version.input_gate.GateVerdict` with one of
:data:`REASONS`; the edges answer it as ``outside_intended_use`` with the reason in words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cxr_platform.data.patient_age import years_text
from cxr_platform.errors import CxrError
from cxr_platform.model_version.input_gate import GateVerdict

MEASURED = "measured"
DECLARED = "declared"
OUTSIDE_INTENDED_USE = "outside_intended_use"
# Why, within OUTSIDE_INTENDED_USE.
PATIENT_AGE = "patient_age"
UNLIKE_POPULATION = "unlike_the_training_population"
REASONS = (PATIENT_AGE, UNLIKE_POPULATION)


class IntendedUseError(CxrError):
    """An intended-use record or setting that cannot be read."""


@dataclass(frozen=True)
class Basis:
    """Where a field of the record came from."""

    source: str  # MEASURED or DECLARED
    detail: str

    def describe(self) -> str:
        return f"{self.source}: {self.detail}"


def parse_age_range(text: str) -> tuple[int, int]:
    """``"1-5"`` (completed years, both ends included) -> ``(1, 5)``."""
    try:
        low, high = (int(part.strip()) for part in text.split("-", 1))
    except ValueError as exc:
        raise IntendedUseError(
            f"an age range is two whole numbers of years, as 1-5 (got {text!r})"
        ) from exc
    if not 0 <= low <= high <= 130:
        raise IntendedUseError(f"age range {text!r} must run upwards from 0 to at most 130")
    return low, high


def age_range_text(age_years: tuple[int, int]) -> str:
    low, high = age_years
    return f"{low}-{high} years" if low != high else f"{low} years"


@dataclass(frozen=True)
class IntendedUse:
    population: str  # in words, as a card says it
    age_years: tuple[int, int] | None = None  # completed years, both ends included
    age_basis: Basis | None = None
    projections: tuple[str, ...] = ()  # ViewPosition values; () when nothing says
    projections_basis: Basis | None = None
    modalities: tuple[str, ...] = ()
    modalities_basis: Basis | None = None
    training_source: dict[str, Any] = field(default_factory=dict)
    # Set when a deployment declared another range than training had: the range it replaced.
    widened_from: tuple[int, int] | None = None

    # ---- the checks ------------------------------------------------------------------------

    def contains_age(self, years: float) -> bool:
        if self.age_years is None:
            return True
        low, high = self.age_years
        return low <= years < high + 1  # completed years: a five-year-old is 5.0 to 5.99

    def age_verdict(self, years: float | None, source: str | None = None) -> GateVerdict | None:
        """The refusal for a stated age outside the range; None when inside, or unknown."""
        if years is None or self.contains_age(years):
            return None
        assert self.age_years is not None
        stated = f" ({source})" if source else ""
        return GateVerdict(
            False,
            PATIENT_AGE,
            f"patient age {years_text(years)}{stated} is outside this model's intended use: "
            f"{age_range_text(self.age_years)}",
            score=float(years),
        )

    # ---- for people ------------------------------------------------------------------------

    def ages_text(self) -> str:
        return age_range_text(self.age_years) if self.age_years else "ages not stated"

    def describe(self) -> str:
        """One line: ages, projections, modalities."""
        parts = [self.population]
        if self.age_years is not None:
            parts.append(f"ages {age_range_text(self.age_years)}")
        if self.projections:
            parts.append("projection " + "/".join(self.projections))
        if self.modalities:
            parts.append("modality " + "/".join(self.modalities))
        return "; ".join(parts)

    def summary(self) -> dict[str, Any]:
        """For tags and ``GET /model``: every field, bases in words."""
        return {
            "population": self.population,
            "age_years": list(self.age_years) if self.age_years else None,
            "age_basis": self.age_basis.describe() if self.age_basis else "not stated",
            "projections": list(self.projections),
            "projections_basis": (
                self.projections_basis.describe() if self.projections_basis else "not stated"
            ),
            "modalities": list(self.modalities),
            "modalities_basis": (
                self.modalities_basis.describe() if self.modalities_basis else "not stated"
            ),
            "widened_from": list(self.widened_from) if self.widened_from else None,
        }

    # ---- stored in the model files ---------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["age_years"] = list(self.age_years) if self.age_years else None
        values["widened_from"] = list(self.widened_from) if self.widened_from else None
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> IntendedUse:
        try:

            def basis(name: str) -> Basis | None:
                found = values.get(name)
                return Basis(**found) if found else None

            def years(name: str) -> tuple[int, int] | None:
                found = values.get(name)
                return (int(found[0]), int(found[1])) if found else None

            return cls(
                population=str(values["population"]),
                age_years=years("age_years"),
                age_basis=basis("age_basis"),
                projections=tuple(values.get("projections") or ()),
                projections_basis=basis("projections_basis"),
                modalities=tuple(values.get("modalities") or ()),
                modalities_basis=basis("modalities_basis"),
                training_source=dict(values.get("training_source") or {}),
                widened_from=years("widened_from"),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise IntendedUseError(f"unreadable intended-use record: {exc!r}") from exc

    def with_declared_ages(self, age_years: tuple[int, int], reason: str) -> IntendedUse:
        """The record with a deployment's own declared range, the replaced one kept."""
        if not reason.strip():
            raise IntendedUseError("a declared age range needs its reason (the evidence for it)")
        if age_years == self.age_years:
            return self
        return replace(
            self,
            age_years=age_years,
            age_basis=Basis(DECLARED, f"by the deployment (CXR_INTENDED_AGE_YEARS): {reason}"),
            widened_from=self.age_years,
        )


def not_stated(population: str = "not stated") -> IntendedUse:
    """A record that says nothing: versions exported before intended use existed."""
    return IntendedUse(population=population)
