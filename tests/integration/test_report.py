"""`visitas report` against a real load log: every figure checked with SQL of its own (or the
generator's truth), each grouping and format, and the HTML page rendered by headless Chromium."""

from __future__ import annotations

import csv
import html.parser
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

VISITAS = str(Path(sys.executable).with_name("visitas"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root, on a machine with no network: no sandbox, nothing fetched in the background.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


@pytest.fixture
def two_months(env):
    """Loads on three run dates over two months: bad rows, a rejected file, a duplicate."""
    october = env.generate(files=2, rows=120, defects=0.1)
    assert env.luigi("--date", "2026-10-30").returncode == 0
    env.generate(files=1, rows=90, defects=0.05, first_number=3, seed=3)
    (env.remote_dir / "report_8.txt").write_bytes(b"\x00\x01 not a report")
    assert env.luigi("--date", "2026-10-31").returncode == 0
    november = env.generate(files=2, rows=60, defects=0.08, first_number=4, seed=4)
    shutil.copyfile(october["dir"] / "report_1.txt", env.remote_dir / "report_9.txt")
    assert env.luigi("--date", "2026-11-02").returncode == 0
    return env, november


def _report(env, *args: str) -> str:
    done = subprocess.run([VISITAS, "report", "--month", "2026-10", "--to", "2026-11", *args],
                          cwd=env.tmp, env=env.environment(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


# Each month's figures, by SQL written here (the report groups in Python).
BY_MONTH = """
WITH f AS (SELECT *, to_char(run_date, 'YYYY-MM') AS month,
                  (SELECT coalesce(sum(value::bigint), 0) FROM jsonb_each_text(warnings)) AS warned
           FROM load_log)
SELECT month,
       count(*) FILTER (WHERE status = 'loaded'), count(*) FILTER (WHERE status = 'rejected'),
       count(*) FILTER (WHERE status = 'duplicate'), count(*) FILTER (WHERE status = 'failed'),
       sum(rows_read), sum(rows_loaded), sum(rows_rejected), sum(visitors), sum(size_bytes),
       sum(warned), round(sum(extract(epoch FROM finished_at - started_at))::numeric, 1)::float8
FROM f GROUP BY 1 ORDER BY 1
"""
FIGURES = ("month", "files_loaded", "files_rejected", "files_duplicate", "files_failed", "rows_read",
           "rows_loaded", "rows_rejected", "visitors", "bytes", "warnings", "duration_s")


def test_every_grouping_and_format_matches_the_load_log(two_months):
    env, november = two_months
    expected = [dict(zip(FIGURES, row, strict=True)) for row in env.query(BY_MONTH)]
    by_month = json.loads(_report(env, "--by", "month", "--format", "json"))
    assert [{k: r[k] for k in FIGURES} for r in by_month] == expected  # and no TOTAL row
    assert expected[0]["files_rejected"] == 1 and expected[1]["files_duplicate"] == 1
    # Error reasons survive the daily emptying of errors: November's are still in the table.
    november_reasons = dict(env.query("SELECT reason, count(*) FROM errors GROUP BY reason"))
    assert by_month[1]["error_reasons"] == november_reasons
    assert sum(by_month[0]["error_reasons"].values()) == env.query(
        "SELECT sum(error_count) FROM load_log WHERE run_date < '2026-11-01'")[0][0]
    truth = env.truth(november)
    assert (by_month[1]["open_rate"], by_month[1]["click_rate"]) == (
        round(truth["opened"].sum() / truth.height, 4), round(truth["clicked"].sum() / truth.height, 4))

    by_day = json.loads(_report(env, "--by", "day", "--format", "json"))
    assert [(r["day"], r["rows_loaded"]) for r in by_day] == env.query(
        "SELECT run_date::text, sum(rows_loaded) FROM load_log GROUP BY 1 ORDER BY 1")
    by_file = list(csv.DictReader(io.StringIO(_report(env, "--format", "csv"))))
    assert [(r["file_name"], int(r["rows_read"])) for r in by_file] == env.query(
        "SELECT file_name, rows_read FROM load_log ORDER BY id")  # one row per file, no TOTAL
    assert {r["host"] for r in by_file} == {h for (h,) in env.query("SELECT DISTINCT host FROM load_log")}

    table = _report(env).splitlines()
    assert table[0].split() == [
        "month", "file_name", "host", "files_loaded", "files_rejected", "files_duplicate",
        "files_failed", "rows_read", "rows_loaded", "rows_rejected", "visitors", "warnings", "bytes",
        "duration_s", "open_rate", "click_rate"]
    totals = [line.split() for line in table if " TOTAL " in f" {line} "]
    # month, TOTAL, (no host), files x4, rows_read, rows_loaded...
    assert len(totals) == 2 and totals[1][7] == str(expected[1]["rows_loaded"])
    assert len({len(line) for line in table[:3]}) == 1  # aligned columns


class _Page(html.parser.HTMLParser):
    """The summary table's rows (cell text by data-column) and the reasons table, from the DOM."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []
        self.reasons: dict[str, int] = {}
        self._column: str | None = None
        self._table: str | None = None
        self._reason: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id")
        elif tag == "tr" and self._table == "summary" and attrs.get("class") in ("row", "total"):
            self.rows.append({"total": attrs["class"] == "total"})
        elif tag == "td":
            self._column = attrs.get("data-column")

    def handle_data(self, data):
        if self._column is None:
            return
        if self._table == "summary":
            self.rows[-1][self._column] = data
        elif self._table == "reasons" and self._column == "reason":
            self._reason = data
        elif self._table == "reasons" and self._column == "count":
            self.reasons[self._reason] = int(data)

    def handle_endtag(self, tag):
        if tag == "td":
            self._column = None


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")
def test_the_html_page_renders_and_shows_the_load_logs_figures(two_months, tmp_path):
    from PIL import Image

    env, _ = two_months
    page = tmp_path / "report.html"
    page.write_text(_report(env, "--by", "month", "--format", "html"))
    assert "<script" not in page.read_text() and "http" not in page.read_text().replace(
        'xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    profile = tmp_path / "chromium-profile"
    common = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    shot = tmp_path / "report.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1400,1100", page.as_uri()],
                   capture_output=True, timeout=180, env={**os.environ, "HOME": str(tmp_path)})
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 1100)
    counts = {color: n for n, color in image.getcolors(maxcolors=1 << 24)}
    ink = sum(n for color, n in counts.items() if color != (255, 255, 255))
    assert ink > 0.02 * 1400 * 1100  # not blank: text, table rules, bars
    colors = set(counts)
    for bar in ((0x2E, 0x85, 0x40), (0xD8, 0x39, 0x33), (0x20, 0x54, 0x93)):  # loaded, rejected, reasons
        assert any(sum(abs(a - b) for a, b in zip(c, bar, strict=True)) < 12 for c in colors), bar

    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=180, env={**os.environ, "HOME": str(tmp_path)}).stdout
    parsed = _Page()
    parsed.feed(dom)
    months = [r for r in parsed.rows if not r["total"]]
    expected = env.query(BY_MONTH)
    assert [tuple(r[c] for c in FIGURES[:9]) for r in months] == [
        tuple(str(v) for v in row[:9]) for row in expected]
    [total] = [r for r in parsed.rows if r["total"]]
    assert total["rows_loaded"] == str(sum(row[6] for row in expected))
    assert parsed.reasons == {reason: count for reason, count in env.query(
        "SELECT key, sum(value::bigint) FROM load_log, jsonb_each_text(error_reasons)"
        " GROUP BY key")}
