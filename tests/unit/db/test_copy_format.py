"""COPY text format built by Polars."""

import datetime as dt

import polars as pl

from visitas.db.copy_format import copy_lines


def test_nulls_escapes_arrays_and_timestamps():
    frame = pl.DataFrame({
        "text": ["a\tb\\c\nd", None],
        "when": [dt.datetime(2013, 2, 8, 18, 30), None],
        "n": [3, None],
        "tags": [['IE 9.0', 'say "hi"', "back\\slash"], None],
    })
    lines = copy_lines(frame).decode().split("\n")
    assert lines[0] == ('a\\tb\\\\c\\nd\t2013-02-08 18:30:00\t3\t'
                        '{"IE 9.0","say \\\\"hi\\\\"","back\\\\\\\\slash"}')
    assert lines[1] == "\\N\t\\N\t\\N\t\\N"
    assert lines[2] == ""


def test_nul_bytes_are_kept_visible():
    assert copy_lines(pl.DataFrame({"raw": ["a\x00b"]})) == b"a\\\\x00b\n"


def test_empty_frame_is_no_bytes():
    assert copy_lines(pl.DataFrame({"a": []}, schema={"a": pl.String})) == b""


def test_plain_and_empty_arrays():
    frame = pl.DataFrame({"tags": [["IE 9.0", "Chrome"], [], None]})
    assert copy_lines(frame).decode().split("\n")[:3] == ['{"IE 9.0","Chrome"}', "{}", "\\N"]


def test_timestamps_and_dates_need_no_escaping():
    frame = pl.DataFrame({"d": [dt.date(2025, 1, 2)], "n": [7]})
    assert copy_lines(frame) == b"2025-01-02\t7\n"
