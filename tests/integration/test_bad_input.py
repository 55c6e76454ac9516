"""The bad-input corpus: every kind of broken file in one run, each with a clear, specific error,
the good rows of the same file loaded, the run finishing, and every file archived."""

from __future__ import annotations

import os
import random
import resource

import pytest

from tests.unit.conftest import GOOD_ROW, HEADER, row

pytestmark = pytest.mark.slow

GOOD = [row(email=f"bueno{i}@ejemplo.mx") for i in range(5)]


def _lines(*lines: str, eol: str = "\r\n") -> bytes:
    return (eol.join(lines) + eol).encode("utf-8")


def _corpus(remote, outside) -> dict[str, tuple[str, str | None, int]]:
    """Write the corpus; return name -> (status, file reason or None, good rows expected)."""
    files: dict[str, tuple[str, str | None, int]] = {}

    def put(name: str, data: bytes, status: str, reason: str | None, good: int) -> None:
        (remote / name).write_bytes(data)
        files[name] = (status, reason, good)

    put("report_01.txt", b"", "rejected", "empty_file", 0)
    put("report_02.txt", _lines(HEADER), "rejected", "no_rows", 0)
    put("report_03.txt", _lines(HEADER.rsplit(",", 1)[0], *GOOD), "rejected", "header_columns", 0)
    put("report_04.txt", _lines(HEADER + ",Extra", *GOOD), "rejected", "header_columns", 0)
    put("report_05.txt", _lines(HEADER.replace("Opens,", "Aperturas,"), *GOOD), "rejected", "header_names", 0)
    put("report_06.txt", _lines(*GOOD), "rejected", "no_header", 0)
    put("report_07.txt", b"\xef\xbb\xbf" + _lines(HEADER, *GOOD), "loaded", None, 5)
    put("report_08.txt", (HEADER.replace("envio", "envío") + "\r\n"
                          + row(navegadores="Explorador móvil", plataformas="Teléfono") + "\r\n")
        .encode("cp1252"), "loaded", None, 1)
    put("report_09.txt", (HEADER + "\n" + GOOD[0] + "\r\n" + GOOD[1] + "\n" + GOOD[2] + "\r\n").encode(),
        "loaded", None, 3)
    put("report_10.txt", _lines(HEADER, GOOD_ROW.rsplit(",", 1)[0], GOOD_ROW + ",x", *GOOD), "loaded", None, 5)
    put("report_11.txt", _lines(HEADER, GOOD[0], '"' + GOOD[1], GOOD[2]), "loaded", None, 2)
    put("report_12.txt", _lines(HEADER, GOOD[0], "x" * 10_000_000, GOOD[1]), "loaded", None, 2)
    put("report_13.txt", random.Random(13).randbytes(8192), "rejected", "binary_file", 0)
    filler = [row(email=f"relleno{i}@ejemplo.mx") for i in range(800)]  # past the 64 KiB sniff
    put("report_14.txt", _lines(HEADER, *filler, row(jyv="a\x00b"), GOOD[0]), "loaded", None, 801)
    with open(remote / "report_15.txt", "wb") as sparse:  # 1 GB of zeros, sparse on disk
        sparse.truncate(1024 ** 3)
    files["report_15.txt"] = ("rejected", "binary_file", 0)
    put("report_16.txt", _lines(HEADER, *(row(fecha_envio=d) for d in (
        "08/020/2013 18:30", "31/02/2013 10:00", "2013-02-08 18:30", "8/2/2013 18:30",
        "29/02/2023 10:00", "08/02/2013 25:00", "")), row(fecha_open="32/01/2013 10:00"), GOOD[0]),
        "loaded", None, 1)
    put("report_17.txt", _lines(HEADER, row(opens="-1"), row(clicks="dos"), row(opens_virales="1.5"),
                                GOOD[0]), "loaded", None, 1)
    put("report_18.txt", _lines(HEADER, row(email="juan perez@ejemplo.mx"), row(email="a@@ejemplo.mx"),
                                row(email="josé@ejemplo.mx"), GOOD[0]), "loaded", None, 2)
    put("report_19.txt", _lines(HEADER, row(jyv="'); DROP TABLE visitor; --",
                                            navegadores="Robert'); DROP TABLE statistics;--")),
        "loaded", None, 1)
    (remote / "report_20.txt").mkdir()  # a directory named like a report
    (outside / "secret.txt").write_text("not for you")
    os.symlink(outside / "secret.txt", remote / "report_21.txt")  # a link out of remote_dir
    return files


def test_bad_input_corpus(env, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    env.remote_dir.mkdir(parents=True, exist_ok=True)
    files = _corpus(env.remote_dir, outside)
    result = env.luigi(timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    loads = {r[0]: r for r in env.query(
        "SELECT file_name, status, reason, rows_loaded, rows_read, rows_rejected FROM load_log")}
    assert set(loads) == set(files)
    for name, (status, reason, good) in files.items():
        got = loads[name]
        assert (got[1], got[2], got[3]) == (status, reason, good), name
        assert got[4] == got[3] + got[5]
        if status == "rejected":
            [(line_no, column, why, message)] = env.query(
                "SELECT line_no, column_name, reason, message FROM errors WHERE source_file = %s", (name,))
            assert (column, why) == ("(file)", reason) and message

    def reasons(name):
        return sorted(r[0] for r in env.query(
            "SELECT reason FROM errors WHERE source_file = %s", (name,)))

    assert reasons("report_10.txt") == ["field_count", "field_count"]
    assert env.query("SELECT message FROM errors WHERE source_file = 'report_10.txt' ORDER BY line_no") == [
        ("expected 15 fields, found 14",), ("expected 15 fields, found 16",)]
    assert env.query("SELECT line_no, reason FROM errors WHERE source_file = 'report_11.txt'") == [
        (3, "malformed_quotes")]
    assert env.query("SELECT line_no, length(raw_line) FROM errors WHERE source_file = 'report_12.txt'") == [
        (3, 10_000_000)]
    assert env.query("SELECT line_no, reason FROM errors WHERE source_file = 'report_14.txt'") == [
        (802, "nul_byte")]
    assert reasons("report_16.txt") == ["invalid_date"] * 7 + ["missing_date"]
    assert reasons("report_17.txt") == ["invalid_count"] * 3
    assert reasons("report_18.txt") == ["invalid_email"] * 2
    assert env.query("SELECT encoding FROM load_log WHERE file_name IN ('report_07.txt', 'report_08.txt')"
                     " ORDER BY file_name") == [("utf-8-sig",), ("cp1252",)]
    assert env.query("SELECT navegadores, plataformas FROM statistics WHERE source_file = 'report_08.txt'") == [
        (["Explorador móvil"], ["Teléfono"])]
    assert env.query("SELECT jyv, navegadores FROM statistics WHERE source_file = 'report_19.txt'") == [
        ("'); DROP TABLE visitor; --", ["Robert'); DROP TABLE statistics;--"])]
    assert env.query("SELECT count(*) FROM visitor WHERE email = 'josé@ejemplo.mx'") == [(1,)]

    # Every file archived, loaded or not; the directory and the link left alone and not followed.
    members = {name.split(":", 1)[1] for name in env.zip_members()}
    for name, (status, _, _) in files.items():
        assert (name if status == "loaded" else f"rejected/{name}") in members
    assert sorted(p.name for p in env.remote_dir.iterdir()) == ["report_20.txt", "report_21.txt"]
    assert (outside / "secret.txt").read_text() == "not for you"
    assert "not a regular file" in env.log_file.read_text()
    # The 1 GB file never entered memory whole (this process's children: the luigi run).
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 1024 * 1024  # KiB: < 1 GiB
