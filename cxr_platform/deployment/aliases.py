"""The registry's alias names, importable without MLflow (the CLI builds its options from them)."""

PRODUCTION = "production"
SHADOW = "shadow"
PREVIOUS_PRODUCTION = "previous-production"
ALIASES = (PRODUCTION, SHADOW, PREVIOUS_PRODUCTION)
