"""The ``platform`` resource: every setting, overridable per run from the Dagster launchpad.

Its fields are generated from the settings' own declaration, so no list of settings is kept
here: a setting added to :mod:`cxr_platform.sections` appears in the launchpad by itself.
Secrets are left out (they would show in run config); they still arrive from the environment.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import dagster as dg

from cxr_platform.settings import SECRET_SETTINGS, CxrSettings, load_settings, settings_fields


def _launchpad_type(annotation: Any) -> Any:
    """The settings type as Dagster config can hold it (paths as strings, tuples as lists)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _launchpad_type(typing.get_args(annotation)[0])
    if annotation is Path:
        return str
    if origin is typing.Literal:
        return str
    if origin is tuple:
        return list[_launchpad_type(typing.get_args(annotation)[0])]
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _launchpad_type(args[0])
    return annotation


def _launchpad_value(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_launchpad_value(item) for item in value]
    return value


class _PlatformSettingsBase(dg.ConfigurableResource):
    """Unset fields fall back to the ``CXR_*`` environment of the run's process."""

    def settings(self) -> CxrSettings:
        values = {name: getattr(self, name) for name in type(self).model_fields}
        return load_settings(**values)

    @classmethod
    def from_settings(cls, settings: CxrSettings) -> _PlatformSettingsBase:
        return cls(**{name: _launchpad_value(getattr(settings, name)) for name in cls.model_fields})


def _platform_settings_class() -> type[_PlatformSettingsBase]:
    annotations = {
        name: _launchpad_type(field.annotation) | None
        for name, field in settings_fields().items()
        if name not in SECRET_SETTINGS
    }
    namespace: dict[str, Any] = {
        "__annotations__": annotations,
        "__module__": __name__,
        "__qualname__": "PlatformSettings",
        "__doc__": _PlatformSettingsBase.__doc__,
        **dict.fromkeys(annotations),
    }
    return type("PlatformSettings", (_PlatformSettingsBase,), namespace)


PlatformSettings = _platform_settings_class()
