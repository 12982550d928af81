"""Benchmark helpers: what the speed tables' ratios rest on."""

from __future__ import annotations

from napari_tinysam.bench import interleaved_medians


def test_implementations_are_timed_in_turns_and_a_call_elsewhere_reports_its_own_time():
    calls = []

    def here():
        calls.append("here")

    def elsewhere():  # e.g. the reference in its own process: it measures itself
        calls.append("elsewhere")
        return 0.25

    medians = interleaved_medians({"here": here, "elsewhere": elsewhere}, repeats=3, self_timed=["elsewhere"])
    assert calls == ["here", "elsewhere"] * 4  # one warm-up round, then three, alternating
    assert medians["elsewhere"] == 0.25
    assert 0 <= medians["here"] < 0.1
