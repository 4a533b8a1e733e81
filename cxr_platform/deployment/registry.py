"""The MLflow model registry, addressed by aliases (stages are deprecated in MLflow).

- ``shadow``: the newest candidate; the service scores it alongside production, never returns it.
- ``production``: what the service and the DICOM node answer with.
- ``previous-production``: the version production replaced, kept addressable for rollback.

Every promotion and rollback is recorded twice: as tags on the model version concerned and as
an append-only event tag on the registered model (``cxr.event.<ms>``), so the history survives
alias moves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.artifacts
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cxr_platform.deployment.model_card import (
    CARD_HTML,
    CARD_MARKDOWN,
    CardFacts,
    card_html,
    card_markdown,
    card_summary,
)
from cxr_platform.errors import CxrError
from cxr_platform.locks import exclusive, file_lock
from cxr_platform.model_version.aliases import (
    ALIASES,
    PREVIOUS_PRODUCTION,
    PRODUCTION,
    SHADOW,
    SITE_PRODUCTION_PREFIX,
    site_production_alias,
)
from cxr_platform.model_version.files import METADATA_FILE, ONNX_FILE
from cxr_platform.model_version.lung_fields import SEGMENTER_ONNX_FILE, SEGMENTER_REPORT_FILE
from cxr_platform.model_version.tags import VersionTags, record_json
from cxr_platform.sections import RegistrySection
from cxr_platform.tracking import run_url

if TYPE_CHECKING:  # the exporter needs torch; a registry client (the service, the node) does not
    from cxr_platform.deployment.export import ExportedModel

DEFAULT_MODEL_NAME = "cxr-pneumonia-classifier"
EVENT_TAG_PREFIX = "cxr.event."
MAX_TAG_LENGTH = 5000  # MLflow's limit for model version tag values
CLASSIFIER_DESCRIPTION = (
    "Chest X-ray Normal vs Pneumonia (one logit). ONNX + TorchScript with preprocessing and "
    "operating point inside."
)


class RegistryError(CxrError):
    pass


class ModelVersionNotFoundError(RegistryError):
    pass


class ProductionMovedError(RegistryError):
    """Production changed between the gate's comparison and the promotion it allowed."""


# ``promote``'s default: move production whatever it points at now.
ANY_PRODUCTION = "<any>"


class NothingToRollBackError(RegistryError):
    pass


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str | None
    source: str
    created_at: datetime
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def release(self) -> VersionTags:
        """The tags this platform wrote, parsed."""
        return VersionTags.from_tags(self.tags)

    @property
    def metrics(self) -> dict[str, float]:
        return self.release.metrics

    @property
    def arch(self) -> str | None:
        return self.release.arch

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["created_at"] = self.created_at.isoformat(timespec="seconds")
        values["metrics"] = self.metrics
        return values


@dataclass(frozen=True)
class RegistryEvent:
    # registered | shadow | promoted | rollback | refused | site_kept | site_retired
    action: str
    version: str
    previous_version: str | None
    triggered_by: str
    at: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_TAG_LENGTH else text[: MAX_TAG_LENGTH - 3] + "..."


class ModelRegistry:
    """One registered model in one MLflow tracking/registry store."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        name: str = DEFAULT_MODEL_NAME,
        cache_dir: Path | None = None,
        lock_url: str | None = None,
        ui_url: str | None = None,
        files: tuple[str, ...] = (METADATA_FILE, ONNX_FILE),
        description: str = CLASSIFIER_DESCRIPTION,
    ) -> None:
        """``lock_url``: the database whose lock serializes alias moves (PostgreSQL for
        promoters on several machines); without it, a file lock in ``cache_dir``. ``ui_url``:
        an MLflow UI that model cards link runs to. ``files``: what every version's folder
        holds (a download without them is refused); ``description``: the registered model's,
        written when it is created. Both differ for the lung segmentation model."""
        self.files = files
        self.description = description
        self.tracking_uri = tracking_uri
        self.ui_url = ui_url
        self.name = name
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.cache_dir = cache_dir
        self.lock_url = lock_url

    # ------------------------------------------------------------------ reading

    def _ensure_model(self) -> None:
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            try:
                self.client.create_registered_model(self.name, description=self.description)
            except MlflowException:
                # Another process created it between our check and our create.
                self.client.get_registered_model(self.name)

    def aliases(self) -> dict[str, str]:
        try:
            aliases = self.client.get_registered_model(self.name).aliases
        except MlflowException:
            return {}
        return {alias: str(version) for alias, version in aliases.items()}

    def _info(self, mv: Any, aliases_by_version: Mapping[str, list[str]]) -> ModelVersionInfo:
        return ModelVersionInfo(
            name=mv.name,
            version=str(mv.version),
            aliases=tuple(sorted(aliases_by_version.get(str(mv.version), []))),
            run_id=mv.run_id,
            source=mv.source,
            created_at=datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC),
            tags=dict(mv.tags),
        )

    def _aliases_by_version(self) -> dict[str, list[str]]:
        by_version: dict[str, list[str]] = {}
        for alias, version in self.aliases().items():
            by_version.setdefault(version, []).append(alias)
        return by_version

    def versions(self) -> list[ModelVersionInfo]:
        """Every version, newest first, with its aliases filled in."""
        try:
            found = self.client.search_model_versions(f"name = '{self.name}'")
        except MlflowException:
            return []
        by_version = self._aliases_by_version()
        infos = [self._info(mv, by_version) for mv in found]
        return sorted(infos, key=lambda info: int(info.version), reverse=True)

    def get(self, ref: str | int) -> ModelVersionInfo:
        """``production`` / ``shadow`` / ``previous-production``, ``3`` or ``v3``."""
        ref = str(ref).strip()
        try:
            if ref in ALIASES:
                mv = self.client.get_model_version_by_alias(self.name, ref)
            else:
                number = ref[1:] if ref.lower().startswith("v") else ref
                if not number.isdigit():
                    raise ModelVersionNotFoundError(
                        f"{ref!r} is neither an alias ({', '.join(ALIASES)}) nor a version number"
                    )
                mv = self.client.get_model_version(self.name, number)
        except MlflowException as exc:
            raise ModelVersionNotFoundError(
                f"model {self.name!r} has no version {ref!r}"
                + (" (no model has been registered yet)" if not self.versions() else "")
            ) from exc
        return self._info(mv, self._aliases_by_version())

    def find(self, ref: str) -> ModelVersionInfo | None:
        try:
            return self.get(ref)
        except ModelVersionNotFoundError:
            return None

    def events(self) -> list[RegistryEvent]:
        try:
            tags = self.client.get_registered_model(self.name).tags
        except MlflowException:
            return []
        events = []
        for key, value in sorted(tags.items()):
            if not key.startswith(EVENT_TAG_PREFIX):
                continue
            try:
                events.append(RegistryEvent(**json.loads(value)))
            except (json.JSONDecodeError, TypeError):
                # A hand-edited or foreign tag must not hide the rest of the history.
                continue
        return events

    def download(self, ref: str | int) -> Path:
        """A local folder with the version's files. Versions are immutable, so a downloaded copy
        is reused; it appears atomically (download to a temporary folder, then rename)."""
        info = self.get(ref)
        if self.cache_dir is None:
            raise RegistryError("this registry has no local cache folder to download into")
        # Keyed by the artifact location too: a fresh tracking database (or another server)
        # numbers its versions from 1 again, and must never be served a stale local copy.
        location = hashlib.sha256(info.source.encode()).hexdigest()[:12]
        target = self.cache_dir / self.name / f"v{info.version}-{location}"
        if all((target / name).exists() for name in self.files):
            return target
        tmp = target.with_name(f"{target.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        tmp.mkdir(parents=True)
        try:
            downloaded = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=info.source, dst_path=str(tmp), tracking_uri=self.tracking_uri
                )
            )
            missing = [name for name in self.files if not (downloaded / name).exists()]
            if missing:
                raise RegistryError(
                    f"version {info.version} has no {', '.join(missing)} at {info.source}"
                )
            try:
                downloaded.rename(target)
            except OSError:
                if not (target / self.files[-1]).exists():  # not a concurrent download that won
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    # ------------------------------------------------------------------ writing

    def _record(self, event: RegistryEvent) -> None:
        key = f"{EVENT_TAG_PREFIX}{time.time_ns() // 1000:016d}.{event.action}"
        text = record_json(event.to_dict(), separators=(",", ":"))
        if len(text) > MAX_TAG_LENGTH:
            # Truncated JSON would be unreadable: keep the event, drop the bulky details (the
            # full gate result is also on the model version's cxr.gate tag).
            slim = {**event.to_dict(), "details": {"truncated": True}}
            text = record_json(slim, separators=(",", ":"))
        self.client.set_registered_model_tag(self.name, key, text)

    def register(
        self,
        exported: ExportedModel,
        *,
        run_id: str,
        tags: VersionTags,
        triggered_by: str,
        description: str | None = None,
    ) -> ModelVersionInfo:
        """Upload the export folder to the training run and create a version pointing at it."""
        return self.register_folder(
            exported.directory,
            run_id=run_id,
            tags=tags,
            triggered_by=triggered_by,
            description=description,
        )

    def register_folder(
        self,
        directory: Path,
        *,
        run_id: str,
        tags: VersionTags,
        triggered_by: str,
        description: str | None = None,
        card: Callable[[CardFacts], str] = card_markdown,
        summary: Callable[[CardFacts], str] = card_summary,
    ) -> ModelVersionInfo:
        """A new version from a folder of model files (an export, or a recalibrated copy).
        ``card`` and ``summary`` write its model card and the version description from the
        registry's facts (the lung segmentation version's say other things than a classifier's)."""
        self._ensure_model()
        # A fresh artifact folder per export: a later re-export of the same run must never
        # change the files under an existing version.
        artifact_path = f"registry/{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}"
        self.client.log_artifacts(run_id, str(directory), artifact_path)
        run = self.client.get_run(run_id)
        source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
        mv = self.client.create_model_version(
            self.name,
            source=source,
            run_id=run_id,
            tags={key: _truncate(value) for key, value in tags.to_tags().items()},
            description=description,
        )
        version = str(mv.version)
        self._write_card(self.get(version), artifact_path, description, card, summary)
        self._record(
            RegistryEvent("registered", version, None, triggered_by, _utc_now(), {"run_id": run_id})
        )
        return self.get(version)

    # ------------------------------------------------------------------ model cards

    def _run_evaluation(self, run_id: str) -> dict[str, Any] | None:
        """The evaluation report logged with the run, if it has one."""
        with tempfile.TemporaryDirectory() as work:
            try:
                path = self.client.download_artifacts(run_id, "evaluation/evaluation.json", work)
                values = json.loads(Path(path).read_text())
            except (MlflowException, OSError, ValueError):
                return None
        return values if isinstance(values, dict) else None

    def card_facts(self, info: ModelVersionInfo) -> CardFacts:
        params: dict[str, str] = {}
        evaluation = link = None
        if info.run_id:
            run = self.client.get_run(info.run_id)
            params = dict(run.data.params)
            evaluation = self._run_evaluation(info.run_id)
            if self.ui_url:
                link = run_url(self.ui_url, run.info.experiment_id, info.run_id)
        return CardFacts(
            registered_model=self.name,
            version=info.version,
            created_at=info.created_at,
            tags=info.release,
            run_id=info.run_id,
            run_params=params,
            evaluation=evaluation,
            run_link=link,
        )

    def _write_card(
        self,
        info: ModelVersionInfo,
        artifact_path: str,
        description: str | None,
        card: Callable[[CardFacts], str],
        summary: Callable[[CardFacts], str],
    ) -> None:
        """The card beside the version's model files (written once, with the version), and its
        summary as the version's description, which MLflow's UI shows first."""
        facts = self.card_facts(info)
        markdown = card(facts)
        with tempfile.TemporaryDirectory() as work:
            folder = Path(work)
            (folder / CARD_MARKDOWN).write_text(markdown)
            (folder / CARD_HTML).write_text(
                card_html(markdown, f"{self.name} version {info.version}")
            )
            assert info.run_id is not None  # register_folder always names the run
            self.client.log_artifacts(info.run_id, str(folder), artifact_path)
        short = summary(facts)
        self.client.update_model_version(
            self.name,
            info.version,
            description=_truncate(f"{description}\n\n{short}" if description else short),
        )

    def card(self, ref: str | int) -> str:
        """The version's model card as Markdown: the one written at registration, or, for a
        version registered before cards existed, one built now from the same facts."""
        info = self.get(ref)
        with tempfile.TemporaryDirectory() as work:
            try:
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{info.source.rstrip('/')}/{CARD_MARKDOWN}",
                    dst_path=work,
                    tracking_uri=self.tracking_uri,
                )
                return Path(path).read_text()
            except (MlflowException, OSError):
                return card_markdown(self.card_facts(info))

    @contextlib.contextmanager
    def _alias_lock(self) -> Iterator[None]:
        """Alias moves read, then write several aliases: one mover at a time per registered
        model, so a CLI promotion and a Dagster promotion cannot interleave. Named by the model
        alone: every machine must derive the same lock, whatever address it has for MLflow."""
        name = f"cxr.registry.aliases.{self.name}"
        if self.lock_url is not None:
            with exclusive(self.lock_url, name):
                yield
        elif self.cache_dir is not None:
            with file_lock(self.cache_dir / f".{self.name}.aliases.lock", name):
                yield
        else:
            yield

    def retire_shadow(
        self, ref: str | int, *, triggered_by: str, gate: Mapping[str, Any] | None = None
    ) -> RegistryEvent:
        """The gate refused the shadow: it stops being scored, and the refusal is recorded."""
        with self._alias_lock():
            info = self.get(ref)
            if self.aliases().get(SHADOW) == info.version:
                self.client.delete_registered_model_alias(self.name, SHADOW)
            now = _utc_now()
            self._tag(info.version, VersionTags(refused_at=now, gate=dict(gate or {})))
            event = RegistryEvent(
                "refused",
                info.version,
                self.aliases().get(PRODUCTION),
                triggered_by,
                now,
                {"gate": dict(gate or {})},
            )
            self._record(event)
            return event

    def _tag(self, version: str, tags: VersionTags) -> None:
        for key, value in tags.to_tags().items():
            self.client.set_model_version_tag(self.name, version, key, _truncate(value))

    def set_shadow(self, ref: str | int, *, triggered_by: str) -> ModelVersionInfo:
        with self._alias_lock():
            info = self.get(ref)
            previous = self.aliases().get(SHADOW)
            self.client.set_registered_model_alias(self.name, SHADOW, info.version)
            self._record(RegistryEvent("shadow", info.version, previous, triggered_by, _utc_now()))
        return self.get(info.version)

    def promote(
        self,
        ref: str | int,
        *,
        triggered_by: str,
        gate: Mapping[str, Any] | None = None,
        replacing: str | None = ANY_PRODUCTION,
    ) -> RegistryEvent:
        """Move ``production`` to ``ref``; the replaced version becomes ``previous-production``.

        The caller decides whether the gate allows it; ``gate`` is what it measured, and
        ``replacing`` the production version (None: none) the gate compared against. Another
        promoter may have moved production while the gate ran: then nothing moves and
        :class:`ProductionMovedError` says so, since the comparison no longer holds.
        """
        with self._alias_lock():
            info = self.get(ref)
            aliases = self.aliases()
            current = aliases.get(PRODUCTION)
            if current == info.version:
                raise RegistryError(f"version {info.version} is already production")
            if replacing != ANY_PRODUCTION and current != replacing:
                raise ProductionMovedError(
                    f"production moved from version {replacing or '(none)'} to "
                    f"{current or '(none)'} while the gate compared version {info.version} "
                    "with it"
                )
            if current is not None:
                self.client.set_registered_model_alias(self.name, PREVIOUS_PRODUCTION, current)
            return self._point_alias(info.version, PRODUCTION, aliases, triggered_by, gate)

    def _point_alias(
        self,
        version: str,
        alias: str,
        aliases: Mapping[str, str],
        triggered_by: str,
        gate: Mapping[str, Any] | None,
        details: Mapping[str, Any] | None = None,
    ) -> RegistryEvent:
        """Point a production alias at ``version`` and record it (under the alias lock)."""
        current = aliases.get(alias)
        now = _utc_now()
        self.client.set_registered_model_alias(self.name, alias, version)
        if aliases.get(SHADOW) == version:
            # Shadow scoring the production model would only double the work.
            self.client.delete_registered_model_alias(self.name, SHADOW)
        # Every field written, empty ones too, so nothing of an earlier refusal lingers.
        self._tag(
            version,
            VersionTags(
                promoted_at=now,
                promoted_by=triggered_by,
                replaced_version=current or "",
                gate=dict(gate or {}),
            ),
        )
        event = RegistryEvent(
            "promoted",
            version,
            current,
            triggered_by,
            now,
            {"gate": dict(gate or {}), **(details or {})},
        )
        self._record(event)
        return event

    def promote_for_site(
        self,
        ref: str | int,
        site: str,
        *,
        triggered_by: str,
        gate: Mapping[str, Any] | None = None,
        replacing: str | None = ANY_PRODUCTION,
    ) -> RegistryEvent:
        """Make ``ref`` the production version of one site (its own alias); every other site
        keeps ``production``. The version must have been made for that site. ``replacing``: the
        version the site was served by when the gate compared (its own or production); if
        another promoter moved it meanwhile, nothing moves and :class:`ProductionMovedError`
        says so."""
        alias = site_production_alias(site)
        with self._alias_lock():
            info = self.get(ref)
            if info.release.site != site:
                raise RegistryError(
                    f"version {info.version} was made for site {info.release.site!r}, not {site!r}"
                )
            aliases = self.aliases()
            served = aliases.get(alias) or aliases.get(PRODUCTION)
            if replacing != ANY_PRODUCTION and served != replacing:
                raise ProductionMovedError(
                    f"site {site} moved from version {replacing or '(none)'} to "
                    f"{served or '(none)'} while the gate compared version {info.version} with it"
                )
            return self._point_alias(
                info.version,
                alias,
                aliases,
                triggered_by,
                gate,
                {"site": site, "alias": alias},
            )

    def settle_site(
        self,
        site: str,
        *,
        keep: bool,
        production: str | None,
        triggered_by: str,
        evidence: Mapping[str, Any],
    ) -> RegistryEvent:
        """After production moved: the site keeps its own version (``site_kept``) or goes back
        to production (``site_retired``, its alias removed). Either way an event says why."""
        alias = site_production_alias(site)
        with self._alias_lock():
            version = self.aliases().get(alias)
            if version is None:
                raise RegistryError(f"site {site} has no production version of its own")
            if not keep:
                self.client.delete_registered_model_alias(self.name, alias)
            event = RegistryEvent(
                "site_kept" if keep else "site_retired",
                version,
                production,
                triggered_by,
                _utc_now(),
                {"site": site, "alias": alias, **dict(evidence)},
            )
            self._record(event)
            return event

    def version_for_site(self, site: str | None) -> str:
        """The version ``site`` is served by: its own production where it has one, else
        production."""
        own = self.aliases().get(site_production_alias(site)) if site else None
        return own or self.get(PRODUCTION).version

    def site_productions(self) -> dict[str, str]:
        """Site -> the version that site is served by, where it has its own."""
        sites = {}
        for alias, version in self.aliases().items():
            if alias.startswith(SITE_PRODUCTION_PREFIX):
                site = self.get(version).release.site
                if site is not None and site_production_alias(site) == alias:
                    sites[site] = version
        return sites

    def rollback(self, *, triggered_by: str) -> RegistryEvent:
        """Production goes back to the version it replaced; repeated rollbacks walk further."""
        with self._alias_lock():
            return self._rollback(triggered_by)

    def _rollback(self, triggered_by: str) -> RegistryEvent:
        current = self.find(PRODUCTION)
        if current is None:
            raise NothingToRollBackError("there is no production model to roll back")
        target = current.release.replaced_version or self.aliases().get(PREVIOUS_PRODUCTION)
        if not target or str(target) == current.version:
            raise NothingToRollBackError(
                f"production version {current.version} replaced no earlier version"
            )
        target_info = self.get(str(target))
        now = _utc_now()
        self.client.set_registered_model_alias(self.name, PRODUCTION, target_info.version)
        before = target_info.release.replaced_version
        if before:
            self.client.set_registered_model_alias(self.name, PREVIOUS_PRODUCTION, before)
        else:
            with contextlib.suppress(MlflowException):  # already absent
                self.client.delete_registered_model_alias(self.name, PREVIOUS_PRODUCTION)
        self._tag(current.version, VersionTags(rolled_back_at=now, rolled_back_by=triggered_by))
        event = RegistryEvent("rollback", target_info.version, current.version, triggered_by, now)
        self._record(event)
        return event


def registry_for(registry_settings: RegistrySection) -> ModelRegistry:
    """The registry these settings name, with its download cache under the home."""
    return _registry_for(registry_settings, registry_settings.registry_model_name)


def _registry_for(registry_settings: RegistrySection, name: str, **kind: Any) -> ModelRegistry:
    registry_settings.ensure_dirs()
    return ModelRegistry(
        registry_settings.tracking_uri,
        name=name,
        cache_dir=registry_settings.registry_cache_dir,
        lock_url=registry_settings.lock_uri,
        ui_url=registry_settings.ui_url,
        **kind,
    )


LUNG_FIELDS_DESCRIPTION = (
    "Chest X-ray lung fields (U-Net, one logit per pixel) on the classifier's prepared square. "
    "ONNX with its preprocessing inside; a card and the test split's report with every version."
)


def lung_registry_for(registry_settings: RegistrySection) -> ModelRegistry:
    """The lung segmentation version's registered model, in the same store and cache."""
    return _registry_for(
        registry_settings,
        registry_settings.registry_lung_model_name,
        files=(SEGMENTER_ONNX_FILE, SEGMENTER_REPORT_FILE),
        description=LUNG_FIELDS_DESCRIPTION,
    )
