"""The ``visitas`` command: operator tools beside the Luigi pipeline.

    visitas report --month 2026-11 [--to 2026-12] [--format table|csv|json]

The configuration is Luigi's (``luigi.cfg`` in the working directory, then ``LUIGI_CONFIG_PATH``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visitas", description="visitas operator tools")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="files and rows processed per month and file")
    report.add_argument("--month", default=f"{dt.date.today():%Y-%m}", help="YYYY-MM (default: this month)")
    report.add_argument("--to", default=None, help="last month of a range, YYYY-MM")
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    args = parser.parse_args(argv)

    from visitas import db
    from visitas.ops import monthly
    from visitas.runtime import logsetup

    logsetup.configure()
    try:
        first = monthly.parse_month(args.month)
        last = monthly.parse_month(args.to) if args.to else first
    except ValueError as error:
        parser.error(str(error))
    if last < first:
        parser.error("--to is before --month")
    rows = monthly.monthly_rows(db.database(), first, last)
    sys.stdout.write(monthly.render(rows, args.format))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
