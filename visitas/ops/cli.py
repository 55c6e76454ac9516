"""The ``visitas`` command: operator tools beside the Luigi pipeline.

    visitas validate FILE... [--format text|json]        the contract on local files (no config)
    visitas report --month 2026-11 [--to 2026-12] [--format table|csv|json]   (needs [postgres])

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

EXIT_PROBLEM, EXIT_USAGE = 1, 2


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
    report = sub.add_parser("report", help="files and rows processed per month, file and host")
    report.add_argument("--month", default=f"{dt.date.today():%Y-%m}", help="YYYY-MM (default: this month)")
    report.add_argument("--to", default=None, help="last month of a range, YYYY-MM")
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            return _validate(args)
        return _report(args, parser)
    except Exception as error:  # one line for the operator; --debug for the engineer
        if args.debug:
            raise
        from visitas.runtime import logsetup

        cause: BaseException = error
        while cause.__cause__ is not None:  # Luigi wraps the message that names the problem
            cause = cause.__cause__
        text = str(cause).strip().splitlines()
        print(f"visitas: error: {logsetup.mask(text[0] if text else type(cause).__name__)}",
              file=sys.stderr)
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
    rows = monthly.monthly_rows(db.database(), first, last)
    sys.stdout.write(monthly.render(rows, args.format))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
