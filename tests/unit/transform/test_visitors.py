"""The visitor rule: counters from visits, independent of the order of files."""

import datetime as dt

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from visitas.transform import visitors


VISIT_SCHEMA = {"email": pl.String, "sent_at": pl.Datetime("us"), "opened": pl.Boolean,
                "clicked": pl.Boolean, "opens": pl.Int64, "clicks": pl.Int64, "opened_on": pl.Date,
                "clicked_on": pl.Date}


def _visits(*rows):
    """Visits from ``(email, sent_at)`` pairs or whole rows of VISIT_SCHEMA (engagement: none)."""
    full = [tuple(r) + (False, False, 0, 0, None, None)[len(r) - 2:] for r in rows]
    return pl.DataFrame(full, orient="row", schema=VISIT_SCHEMA)


def test_counters_follow_the_latest_visit():
    visits = _visits(
        ("a@x.mx", dt.datetime(2024, 12, 31, 23, 59)),
        ("a@x.mx", dt.datetime(2025, 3, 1, 8, 0)),
        ("a@x.mx", dt.datetime(2025, 3, 20, 9, 0)),
        ("a@x.mx", dt.datetime(2025, 1, 5, 9, 0)),
        ("b@x.mx", dt.datetime(2023, 7, 7, 7, 7)),
    )
    result = visitors.visitor_rule(visits.lazy()).collect()
    expected = pl.DataFrame({
        "email": ["a@x.mx", "b@x.mx"],
        "fecha_primera_visita": [dt.date(2024, 12, 31), dt.date(2023, 7, 7)],
        "fecha_ultima_visita": [dt.date(2025, 3, 20), dt.date(2023, 7, 7)],
        "visitas_totales": [4, 1],
        "visitas_anio_actual": [3, 1],
        "visitas_mes_actual": [2, 1],
        "opens_totales": [0, 0], "clicks_totales": [0, 0], "visitas_abiertas": [0, 0],
        "visitas_clicadas": [0, 0], "fecha_ultimo_open": [None, None],
        "fecha_ultimo_click": [None, None],
    }, schema=visitors.SUMMARY_SCHEMA)
    assert_frame_equal(result, expected)


def test_merge_rule_keeps_only_the_latest_year_and_month():
    earlier = _visits(("a@x.mx", dt.datetime(2024, 5, 1)), ("a@x.mx", dt.datetime(2024, 5, 9)))
    later = _visits(("a@x.mx", dt.datetime(2025, 5, 2)))
    same_month = _visits(("a@x.mx", dt.datetime(2025, 5, 30)))
    parts = pl.concat([visitors.visitor_rule(f.lazy()).collect() for f in (earlier, later, same_month)])
    merged = visitors.merge_rule(parts.lazy()).collect()
    assert merged.row(0)[:6] == ("a@x.mx", dt.date(2024, 5, 1), dt.date(2025, 5, 30), 4, 2, 2)


def test_engagement_counters_sum_and_keep_the_latest_dates():
    visits = _visits(
        ("a@x.mx", dt.datetime(2025, 3, 1), True, True, 3, 1, dt.date(2025, 3, 2), dt.date(2025, 3, 2)),
        # an open dated before the send (kept), and a click with no date
        ("a@x.mx", dt.datetime(2025, 3, 9), True, True, 1, 2, dt.date(2025, 3, 8), None),
        ("a@x.mx", dt.datetime(2025, 4, 1), False, False, None, 0, None, None),
        ("b@x.mx", dt.datetime(2025, 4, 1), False, True, 0, 4, None, dt.date(2025, 4, 3)),
    )
    result = visitors.visitor_rule(visits.lazy()).collect()
    assert result.select("email", *visitors.ENGAGEMENT_SUMS, *visitors.ENGAGEMENT_DATES).rows() == [
        ("a@x.mx", 4, 3, 2, 2, dt.date(2025, 3, 8), dt.date(2025, 3, 2)),
        ("b@x.mx", 0, 4, 0, 1, None, dt.date(2025, 4, 3)),
    ]


_day = st.dates(min_value=dt.date(2020, 1, 1), max_value=dt.date(2027, 12, 31))
visit_strategy = st.lists(
    st.tuples(st.sampled_from(["a@x.mx", "b@x.mx", "c@x.mx"]),
              st.datetimes(min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2027, 12, 31)),
              st.booleans(), st.booleans(),
              st.none() | st.integers(0, 10**6), st.none() | st.integers(0, 10**6),
              st.none() | _day, st.none() | _day),
    min_size=1, max_size=40)


@settings(max_examples=80, deadline=None)
@given(visit_strategy, st.randoms(use_true_random=False), st.integers(min_value=1, max_value=5))
def test_result_does_not_depend_on_load_order(pairs, random, n_files):
    """Split the visits into 'files', merge their summaries one at a time in a shuffled order
    (as successive loads do): the same counters as all visits at once."""
    visits = _visits(*pairs)
    reference = visitors.visitor_rule(visits.lazy()).collect()
    files = [visits[i::n_files] for i in range(n_files)]
    random.shuffle(files)
    state = None
    for part in files:
        if part.height == 0:
            continue
        summary = visitors.visitor_rule(part.lazy()).collect()
        state = summary if state is None else visitors.merge_rule(
            pl.concat([state, summary]).lazy()).collect()
    assert_frame_equal(state, reference)
    assert reference["visitas_totales"].sum() == len(pairs)
    assert (reference["visitas_mes_actual"] <= reference["visitas_anio_actual"]).all()
    assert (reference["visitas_anio_actual"] <= reference["visitas_totales"]).all()
    # The engagement counters, worked out here in plain Python.
    for email, *_, opens, clicks, opened, clicked, last_open, last_click in reference.iter_rows():
        mine = [p for p in pairs if p[0] == email]
        assert opens == sum(p[4] or 0 for p in mine)
        assert clicks == sum(p[5] or 0 for p in mine)
        assert opened == sum(p[2] for p in mine)
        assert clicked == sum(p[3] for p in mine)
        assert last_open == max((p[6] for p in mine if p[6]), default=None)
        assert last_click == max((p[7] for p in mine if p[7]), default=None)
