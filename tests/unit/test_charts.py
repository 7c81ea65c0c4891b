"""The /stats chart renders real PNGs, with and without data."""

from __future__ import annotations

import struct

from analytics.charts import Event, Period, accuracy_figure, accuracy_png

PNG = b"\x89PNG\r\n\x1a\n"


def _size(png: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def test_chart_of_two_versions_with_a_decision() -> None:
    periods = [Period("v1", 3600.0 * h, 10, 8) for h in range(5)]
    periods += [Period("v2", 3600.0 * h, 4, 4) for h in range(2, 5)]
    png = accuracy_png(periods, [Event(3600.0 * 2, "canary v2")])
    assert png.startswith(PNG) and _size(png) == (960, 540)
    # Different data draws a different picture (the chart is not a fixed image).
    assert accuracy_png(periods[:3]) != png


def test_chart_without_votes_still_renders() -> None:
    png = accuracy_png([], width_px=480, height_px=270)
    assert png.startswith(PNG) and _size(png) == (480, 270)


def test_a_single_period_keeps_a_readable_time_axis() -> None:
    # The first hour after deployment: every version has one point at the same time.
    periods = [Period("v1", 7200.0, 10, 8), Period("v2", 7200.0, 3, 2)]
    (ax,) = accuracy_figure(periods).axes
    low, high = ax.get_xlim()
    assert 0 < high - low <= 1.0  # within a day (matplotlib date units), not years

