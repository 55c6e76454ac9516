"""The ``visitas`` command: operator tools beside the Luigi pipeline.

    visitas run [--date D] [--workers N] [--scheduler-host H --scheduler-port P]   the pipeline
    visitas check                                        preflight, one line per check
    visitas status [--date D]                            what is pending, failed, last run
    visitas validate FILE... [--format text|json]        the contract on local files (no config)
    visitas report --month 2026-11 [--to 2026-12] [--by file|day|month]
                   [--format table|csv|json|html]       the load report (needs [postgres] only)
    visitas rebuild [--backups DIR] [--schema S] [--apply]   the visitor table from the backups

The configuration is Luigi's (``luigi.cfg`` in the working directory, then ``LUIGI_CONFIG_PATH``).
Configuration and connection problems end in one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

EXIT_PROBLEM, EXIT_USAGE, EXIT_DIFFERENT = 1, 2, 3


def _version() -> str:
    try:
        return version("visitas")
    except PackageNotFoundError:  # a checkout that was never installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visitas", description="visitas operator tools")
    parser.add_argument("--version", action="version", version=f"visitas {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("validate", help="check local report files against the contract (no"
                                            " configuration, no server); exit 1 if anything is rejected")
    check.add_argument("files", nargs="+", type=Path, metavar="FILE")
    check.add_argument("--format", choices=("text", "json"), default="text")
    check.add_argument("--max-errors", type=int, default=50, help="error lines shown per file (text)")
    report = sub.add_parser("report", help="files, rows, visitors, warnings, bytes, time and open/click"
                                           " rates from the load log, per file, day or month")
    report.add_argument("--month", default=f"{dt.date.today():%Y-%m}", help="YYYY-MM (default: this month)")
    report.add_argument("--to", default=None, help="last month of a range, YYYY-MM")
    report.add_argument("--by", choices=("file", "day", "month"), default="file",
                        help="one row per file (and host), run date or month (default: file)")
    report.add_argument("--format", choices=("table", "csv", "json", "html"), default="table",
                        help="table and html have TOTAL rows; csv and json have none (default: table)")
    run = sub.add_parser(
        "run", help="run the pipeline for a run date (the cron line); exit codes: 0 success, 10 already"
                    " running, 20 no file for longer than [notify] stale_after_hours, 25 not run,"
                    " 30 a task failed, 35 scheduling error, 40 unexpected error")
    run.add_argument("--date", type=dt.date.fromisoformat, default=dt.date.today(),
                     help="run date, YYYY-MM-DD (default: today)")
    run.add_argument("--workers", type=int, default=1,
                     help="steps run at once, in threads of this process (default 1)")
    run.add_argument("--scheduler-host", default=None,
                     help="luigid's host (default: a local scheduler, no luigid)")
    run.add_argument("--scheduler-port", type=int, default=None, help="luigid's port (default 8082)")
    sub.add_parser("check", help="preflight: configuration, SFTP host key and login, database and"
                                 " privileges, SMTP, folders; one line each, exit 1 if any fails")
    status = sub.add_parser("status", help="files at the source, loads not archived or not removed,"
                                           " failed files, the last successful run, the last file")
    status.add_argument("--date", type=dt.date.fromisoformat, default=dt.date.today(),
                        help="run date whose files are listed (default: today)")
    rebuild = sub.add_parser(
        "rebuild", help="replay the archived reports load_log says were loaded into a scratch"
                        " schema and compare its visitor table with the live one; exit 0 if"
                        " identical (or applied), 3 if they differ")
    rebuild.add_argument("--backups", type=Path, default=None,
                         help="folder of the backup zips (default: [paths] backup_dir)")
    rebuild.add_argument("--schema", default=None,
                         help="scratch schema for the rebuilt tables (default: visitas_rebuild)")
    rebuild.add_argument("--apply", action="store_true",
                         help="replace the live visitor table with the rebuilt one (one transaction)")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "rebuild":
            return _rebuild(args)
        if args.command == "check":
            return _check()
        if args.command == "status":
            from visitas.ops import status as operator_status
            from visitas.runtime import logsetup

            logsetup.configure()
            for name in ("visitas", "paramiko"):  # the listing is the output
                logging.getLogger(name).setLevel(logging.CRITICAL)
            listing, complete = operator_status.render(operator_status.gather(args.date))
            sys.stdout.write(listing)
            return 0 if complete else EXIT_PROBLEM
        if args.command == "run":
            from visitas.ops import runner

            return runner.run(args.date, args.workers, args.scheduler_host, args.scheduler_port)
        return _report(args, parser)
    except Exception as error:  # one line for the operator; --debug for the engineer
        if args.debug:
            raise
        from visitas.runtime import logsetup

        cause: BaseException = error
        while cause.__cause__ is not None:  # Luigi wraps the message that names the problem
            cause = cause.__cause__
        print(f"visitas: error: {logsetup.one_line(cause)}", file=sys.stderr)
        return EXIT_PROBLEM


def _validate(args: argparse.Namespace) -> int:
    from visitas.ops import validation

    logging.getLogger("visitas").setLevel(logging.ERROR)  # the verdicts are the output
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"visitas: error: not a file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    reports = [validation.check_file(path) for path in args.files]
    sys.stdout.write(validation.render_json(reports) if args.format == "json"
                     else validation.render_text(reports, args.max_errors))
    return 0 if all(r.clean for r in reports) else EXIT_PROBLEM


def _report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from visitas import db
    from visitas.ops import monthly
    from visitas.runtime import logsetup

    try:
        first = monthly.parse_month(args.month)
        last = monthly.parse_month(args.to) if args.to else first
    except ValueError as error:
        parser.error(str(error))
    if last < first:
        parser.error("--to is before --month")
    logsetup.configure()
    report = monthly.load_report(db.database(), first, last, args.by)
    sys.stdout.write(monthly.render(report, args.format))
    return 0


def _check() -> int:
    from visitas.ops import preflight

    for name in ("visitas", "paramiko"):  # the lines are the output
        logging.getLogger(name).setLevel(logging.CRITICAL)
    checks = preflight.run_checks()
    sys.stdout.write(preflight.render(checks))
    return 0 if all(c.ok for c in checks) else EXIT_PROBLEM


def _rebuild(args: argparse.Namespace) -> int:
    from visitas import config
    from visitas.db import Database
    from visitas.ops import rebuild
    from visitas.runtime import logsetup

    logsetup.configure()
    load, paths = config.load(), config.paths()
    live = Database.from_config()
    scratch = Database.from_config(args.schema or rebuild.DEFAULT_SCHEMA)
    job = rebuild.Rebuild(
        live, scratch, args.backups or Path(paths.backup_dir),
        Path(paths.resolved_state_dir()) / "rebuild",
        rebuild.Settings(load.batch_mb * 1024 * 1024, load.parallel_batches, load.max_line_bytes),
        progress=lambda line: print(line, file=sys.stderr))
    outcome = job.run()
    if args.apply and not outcome.identical:
        job.apply(outcome)
    sys.stdout.write(rebuild.render(outcome, scratch.schema))
    return 0 if outcome.identical or outcome.applied else EXIT_DIFFERENT


if __name__ == "__main__":
    raise SystemExit(main())
