"""Dagster definitions: thin wrappers that call the library and attach metadata for the UI."""
