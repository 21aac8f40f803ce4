"""The one way a duration is written for people (service/clock.py)."""

from __future__ import annotations

import pytest

from service.clock import duration


@pytest.mark.parametrize(
    ("seconds", "written"),
    [
        (0, "0s"),
        (7, "7s"),
        (59.9, "59s"),
        (65, "1m 05s"),
        (3600, "1h 00m 00s"),
        (14398, "3h 59m 58s"),
        (86400 + 3 * 3600 + 5 * 60 + 9, "1d 03h 05m 09s"),
        (2592000, "30d 00h 00m 00s"),
        (-3, "0s"),
    ],
)
def test_a_duration_is_written_from_its_largest_unit_down_to_whole_seconds(seconds, written):
    assert duration(seconds) == written
