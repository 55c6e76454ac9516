"""A whole file through ValidateReport's and SplitVisitorStats' pure work (local files only)."""


import polars as pl
import pytest

from visitas import handoff
from visitas.transform import reading, split, validate
from visitas.db.copy_format import copy_lines

from ..conftest import GOOD_ROW, HEADER, row


def _run(tmp_path, data: bytes, batch_bytes=reading.BATCH_BYTES, parallel=reading.PARALLEL_BATCHES):
    path = tmp_path / "report_1.txt"
    path.write_bytes(data)
    verdict = validate.validate_report(path, "report_1.txt", tmp_path / "checked", batch_bytes,
                                         parallel)
    summary = split.split_report(tmp_path / "checked", "report_1.txt", tmp_path / "split")
    return verdict, summary


def _copy_rows(path):
    return [line.split("\t") for line in path.read_text().splitlines()]


def _statistics_rows(tmp_path):
    batches = split.statistics_batches(tmp_path / "checked", "report_1.txt")
    return [line.split("\t") for line in b"".join(map(copy_lines, batches)).decode().splitlines()]


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
    assert summary.rows_read == summary.rows_loaded + summary.rows_rejected


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
    assert summary.sha256 and summary.error_count == 1
    [error] = _copy_rows(tmp_path / "split" / "errors.copy")
    assert error[2:4] == ["(file)", reason]
    assert _statistics_rows(tmp_path) == []


def test_visitor_summaries_are_written(tmp_path):
    text = "\n".join([HEADER, GOOD_ROW, GOOD_ROW, row(fecha_envio="01/03/2013 10:00")])
    _run(tmp_path, text.encode(), batch_bytes=len(HEADER) + 5)  # one line per batch, merged
    summaries = pl.read_parquet(tmp_path / "split" / "visitors.parquet")
    assert summaries.select("visitas_totales", "visitas_anio_actual", "visitas_mes_actual").row(0) == (3, 3, 1)
    summary = handoff.read(tmp_path / "split" / handoff.SUMMARY_FILE, handoff.SplitSummary)
    assert summary.visitors == 1


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

    results = validate.ordered_map(work, ((i,) for i in range(8)), parallel=3)
    assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="batch 5"):
        next(results)
    assert most == 3


# ---------------------------------------------------------------- reading, line by line

def _pieces(tmp_path, data: bytes, batch_bytes: int, max_line_bytes: int = 1 << 20):
    path = tmp_path / "lines.txt"
    path.write_bytes(data)
    return list(reading.iter_raw_lines(path, 0, 2, batch_bytes, max_line_bytes))


@pytest.mark.parametrize("batch_bytes", [1, 2, 3, 5, 64])
def test_pieces_are_whole_lines_whatever_the_batch_size(tmp_path, batch_bytes):
    data = b"aa\r\nbb\rcc\ndd\r\r\nee"  # a CRLF may straddle two reads
    pieces = _pieces(tmp_path, data, batch_bytes)
    assert b"".join(p.data for p in pieces) == data
    numbered = [(n, line) for p in pieces
                for n, line in _lines_of(p)]
    assert numbered == [(2, "aa"), (3, "bb"), (4, "cc"), (5, "dd"), (7, "ee")]


def _lines_of(piece):
    from visitas.transform import contract

    frame, _ = contract.lines_frame(piece.data, piece.first_line_no)
    return frame.select("line_no", "line").rows()


def test_an_overlong_line_is_skipped_without_being_held(tmp_path):
    data = b"ok\n" + b"x" * 50_000 + b"\r\nnext\n" + b"y" * 40_000
    pieces = _pieces(tmp_path, data, batch_bytes=1000, max_line_bytes=4000)
    overlong = [p for p in pieces if p.overlong]
    assert [(p.first_line_no, len(p.data)) for p in overlong] == [(3, 1024), (5, 1024)]
    assert all(len(p.data) <= 4000 + 1000 for p in pieces)  # never more than a line + a read
    plain = [line for p in pieces if not p.overlong for line in _lines_of(p)]
    assert plain == [(2, "ok"), (4, "next")]


def test_cr_only_bom_and_windows_1252_file(tmp_path):
    header = HEADER.replace("Fecha envio", "Fecha envío")
    text = "\r".join([header, row(navegadores="Explorador móvil"), row(opens="x")]) + "\r"
    verdict, summary = _run(tmp_path, b"\xef\xbb\xbf" + text.encode("cp1252"))
    assert (verdict.status, verdict.rows_read, verdict.rows_loaded) == ("valid", 2, 1)
    assert verdict.encoding == "mixed"  # a BOM says UTF-8, the lines are not
    assert summary.warnings["mixed_encoding"] == 1
    assert _statistics_rows(tmp_path)[0][13] == '{"Explorador móvil"}'


def test_a_file_wholly_in_windows_1252_is_no_warning(tmp_path):
    text = "\r\n".join([HEADER, row(navegadores="Explorador móvil")]) + "\r\n"
    verdict, summary = _run(tmp_path, text.encode("cp1252"))
    assert verdict.encoding == "cp1252" and summary.warnings["mixed_encoding"] == 0


@pytest.mark.parametrize("tail, lines_done", [
    ("\n", 3),                                    # ends with a line end: every line is final
    ("", 3),                                      # the last line lacks its end but loaded
])
def test_lines_done_of_a_whole_last_line(tmp_path, tail, lines_done):
    verdict, _ = _run(tmp_path, ("\n".join([HEADER, GOOD_ROW, GOOD_ROW]) + tail).encode())
    assert verdict.lines_done == lines_done


def test_lines_done_leaves_out_a_cut_last_line_that_was_rejected(tmp_path):
    verdict, _ = _run(tmp_path, ("\n".join([HEADER, GOOD_ROW, GOOD_ROW[:30]])).encode())
    assert (verdict.rows_read, verdict.rows_rejected, verdict.lines_done) == (2, 1, 2)


def test_a_split_of_the_lines_after_a_point_without_refused_rows(tmp_path):
    lines = [HEADER, row(email="a@x.mx"), row(email="b@x.mx", opens="x"), row(email="c@x.mx"),
             row(email="d@x.mx"), row(email="e@x.mx")]
    _run(tmp_path, ("\n".join(lines) + "\n").encode())
    refused = {5: ("opens", "the database refused the row: out of range", "d@x.mx\t...")}
    summary = split.split_report(tmp_path / "checked", "report_1.txt", tmp_path / "part",
                                      after_line=2, refused=refused)
    assert (summary.rows_read, summary.rows_loaded, summary.rows_rejected) == (4, 2, 2)
    visitors = pl.read_parquet(tmp_path / "part" / "visitors.parquet")["email"].to_list()
    assert visitors == ["c@x.mx", "e@x.mx"]
    errors = _copy_rows(tmp_path / "part" / "errors.copy")
    assert [(e[1], e[2], e[3], e[5]) for e in errors] == [
        ("3", "Opens", "invalid_count", lines[2]), ("5", "opens", "db_refused", "d@x.mx\\t...")]
    batches = split.statistics_batches(tmp_path / "checked", "report_1.txt", after_line=3)
    assert pl.concat(batches)["line_no"].to_list() == [4, 5, 6]


def test_prefix_hashes_in_one_pass(tmp_path):
    import hashlib

    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 40)
    sizes = [0, 1, 4095, 4096, 10_240, 99_999]
    found = reading.prefix_sha256(path, sizes)
    data = path.read_bytes()
    assert found == {n: hashlib.sha256(data[:n]).hexdigest() for n in sizes if n <= len(data)}


def test_visits_spilled_in_parts_summarise_as_in_memory(tmp_path, monkeypatch):
    """Past VISITS_IN_MEMORY the visits go to disk in hash parts: the same summary, nothing left."""
    from visitas.dev import sample

    sample.generate(tmp_path / "in", files=1, rows=3000, seed=11, defects=0.02, visitors=400)
    data = (tmp_path / "in" / "report_1.txt").read_bytes()
    (tmp_path / "memory").mkdir()
    _run(tmp_path / "memory", data, batch_bytes=20_000)
    monkeypatch.setattr(split, "VISITS_IN_MEMORY", 250)  # spills every batch or two
    (tmp_path / "spilled").mkdir()
    _, summary = _run(tmp_path / "spilled", data, batch_bytes=20_000)
    in_memory = pl.read_parquet(tmp_path / "memory" / "split" / "visitors.parquet")
    spilled = pl.read_parquet(tmp_path / "spilled" / "split" / "visitors.parquet").sort("email")
    assert in_memory.height == summary.visitors == spilled.height > 300
    assert in_memory.equals(spilled)
    assert sorted(p.name for p in (tmp_path / "spilled" / "split").iterdir()) == [
        "errors.copy", "summary.json", "visitors.parquet"]  # the spilled parts are gone


def test_a_file_of_one_batch_splits_as_in_several(tmp_path):
    """One batch is summarised in the query that reads it; several, after: the same split."""
    from visitas.dev import sample

    sample.generate(tmp_path / "in", files=1, rows=3000, seed=5, defects=0.05, visitors=500)
    data = (tmp_path / "in" / "report_1.txt").read_bytes()
    splits = {}
    for name, batch_bytes in (("one", reading.BATCH_BYTES), ("several", 20_000)):
        (tmp_path / name).mkdir()
        _, splits[name] = _run(tmp_path / name, data, batch_bytes=batch_bytes)
    assert len(list((tmp_path / "one" / "checked").glob("checked-*"))) == 1
    assert len(list((tmp_path / "several" / "checked").glob("checked-*"))) > 3
    assert splits["one"] == splits["several"]
    assert splits["one"].error_count > 0 and splits["one"].rows_opened > 0
    for output in ("visitors.parquet", "errors.copy"):
        assert ((tmp_path / "one" / "split" / output).read_bytes()
                == (tmp_path / "several" / "split" / output).read_bytes())
