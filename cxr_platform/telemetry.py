"""Telemetry opt-outs: the platform's only writes to ``os.environ``.

MLflow and Evidently decide at import time whether to send usage telemetry, and read that
decision from environment variables, so it cannot be passed as an argument. A hospital machine
must not reach out to the network on its own: these defaults opt out, and a deployment that
wants telemetry sets the variables itself (``setdefault`` leaves an explicit value alone).
"""

import os

TELEMETRY_OPT_OUTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # MLflow draws a progress bar per artifact download; it garbles logs of a serving process.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "DO_NOT_TRACK": "1",
    "EVIDENTLY_DISABLE_TELEMETRY": "1",
}

for _name, _value in TELEMETRY_OPT_OUTS.items():
    os.environ.setdefault(_name, _value)
