"""The visitor rule, as pure functions over frames.

A visit is a valid statistics row, dated by ``Fecha envio`` (``sent_at``).  For each visitor:

- ``fecha_primera_visita``: date of the earliest visit;
- ``fecha_ultima_visita``: date of the latest visit;
- ``visitas_totales``: number of visits;
- ``visitas_anio_actual``: visits in the calendar year of the latest visit;
- ``visitas_mes_actual``: visits in the year-month of the latest visit.

Everything is an aggregate over the set of visits, so the result cannot depend on the order in
which files are loaded.  The database keeps visits per visitor and month (``visitor_month``) and
recomputes the counters from it with the same rule (see ``visitas.db``).
"""

from __future__ import annotations

import polars as pl

MONTHLY_SCHEMA = {
    "email": pl.String, "visit_month": pl.Date, "visit_count": pl.Int64,
    "first_visit": pl.Date, "last_visit": pl.Date,
}


def monthly_visits(visits: pl.LazyFrame) -> pl.LazyFrame:
    """``email, sent_at`` -> visits per visitor and calendar month (what the database keeps)."""
    return (
        visits.with_columns(pl.col("sent_at").dt.date().alias("visit_date"))
        .group_by("email", pl.col("visit_date").dt.truncate("1mo").alias("visit_month"))
        .agg(
            pl.len().cast(pl.Int64).alias("visit_count"),
            pl.col("visit_date").min().alias("first_visit"),
            pl.col("visit_date").max().alias("last_visit"),
        )
        .select([pl.col(name).cast(dtype) for name, dtype in MONTHLY_SCHEMA.items()])
    )


def combine_monthly(monthly: pl.LazyFrame) -> pl.LazyFrame:
    """Merge monthly aggregates of several files (or batches) into one row per visitor-month."""
    return monthly.group_by("email", "visit_month").agg(
        pl.col("visit_count").sum(),
        pl.col("first_visit").min(),
        pl.col("last_visit").max(),
    )


def visitor_counters(monthly: pl.LazyFrame) -> pl.LazyFrame:
    """Visits per visitor and month -> the visitor row (the rule in the module docstring)."""
    latest = pl.col("last_visit").max().over("email")
    return (
        monthly.with_columns(latest.alias("_latest"))
        .group_by("email")
        .agg(
            pl.col("first_visit").min().alias("fecha_primera_visita"),
            pl.col("last_visit").max().alias("fecha_ultima_visita"),
            pl.col("visit_count").sum().alias("visitas_totales"),
            pl.col("visit_count")
            .filter(pl.col("visit_month").dt.year() == pl.col("_latest").dt.year())
            .sum().alias("visitas_anio_actual"),
            pl.col("visit_count")
            .filter(pl.col("visit_month") == pl.col("_latest").dt.truncate("1mo"))
            .sum().alias("visitas_mes_actual"),
        )
        .sort("email")
    )


def visitor_rule(visits: pl.LazyFrame) -> pl.LazyFrame:
    """``email, sent_at`` -> one row per visitor with the five counters."""
    return visitor_counters(monthly_visits(visits))


def as_yyyymmdd(column: str) -> pl.Expr:
    """Dates are reported as ``yyyymmdd``."""
    return pl.col(column).dt.strftime("%Y%m%d")
