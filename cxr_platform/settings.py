"""The platform's settings: read once from ``CXR_*`` variables (and an optional ``.env``).

The fields are not written here: :func:`_declared_fields` builds them from the sections in
:mod:`cxr_platform.sections`, so a setting is declared once, with its type, default, bounds and
description. Everything local lives under ``home`` (``CXR_HOME``, default ``./.cxr``); every
store is a path or URL derived there, so moving to PostgreSQL or object storage is
configuration, not code.

Library functions never take :class:`CxrSettings`; they take the section they need
(``settings.data``, ``settings.training``, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import Field, SecretStr, ValidationInfo, create_model, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from cxr_platform.sections import (
    SECTIONS,
    DagsterSection,
    DataSection,
    DicomSection,
    HomeLayout,
    MonitoringSection,
    RegistrySection,
    ServingSection,
    SiteTrialSection,
    TrainingSection,
    ViewerSection,
)

ENV_PREFIX = "CXR_"
SectionT = TypeVar("SectionT", bound=HomeLayout)


def _is_path(annotation: Any) -> bool:
    return annotation is Path or Path in typing.get_args(annotation)


def _is_name_list(annotation: Any) -> bool:
    return annotation == tuple[str, ...]


def _is_path_list(annotation: Any) -> bool:
    return annotation == tuple[Path, ...]


def _declared_fields() -> dict[str, tuple[Any, Any]]:
    """One pydantic field per distinct setting across all sections.

    A name declared by several sections must be declared alike (the sections share it through a
    common base or one helper); a disagreement is a programming error caught at import.
    """
    declared: dict[str, tuple[Any, Any]] = {}
    origin: dict[str, tuple[Any, Any, str]] = {}
    for section in SECTIONS.values():
        hints = typing.get_type_hints(section)
        for spec in dataclasses.fields(section):
            annotation = hints[spec.name]
            has_default = spec.default is not dataclasses.MISSING
            default = spec.default if has_default else spec.default_factory
            if spec.name in origin:
                seen_annotation, seen_default, seen_in = origin[spec.name]
                if (seen_annotation, seen_default) != (annotation, default):
                    raise TypeError(
                        f"setting {spec.name!r} is declared differently in {section.__name__} "
                        f"and {seen_in}"
                    )
                continue
            origin[spec.name] = (annotation, default, section.__name__)
            meta = spec.metadata
            if meta.get("secret"):
                annotation = SecretStr | None
            elif _is_name_list(annotation) or _is_path_list(annotation):
                # CXR_MODELS=baseline_cnn,resnet18 reads more naturally than a JSON list, and
                # folders are listed as PATH lists them (a folder's name may hold a comma).
                annotation = Annotated[annotation, NoDecode]
            bounds = {
                key: meta[key] for key in ("ge", "gt", "le", "lt") if meta.get(key) is not None
            }
            if has_default:
                field = Field(default=spec.default, description=meta.get("doc"), **bounds)
            else:
                field = Field(
                    default_factory=spec.default_factory,  # type: ignore[arg-type]
                    description=meta.get("doc"),
                    **bounds,
                )
            declared[spec.name] = (annotation, field)
    return declared


_FIELDS = _declared_fields()
SECRET_SETTINGS = frozenset(
    name for name, (annotation, _) in _FIELDS.items() if annotation == SecretStr | None
)


FILE_SUFFIX = "_FILE"
# What example files and tutorials write where a secret goes: a deployment that still holds
# one has a credential anybody can guess, so it does not start.
_PLACEHOLDER = re.compile(r"change[-_ ]?me|replace[-_ ]?me", re.IGNORECASE)


class SecretFiles(PydanticBaseSettingsSource):
    """``CXR_<SECRET>_FILE`` names a file that holds the secret (a Docker or Kubernetes secret
    mount), so the value need not sit in the environment or on a command line."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads every secret at once

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name in sorted(SECRET_SETTINGS):
            variable = env_name(name) + FILE_SUFFIX
            path = os.environ.get(variable, "").strip()
            if not path:
                continue
            try:
                value = Path(path).read_text().strip()
            except OSError as exc:
                raise SettingsError(f"{variable}: cannot read {path}: {exc.strerror}") from exc
            given = os.environ.get(env_name(name), "").strip()
            if given and given != value:
                # Equal is fine: a child process the platform starts inherits the _FILE
                # variable and is handed the value it read.
                raise SettingsError(f"{env_name(name)} and {variable} disagree: set one")
            found[name] = value
        return found


class _SettingsBase(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        extra="ignore",
        frozen=True,
        # A validation error must not echo the other inputs: one of them may be the API key.
        hide_input_in_errors=True,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _parse(cls, value: object, info: ValidationInfo) -> object:
        annotation = _FIELDS[info.field_name][0]
        if annotation == SecretStr | None and isinstance(value, str):
            if not value.strip():
                return None  # CXR_SERVICE_API_KEY= (set but empty) must not demand an empty key
            if any(_PLACEHOLDER.search(part) for part in re.split(r"[,=\s]+", value) if part):
                raise ValueError(
                    f"{env_name(info.field_name)} holds a placeholder, not a secret: generate "
                    "one (openssl rand -hex 32) and set it"
                )
        if typing.get_origin(annotation) is Annotated and isinstance(value, str | Path):
            listed = typing.get_args(annotation)[0]
            if _is_path_list(listed):
                return tuple(Path(part) for part in str(value).split(os.pathsep) if part.strip())
            return tuple(name.strip() for name in str(value).split(",") if name.strip())
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, SecretFiles(settings_cls), dotenv_settings)

    @field_validator("*", mode="after")
    @classmethod
    def _absolute_paths(cls, value: object, info: ValidationInfo) -> object:
        annotation = _FIELDS[info.field_name][0]
        if isinstance(value, Path) and _is_path(annotation):
            return value.expanduser().resolve()
        annotated = typing.get_origin(annotation) is Annotated
        if isinstance(value, tuple) and annotated and _is_path_list(typing.get_args(annotation)[0]):
            return tuple(Path(item).expanduser().resolve() for item in value)
        return value

    def model_post_init(self, context: Any, /) -> None:
        # Every section is built (and so validated) now, not at first use deep inside a run.
        for name in SECTIONS:
            getattr(self, name)

    # Sections are built on each access, not cached: a cached one would survive model_copy(update=)
    # and describe the settings before the update. Building one costs microseconds.
    def section(self, kind: type[SectionT]) -> SectionT:
        values = {}
        for spec in dataclasses.fields(kind):
            value = getattr(self, spec.name)
            values[spec.name] = value.get_secret_value() if isinstance(value, SecretStr) else value
        return kind(**values)

    @property
    def data(self) -> DataSection:
        return self.section(DataSection)

    @property
    def training(self) -> TrainingSection:
        return self.section(TrainingSection)

    @property
    def registry(self) -> RegistrySection:
        return self.section(RegistrySection)

    @property
    def serving(self) -> ServingSection:
        return self.section(ServingSection)

    @property
    def dicom(self) -> DicomSection:
        return self.section(DicomSection)

    @property
    def monitoring(self) -> MonitoringSection:
        return self.section(MonitoringSection)

    @property
    def site_trial(self) -> SiteTrialSection:
        return self.section(SiteTrialSection)

    @property
    def dagster(self) -> DagsterSection:
        return self.section(DagsterSection)

    @property
    def viewer(self) -> ViewerSection:
        return self.section(ViewerSection)

    def effective(self) -> dict[str, dict[str, Any]]:
        """Every setting in force, by section, secrets masked (what ``cxr config`` prints)."""
        shown: dict[str, dict[str, Any]] = {}
        for name, kind in SECTIONS.items():
            shown[name] = {}
            for spec in dataclasses.fields(kind):
                value = getattr(self, spec.name)
                if spec.name in SECRET_SETTINGS:
                    value = "**********" if value is not None else None
                elif isinstance(value, str):
                    value = _without_password(value)
                elif isinstance(value, Path):
                    value = str(value)
                elif isinstance(value, tuple):
                    value = [str(item) if isinstance(item, Path) else item for item in value]
                shown[name][spec.name] = value
        return shown


if typing.TYPE_CHECKING:
    # Type checkers see the sections and methods; the fields exist only in the generated class.
    CxrSettings = _SettingsBase
else:
    CxrSettings = create_model(
        "CxrSettings",
        __base__=_SettingsBase,
        __module__=__name__,
        __doc__="Typed settings, read from ``CXR_*`` environment variables (and a .env file).",
        **_FIELDS,
    )


_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/@]*:)[^@/]*@", re.IGNORECASE)


def _without_password(value: str) -> str:
    """A database or server URL as ``cxr config`` shows it: the password masked."""
    return _URL_PASSWORD.sub(r"\1**********@", value)


def env_name(setting: str) -> str:
    return f"{ENV_PREFIX}{setting.upper()}"


def settings_fields() -> dict[str, Any]:
    """The pydantic field of every setting, by name (for generated interfaces and tests)."""
    return dict(CxrSettings.model_fields)


def _environment_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        if all(isinstance(item, str) for item in value):
            return ",".join(value)
        if all(isinstance(item, Path) for item in value):
            return os.pathsep.join(str(item) for item in value)
        return json.dumps(list(value))
    return str(value)


def settings_environment(settings: _SettingsBase, **overrides: object) -> dict[str, str]:
    """``CXR_*`` variables that make a child process (the service, the node) read exactly these
    settings, with ``overrides`` on top: the one way settings cross a process boundary."""
    values = {name: getattr(settings, name) for name in _FIELDS}
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise TypeError(f"unknown settings: {unknown}")
    values.update(overrides)
    return {
        env_name(name): _environment_value(value)
        for name, value in values.items()
        if value is not None
    }


def load_settings(**overrides: object) -> _SettingsBase:
    """Settings from the environment, with explicit overrides (CLI flags, Dagster config) on top."""
    clean = {key: value for key, value in overrides.items() if value is not None}
    unknown = sorted(set(clean) - set(_FIELDS))
    if unknown:
        raise TypeError(f"unknown settings: {unknown}")
    return CxrSettings(**clean)


__all__ = [
    "SECRET_SETTINGS",
    "CxrSettings",
    "env_name",
    "load_settings",
    "settings_environment",
    "settings_fields",
]
