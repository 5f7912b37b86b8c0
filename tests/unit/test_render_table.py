"""render.table: human sizes and durations, tables that never exceed 80 columns."""

from __future__ import annotations

import pytest

from hekitrace.render.table import Column, Table, cut, human_duration, human_size


@pytest.mark.parametrize("size,text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (14 << 20, "14.0 MiB"),
    (4 << 30, "4.0 GiB"), (1 << 40, "1.0 TiB"), (3 << 50, "3.0 PiB"), (1 << 62, "4096.0 PiB"),
])
def test_human_size(size, text):
    assert human_size(size) == text


@pytest.mark.parametrize("seconds,text", [
    (0.25, "0.2s"), (12, "12s"), (75, "1m15s"), (3 * 3600 + 60, "3h01m"),
    (93784, "1d02h"), (-5, "0.0s"),
])
def test_human_duration(seconds, text):
    assert human_duration(seconds) == text


def test_cut_marks_the_cut():
    assert cut("abcdef", 6) == "abcdef"
    assert cut("abcdefg", 6) == "abcde~"


def test_table_fits_and_aligns():
    table = Table([Column("NAME", 10), Column("SIZE", 8, ">")], indent=2)
    lines = table.render([["a-very-long-vm-name", "4.0 GiB"], ["x", ""]])
    assert lines == ["  NAME            SIZE", "  a-very-lo~   4.0 GiB", "  x"]


def test_table_wider_than_80_is_refused():
    with pytest.raises(ValueError, match="81 columns"):
        Table([Column("A", 40), Column("B", 39)])
