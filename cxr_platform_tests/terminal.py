"""Run a command as a person at a terminal would: on a pseudo-terminal, reading all it draws."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

# What tqdm draws: "12/40 [00:03<00:07, 3.9img/s]" (count, elapsed<remaining, rate).
PROGRESS_BAR = re.compile(r"\d+/\d+ \[\d+:\d\d<[\d:?]+, +[\d.?]+ ?(?:s/)?img(?:/s)?\]")


def run_in_terminal(
    args: list[str], *, env: dict[str, str], timeout: float = 600
) -> tuple[int, str]:
    """(exit code, everything written to the terminal, carriage returns kept)."""
    leader, follower = pty.openpty()
    # A 120x24 window, as a terminal reports it: tqdm sizes its bar from this.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(
        args, stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True
    )
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            process.kill()
            raise TimeoutError(f"{args} ran past {timeout:.0f} s")
        code = process.wait(timeout=60)
    finally:
        os.close(leader)
    return code, b"".join(chunks).decode("utf-8", "replace")
