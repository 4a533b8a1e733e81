"""cxr_platform: train, explain, serve and monitor a chest X-ray Normal/Pneumonia classifier."""

# The package is imported before any of its modules, so these opt-outs are in place before MLflow
# or Evidently is first imported anywhere in the process (both read them at import time).
from cxr_platform import telemetry as _telemetry  # noqa: F401

__version__ = "0.1.0"
