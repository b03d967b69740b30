"""The one RFC 3339 formatter: UTC always, Z always, naive times refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from ztagent.timefmt import parse_rfc3339, rfc3339, rfc3339_from_timestamp

WHEN = datetime(2026, 12, 1, 21, 13, 54, 843199, tzinfo=UTC)


def test_utc_with_the_requested_fraction() -> None:
    assert rfc3339(WHEN) == "2026-12-01T21:13:54Z"
    assert rfc3339(WHEN, digits=3) == "2026-12-01T21:13:54.843Z"
    assert rfc3339(WHEN, digits=6) == "2026-12-01T21:13:54.843199Z"
    assert rfc3339(WHEN.replace(microsecond=0), digits=6) == "2026-12-01T21:13:54.000000Z"


def test_another_zone_is_converted_not_relabelled() -> None:
    # The old policy-input formatter wrote 23:13:54...Z for this: a two-hour error.
    east = WHEN.astimezone(timezone(timedelta(hours=2)))
    assert rfc3339(east, digits=3) == "2026-12-01T21:13:54.843Z"


def test_a_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        rfc3339(datetime(2026, 12, 1, 21, 0, 0))


def test_timestamps_and_round_trips() -> None:
    assert rfc3339_from_timestamp(WHEN.timestamp()) == "2026-12-01T21:13:54Z"
    assert rfc3339_from_timestamp(1e300) == "1e+300"  # no calendar holds it: the number
    assert parse_rfc3339(rfc3339(WHEN, digits=6)) == WHEN
    assert parse_rfc3339("2026-12-01T21:13:54Z") == WHEN.replace(microsecond=0)
    with pytest.raises(ValueError, match="ending in 'Z'"):
        parse_rfc3339("2026-12-01T21:13:54+02:00")


def test_the_year_has_four_digits_and_other_utc_zones_are_utc() -> None:
    from zoneinfo import ZoneInfo

    early = datetime(999, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert rfc3339(early) == "0999-01-02T03:04:05Z"
    assert rfc3339(early, digits=6) == "0999-01-02T03:04:05.678901Z"
    assert rfc3339(WHEN.replace(tzinfo=ZoneInfo("UTC")), digits=3) == "2026-12-01T21:13:54.843Z"
