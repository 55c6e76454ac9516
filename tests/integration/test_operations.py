"""Operations against real servers: run mail (aiosmtpd), Luigi's crash mail, luigid,
the monthly report command, the process lock, the removal of past dates' folders."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
import urllib.parse
import urllib.request

import polars as pl
import psycopg

from visitas import db

from .harness import notify_cfg, wait_for, wait_until_blocked_on_a_lock


def _attachment(message) -> tuple[str, list[dict]]:
    for part in message.walk():
        if part.get_filename():
            text = part.get_payload(decode=True).decode()
            rows = [r for r in csv.DictReader(io.StringIO(text)) if not r["source_file"].startswith("#")]
            return part.get_filename(), rows
    raise AssertionError("no attachment")


def test_run_with_rejections_mails_one_report(make_env, smtp):
    env = make_env(extra_cfg=notify_cfg(smtp, max_attachment_rows=5))
    manifest = env.generate(files=2, rows=200, defects=0.05)
    result = env.luigi()
    assert result.returncode == 0, result.stderr[-2000:]
    assert wait_for(lambda: smtp.messages)
    [message] = smtp.messages
    rejected = sum(info["rejected_rows"] for info in manifest["files"].values())
    assert message["Subject"] == (f"[visitas] run {time.strftime('%Y-%m-%d')}: 2 loaded, 0 rejected,"
                                  f" 0 duplicate, 0 failed, {rejected} rows rejected")
    assert message["X-Envelope-To"] == "ops@example.com, data@example.com"
    body = message.get_body(("plain",)).get_content()
    truth = env.truth(manifest)
    for name, info in manifest["files"].items():
        mine = truth.filter(pl.col("source_file") == name)
        opened, clicked = (f"{100 * mine[c].sum() / mine.height:.1f}%" for c in ("opened", "clicked"))
        assert (f"{name:<28} loaded     {info['rows']:>9} {info['valid_rows']:>9}"
                f" {info['rejected_rows']:>9} {opened:>7} {clicked:>7}") in body
    assert "field_count" in body and "invalid_email" in body and "report_1.txt:" in body
    filename, rows = _attachment(message)
    assert filename.endswith(".csv") and len(rows) == 5  # capped
    assert set(rows[0]) == {"source_file", "line_no", "column_name", "reason", "message", "raw_line"}
    assert "capped at 5 rows" in message.get_payload()[1].get_payload(decode=True).decode()


def test_clean_run_sends_nothing_unless_send_always(make_env, smtp):
    env = make_env(extra_cfg=notify_cfg(smtp))
    env.generate(files=1, rows=50, defects=0.0)
    assert env.luigi().returncode == 0
    time.sleep(0.5)
    assert smtp.messages == []

    env.write_config(notify_cfg(smtp, send_always="true"))
    env.generate(files=1, rows=50, defects=0.0, first_number=2, seed=9)
    assert env.luigi().returncode == 0
    assert wait_for(lambda: smtp.messages)
    assert "1 loaded, 0 rejected, 0 duplicate, 0 failed, 0 rows rejected" in smtp.messages[0]["Subject"]


def test_no_recipients_no_mail_no_error(make_env, smtp):
    env = make_env(extra_cfg=f"[notify]\nsmtp_host = 127.0.0.1\nsmtp_port = {smtp.port}\n")
    env.generate(files=1, rows=50, defects=0.2)
    result = env.luigi()
    assert result.returncode == 0
    time.sleep(0.5)
    assert smtp.messages == []
    assert "no recipients" in env.log_file.read_text()


def test_a_failed_task_sends_the_run_mail_and_luigis_own_error_mail(make_env, smtp):
    luigi_mail = (f"[email]\nmethod = smtp\nreceiver = oncall@example.com\nsender = luigi@example.com\n"
                  f"force_send = true\n[smtp]\nhost = 127.0.0.1\nport = {smtp.port}\n")
    env = make_env(extra_cfg=notify_cfg(smtp) + luigi_mail)
    env.generate(files=2, rows=60)
    env.fail_loads_of("report_2.txt", "disk on fire")
    result = env.luigi()
    assert result.returncode == 30
    assert wait_for(lambda: len(smtp.messages) >= 2)
    subjects = [m["Subject"] for m in smtp.messages]
    [report] = [m for m in smtp.messages if m["Subject"].startswith("[visitas]")]
    assert "1 loaded" in report["Subject"] and "1 failed" in report["Subject"]
    body = report.get_body(("plain",)).get_content()
    assert "LoadPostgres" in body and "disk on fire" in body
    assert any("LoadPostgres" in s and "FAILED" in s.upper() for s in subjects), subjects


def test_luigid_shows_every_task_done_and_no_secret(make_env, luigid):
    env = make_env(password="pw-" + "x" * 12)
    env.generate(files=2, rows=50)
    run = env.luigi(scheduler_port=luigid)
    assert run.returncode == 0, run.stderr[-2000:]
    query = urllib.parse.quote(json.dumps({"status": "DONE"}))
    with urllib.request.urlopen(f"http://127.0.0.1:{luigid}/api/task_list?data={query}") as response:
        tasks = json.load(response)["response"]
    families = {t["name"] for t in tasks.values()}
    assert {"RunAll", "DownloadReport", "ValidateReport", "SplitVisitorStats", "LoadPostgres",
            "ArchiveZip", "PrepareRun"} <= families
    archive = [t for t in tasks.values() if t["name"] == "ArchiveZip"]
    assert {t["params"]["file_name"] for t in archive} == {"report_1.txt", "report_2.txt"}
    for task_id in [task_id for task_id, t in tasks.items() if t["name"] == "LoadPostgres"]:
        data = urllib.parse.quote(json.dumps({"task_id": task_id}))
        with urllib.request.urlopen(
                f"http://127.0.0.1:{luigid}/api/get_task_status_message?data={data}") as response:
            message = json.load(response)["response"]["statusMessage"]
        assert message.startswith("loaded: ") and "rows loaded" in message
    shown = json.dumps(tasks)
    assert env.dsn.split(":")[2].split("@")[0] not in shown  # the DB password
    assert "x" * 12 not in shown


def test_overlapping_run_on_one_host_is_refused_by_the_process_lock(env):
    env.generate(files=2, rows=100)
    with psycopg.connect(env.dsn, autocommit=True) as holder:
        # Hold the visitor-merge lock so the first run is certainly still going.
        holder.execute("SELECT pg_advisory_lock(%s, 0)", (db.LOCK_VISITORS,))
        first = env.popen()
        wait_until_blocked_on_a_lock(env)
        second = env.luigi()
        holder.execute("SELECT pg_advisory_unlock(%s, 0)", (db.LOCK_VISITORS,))
    out, _ = first.communicate(timeout=300)
    assert second.returncode == 10, second.stderr[-2000:]  # [retcode] already_running
    assert first.returncode == 0, out[-2000:]
    assert [r[1] for r in env.loads()] == ["loaded", "loaded"]


def test_a_run_removes_past_dates_folders_but_keeps_a_download_never_archived(make_env, smtp):
    """A chain that stopped on an old date, its file loaded by a later date's run instead, left a
    copy of the file behind: the next run removes it (its content is archived, says load_log), and
    keeps a download whose content is loaded but not archived, naming it in the log and the mail."""
    env = make_env(extra_cfg=notify_cfg(smtp))
    manifest = env.generate(files=2, rows=50, defects=0.0)
    assert env.luigi().returncode == 0
    assert smtp.messages == []  # nothing to report: all loaded
    stopped = env.download_dir / "20260101" / "report_1.txt"
    stopped.parent.mkdir(parents=True)
    shutil.copyfile(manifest["dir"] / "report_1.txt", stopped)
    (env.state_dir / "20260101" / "report_1.txt" / "checked").mkdir(parents=True)
    (env.state_dir / "20260101" / "report_1.txt" / "checked" / "part-0.parquet").write_bytes(b"x")
    never = env.download_dir / "20260102" / "report_2.txt"
    never.parent.mkdir(parents=True)
    shutil.copyfile(manifest["dir"] / "report_2.txt", never)
    # As if its archive had failed and the source copy were gone: the download is the only copy.
    env.execute("UPDATE load_log SET archived_at = NULL WHERE file_name = 'report_2.txt'")
    old = time.time() - 30 * 86400
    for root in (env.download_dir, env.state_dir):
        for path in root.glob("2026010[12]/**/*"):
            os.utime(path, (old, old))
        for path in root.glob("2026010[12]"):
            os.utime(path, (old, old))

    assert env.luigi().returncode == 0
    assert not (env.download_dir / "20260101").exists()
    assert not (env.state_dir / "20260101").exists()
    assert never.read_bytes() == (manifest["dir"] / "report_2.txt").read_bytes()
    assert "20260102/report_2.txt never archived, so its folders stay" in env.log_file.read_text()
    assert "removed the local folders of 1 past run date(s) (2026-01-01)" in env.log_file.read_text()
    assert wait_for(lambda: smtp.messages)
    [message] = smtp.messages
    assert message["Subject"].endswith(", 1 past download(s) never archived")
    for part in ("plain", "html"):
        assert (f"{never}: load it with `visitas run --date 2026-01-02`"
                in message.get_body((part,)).get_content())
