"""The bad-input corpus: every kind of broken file in one run, each with a clear, specific error,
the good rows of the same file loaded, the run finishing, and every file archived."""

from __future__ import annotations

import os
import random

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
    put("report_22.txt", ("\r".join([HEADER, *GOOD[:3]]) + "\r").encode(), "loaded", None, 3)
    put("report_23.txt", b"\xef\xbb\xbf" + ("\r\n".join([
        HEADER.replace("envio", "envío"), row(navegadores="Explorador móvil"), GOOD[0]]) + "\r\n")
        .encode("cp1252"), "loaded", None, 2)
    put("report_24.txt", (HEADER + "\n" + row(navegadores="Explorador móvil") + "\n").encode()
        + row(navegadores="Café Navegador").encode("cp1252") + b"\n"
        + (row(plataformas="Teléfono") + "\n").encode(), "loaded", None, 3)
    put("report_25.txt", _lines(HEADER, GOOD[0], "z" * (64 * 1024 * 1024), GOOD[1]), "loaded", None, 2)
    put("report_26.txt", _lines(HEADER, GOOD[0], "\x01\x02\x1f\x7f", "   ", GOOD[1]), "loaded", None, 2)
    put("report_27.txt", _lines(HEADER, row(fecha_envio="08/02/0000 10:00"), row(opens="３"),
                                row(fecha_open="３1/01/2013 10:00"), GOOD[0]), "loaded", None, 1)
    put("report_28.txt", _lines(HEADER, row(jyv="a\x00\x00b"), *GOOD), "loaded", None, 5)
    put("report_29.txt", _lines(HEADER, row(email="josé@ejemplo.mx"), row(email="jose\u0301@ejemplo.mx"),
                                row(email="ana@münchen.de"), row(email="Ana@xn--mnchen-3ya.de")),
        "loaded", None, 4)
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
    # The 1 GB file and the 64 MiB line never entered memory whole: the run's own process.
    assert result.max_rss_kib < 1024 * 1024  # KiB: < 1 GiB

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
    for name in ("report_12.txt", "report_25.txt"):  # kept: the line's first KiB
        assert env.query("SELECT line_no, reason, length(raw_line) FROM errors WHERE source_file = %s",
                         (name,)) == [(3, "line_too_long", 1024)]
    assert env.query("SELECT line_no, reason FROM errors WHERE source_file = 'report_14.txt'") == [
        (802, "nul_byte")]
    assert reasons("report_16.txt") == ["invalid_date"] * 7 + ["missing_date"]
    assert reasons("report_17.txt") == ["invalid_count"] * 3
    assert reasons("report_18.txt") == ["invalid_email"] * 2
    assert env.query("SELECT file_name, encoding, (warnings->>'mixed_encoding')::int FROM load_log"
                     " WHERE file_name IN ('report_07.txt', 'report_08.txt', 'report_22.txt',"
                     " 'report_23.txt', 'report_24.txt') ORDER BY file_name") == [
        ("report_07.txt", "utf-8-sig", 0), ("report_08.txt", "cp1252", 0),
        ("report_22.txt", "utf-8", 0), ("report_23.txt", "mixed", 1), ("report_24.txt", "mixed", 1)]
    # Each line decoded on its own: one stray byte spoils no other line.
    assert env.query("SELECT line_no, navegadores, plataformas FROM statistics"
                     " WHERE source_file = 'report_24.txt' ORDER BY line_no") == [
        (2, ["Explorador móvil"], ["Windows"]), (3, ["Café Navegador"], ["Windows"]),
        (4, ["IE 9.0"], ["Teléfono"])]
    assert env.query("SELECT navegadores FROM statistics WHERE source_file = 'report_23.txt'"
                     " ORDER BY line_no") == [(["Explorador móvil"],), (["IE 9.0"],)]
    assert env.query("SELECT line_no, reason FROM errors WHERE source_file = 'report_26.txt'"
                     " ORDER BY line_no") == [(3, "blank_line"), (4, "blank_line")]
    assert env.query("SELECT line_no, column_name, reason FROM errors WHERE source_file = 'report_27.txt'"
                     " ORDER BY line_no") == [(2, "Fecha envio", "invalid_date"),
                                              (3, "Opens", "invalid_count"),
                                              (4, "Fecha open", "invalid_date")]
    assert env.query("SELECT line_no, reason FROM errors WHERE source_file = 'report_28.txt'") == [
        (2, "nul_byte")]
    # One visitor per address, whatever its spelling; statistics keep what the file said.
    assert env.query("SELECT email, visitas_totales FROM visitor WHERE email IN"
                     " ('josé@ejemplo.mx', 'ana@münchen.de') ORDER BY email") == [
        ("ana@münchen.de", 2), ("josé@ejemplo.mx", 3)]
    assert env.query("SELECT count(DISTINCT email) FROM statistics WHERE source_file = 'report_29.txt'") == [
        (4,)]
    assert env.query("SELECT navegadores, plataformas FROM statistics WHERE source_file = 'report_08.txt'") == [
        (["Explorador móvil"], ["Teléfono"])]
    assert env.query("SELECT jyv, navegadores FROM statistics WHERE source_file = 'report_19.txt'") == [
        ("'); DROP TABLE visitor; --", ["Robert'); DROP TABLE statistics;--"])]

    # Every file archived, loaded or not; the directory and the link left alone and not followed.
    members = {name.split(":", 1)[1] for name in env.zip_members()}
    for name, (status, _, _) in files.items():
        assert (name if status == "loaded" else f"rejected/{name}") in members
    assert sorted(p.name for p in env.remote_dir.iterdir()) == ["report_20.txt", "report_21.txt"]
    assert (outside / "secret.txt").read_text() == "not for you"
    assert "not a regular file" in env.log_file.read_text()
