"""The report contract: header, row checks, typing, outputs (tiny inline data)."""

import datetime as dt

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from visitas.transform import contract

from ..conftest import GOOD_ROW, HEADER, row


# ---------------------------------------------------------------- header

@pytest.mark.parametrize("second", ["jk", "jyv", "fgh", "anything"])
def test_header_accepts_any_second_name(second):
    contract.check_header(HEADER.replace("jyv", second))


def test_header_compares_case_and_accent_insensitively():
    contract.check_header("\ufeff" + HEADER.replace("Fecha envio", "FECHA ENVÍO").replace("IPs", "ips") + "\r\n")


@pytest.mark.parametrize("header, reason, words", [
    (HEADER.rsplit(",", 1)[0], "header_columns", "14 columns"),
    (HEADER + ",Extra", "header_columns", "16 columns"),
    (HEADER.replace("Badmail", "Bad mail"), "header_names", "column 3 is 'Bad mail'"),
    (GOOD_ROW, "no_header", "looks like data"),
    ("", "no_header", "empty"),
])
def test_header_rejections_name_the_problem(header, reason, words):
    with pytest.raises(contract.FileRejected) as caught:
        contract.check_header(header)
    assert caught.value.reason == reason
    assert words in caught.value.message


@pytest.mark.parametrize("line, offset", [(b"abc\x00def", 3), (b"\x07email", 0), (b"a,b\x1bc", 3)])
def test_a_first_line_with_control_bytes_is_binary(line, offset):
    with pytest.raises(contract.FileRejected, match=f"at offset {offset} of the first line") as caught:
        contract.check_text_header(line)
    assert caught.value.reason == "binary_file"


def test_a_text_header_passes():
    contract.check_text_header(HEADER.encode())
    contract.check_text_header("email,jk,Fecha envío\t".encode("cp1252"))


# ---------------------------------------------------------------- encoding, line by line

@pytest.mark.parametrize("data, text, cp1252", [
    (b"plain", "plain", False),
    ("Explorador móvil".encode("utf-8"), "Explorador móvil", False),
    ("Explorador móvil".encode("cp1252"), "Explorador móvil", True),
    (b"\x81 undefined in cp1252", "\ufffd undefined in cp1252", True),
])
def test_each_line_is_utf8_or_else_windows_1252(data, text, cp1252):
    assert contract.decode_line(data) == (text, cp1252)


def test_one_stray_byte_spoils_only_its_own_line():
    data = "Navegación\n".encode() + "móvil\n".encode("cp1252") + "acción\n".encode()
    frame, utf8_non_ascii = contract.lines_frame(data, first_line_no=2)
    assert frame["line"].to_list() == ["Navegación", "móvil", "acción"]
    assert frame["cp1252"].to_list() == [False, True, False]
    assert utf8_non_ascii


# ---------------------------------------------------------------- lines

def _lines(data: bytes, **kwargs) -> list[tuple]:
    frame, _ = contract.lines_frame(data, first_line_no=2, **kwargs)
    return list(frame.select("line_no", "line").iter_rows())


def test_lf_crlf_and_a_lone_cr_all_end_lines():
    assert _lines(b"a\r\nb\nc\rd\r\re") == [(2, "a"), (3, "b"), (4, "c"), (5, "d"), (7, "e")]


def test_empty_lines_are_not_rows_but_keep_the_numbering():
    assert _lines(b"a\n\r\n\nb\n") == [(2, "a"), (5, "b")]


def test_a_line_of_spaces_or_control_characters_is_a_row():
    assert _lines(b"a\n \t\n\x01\x02\nb") == [(2, "a"), (3, " \t"), (4, "\x01\x02"), (5, "b")]


@pytest.mark.parametrize("data, lines", [
    (b"a\x01b\nc\n", ["a\x01b", "c"]),           # Polars' reader would see two fields
    (b"\xef\xbb\xbfa\nb", ["\ufeffa", "b"]),       # a BOM inside the file is data, not stripped
    (b'x,"open\ny\n', ['x,"open', "y"]),           # a quote never joins lines
    (b"a\x00\x00b\nc", ["a\x00\x00b", "c"]),       # NUL bytes stay in their line
    (b"", []),
])
def test_lines_frame_keeps_every_byte_of_every_line(data, lines):
    frame, _ = contract.lines_frame(data, first_line_no=2)
    assert frame["line"].to_list() == lines
    assert frame["line_no"].to_list() == list(range(2, 2 + len(lines)))


def test_a_line_over_the_limit_keeps_only_its_start():
    frame, _ = contract.lines_frame(b"short\n" + b"x" * 3000 + b"\nok\n", 2, max_line_bytes=2000)
    assert frame["too_long"].to_list() == [False, True, False]
    assert [len(line) for line in frame["line"]] == [5, contract.EXCERPT_BYTES, 2]


def test_line_ends_are_counted_like_the_splitter_splits():
    assert contract.count_line_ends(b"a\r\nb\nc\rd\r\r") == 5


def test_split_line_unquotes_multi_value_fields():
    assert contract.split_line('a,"65.49.14.78,65.49.14.93","IE 9.0,","0,3",-,') == [
        "a", "65.49.14.78,65.49.14.93", "IE 9.0,", "0,3", "-", ""]
    assert contract.split_line('"say ""hi""",x') == ['say "hi"', "x"]


# ---------------------------------------------------------------- good rows

def test_good_row_is_typed(check):
    stats = contract.statistics_rows(check(GOOD_ROW).lazy(), "report_1.txt").collect()
    expected = pl.DataFrame([{
        "email": "ana@example.com", "jyv": "1", "badmail": None, "baja": None,
        "fecha_envio": dt.datetime(2013, 2, 8, 18, 30), "fecha_open": dt.datetime(2013, 2, 8, 19, 0),
        "opens": 2, "opens_virales": 0, "fecha_click": None, "clicks": 0, "clicks_virales": 0,
        "links": None, "ips": ["65.49.14.78", "65.49.14.93"], "navegadores": ["IE 9.0"],
        "plataformas": ["Windows"], "source_file": "report_1.txt", "line_no": 2,
        "abierto": True, "clicado": False, "minutos_a_open": 30, "minutos_a_click": None,
        "opens_totales": 2, "clicks_totales": 0, "num_links": 0,
    }], schema=contract.STATISTICS_SCHEMA)
    assert_frame_equal(stats, expected)


def test_checked_batches_with_the_values_already_split_still_load(check):
    """Checked batches written before the multi-value fields were left as text (a run resumed
    across the upgrade) give the same statistics rows."""
    checked = check(GOOD_ROW)
    assert checked.schema["ips"] == pl.String
    old = checked.with_columns(
        pl.Series("links", [None], dtype=pl.List(pl.String)),
        pl.Series("ips", [["65.49.14.78", "65.49.14.93"]]),
        pl.Series("navegadores", [["IE 9.0"]]), pl.Series("plataformas", [["Windows"]]))
    stats = contract.statistics_rows(old.lazy(), "report_1.txt").collect()
    assert stats.select(contract.LIST_COLUMNS).row(0) == (
        None, ["65.49.14.78", "65.49.14.93"], ["IE 9.0"], ["Windows"])
    assert_frame_equal(stats, contract.statistics_rows(checked.lazy(), "report_1.txt").collect())


METRICS = ("abierto", "clicado", "minutos_a_open", "minutos_a_click", "opens_totales",
           "clicks_totales", "num_links")


@pytest.mark.parametrize(("changes", "expected"), [
    # an open and a click a day later, with viral ones and two links
    (dict(fecha_click="09/02/2013 18:45", clicks="3", clicks_virales="2", opens_virales="4",
          links="http://a.mx/1,http://a.mx/2"),
     (True, True, 30, 1455, 6, 5, 2)),
    # no open date, but opens counted: opened; a click date alone: clicked
    (dict(fecha_open="-", opens="1", fecha_click="08/02/2013 18:31", clicks="0"),
     (True, True, None, 1, 1, 0, 0)),
    # nothing: not opened, not clicked, no minutes
    (dict(fecha_open="-", opens="0"), (False, False, None, None, 0, 0, 0)),
    # viral opens alone are someone else's: not opened by the visitor
    (dict(fecha_open="-", opens="0", opens_virales="5"), (False, False, None, None, 5, 0, 0)),
    # dates before the send keep their negative minutes (the *_before_send warnings flag them)
    (dict(fecha_open="08/02/2013 18:00", fecha_click="07/02/2013 18:30"),
     (True, True, -30, -1440, 2, 0, 0)),
    # missing counts: a total is null only when both of its counts are missing
    (dict(opens="-", opens_virales="", clicks="", clicks_virales="7"),
     (True, False, 30, None, None, 7, 0)),
])
def test_row_metrics(check, changes, expected):
    stats = contract.statistics_rows(check(row(**changes)).lazy(), "f").collect()
    assert stats.select(METRICS).row(0) == expected


def test_visits_carry_their_engagement_and_only_valid_rows_are_visits(check):
    checked = check(row(), row(fecha_open="-", opens="0", clicks="1", opens_virales="2"),
                    row(fecha_envio="x"))
    visits = contract.visits(checked.lazy()).collect()
    assert visits.select("opened", "clicked", "opens", "clicks", "opened_on").rows() == [
        (True, False, 2, 0, dt.date(2013, 2, 8)), (False, True, 2, 1, None)]


def test_statistics_keep_the_trimmed_email_and_visits_use_the_lower_cased_key(check):
    checked = check(row(email="  Ana.Perez@Example.COM ")).lazy()
    assert contract.statistics_rows(checked, "f").collect()["email"].to_list() == [
        "Ana.Perez@Example.COM"]
    assert contract.visits(checked).collect()["email"].to_list() == ["ana.perez@example.com"]


@pytest.mark.parametrize("spellings", [
    ["josé@ejemplo.mx", "jose\u0301@ejemplo.mx", "JOSÉ@Ejemplo.MX"],   # NFC, NFD, case
    ["ana@münchen.de", "ana@xn--mnchen-3ya.de", "Ana@MÜNCHEN.de"],    # Unicode and IDNA domain
])
def test_one_address_in_several_spellings_is_one_visitor(check, spellings):
    visits = contract.visits(check(*(row(email=e) for e in spellings)).lazy()).collect()
    assert visits.height == len(spellings)
    assert visits["email"].n_unique() == 1


def test_dash_and_empty_are_null(check):
    checked = check(row(jyv="-", badmail="", baja="-", fecha_open="", ips="-", navegadores=""))
    stats = contract.statistics_rows(checked.lazy(), "f").collect()
    assert stats.select("jyv", "badmail", "baja", "fecha_open", "ips", "navegadores").row(0) == (
        None, None, None, None, None, None)


def test_open_before_send_is_valid_but_warned(check):
    checked = check(row(fecha_open="01/02/2013 10:00"), row(baja="SI", opens="3"),
                    row(fecha_open="-", fecha_click="09/02/2013 10:00"))
    stats = contract.statistics_rows(checked.lazy(), "f").collect()
    assert stats.height == 3
    warnings = contract.warning_counts(checked.lazy()).collect().row(0, named=True)
    assert warnings == {"open_before_send": 1, "click_before_send": 0,
                        "click_without_open": 1, "baja_with_activity": 1, "mixed_encoding": 0}


def test_warnings_count_valid_rows_only_and_every_windows_1252_line(check):
    checked = check(row(fecha_open="01/02/2013 10:00"), row(fecha_open="01/02/2013 10:00", opens="x"))
    checked = checked.with_columns(pl.Series("cp1252", [False, True]))
    warnings = contract.warning_counts(checked.lazy()).collect().row(0, named=True)
    assert (warnings["open_before_send"], warnings["mixed_encoding"]) == (1, 1)


def test_duplicate_emails_within_a_file_are_two_visits(check):
    checked = check(GOOD_ROW, row(fecha_envio="09/03/2013 10:00"))
    visits = contract.visits(checked.lazy()).collect()
    assert visits.height == 2 and visits["email"].n_unique() == 1


# ---------------------------------------------------------------- bad rows

@pytest.mark.parametrize("value", ["08/020/2013 18:30", "31/02/2013 10:00", "2013-02-08 18:30",
                                   "8/2/2013 18:30", "08/02/2013 24:00", "08/02/13 18:30"])
def test_invalid_send_dates(errors_of, value):
    assert errors_of(row(fecha_envio=value)) == [
        (2, "Fecha envio", "invalid_date",
         f"Fecha envio '{value}' is not a real date-time in dd/mm/yyyy HH:mm")]


@pytest.mark.parametrize("value", ["", "-"])
def test_missing_send_date(errors_of, value):
    assert errors_of(row(fecha_envio=value)) == [
        (2, "Fecha envio", "missing_date", "Fecha envio is empty (required)")]


@pytest.mark.parametrize("column, header", [("fecha_open", "Fecha open"), ("fecha_click", "Fecha click")])
def test_invalid_optional_dates(errors_of, column, header):
    assert [e[1:3] for e in errors_of(row(**{column: "30/02/2013 10:00"}))] == [(header, "invalid_date")]


@pytest.mark.parametrize("value", ["-1", "dos", "1.5", "1e3", "99999999999999999999"])
def test_counts_must_be_non_negative_integers(errors_of, value):
    found = errors_of(row(clicks=value))
    assert found == [(2, "Clicks", "invalid_count", f"Clicks '{value}' is not a non-negative integer")]


@pytest.mark.parametrize("value", ["juan perez@example.com", "ana@@example.com", "sin-arroba.com",
                                   "x@", "@example.com", "a@b"])
def test_invalid_emails(errors_of, value):
    [(line_no, column, reason, message)] = errors_of(row(email=value))
    assert (line_no, column, reason) == (2, "email", "invalid_email")
    assert f"'{value}'" in message


def test_unicode_email_is_checked_by_email_validator(errors_of):
    assert errors_of(row(email="josé@ejemplo.mx")) == []


@pytest.mark.parametrize("line, found", [
    (GOOD_ROW.rsplit(",", 1)[0], 14),
    (GOOD_ROW + ",extra", 16),
    ("solo,tres,campos", 3),
])
def test_field_count(errors_of, line, found):
    assert errors_of(line) == [(2, "(line)", "field_count", f"expected 15 fields, found {found}")]


def test_unclosed_quote_only_rejects_its_own_line(errors_of, check):
    lines = ['"' + GOOD_ROW, GOOD_ROW]
    assert [e[:3] for e in errors_of(*lines)] == [(2, "(line)", "malformed_quotes")]
    assert contract.statistics_rows(check(*lines).lazy(), "f").collect()["line_no"].to_list() == [3]


def test_one_row_reports_every_error(errors_of):
    found = errors_of(row(email="mal", fecha_envio="2013-02-08", opens="-2", clicks="x"))
    assert [e[2] for e in found] == ["invalid_email", "invalid_date", "invalid_count", "invalid_count"]
    assert {e[0] for e in found} == {2}


def test_error_rows_keep_the_raw_line(check):
    bad = row(opens="x")
    errors = contract.error_rows(check(GOOD_ROW, bad).lazy(), "report_9.txt").collect()
    assert errors.select("source_file", "line_no", "raw_line").rows() == [("report_9.txt", 3, bad)]


def test_every_row_is_statistics_or_error_never_both(check):
    checked = check(GOOD_ROW, row(opens="x"), "a,b", row(email="x@"), row(fecha_open="-"))
    stats = contract.statistics_rows(checked.lazy(), "f").collect()["line_no"].to_list()
    errors = set(contract.error_rows(checked.lazy(), "f").collect()["line_no"].to_list())
    assert sorted(stats + list(errors)) == [2, 3, 4, 5, 6]
    assert not set(stats) & errors


def test_each_distinct_unusual_email_is_validated_once_by_email_validator():
    seen: list[list[str]] = []

    def counting_checker(addresses):
        seen.append(list(addresses))
        return contract.check_emails(addresses)

    lines = [GOOD_ROW, GOOD_ROW, row(email="josé@ejemplo.mx"), row(email="josé@ejemplo.mx"),
             row(email="x@ejemplo.test")]
    frame, _ = contract.lines_frame("\n".join(lines).encode(), first_line_no=2)
    contract.validate_lines(frame, counting_checker)
    assert len(seen) == 1 and sorted(seen[0]) == ["josé@ejemplo.mx", "x@ejemplo.test"]


@pytest.mark.parametrize("address, plain", [
    ("ana.perez+promo@mail.example.com.mx", True),
    ("A_B-C@Sub-Domain.Example.COM", True),
    ("a@b.test", False), ("a@b.LOCAL", False), ("a@xn--bcher-kva.com", False),
    ("a..b@x.com", False), (".a@x.com", False), ("a@x", False), ("a@x.c0m", False),
    ("a@-x.com", False), ("josé@x.com", False), ('"a b"@x.com', False),
    ("a" * 65 + "@x.com", False), ("a@" + "b" * 64 + ".com", False),
])
def test_plain_email_fast_path(address, plain):
    frame = pl.DataFrame({"email": [address]})
    assert frame.select(contract.is_plain_email(pl.col("email"))).item() is plain


@settings(max_examples=400, deadline=None)
@given(st.from_regex(contract.PLAIN_EMAIL_PATTERN, fullmatch=True))
def test_email_validator_accepts_every_plain_email(address):
    """The fast path never accepts what email-validator would refuse."""
    from email_validator import validate_email

    frame = pl.DataFrame({"email": [address]})
    if frame.select(contract.is_plain_email(pl.col("email"))).item():
        validate_email(address, check_deliverability=False)
