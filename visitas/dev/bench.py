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
5. with ``--many-files N``: N files of ``--many-rows`` rows (1,000) in one run with ``--workers 1``,
   again with ``--workers 2``, and again as two hosts at once under one luigid (each with its
   own folders and ``[cluster] host``; on this one machine, so they share its cores).

It asserts nothing about time: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import paramiko
import polars as pl
import psycopg

from visitas.dev import sample, servers

REMOTE_DIR = "home/vinkOS/archivosVisitas"


class Bench:
    def __init__(self, base: Path):
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        self.cluster = servers.PostgresCluster(base / "pg", fsync=True).init().start()
        self.keys = servers.SshKeys(base / "keys")
        self.remote = base / "sftp" / REMOTE_DIR
        shutil.rmtree(self.remote, ignore_errors=True)  # nothing left from an interrupted run
        self.remote.mkdir(parents=True, exist_ok=True)
        self.server = servers.SftpServer(base / "sftp", self.keys).start()
        self.known_hosts = self.keys.write_known_hosts(base / "known_hosts", self.server.port)

    def close(self) -> None:
        self.server.stop()
        self.cluster.stop()

    # ------------------------------------------------------------------ floor

    def floor(self, report: Path) -> dict:
        work = Path(tempfile.mkdtemp(dir=self.base))
        times = {}
        _settle()
        start = time.perf_counter()
        client = paramiko.SSHClient()
        client.load_host_keys(str(self.known_hosts))
        client.connect("127.0.0.1", self.server.port, "vinkos", key_filename=str(self.keys.client_key),
                       allow_agent=False, look_for_keys=False)
        sftp = client.open_sftp()
        local = work / report.name
        sftp.get(f"/{REMOTE_DIR}/{report.name}", str(local))
        client.close()
        times["download"] = time.perf_counter() - start

        start = time.perf_counter()
        columns = ", ".join(f"c{i} text" for i in range(15))
        with psycopg.connect(self.cluster.dsn()) as conn:
            conn.execute("DROP TABLE IF EXISTS floor_raw")
            conn.execute(f"CREATE TABLE floor_raw ({columns})")
            with conn.cursor().copy("COPY floor_raw FROM STDIN WITH (FORMAT csv, HEADER true)") as copy, \
                    open(local, "rb") as handle:
                while chunk := handle.read(1024 * 1024):
                    copy.write(chunk)
        times["copy"] = time.perf_counter() - start

        start = time.perf_counter()
        with zipfile.ZipFile(work / "floor.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.write(local, arcname=report.name)
        times["zip"] = time.perf_counter() - start
        shutil.rmtree(work)
        times["total"] = sum(times.values())
        return times

    # ------------------------------------------------------------------ pipeline

    def config(self, name: str, workers_dir: Path) -> Path:
        cfg = workers_dir / "luigi.cfg"
        sftp = {"host": "127.0.0.1", "port": self.server.port, "username": "vinkos",
                "key_file": self.keys.client_key, "known_hosts": self.known_hosts,
                "remote_dir": f"/{REMOTE_DIR}"}
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
        luigi = str(Path(sys.executable).with_name("luigi"))
        _settle()
        start = time.perf_counter()
        process = subprocess.Popen([luigi, "--module", "visitas", "RunAll", "--local-scheduler",
                                    "--workers", str(workers)], cwd=run_dir, env=env,
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
            _settle()
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


def _settle() -> None:
    """Flush what earlier steps wrote, so that their writeback is not billed to the next one."""
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


def _archive_bytes(log: Path) -> int:
    """Bytes the archive step wrote into the backup zips (its log lines say)."""
    pattern = re.compile(r"archived .* \((\d+) bytes written\)")
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(int(m.group(1)) for m in map(pattern.search, lines) if m)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visitas.dev.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--visitors", type=int, default=300_000)
    parser.add_argument("--defects", type=float, default=0.001)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--many-files", type=int, default=200, help="0 to skip")
    parser.add_argument("--many-rows", type=int, default=1000, help="rows of each of the many files")
    parser.add_argument("--dir", type=Path, default=Path(".bench"))
    parser.add_argument("--skip-floor", action="store_true")
    args = parser.parse_args(argv)

    bench = Bench(args.dir.resolve())
    try:
        generated = bench.base / "generated"
        shutil.rmtree(generated, ignore_errors=True)
        start = time.perf_counter()
        manifest = sample.generate(generated, files=1, rows=args.rows, seed=42, defects=args.defects,
                                   visitors=args.visitors)
        info = manifest["files"]["report_1.txt"]
        report = generated / "report_1.txt"
        size_mb = report.stat().st_size / 1048576
        print(f"generated {args.rows:,} rows ({size_mb:.0f} MiB, {args.visitors:,} visitor pool, "
              f"{info['rejected_rows']:,} planted defects) in {time.perf_counter() - start:.1f}s")
        truth = pl.read_parquet(generated / "truth.parquet")

        floor = None
        if not args.skip_floor:
            # Raw COPY cannot take the planted defects (14/16 fields): the floor moves the same
            # rows without them (same seed, within 1% of the size).
            sample.generate(bench.base / "floor-twin", files=1, rows=args.rows, seed=42,
                            defects=0.0, visitors=args.visitors)
            twin_file = bench.base / "floor-twin" / "report_1.txt"
            shutil.copyfile(twin_file, bench.remote / twin_file.name)
            floor = bench.floor(twin_file)
            (bench.remote / twin_file.name).unlink()
        shutil.copyfile(report, bench.remote / report.name)
        if floor:
            print(f"floor:    {floor['total']:7.2f}s  (download {floor['download']:.2f}s, COPY raw "
                  f"{floor['copy']:.2f}s, zip {floor['zip']:.2f}s)")
        result = bench.pipeline("bench", args.workers)
        print(f"pipeline: {result['seconds']:7.2f}s  with --workers {args.workers}")
        if floor:
            print(f"ratio pipeline/floor: {result['seconds'] / floor['total']:.2f}")
        print("per stage: " + ", ".join(f"{k} {v:.2f}s" for k, v in result["stages"].items()))
        print(f"peak RSS of the pipeline's process tree: {result['peak_rss_mb']:.0f} MiB")
        counts = bench.counts("bench")
        expected = {"statistics": info["valid_rows"], "errors_lines": info["rejected_rows"],
                    "visitor": truth["email"].n_unique(), "files_loaded": 1}
        ok = counts == expected
        print(f"counts: {json.dumps(counts)} — {'as planted' if ok else 'EXPECTED ' + json.dumps(expected)}")

        if args.many_files:
            many = bench.base / "many"
            shutil.rmtree(many, ignore_errors=True)
            sample.generate(many, files=args.many_files, rows=args.many_rows, seed=7, defects=0.01)
            modes = [("--workers 1", 1, 1), ("--workers 2", 2, 1), ("2 hosts, one luigid", 1, 2)]
            for label, workers, hosts in modes:
                for path in many.glob("report_*.txt"):
                    shutil.copyfile(path, bench.remote / path.name)
                schema = f"bench_many_{workers}w_{hosts}h"
                result = (bench.pipeline(schema, workers) if hosts == 1
                          else bench.pipeline_hosts(schema, hosts))
                counts = bench.counts(schema)
                rss = f", peak RSS {result['peak_rss_mb']:.0f} MiB" if "peak_rss_mb" in result else ""
                if "archive_bytes" in result:
                    run_dir = bench.base / f"run-{schema}"
                    zips = sum(p.stat().st_size for p in run_dir.rglob("visitas_*.zip"))
                    rss += (f", archive wrote {result['archive_bytes'] / 1048576:.1f} MiB"
                            f" for zips of {zips / 1048576:.1f} MiB")
                print(f"{args.many_files} files x {args.many_rows:,} rows, {label}: "
                      f"{result['seconds']:.1f}s ({60 * args.many_files / result['seconds']:.0f} files/min,"
                      f" {1000 * result['seconds'] / args.many_files:.0f} ms/file), "
                      f"{counts['files_loaded']} files loaded{rss}")
        return 0 if ok else 1
    finally:
        bench.close()


if __name__ == "__main__":
    raise SystemExit(main())
