from __future__ import annotations

import io

import pytest

from cxr_platform.terminal import duration_text, interactive


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "0 s"),
        (42, "42 s"),
        (185, "3 min 5 s"),
        (600, "10 min"),
        (754, "13 min"),
        (3600, "1 h"),
        (4330, "1 h 12 min"),
        (-3, "0 s"),
    ],
)
def test_durations_read_as_a_person_reads_an_estimate(seconds, text):
    assert duration_text(seconds) == text


def test_only_a_terminal_is_interactive(tmp_path):
    assert not interactive(io.StringIO())
    with (tmp_path / "log.txt").open("w") as handle:
        assert not interactive(handle)
    closed = io.StringIO()
    closed.close()
    assert not interactive(closed)
