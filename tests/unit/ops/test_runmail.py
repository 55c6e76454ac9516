"""The run mail's pure parts: composing the mail, pruning old failure records."""

from visitas.ops import runmail as notify


def _report(**extra):
    base = {"run_id": "abc", "run_date": "2026-11-28", "reasons": [], "errors": [],
            "failures": [], "database_error": None, "files": [
                {"file_name": "report_1.txt", "status": "loaded", "rows_read": 10, "rows_loaded": 9,
                 "rows_rejected": 1, "rows_opened": 6, "rows_clicked": 3, "message": None},
                {"file_name": "report_2.txt", "status": "duplicate", "rows_read": 0,
                 "rows_loaded": 0, "rows_rejected": 0, "rows_opened": 0, "rows_clicked": 0,
                 "message": "same content as report_1.txt"}]}
    return {**base, **extra}


def test_subject_counts_and_capped_attachment():
    errors = [{"source_file": "report_1.txt", "line_no": n, "column_name": "Opens",
               "reason": "invalid_count", "message": "Opens 'x' is not a non-negative integer",
               "raw_line": "a,b"} for n in range(2, 5)]
    message = notify.compose(_report(errors=errors), "etl@example.com", ["a@example.com"], limit=3)
    assert message["Subject"] == ("[visitas] run 2026-11-28: 1 loaded, 0 rejected, 1 duplicate, "
                                  "0 failed, 1 rows rejected")
    body = message.get_body(("plain",)).get_content()
    assert "report_2.txt" in body and "same content as report_1.txt" in body
    [attachment] = list(message.iter_attachments())
    text = attachment.get_content()
    assert text.count("invalid_count") == 3 and "capped at 3 rows" in text


def test_needs_mail_only_for_problems():
    clean = _report(files=[_report()["files"][0] | {"rows_rejected": 0}])
    assert not notify.needs_mail(clean)
    assert notify.needs_mail(_report())
    assert notify.needs_mail(clean | {"failures": [{"task": "t", "file": None, "error": "e", "at": "x"}]})


def test_old_failure_records_are_pruned(tmp_path, monkeypatch):
    import os

    from visitas.ops import runmail as notify

    runs = tmp_path / "runs"
    runs.mkdir()
    old, new = runs / "old.jsonl", runs / "new.jsonl"
    old.write_text("{}\n")
    new.write_text("{}\n")
    os.utime(old, (0, 0))  # 1970: long past any retention
    monkeypatch.setattr(notify, "failures_file", lambda: runs / "current.jsonl")
    notify.prune_failure_files(keep_days=30)
    assert sorted(p.name for p in runs.iterdir()) == ["new.jsonl"]


def test_the_html_part_has_the_same_table():
    import html.parser

    message = notify.compose(_report(), "etl@example.com", ["a@example.com"], limit=3)
    page = message.get_body(("html",)).get_content()

    class Cells(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows: list[list[str]] = []

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])

        def handle_data(self, data):
            if self.rows and self.lasttag in ("td", "th"):
                self.rows[-1].append(data)

    parser = Cells()
    parser.feed(page)
    assert parser.rows[0] == ["file", "status", "read", "loaded", "rejected", "opened", "clicked", "note"]
    assert parser.rows[1] == ["report_1.txt", "loaded", "10", "9", "1", "66.7%", "33.3%"]
    assert parser.rows[2][:5] == ["report_2.txt", "duplicate", "0", "0", "0"]
    assert parser.rows[2][-1] == "same content as report_1.txt"


def test_a_silence_mail_says_since_when():
    silence = {"kind": "silence", "last_file": "report_7.txt", "last_at": "2026-11-26T02:31:05",
               "stale_after_hours": 26.0, "at": "2026-11-28T02:30:00"}
    message = notify.compose(_report(files=[], silence=silence), "etl@example.com", ["a@example.com"],
                             limit=3)
    assert message["Subject"] == "[visitas] run 2026-11-28: NO FILE received for more than 26 h"
    body = message.get_body(("plain",)).get_content()
    assert "the last file, report_7.txt, was received at 2026-11-26T02:31:05" in body
    assert notify.needs_mail(_report(files=[], silence=silence))
    assert not notify.needs_mail(_report(files=[]))
