"""``make bench``: the pipeline against the floor of merely moving the bytes.

    python -m visitas.dev.bench --rows 2000000 [--visitors 300000] [--workers 1] [--many-files 200]
                            [--many-rows 1000]

In one run, on throwaway servers on localhost (PostgreSQL with fsync on, the embedded SFTP server):

1. generates one report of ROWS rows with repeat visitors and a small fraction of defects;
2. the **floor**, sequentially: paramiko ``get`` of the file, ``COPY`` of the raw file into a logged
   table of 15 text columns, ``zipfile`` deflate of the file (on a twin of the report without the
   planted defects, which a raw COPY cannot take);
3. the **pipeline**: ``luigi --module visitas RunAll --local-scheduler`` on a fresh schema, with
   the peak RSS of its process tree sampled every 50 ms;
4. prints rows, floor and pipeline seconds, their ratio, per-stage seconds, the peak RSS, and the
   row counts in ``statistics``, ``errors`` and ``visitor`` checked against what was planted;
   steps 2-4 are done ``--repeat`` times (3 when the floor is measured), each floor right before
   its pipeline, and the ratio of the run is the median of the pairs' ratios: on a shared machine
   the same step varies by a fifth from one minute to the next (the pipeline's load took 14.1,
   10.4 and 12.4 s in three consecutive runs), and a pair measured back to back shares the
   machine's phase;
5. with ``--many-files N``: N files of ``--many-rows`` rows (1,000) in one run with ``--workers 1``,
   again with ``--workers 2``, and again as two hosts at once under one luigid (each with its
   own folders and ``[cluster] host``; on this one machine, so they share its cores).

It asserts nothing about time: it prints figures.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import paramiko
import polars as pl
import psycopg

from visitas.db.connection import scalar
from visitas.dev import sample, servers

REMOTE_DIR = "home/vinkOS/archivosVisitas"


class Bench:
    """Throwaway servers for one mode of the bench.

    ``stock``: Debian's PostgreSQL package with initdb's default settings (installed if missing),
    OpenSSH's sshd with internal-sftp, and a floor of the standard tools: OpenSSH's ``sftp``,
    ``psql \\copy`` and ``zip -6``.  Otherwise (``tuned``): the embedded PostgreSQL with the
    tests' settings, the embedded SFTP server, and a floor of paramiko, psycopg's COPY and zipfile.
    """

    def __init__(self, base: Path, stock: bool):
        self.base, self.stock = base, stock
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        self.keys = servers.SshKeys(base / "keys")
        if stock:
            bindir = servers.system_postgres_bindir(install=True)
            if bindir is None:
                raise SystemExit("stock mode needs Debian's postgresql package (run as root to install it)")
            self.cluster = servers.PostgresCluster(base / "pg-stock", fsync=True, tuned=False,
                                                   bindir=bindir).init().start()
            self.remote = base / "sftp-stock" / REMOTE_DIR
            self.remote_path = str(self.remote)
            (base / "sshd").mkdir(exist_ok=True)
            self.server: servers.SftpServer | servers.OpenSshServer = servers.OpenSshServer(
                base / "sshd", self.keys).start()
            self.username = getpass.getuser()
        else:
            self.cluster = servers.PostgresCluster(base / "pg", fsync=True).init().start()
            self.remote = base / "sftp" / REMOTE_DIR
            self.remote_path = f"/{REMOTE_DIR}"
            self.server = servers.SftpServer(base / "sftp", self.keys).start()
            self.username = "vinkos"
        shutil.rmtree(self.remote, ignore_errors=True)  # nothing left from an interrupted run
        self.remote.mkdir(parents=True, exist_ok=True)
        self.known_hosts = self.keys.write_known_hosts(base / "known_hosts", self.server.port)

    @property
    def label(self) -> str:
        return "stock" if self.stock else "tuned"

    def close(self) -> None:
        self.server.stop()
        self.cluster.stop()

    # ------------------------------------------------------------------ floor

    def floor(self, report: Path) -> dict:
        """Download, COPY and zip the file with the mode's floor tools, one after the other."""
        work = Path(tempfile.mkdtemp(dir=self.base))
        local = work / report.name
        steps = self._stock_floor if self.stock else self._tuned_floor
        times = {}
        for name, step in steps(report, local, work):
            _settle(self.cluster.dsn())
            start = time.perf_counter()
            step()
            times[name] = time.perf_counter() - start
        shutil.rmtree(work)
        # Left in place, the floor's 2M-row table was vacuumed by autovacuum during the
        # pipeline's load (about 1 s more for it, measured on stock PostgreSQL 15).
        with psycopg.connect(self.cluster.dsn(), autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS floor_raw")
        times["total"] = sum(times.values())
        return times

    def _floor_table(self) -> None:
        columns = ", ".join(f"c{i} text" for i in range(15))
        with psycopg.connect(self.cluster.dsn(), autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS floor_raw")
            conn.execute(f"CREATE TABLE floor_raw ({columns})")

    def _stock_floor(self, report: Path, local: Path, work: Path):
        def download() -> None:
            subprocess.run(
                ["sftp", "-q", "-b", "-", "-i", str(self.keys.client_key), "-P", str(self.server.port),
                 "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                 "-o", "BatchMode=yes", f"{self.username}@127.0.0.1"],
                input=f"get {self.remote_path}/{report.name} {local}\n", text=True, check=True,
                capture_output=True)

        def copy() -> None:
            self._floor_table()
            subprocess.run([str(self.cluster.bindir / "psql"), "-q", "-v", "ON_ERROR_STOP=1",
                            self.cluster.dsn(), "-c",
                            f"\\copy floor_raw FROM '{local}' WITH (FORMAT csv, HEADER true)"],
                           check=True, capture_output=True)

        def pack() -> None:
            subprocess.run(["zip", "-6", "-q", "-j", str(work / "floor.zip"), str(local)], check=True)

        return [("download", download), ("copy", copy), ("zip", pack)]

    def _tuned_floor(self, report: Path, local: Path, work: Path):
        def download() -> None:
            client = paramiko.SSHClient()
            client.load_host_keys(str(self.known_hosts))
            client.connect("127.0.0.1", self.server.port, self.username,
                           key_filename=str(self.keys.client_key), allow_agent=False,
                           look_for_keys=False)
            client.open_sftp().get(f"{self.remote_path}/{report.name}", str(local))
            client.close()

        def copy() -> None:
            self._floor_table()
            with psycopg.connect(self.cluster.dsn()) as conn, conn.cursor().copy(
                    "COPY floor_raw FROM STDIN WITH (FORMAT csv, HEADER true)") as copy, \
                    open(local, "rb") as handle:
                while chunk := handle.read(1024 * 1024):
                    copy.write(chunk)

        def pack() -> None:
            with zipfile.ZipFile(work / "floor.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
                archive.write(local, arcname=report.name)

        return [("download", download), ("copy", copy), ("zip", pack)]

    # ------------------------------------------------------------------ pipeline

    def config(self, name: str, workers_dir: Path) -> Path:
        cfg = workers_dir / "luigi.cfg"
        sftp = {"host": "127.0.0.1", "port": self.server.port, "username": self.username,
                "key_file": self.keys.client_key, "known_hosts": self.known_hosts,
                "remote_dir": self.remote_path}
        cfg.write_text(servers.luigi_config(workers_dir, sftp, name, (
            "[core]\nlog_level = WARNING\n[worker]\nwait_interval = 0.2\nwait_jitter = 0.2\n")))
        return cfg

    def fresh(self, schema: str) -> Path:
        """An empty schema and an empty run folder (returned) for one measurement."""
        with psycopg.connect(self.cluster.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        run_dir = self.base / f"run-{schema}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir()
        return run_dir

    def pipeline(self, schema: str, workers: int = 1) -> dict:
        run_dir = self.fresh(schema)
        cfg = self.config(schema, run_dir)
        env = {**os.environ, "LUIGI_CONFIG_PATH": str(cfg), "VISITAS_DSN": self.cluster.dsn()}
        visitas = str(Path(sys.executable).with_name("visitas"))
        _settle(self.cluster.dsn())
        start = time.perf_counter()
        process = subprocess.Popen([visitas, "run", "--workers", str(workers)], cwd=run_dir, env=env,
                                   stdout=subprocess.DEVNULL, stderr=open(run_dir / "stderr.log", "w"))
        peak = _sample_peak_rss(process)
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            raise SystemExit(f"pipeline failed ({process.returncode}): see {run_dir / 'stderr.log'}")
        log_file = run_dir / "logs" / "visitas.log"
        return {"seconds": seconds, "peak_rss_mb": peak / 1048576, "stages": _stage_seconds(log_file),
                "archive_bytes": _archive_bytes(log_file)}

    def pipeline_hosts(self, schema: str, hosts: int = 2) -> dict:
        """``hosts`` runs at once, each with its own folders and [cluster] host, one luigid."""
        base = self.fresh(schema)
        port = servers.free_port()
        bin_dir = Path(sys.executable).parent
        luigid = subprocess.Popen([str(bin_dir / "luigid"), "--port", str(port), "--address", "127.0.0.1",
                                   "--state-path", str(base / "luigid.pickle"), "--logdir", str(base)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            servers.wait_for_port(port)
            runs = []
            _settle(self.cluster.dsn())
            start = time.perf_counter()
            for n in range(hosts):
                run_dir = base / f"host{n + 1}"
                run_dir.mkdir()
                cfg = self.config(schema, run_dir)
                cfg.write_text(cfg.read_text() + f"\n[cluster]\nhost = bench-host-{n + 1}\n")
                env = {**os.environ, "LUIGI_CONFIG_PATH": str(cfg), "VISITAS_DSN": self.cluster.dsn()}
                runs.append((run_dir, subprocess.Popen(
                    [str(bin_dir / "luigi"), "--module", "visitas", "RunAll", "--no-lock",
                     "--scheduler-host", "127.0.0.1", "--scheduler-port", str(port)],
                    cwd=run_dir, env=env, stdout=subprocess.DEVNULL,
                    stderr=open(run_dir / "stderr.log", "w"))))
            for run_dir, process in runs:
                if process.wait() != 0:
                    raise SystemExit(f"host run failed ({process.returncode}): see {run_dir / 'stderr.log'}")
            seconds = time.perf_counter() - start
        finally:
            luigid.terminate()
            luigid.wait(10)
        return {"seconds": seconds}

    def counts(self, schema: str) -> dict:
        with psycopg.connect(self.cluster.dsn()) as conn:
            def one(q):
                return conn.execute(q.format(s=schema)).fetchone()[0]
            return {"statistics": one('SELECT count(*) FROM "{s}".statistics'),
                    "errors_lines": one('SELECT count(DISTINCT (source_file, line_no)) FROM "{s}".errors'),
                    "visitor": one('SELECT count(*) FROM "{s}".visitor'),
                    "files_loaded": one("SELECT count(*) FROM \"{s}\".load_log WHERE status = 'loaded'")}


def _settle(dsn: str | None = None, quiet_wait: float = 120.0) -> None:
    """Finish what earlier steps left to do in the background — autovacuum of the tables they
    loaded (waited for, then done by a VACUUM before the launcher gets to it), the server's WAL
    (CHECKPOINT) and the page cache — so that none of it is billed to the next step (measured: a
    checkpoint the floor's COPY left due added 2-3 s to the pipeline's load; an autovacuum of the
    floor's table, about 1 s)."""
    if dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            deadline = time.monotonic() + quiet_wait
            while time.monotonic() < deadline and scalar(
                    conn, "SELECT count(*) FROM pg_stat_activity"
                          " WHERE backend_type = 'autovacuum worker'"):
                time.sleep(0.5)
            conn.execute("VACUUM")
            conn.execute("CHECKPOINT")
    os.sync()
    time.sleep(1)


def _sample_peak_rss(process: subprocess.Popen) -> int:
    import psutil

    peak = 0
    root = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    return peak


def _stage_seconds(log: Path) -> dict:
    stages: dict[str, float] = {}
    pattern = re.compile(r"task (\w+)\(.*\) took ([0-9.]+)s")
    for line in log.read_text().splitlines() if log.exists() else []:
        match = pattern.search(line)
        if match:
            stages[match.group(1)] = stages.get(match.group(1), 0.0) + float(match.group(2))
    return stages


def _archive_bytes(log: Path) -> list[tuple[int, int]]:
    """For each file the archive step added, in order: the bytes it wrote into the zip and, of
    those, the zip's rewritten central directory (its log line names the member and the zip)."""
    pattern = re.compile(r"archived (\S+) into (\S+) \((\d+) bytes written\)")
    lines = log.read_text().splitlines() if log.exists() else []
    written = []
    for found in filter(None, map(pattern.search, lines)):
        member, path, size = found.group(1), Path(found.group(2)), int(found.group(3))
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(member)
        own = 30 + len(info.filename.encode()) + len(info.extra) + info.compress_size
        written.append((size, size - own))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visitas.dev.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--visitors", type=int, default=300_000)
    parser.add_argument("--defects", type=float, default=0.001)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--mode", choices=("stock", "tuned", "both"),
                        default="stock" if os.geteuid() == 0 else "tuned",
                        help="stock: Debian's PostgreSQL with default settings, OpenSSH, and a floor of"
                             " sftp + psql \\copy + zip -6 (needs root; the default as root);"
                             " tuned: embedded servers, paramiko + COPY + zipfile; both: one, then the other")
    parser.add_argument("--many-files", type=int, default=200, help="0 to skip")
    parser.add_argument("--many-rows", type=int, default=1000, help="rows of each of the many files")
    parser.add_argument("--dir", type=Path, default=Path(".bench"))
    parser.add_argument("--skip-floor", action="store_true")
    parser.add_argument("--repeat", type=int, default=None,
                        help="floor and pipeline this many times, each pair back to back; the ratio"
                             " is the median of the pairs' (default: 3, or 1 with --skip-floor)")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.skip_floor else 3

    base = args.dir.resolve()
    generated = base / "generated"
    shutil.rmtree(generated, ignore_errors=True)
    start = time.perf_counter()
    manifest = sample.generate(generated, files=1, rows=args.rows, seed=42, defects=args.defects,
                               visitors=args.visitors)
    info = manifest["files"]["report_1.txt"]
    report = generated / "report_1.txt"
    print(f"generated {args.rows:,} rows ({report.stat().st_size / 1048576:.0f} MiB,"
          f" {args.visitors:,} visitor pool, {info['rejected_rows']:,} planted defects) in"
          f" {time.perf_counter() - start:.1f}s")
    twin = None
    if not args.skip_floor:
        # Raw COPY cannot take the planted defects (14/16 fields): the floor moves the same rows
        # without them (same seed, within 1% of the size).
        sample.generate(base / "floor-twin", files=1, rows=args.rows, seed=42, defects=0.0,
                        visitors=args.visitors)
        twin = base / "floor-twin" / "report_1.txt"
    many = None
    if args.many_files:
        many = base / "many"
        shutil.rmtree(many, ignore_errors=True)
        sample.generate(many, files=args.many_files, rows=args.many_rows, seed=7, defects=0.01)
    truth = pl.read_parquet(generated / "truth.parquet")
    expected = {"statistics": info["valid_rows"], "errors_lines": info["rejected_rows"],
                "visitor": truth["email"].n_unique(), "files_loaded": 1}
    modes = {"stock": [True], "tuned": [False], "both": [True, False]}[args.mode]
    ok = True
    for stock in modes:
        bench = Bench(base / ("stock" if stock else "tuned"), stock)
        try:
            ok &= _measure(bench, args, report, twin, many, expected)
        finally:
            bench.close()
    return 0 if ok else 1


def _measure(bench: Bench, args: argparse.Namespace, report: Path, twin: Path | None,
             many: Path | None, expected: dict) -> bool:
    """One mode: the floor, the pipeline on the report, the many files; prints the figures."""
    ok, ratios, peaks = True, [], []
    for run in range(1, args.repeat + 1):
        tag = f"[{bench.label}]" + (f" run {run}/{args.repeat}" if args.repeat > 1 else "")
        floor = None
        if twin is not None:
            shutil.copyfile(twin, bench.remote / twin.name)
            floor = bench.floor(twin)
            (bench.remote / twin.name).unlink()
            tools = ("sftp get, psql \\copy, zip -6" if bench.stock
                     else "paramiko get, COPY, zipfile")
            print(f"{tag} floor ({tools}): {floor['total']:7.2f}s  (download {floor['download']:.2f}s,"
                  f" COPY raw {floor['copy']:.2f}s, zip {floor['zip']:.2f}s)")
        shutil.copyfile(report, bench.remote / report.name)
        result = bench.pipeline("bench", args.workers)
        print(f"{tag} pipeline: {result['seconds']:7.2f}s  with --workers {args.workers}")
        if floor:
            ratios.append(result["seconds"] / floor["total"])
            print(f"{tag} ratio pipeline/floor: {ratios[-1]:.2f}")
        print(f"{tag} per stage: " + ", ".join(f"{k} {v:.2f}s" for k, v in result["stages"].items()))
        print(f"{tag} peak RSS of the pipeline's process tree: {result['peak_rss_mb']:.0f} MiB")
        peaks.append(result["peak_rss_mb"])
        counts = bench.counts("bench")
        planted = counts == expected
        ok &= planted
        verdict = "as planted" if planted else "EXPECTED " + json.dumps(expected)
        print(f"{tag} counts: {json.dumps(counts)} — {verdict}")
    tag = f"[{bench.label}]"
    if len(ratios) > 1:
        print(f"{tag} ratio pipeline/floor, median of {len(ratios)} pairs: "
              f"{statistics.median(ratios):.2f} (" + ", ".join(f"{r:.2f}" for r in ratios) + ")")
    if len(peaks) > 1:
        print(f"{tag} peak RSS, largest of {len(peaks)} runs: {max(peaks):.0f} MiB")
    if many is None:
        return ok
    modes = [("--workers 1", 1, 1), ("--workers 2", 2, 1), ("2 hosts, one luigid", 1, 2)]
    for label, workers, hosts in modes:
        for path in many.glob("report_*.txt"):
            shutil.copyfile(path, bench.remote / path.name)
        schema = f"bench_many_{workers}w_{hosts}h"
        result = (bench.pipeline(schema, workers) if hosts == 1
                  else bench.pipeline_hosts(schema, hosts))
        counts = bench.counts(schema)
        extra = f", peak RSS {result['peak_rss_mb']:.0f} MiB" if "peak_rss_mb" in result else ""
        if result.get("archive_bytes"):
            zips = sum(p.stat().st_size for p in (bench.base / f"run-{schema}").rglob("visitas_*.zip"))
            written = result["archive_bytes"]
            directories = [directory for _, directory in written]
            extra += (f", archive wrote {sum(size for size, _ in written) / 1048576:.1f} MiB for zips"
                      f" of {zips / 1048576:.1f} MiB: the members, and zip directories of"
                      f" {sum(directories) / 1048576:.2f} MiB, at most {max(directories) / 1024:.1f}"
                      f" KiB for a file")
        files = args.many_files
        print(f"{tag} {files} files x {args.many_rows:,} rows, {label}: {result['seconds']:.1f}s"
              f" ({60 * files / result['seconds']:.0f} files/min, {1000 * result['seconds'] / files:.0f}"
              f" ms/file), {counts['files_loaded']} files loaded{extra}")
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
