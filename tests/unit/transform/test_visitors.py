"""The visitor rule: counters from visits, independent of the order of files."""

import datetime as dt

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from visitas.transform import visitors


def _visits(*pairs):
    return pl.DataFrame({"email": [p[0] for p in pairs], "sent_at": [p[1] for p in pairs]},
                        schema={"email": pl.String, "sent_at": pl.Datetime("us")})


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
    }, schema=visitors.SUMMARY_SCHEMA)
    assert_frame_equal(result, expected)


def test_merge_rule_keeps_only_the_latest_year_and_month():
    earlier = _visits(("a@x.mx", dt.datetime(2024, 5, 1)), ("a@x.mx", dt.datetime(2024, 5, 9)))
    later = _visits(("a@x.mx", dt.datetime(2025, 5, 2)))
    same_month = _visits(("a@x.mx", dt.datetime(2025, 5, 30)))
    parts = pl.concat([visitors.visitor_rule(f.lazy()).collect() for f in (earlier, later, same_month)])
    merged = visitors.merge_rule(parts.lazy()).collect()
    assert merged.row(0) == ("a@x.mx", dt.date(2024, 5, 1), dt.date(2025, 5, 30), 4, 2, 2)


visit_strategy = st.lists(
    st.tuples(st.sampled_from(["a@x.mx", "b@x.mx", "c@x.mx"]),
              st.datetimes(min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2027, 12, 31))),
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
