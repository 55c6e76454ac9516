"""`visitas rebuild`: the visitor table replayed from the pipeline's own backup zips, against a
real PostgreSQL — "identical" on a healthy database, the exact counters back after damage."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import polars as pl
import psycopg
import pytest
from polars.testing import assert_frame_equal
from psycopg import sql

from visitas import db
from visitas.ops import rebuild

from .harness import cut_mid_line, expected_visitors

VISITAS = str(Path(sys.executable).with_name("visitas"))


@pytest.fixture(autouse=True)
def _drop_scratch_schema(pg_dsn, schema):
    yield
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
            sql.Identifier(f"{schema}_rebuild")))


def _rebuild(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VISITAS, "rebuild", "--schema", f"{env.schema}_rebuild", *args],
                          cwd=env.tmp, env=env.environment(), capture_output=True, text=True,
                          timeout=600)


def _several_days(env, zips: tuple[str, ...] = ("visitas_20261101.zip", "visitas_20261102.zip")
                  ) -> list[dict]:
    """Two run dates: good and bad rows, a stalled half upload completed the next day (an
    extension), a duplicate and a rejected file.  Returns the manifests of what counts."""
    first = env.generate(files=3, rows=400, seed=31, defects=0.04)
    stalled = env.generate(files=1, rows=600, seed=32, defects=0.02, first_number=4)
    full = (stalled["dir"] / "report_4.txt").read_bytes()
    (env.remote_dir / "report_4.txt").write_bytes(cut_mid_line(full))
    day1 = env.luigi("--date", "2026-11-01")
    assert day1.returncode == 0, day1.stderr[-3000:]

    (env.remote_dir / "report_4.txt").write_bytes(full)
    second = env.generate(files=2, rows=500, seed=33, defects=0.03, first_number=5)
    shutil.copyfile(first["dir"] / "report_2.txt", env.remote_dir / "report_9.txt")
    (env.remote_dir / "report_8.txt").write_bytes(b"\x00\x01 not a report")
    day2 = env.luigi("--date", "2026-11-02")
    assert day2.returncode == 0, day2.stderr[-3000:]
    assert env.query("SELECT file_name, status, extends IS NOT NULL FROM load_log"
                     " WHERE run_date = '2026-11-02' ORDER BY file_name") == [
        ("report_4.txt", "loaded", True), ("report_5.txt", "loaded", False),
        ("report_6.txt", "loaded", False), ("report_8.txt", "rejected", False),
        ("report_9.txt", "duplicate", False)]
    assert sorted(p.name for p in env.backup_dir.glob("*.zip")) == sorted(zips)
    return [first, stalled, second]


def test_a_damaged_visitor_table_is_found_and_rebuilt_exactly(env):
    truth = env.truth(*_several_days(env))
    expected = expected_visitors(truth)
    assert_frame_equal(env.visitors(), expected)
    emails = expected["email"].to_list()
    # Damage: a hand edit, a lost row, a row that never was, engagement lost (as after the
    # upgrade that added it).
    env.execute(f"UPDATE visitor SET visitas_totales = visitas_totales + 1 WHERE email = '{emails[0]}';"
                f" DELETE FROM visitor WHERE email = '{emails[1]}';"
                "INSERT INTO visitor (email, fecha_primera_visita, fecha_ultima_visita,"
                " visitas_totales, visitas_anio_actual, visitas_mes_actual) VALUES"
                " ('nadie@example.com', '2026-01-01', '2026-01-01', 1, 1, 1);"
                f" UPDATE visitor SET opens_totales = NULL, clicks_totales = NULL,"
                f" visitas_abiertas = NULL, visitas_clicadas = NULL, fecha_ultimo_open = NULL,"
                f" fecha_ultimo_click = NULL WHERE email = '{emails[2]}'")
    damaged = env.visitors()

    found = _rebuild(env)
    assert found.returncode == 3, found.stdout + found.stderr
    differing = [line.split(":")[0].strip() for line in found.stdout.splitlines()
                 if line.startswith("  ")]
    assert sorted(differing) == sorted([emails[0], emails[1], "nadie@example.com", emails[2]])
    assert f"{emails[0]}: visitas_totales " in found.stdout
    assert "4 visitor row(s) differ" in found.stdout
    assert_frame_equal(env.visitors(), damaged)  # nothing changes without --apply

    applied = _rebuild(env, "--apply")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "applied" in applied.stdout
    assert_frame_equal(env.visitors(), expected)
    again = _rebuild(env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.rstrip().endswith("identical")


def test_days_spread_over_several_zips_are_archived_whole_and_rebuilt_from_them(env):
    env.write_config("[paths]\nfiles_per_zip = 2\n")
    truth = env.truth(*_several_days(env, zips=(
        "visitas_20261101.zip", "visitas_20261101_2.zip", "visitas_20261102.zip",
        "visitas_20261102_2.zip", "visitas_20261102_3.zip")))
    members = env.zip_members()
    assert len(members) == 9  # four files on the first day, five on the second
    for zip_name in {name.split(":", 1)[0] for name in members}:
        with zipfile.ZipFile(env.backup_dir / zip_name) as archive:
            assert len(archive.namelist()) <= 2
    recorded = env.query("SELECT backup_archive, sha256 FROM load_log")
    assert sorted(where for where, _ in recorded) == sorted(members)
    assert all(hashlib.sha256(members[where]).hexdigest() == sha for where, sha in recorded)
    assert_frame_equal(env.visitors(), expected_visitors(truth))
    healthy = _rebuild(env)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.startswith("replayed 7 loaded file(s)")
    assert healthy.stdout.rstrip().endswith("identical")


def test_a_healthy_database_rebuilds_identical_and_missing_backups_are_refused(env):
    _several_days(env)
    before = env.visitors()
    healthy = _rebuild(env)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.startswith("replayed 7 loaded file(s)")  # the half upload and its extension: two
    assert healthy.stdout.rstrip().endswith("identical")
    # The replay loaded the completed upload as an extension of its first half, as the run did.
    assert env.query(f"SELECT file_name, extends IS NOT NULL, rows_loaded FROM {env.schema}_rebuild.load_log"
                     " ORDER BY id") == env.query(
        "SELECT file_name, extends IS NOT NULL, rows_loaded FROM load_log WHERE status = 'loaded'"
        " ORDER BY id")

    # A zip gone: no exact rebuild exists, so none is made and nothing is replaced.
    (env.backup_dir / "visitas_20261102.zip").rename(env.tmp / "elsewhere.zip")
    env.execute("DELETE FROM visitor WHERE email IN (SELECT email FROM visitor LIMIT 1)")
    damaged = env.visitors()
    missing = _rebuild(env, "--apply")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == (
        f"visitas: error: cannot rebuild exactly: no visitas_20261102.zip in {env.backup_dir}"
        " (it holds report_6.txt, report_5.txt, report_4.txt)")
    assert_frame_equal(env.visitors(), damaged)
    assert before.height == damaged.height + 1

    # With the zip given back through --backups, the rebuild repairs the row.
    (env.tmp / "other").mkdir()
    shutil.copy(env.backup_dir / "visitas_20261101.zip", env.tmp / "other")
    (env.tmp / "elsewhere.zip").rename(env.tmp / "other" / "visitas_20261102.zip")
    repaired = _rebuild(env, "--apply", "--backups", str(env.tmp / "other"))
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert_frame_equal(env.visitors(), before)


def test_a_schema_the_rebuild_did_not_make_is_never_dropped(env):
    env.generate(files=1, rows=50)
    assert env.luigi().returncode == 0
    env.execute(f"CREATE SCHEMA {env.schema}_rebuild; CREATE TABLE {env.schema}_rebuild.precious (x int)")
    refused = _rebuild(env)
    assert refused.returncode == 1
    assert "was not made by a rebuild" in refused.stderr
    assert env.query(f"SELECT count(*) FROM {env.schema}_rebuild.precious") == [(0,)]


def test_a_rebuild_that_cannot_be_exact_is_never_applied(env):
    manifest = env.generate(files=2, rows=300, defects=0.0)
    db.Database(env.dsn, env.schema).connection().close()  # the schema must exist first
    line = env.truth(manifest).filter(pl.col("source_file") == "report_1.txt")["line_no"][5]
    env.execute("ALTER TABLE statistics ADD CONSTRAINT site_rule CHECK (NOT (source_file ="
                f" 'report_1.txt' AND line_no = {line}))")
    assert env.luigi("--date", "2026-11-01").returncode == 0
    loaded = manifest["files"]["report_1.txt"]["valid_rows"] - 1
    # The site's own constraint is not in the scratch schema: the replay loads that row too.
    different = _rebuild(env)
    assert different.returncode == 3, different.stdout + different.stderr
    [(load_id,)] = env.query("SELECT id FROM load_log WHERE file_name = 'report_1.txt'")
    assert (f"report_1.txt (load_log id {load_id}, 2026-11-01): live loaded, {loaded} rows, replayed"
            f" loaded, {loaded + 1} rows") in different.stdout
    refused = _rebuild(env, "--apply")
    assert refused.returncode == 1
    assert "replayed differently from what load_log recorded" in refused.stderr
    env.execute(f"UPDATE load_log SET rows_loaded = {loaded + 1}, rows_rejected = rows_rejected - 1"
                " WHERE file_name = 'report_1.txt'")  # as if the row had loaded

    # A member that is not the content load_log recorded.
    zip_path = env.backup_dir / "visitas_20261101.zip"
    with zipfile.ZipFile(zip_path) as original:
        members = {name: original.read(name) for name in original.namelist()}
    with zipfile.ZipFile(zip_path, "w") as tampered:
        for name, data in members.items():
            tampered.writestr(name, data.replace(b"@", b"#", 1) if name == "report_2.txt" else data)
    changed = _rebuild(env, "--apply")
    assert changed.returncode == 1
    assert ("report_2.txt in visitas_20261101.zip is not the content load_log recorded"
            in changed.stderr)
    with zipfile.ZipFile(zip_path, "w") as restored:
        for name, data in members.items():
            restored.writestr(name, data)

    # A file loaded between the replay and --apply: nothing is replaced.
    env.execute("DELETE FROM visitor WHERE email IN (SELECT email FROM visitor LIMIT 1)")
    damaged = env.visitors()
    live = db.Database(env.dsn, env.schema)
    job = rebuild.Rebuild(live, db.Database(env.dsn, f"{env.schema}_rebuild"), env.backup_dir,
                          env.tmp / "rebuild-work", rebuild.Settings(8 << 20, 2, 1 << 20))
    outcome = job.run()
    # (the row the constraint refused, and the row deleted)
    assert outcome.visitor_differences == 2 and not outcome.file_differences
    env.generate(files=1, rows=50, first_number=3, seed=5)
    assert env.luigi("--date", "2026-11-02").returncode == 0
    after_load = env.visitors()
    with pytest.raises(rebuild.CannotRebuild, match="files were loaded while the rebuild ran"):
        job.apply(outcome)
    assert_frame_equal(env.visitors(), after_load)
    assert not after_load.equals(damaged)  # the new file's visits were merged, and kept
