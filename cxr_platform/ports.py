"""Local ports, for the servers the platform starts (the service, a test Orthanc, the node).

Here rather than in either edge: serving/ and pacs/ both start servers and must not import
each other.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
