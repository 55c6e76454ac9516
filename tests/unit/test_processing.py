"""A whole file through ValidateReport's and SplitVisitorStats' pure work (local files only)."""

import json

import polars as pl
import pytest

from visitas import processing

from .conftest import GOOD_ROW, HEADER, row


def _run(tmp_path, data: bytes, batch_bytes=processing.BATCH_BYTES, parallel=processing.PARALLEL_BATCHES):
    path = tmp_path / "report_1.txt"
    path.write_bytes(data)
    verdict = processing.validate_report(path, "report_1.txt", tmp_path / "checked", batch_bytes,
                                         parallel)
    summary = processing.split_report(tmp_path / "checked", "report_1.txt", tmp_path / "split")
    return verdict, summary


def _copy_rows(path):
    return [line.split("\t") for line in path.read_text().splitlines()]


def _statistics_rows(tmp_path):
    chunks = processing.statistics_copy_chunks(tmp_path / "checked", "report_1.txt")
    return [line.split("\t") for line in b"".join(chunks).decode().splitlines()]


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "cp1252"])
def test_encodings_and_line_ends(tmp_path, eol, encoding):
    text = eol.join([HEADER.replace("Fecha envio", "Fecha envío"), row(navegadores="Explorador móvil"),
                     row(opens="x")]) + eol
    verdict, summary = _run(tmp_path, text.encode(encoding))
    assert (verdict.rows_read, verdict.rows_loaded, verdict.rows_rejected) == (2, 1, 1)
    assert verdict.encoding == encoding
    [stats] = _statistics_rows(tmp_path)
    assert stats[13] == '{"Explorador móvil"}'
    [error] = _copy_rows(tmp_path / "split" / "errors.copy")
    assert error[:4] == ["report_1.txt", "3", "Opens", "invalid_count"]


@pytest.mark.parametrize("parallel", [1, 3])
def test_mixed_line_ends_and_small_batches_keep_line_numbers(tmp_path, parallel):
    lines = [HEADER] + [row(opens=str(i)) if i % 5 else row(opens="bad") for i in range(1, 41)]
    data = "".join(line + ("\r\n" if i % 2 else "\n") for i, line in enumerate(lines)).encode()
    verdict, summary = _run(tmp_path, data, batch_bytes=300, parallel=parallel)
    assert (verdict.rows_read, verdict.rows_loaded, verdict.rows_rejected) == (40, 32, 8)
    errors = _copy_rows(tmp_path / "split" / "errors.copy")
    assert [int(e[1]) for e in errors] == [i + 1 for i in range(5, 41, 5)]
    stats = _statistics_rows(tmp_path)
    assert [int(s[16]) for s in stats] == [i + 1 for i in range(1, 41) if i % 5]
    assert summary["rows_read"] == summary["rows_loaded"] + summary["rows_rejected"]


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_file"),
    (b"\x00\x01\x02binary", "binary_file"),
    (HEADER.encode() + b"\r\n", "no_rows"),
    (GOOD_ROW.encode() + b"\n" + GOOD_ROW.encode(), "no_header"),
    (HEADER.replace(",Plataformas", "").encode() + b"\n" + GOOD_ROW.encode(), "header_columns"),
])
def test_file_level_rejections(tmp_path, data, reason):
    verdict, summary = _run(tmp_path, data)
    assert verdict.status == "rejected" and verdict.reason == reason
    assert summary["sha256"] and summary["error_count"] == 1
    [error] = _copy_rows(tmp_path / "split" / "errors.copy")
    assert error[2:4] == ["(file)", reason]
    assert _statistics_rows(tmp_path) == []


def test_visitor_summaries_are_written(tmp_path):
    text = "\n".join([HEADER, GOOD_ROW, GOOD_ROW, row(fecha_envio="01/03/2013 10:00")])
    _run(tmp_path, text.encode(), batch_bytes=len(HEADER) + 5)  # one line per batch, merged
    summaries = pl.read_parquet(tmp_path / "split" / "visitors.parquet")
    assert summaries.select("visitas_totales", "visitas_anio_actual", "visitas_mes_actual").row(0) == (3, 3, 1)
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["visitors"] == 1


def test_ordered_map_keeps_order_bounds_work_in_flight_and_passes_errors_on():
    import threading

    running, most = 0, 0
    lock = threading.Lock()
    first_three = threading.Barrier(3, timeout=10)  # breaks unless three run at once

    def work(index):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        if index < 3:
            first_three.wait()
        with lock:
            running -= 1
        if index == 5:
            raise ValueError("batch 5 is bad")
        return index

    results = processing.ordered_map(work, ((i,) for i in range(8)), parallel=3)
    assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="batch 5"):
        next(results)
    assert most == 3
