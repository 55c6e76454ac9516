"""Deterministic, realistic sample reports (for the demo, the tests and the benchmark).

    python -m visitas.dev.sample OUTDIR --files 3 --rows 500 --seed 7 --defects 0.05

Reproduces the partner's quirks: CRLF and LF line ends, UTF-8 with and without BOM and
Windows-1252 files, a varying 2nd header name, accents in header names, quoted multi-value
fields, ``-`` and empty as null, opens before sends, clicks without opens, ``Baja = SI`` with
activity, duplicate emails within a file and repeat visitors across files, months and years.

With ``--defects F`` a fraction F of rows carries exactly one planted defect, of each kind in
turn; ``manifest.json`` (next to the reports unless ``--manifest`` says otherwise) lists every
file's expected counts and the line number and kind of each defect, and ``truth.parquet`` the
``email, sent_at`` of every valid row (the visits).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import polars as pl

DEFECT_KINDS = (
    "field_count_14", "field_count_16", "invalid_email", "missing_date", "invalid_date",
    "invalid_open_date", "negative_count", "non_numeric_count", "malformed_quotes",
)
INVALID_DATES = ("08/020/2013 18:30", "31/02/2013 10:00", "2013-02-08 18:30", "8/2/2013 18:30")
INVALID_EMAILS = ("juan perez@example.com", "ana@@example.com", "no-at-sign.example.com", "x@", "@y.com")
SECOND_HEADER = ("jk", "jyv", "fgh")
DOMAINS = ("gmail.com", "hotmail.com", "yahoo.com.mx", "outlook.com", "prodigy.net.mx", "empresa.mx")
BROWSERS = ("IE 9.0", "Chrome 31.0", "Firefox 25.0", "Safari 7.0", "Explorador móvil", "Opera 12.1")
PLATFORMS = ("Windows", "Mac OS X", "Linux", "Android", "iOS", "Windows Phone")
LINKS = ("http://vinkos.com/promo", "http://vinkos.com/baja", "http://tienda.mx/oferta?id=7")
FIRST_DAY = dt.datetime(2024, 1, 1)
SPAN_MINUTES = int((dt.datetime(2026, 11, 27) - FIRST_DAY).total_seconds() // 60)
ENCODINGS = ("utf-8", "cp1252", "utf-8-sig")


def header(file_index: int, accents: bool) -> str:
    envio = "Fecha envío" if accents else "Fecha envio"
    return ",".join([
        "email", SECOND_HEADER[file_index % 3], "Badmail", "Baja", envio, "Fecha open", "Opens",
        "Opens virales", "Fecha click", "Clicks", "Clicks virales", "Links", "IPs", "Navegadores",
        "Plataformas",
    ])


def _pick(values: tuple, n: int, seed: int) -> pl.Series:
    return pl.Series(values).sample(n, with_replacement=True, seed=seed)


def _fmt(when: pl.Expr) -> pl.Expr:
    return when.dt.strftime("%d/%m/%Y %H:%M")


def _quoted_list(column: pl.Expr) -> pl.Expr:
    return pl.concat_str(pl.lit('"'), column, pl.lit('"'))


ENGAGEMENT = ("opened", "clicked", "opens_total", "clicks_total", "opened_on", "clicked_on")


def report_frame(rows: int, seed: int, visitors: int, file_index: int,
                 defect_rate: float) -> pl.DataFrame:
    """One report's rows: ``line_no, line, defect, email_key, sent_at`` (sent_at null if
    defective) and the engagement each row states (``opened, clicked, opens_total, clicks_total,
    opened_on, clicked_on``)."""
    s = seed * 1000 + file_index * 17
    idx = pl.int_range(0, rows, eager=True)
    visitor = pl.Series(range(visitors)).sample(rows, with_replacement=True, seed=s)
    email_key = pl.concat_str(pl.lit("visitante"), pl.col("visitor").cast(pl.String), pl.lit("@"),
                              pl.lit(pl.Series(DOMAINS)).gather(pl.col("visitor") % len(DOMAINS)))
    sent = pl.Series(range(SPAN_MINUTES)).sample(rows, with_replacement=True, seed=s + 2)
    open_delta = pl.Series(range(-600, 4000)).sample(rows, with_replacement=True, seed=s + 3)
    roll = pl.Series(range(100)).sample(rows, with_replacement=True, seed=s + 4)
    frame = pl.DataFrame({
        "i": idx, "visitor": visitor, "sent_min": sent, "open_delta": open_delta, "roll": roll,
        "browser1": _pick(BROWSERS, rows, s + 5), "browser2": _pick(BROWSERS, rows, s + 6),
        "platform": _pick(PLATFORMS, rows, s + 7), "link": _pick(LINKS, rows, s + 8),
        "ip3": pl.Series(range(256)).sample(rows, with_replacement=True, seed=s + 9),
        "opens": pl.Series(range(0, 6)).sample(rows, with_replacement=True, seed=s + 10),
        "clicks": pl.Series(range(0, 3)).sample(rows, with_replacement=True, seed=s + 11),
    }).with_columns(email_key.alias("email_key")).drop("i", "visitor")
    sent_at = pl.lit(FIRST_DAY) + pl.duration(minutes=pl.col("sent_min"))
    opened_at = sent_at + pl.duration(minutes=pl.col("open_delta"))
    has_open = pl.col("roll") < 70
    has_click = (pl.col("roll") < 35) | (pl.col("roll") > 96)  # >96: a click without an open
    # Mixed case and stray spaces in the raw email; the key is trimmed and lower-cased.
    raw_email = (
        pl.when(pl.col("roll") % 10 == 3).then(pl.col("email_key").str.to_uppercase())
        .when(pl.col("roll") % 10 == 4).then(pl.concat_str(pl.lit(" "), pl.col("email_key"), pl.lit(" ")))
        .otherwise(pl.col("email_key"))
    )
    fields = [
        raw_email,
        pl.when(pl.col("roll") % 3 == 0).then(pl.lit("1")).otherwise(pl.lit("")),
        pl.when(pl.col("roll") == 5).then(pl.lit("SI")).otherwise(pl.lit("")),
        pl.when(pl.col("roll") % 20 == 1).then(pl.lit("SI")).otherwise(pl.lit("")),
        _fmt(sent_at),
        pl.when(has_open).then(_fmt(opened_at)).otherwise(pl.lit("-")),
        pl.when(has_open).then(pl.col("opens") + 1).otherwise(0).cast(pl.String),
        (pl.col("roll") % 2).cast(pl.String),
        pl.when(has_click).then(_fmt(opened_at + pl.duration(minutes=5))).otherwise(pl.lit("-")),
        pl.when(has_click).then(pl.col("clicks") + 1).otherwise(0).cast(pl.String),
        pl.lit("0"),
        pl.when(has_click).then(pl.col("link")).otherwise(pl.lit("-")),
        pl.when(pl.col("roll") % 4 == 0).then(_quoted_list(pl.format(
            "65.49.14.{},65.49.14.{}", pl.col("ip3"), (pl.col("ip3") + 15) % 256)))
        .otherwise(pl.format("187.190.{}.9", pl.col("ip3"))),
        pl.when(pl.col("roll") % 5 == 0).then(_quoted_list(pl.concat_str(pl.col("browser1"), pl.lit(","))))
        .when(pl.col("roll") % 5 == 1)
        .then(_quoted_list(pl.format("{},{}", pl.col("browser1"), pl.col("browser2"))))
        .otherwise(pl.col("browser1")),
        pl.when(pl.col("roll") % 7 == 0).then(pl.lit("-")).otherwise(pl.col("platform")),
    ]
    names = [f"f{k}" for k in range(15)]
    frame = frame.with_columns(*[f.alias(n) for f, n in zip(fields, names, strict=True)],
                               sent_at.alias("sent_at"))
    frame = _plant_defects(frame, defect_rate, s + 12)
    line = pl.concat_str([pl.col(n) for n in names], separator=",")
    line = (
        pl.when(pl.col("defect") == "field_count_14")
        .then(pl.concat_str([pl.col(n) for n in names[:14]], separator=","))
        .when(pl.col("defect") == "field_count_16").then(pl.concat_str(line, pl.lit(",extra")))
        .when(pl.col("defect") == "malformed_quotes").then(pl.concat_str(pl.lit('"'), line))
        .otherwise(line)
    )
    return frame.select(
        (pl.int_range(0, pl.len()) + 2).cast(pl.Int64).alias("line_no"),
        line.alias("line"),
        "defect",
        "email_key",
        pl.when(pl.col("defect").is_null()).then(pl.col("sent_at")).alias("sent_at"),
        # What each row says of engagement, as written above (the truth of the metrics).
        has_open.alias("opened"), has_click.alias("clicked"),
        (pl.when(has_open).then(pl.col("opens") + 1).otherwise(0) + pl.col("roll") % 2)
        .cast(pl.Int64).alias("opens_total"),
        pl.when(has_click).then(pl.col("clicks") + 1).otherwise(0).cast(pl.Int64).alias("clicks_total"),
        pl.when(has_open).then(opened_at.dt.date()).alias("opened_on"),
        pl.when(has_click).then((opened_at + pl.duration(minutes=5)).dt.date()).alias("clicked_on"),
    )


def _plant_defects(frame: pl.DataFrame, rate: float, seed: int) -> pl.DataFrame:
    n = frame.height
    count = int(round(n * rate))
    defect = pl.Series("defect", [None] * n, dtype=pl.String)
    if count:
        rows = pl.Series(range(n)).sample(count, seed=seed).sort()
        kinds = pl.Series([DEFECT_KINDS[k % len(DEFECT_KINDS)] for k in range(count)])
        defect = defect.scatter(rows, kinds)
    frame = frame.with_columns(defect)
    d = pl.col("defect")
    bad_date = pl.lit(pl.Series(INVALID_DATES)).gather(pl.col("roll") % len(INVALID_DATES))
    bad_email = pl.lit(pl.Series(INVALID_EMAILS)).gather(pl.col("roll") % len(INVALID_EMAILS))
    return frame.with_columns(
        pl.when(d == "invalid_email").then(bad_email).otherwise(pl.col("f0")).alias("f0"),
        pl.when(d == "missing_date").then(pl.lit(""))
        .when(d == "invalid_date").then(bad_date).otherwise(pl.col("f4")).alias("f4"),
        pl.when(d == "invalid_open_date").then(bad_date).otherwise(pl.col("f5")).alias("f5"),
        pl.when(d == "negative_count").then(pl.lit("-3"))
        .when(d == "non_numeric_count").then(pl.lit("dos")).otherwise(pl.col("f6")).alias("f6"),
    )


def write_report(frame: pl.DataFrame, path: Path, file_index: int, encoding: str,
                 crlf: bool) -> None:
    eol = "\r\n" if crlf else "\n"
    body = frame.get_column("line").str.join(eol).item()
    text = header(file_index, accents=file_index % 2 == 0) + eol + body + eol
    data = text.encode(encoding)
    path.write_bytes(data)


def generate(out_dir: Path, files: int = 3, rows: int = 500, seed: int = 7,
             defects: float = 0.0, visitors: int | None = None, first_number: int = 1,
             manifest: Path | None = None) -> dict:
    """Write ``files`` reports into ``out_dir``; return (and write) the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    visitors = visitors or max(1, rows * files // 4)
    result: dict = {"seed": seed, "files": {}}
    truth_parts = []
    for k in range(files):
        name = f"report_{first_number + k}.txt"
        frame = report_frame(rows, seed, visitors, k, defects)
        encoding = ENCODINGS[k % len(ENCODINGS)]
        write_report(frame, out_dir / name, k, encoding, crlf=k % 3 != 2)
        planted = frame.filter(pl.col("defect").is_not_null())
        result["files"][name] = {
            "rows": frame.height,
            "valid_rows": frame.height - planted.height,
            "rejected_rows": planted.height,
            "encoding": encoding,
            "defects": {kind: planted.filter(pl.col("defect") == kind).get_column("line_no").to_list()
                        for kind in DEFECT_KINDS},
        }
        truth_parts.append(frame.filter(pl.col("defect").is_null())
                           .select(pl.lit(name).alias("source_file"), "line_no",
                                   pl.col("email_key").alias("email"), "sent_at", *ENGAGEMENT))
    manifest = manifest or out_dir / "manifest.json"
    manifest.write_text(json.dumps(result, indent=1))
    pl.concat(truth_parts).write_parquet(manifest.with_name("truth.parquet"))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visitas.dev.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--files", type=int, default=3)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--defects", type=float, default=0.0, help="fraction of defective rows")
    parser.add_argument("--visitors", type=int, default=None, help="distinct visitors in the pool")
    parser.add_argument("--first-number", type=int, default=1, help="n of the first report_<n>.txt")
    parser.add_argument("--manifest", type=Path, default=None)
    args = parser.parse_args(argv)
    result = generate(args.out_dir, args.files, args.rows, args.seed, args.defects,
                      args.visitors, args.first_number, args.manifest)
    for name, info in result["files"].items():
        print(f"{name}: {info['rows']} rows, {info['rejected_rows']} defective, {info['encoding']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
