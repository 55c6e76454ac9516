"""``make demo``: the whole ETL end to end on throwaway servers, then what happened.

Starts a private PostgreSQL cluster and an embedded SFTP server (own host key, client key) on free
localhost ports, puts freshly generated reports (with defects) in the remote folder, runs the real
``visitas run`` (the cron line) and prints the files, rows, a few visitors,
the backup zip and the monthly report.  Everything lives under one folder (``--dir``); running it
again adds new reports (and one re-sent file, to show duplicate detection) to the same database.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

from visitas.dev import sample, servers

REMOTE_DIR = "home/vinkOS/archivosVisitas"


def _config(base: Path, port: int, keys: servers.SshKeys) -> str:
    sftp = {"host": "127.0.0.1", "port": port, "username": "vinkos", "key_file": keys.client_key,
            "known_hosts": base / "known_hosts", "remote_dir": f"/{REMOTE_DIR}"}
    return ("# Written by the demo: embedded servers on localhost, no secrets in this file.\n"
            + servers.luigi_config(base, sftp, "visitas", "[logfile]\nlevel = WARNING\n"))


def _upload(base: Path, remote: Path) -> list[str]:
    """New reports numbered after the previous runs', and (after the first run) a re-sent one."""
    state_file = base / "demo-state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"runs": 0, "next": 1}
    generated = base / "generated" / f"run{state['runs'] + 1}"
    manifest = sample.generate(generated, files=3, rows=400, seed=100 + state["runs"],
                               defects=0.03, first_number=state["next"], visitors=250)
    names = list(manifest["files"])
    for name in names:
        shutil.copyfile(generated / name, remote / name)
    if state["runs"] > 0:
        resent = f"report_{state['next'] + 3}.txt"
        shutil.copyfile(base / "generated" / "run1" / "report_1.txt", remote / resent)
        names.append(resent + " (same content as report_1.txt)")
    state_file.write_text(json.dumps({"runs": state["runs"] + 1, "next": state["next"] + len(names)}))
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visitas.dev.demo", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path(".demo"))
    args = parser.parse_args(argv)
    base = args.dir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)

    print(f"visitas demo — everything under {base}")
    cluster = servers.PostgresCluster(base / "pg").init().start()
    keys = servers.SshKeys(base / "keys")
    remote = base / "sftp" / REMOTE_DIR
    remote.mkdir(parents=True, exist_ok=True)
    server = servers.SftpServer(base / "sftp", keys).start()
    try:
        keys.write_known_hosts(base / "known_hosts", server.port)
        (base / "luigi.cfg").write_text(_config(base, server.port, keys))
        uploaded = _upload(base, remote)
        print(f"PostgreSQL on 127.0.0.1:{cluster.port}, SFTP on 127.0.0.1:{server.port}")
        print("uploaded to the SFTP server: " + ", ".join(uploaded))
        run_id = uuid.uuid4().hex[:12]
        env = {**os.environ, "LUIGI_CONFIG_PATH": str(base / "luigi.cfg"),
               "VISITAS_DSN": cluster.dsn(), "VISITAS_RUN_ID": run_id}
        visitas = str(Path(sys.executable).with_name("visitas"))
        print("\n$ visitas run")
        result = subprocess.run([visitas, "run"], cwd=base, env=env, capture_output=True, text=True)
        print(_luigi_summary(result.stderr))
        print(f"exit code {result.returncode}")
        if result.returncode != 0:
            print(result.stderr[-4000:], file=sys.stderr)
            return result.returncode
        _summary(cluster.dsn(), run_id, base)
        print(f"\n$ visitas report --month {_this_month()}")
        subprocess.run([visitas, "report", "--month", _this_month()], cwd=base, env=env, check=True)
        print(f"Logs: {base / 'logs' / 'visitas.log'}.  Run `make demo` again to add more files; "
              "`make clean` removes it all.")
    finally:
        server.stop()
        cluster.stop()
    return 0


def _luigi_summary(stderr: str) -> str:
    """Luigi's execution summary block, as it printed it."""
    marker = "===== Luigi Execution Summary ====="
    parts = stderr.split(marker)
    return (marker + parts[1] + marker) if len(parts) >= 3 else stderr[-3000:]


def _this_month() -> str:
    import datetime as dt

    return f"{dt.date.today():%Y-%m}"


def _summary(dsn: str, run_id: str, base: Path) -> None:
    import psycopg

    with psycopg.connect(dsn) as conn:
        conn.execute("SET search_path TO visitas")
        files = conn.execute(
            "SELECT file_name, status, rows_read, rows_loaded, rows_rejected, encoding,"
            " backup_archive FROM load_log WHERE run_id = %s ORDER BY id", (run_id,)).fetchall()
        print(f"\nFiles handled in this run ({len(files)}):")
        print(f"  {'file':<14} {'status':<10} {'read':>6} {'loaded':>7} {'rejected':>9}  "
              f"{'encoding':<10} archived as")
        for f in files:
            print(f"  {f[0]:<14} {f[1]:<10} {f[2]:>6} {f[3]:>7} {f[4]:>9}  {f[5] or '':<10} {f[6]}")
        reasons = conn.execute(
            "SELECT reason, count(*), min(source_file || ':' || line_no) FROM errors"
            " WHERE load_id IN (SELECT id FROM load_log WHERE run_id = %s)"
            " GROUP BY reason ORDER BY 2 DESC", (run_id,)).fetchall()
        print("\nRejected rows by reason (first example):")
        for reason, count, example in reasons:
            print(f"  {reason:<18} {count:>5}  {example}")
        visitors, visits = conn.execute("SELECT count(*), sum(visitas_totales) FROM visitor").fetchall()[0]
        print(f"\nVisitors: {visitors} with {visits} visits in all. The most frequent:")
        rows = conn.execute(
            "SELECT email, to_char(fecha_primera_visita, 'YYYYMMDD'),"
            " to_char(fecha_ultima_visita, 'YYYYMMDD'), visitas_totales, visitas_anio_actual,"
            " visitas_mes_actual FROM visitor ORDER BY visitas_totales DESC, email LIMIT 5").fetchall()
        print(f"  {'email':<30} {'primera':<9} {'ultima':<9} {'total':>5} {'año':>4} {'mes':>4}")
        for r in rows:
            print(f"  {r[0]:<30} {r[1]:<9} {r[2]:<9} {r[3]:>5} {r[4]:>4} {r[5]:>4}")
    print("\nBackups:")
    for path in sorted((base / "bckp").glob("visitas_*.zip")):
        with zipfile.ZipFile(path) as archive:
            print(f"  {path}: {', '.join(archive.namelist())}")
    left = sorted(p.name for p in (base / "sftp" / REMOTE_DIR).iterdir())
    print(f"Left on the SFTP server: {', '.join(left) or 'nothing'}")


if __name__ == "__main__":
    raise SystemExit(main())
