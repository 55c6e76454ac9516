"""The load report's grouping, on tiny inline load_log rows."""

import datetime as dt

from visitas.ops import monthly


def _record(day, name, status="loaded", read=10, loaded=9, rejected=1, opened=6, clicked=3,
            reasons=None, warnings=None, host="a"):
    return {"run_date": day, "file_name": name, "host": host, "status": status, "rows_read": read,
            "rows_loaded": loaded, "rows_rejected": rejected, "visitors": 4,
            "warnings": warnings or {"open_before_send": 1, "mixed_encoding": 0},
            "error_reasons": reasons if reasons is not None else {"invalid_email": rejected},
            "size_bytes": 1000, "duration_s": 1.25, "rows_opened": opened, "rows_clicked": clicked}


RECORDS = [
    _record(dt.date(2026, 10, 30), "report_1.txt"),
    _record(dt.date(2026, 10, 31), "report_2.txt", status="rejected", read=0, loaded=0, rejected=0,
            opened=0, clicked=0, reasons={"binary_file": 1}),
    # loaded before migration 5: no opened/clicked counts, so outside the rates
    _record(dt.date(2026, 10, 31), "report_3.txt", loaded=10, rejected=0, opened=None, clicked=None),
    _record(dt.date(2026, 11, 2), "report_4.txt", status="failed", read=0, loaded=0, rejected=0,
            opened=None, clicked=None, reasons={"load_error": 1}),
]
FIRST, LAST = dt.date(2026, 10, 1), dt.date(2026, 11, 1)


def test_by_month_sums_and_rates_over_measured_rows_only():
    report = monthly.summarise(RECORDS, FIRST, LAST, "month")
    october, november, total = report.rows
    assert (october["month"], october["files_loaded"], october["files_rejected"],
            october["rows_loaded"], october["warnings"], october["bytes"], october["duration_s"]) == (
        "2026-10", 2, 1, 19, 3, 3000, 3.8)
    assert october["open_rate"] == round(6 / 9, 4) and october["click_rate"] == round(3 / 9, 4)
    assert october["error_reasons"] == {"invalid_email": 1, "binary_file": 1}
    assert november["files_failed"] == 1 and november["open_rate"] is None  # nothing measured
    assert total["total"] and total["rows_loaded"] == 19 and total["files_failed"] == 1


def test_by_file_has_a_total_per_month_and_by_day_one_row_per_date():
    by_file = monthly.summarise(RECORDS, FIRST, LAST, "file").rows
    assert [(r["month"], r["file_name"]) for r in by_file] == [
        ("2026-10", "report_1.txt"), ("2026-10", "report_2.txt"), ("2026-10", "report_3.txt"),
        ("2026-10", "TOTAL"), ("2026-11", "report_4.txt"), ("2026-11", "TOTAL")]
    by_day = monthly.summarise(RECORDS, FIRST, LAST, "day")
    assert [(r["day"], r["rows_loaded"]) for r in by_day.rows] == [
        ("2026-10-30", 9), ("2026-10-31", 10), ("2026-11-02", 0), ("TOTAL", 19)]
    assert by_day.per_day == [("2026-10-30", 9, 1), ("2026-10-31", 10, 0), ("2026-11-02", 0, 0)]
    assert by_day.reasons[0] == ("binary_file", 1) and len(by_day.reasons) == 3


def test_csv_and_json_leave_the_totals_out():
    report = monthly.summarise(RECORDS, FIRST, LAST, "file")
    assert "TOTAL" not in monthly.render(report, "csv") + monthly.render(report, "json")
    assert monthly.render(report, "table").count("TOTAL") == 2
    assert monthly.render(monthly.summarise([], FIRST, LAST), "table").startswith("no files")
