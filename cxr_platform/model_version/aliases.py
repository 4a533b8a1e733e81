"""The registry's alias names, importable without MLflow (the CLI builds its options from them)."""

import re

PRODUCTION = "production"
SHADOW = "shadow"
PREVIOUS_PRODUCTION = "previous-production"
ALIASES = (PRODUCTION, SHADOW, PREVIOUS_PRODUCTION)
SITE_PRODUCTION_PREFIX = "production-site-"


def site_production_alias(site: str) -> str:
    """The alias of one site's own production version. MLflow aliases allow only letters,
    digits, ``_`` and ``-``; the version's ``cxr.site`` tag keeps the exact name."""
    slug = re.sub(r"[^a-z0-9]+", "-", site.lower()).strip("-") or "unnamed"
    return SITE_PRODUCTION_PREFIX + slug
