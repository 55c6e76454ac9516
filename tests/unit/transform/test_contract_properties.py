"""Property-based: arbitrary lines never crash validation, and every line ends up in exactly one
of statistics or errors."""

import polars as pl
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from visitas.transform import contract

from ..conftest import GOOD_ROW, row

FIELD = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"),
            max_size=12),
    st.sampled_from(["", "-", '"', '""', '"a,b"', "08/02/2013 18:30", "31/02/2013 10:00", "-1",
                     "3", "ana@example.com", "a@@b", "\x00", "\r", "SI", "josé@ejemplo.mx"]),
)
LINE = st.one_of(
    st.lists(FIELD, min_size=0, max_size=18).map(",".join),
    st.builds(lambda email, date, opens: row(email=email, fecha_envio=date, opens=opens),
              FIELD.filter(lambda f: '"' not in f and "," not in f),
              FIELD.filter(lambda f: '"' not in f and "," not in f),
              FIELD.filter(lambda f: '"' not in f and "," not in f)),
    st.just(GOOD_ROW),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINE, min_size=1, max_size=25))
def test_every_line_is_statistics_or_error_never_both(lines):
    """Through the real line splitter: every non-empty physical line (a CR inside a field ends
    its line too) is one row, and ends in statistics or errors, never both, never neither."""
    frame, _ = contract.lines_frame("\n".join(lines).encode("utf-8") + b"\n", first_line_no=2)
    checked = contract.validate_lines(frame)
    assert checked.height == frame.height
    stats = set(contract.statistics_rows(checked.lazy(), "f").collect()["line_no"].to_list())
    errors = contract.error_rows(checked.lazy(), "f").collect()
    error_lines = set(errors["line_no"].to_list())
    assert not stats & error_lines
    assert stats | error_lines == set(frame["line_no"].to_list())
    assert errors["message"].null_count() == 0 and errors["reason"].null_count() == 0

# A quoted field as a CSV writer makes it: quotes doubled inside.
QUOTED = FIELD.map(lambda text: '"' + text.replace('"', '""') + '"')


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINE | st.lists(FIELD | QUOTED, min_size=14, max_size=16).map(",".join),
                min_size=1, max_size=contract.FEW_LINES))
def test_the_slow_path_splits_a_few_lines_in_python_as_polars_does(lines):
    """Malformed lines are split by a regular expression: by Python's re when they are few, by
    Polars' otherwise.  Both give the same fields, field counts and quoting verdicts."""
    frame = contract.lines_frame("\n".join(lines).encode("utf-8") + b"\n", first_line_no=2)[0]
    assume(frame.height > 0)  # only empty lines
    padding = contract.FEW_LINES // frame.height + 1  # enough copies to take the Polars path
    many = contract._split_by_pattern(pl.concat([frame] * padding)).head(frame.height)
    few = contract._split_by_pattern(frame)
    assert padding * frame.height > contract.FEW_LINES >= frame.height
    assert_frame_equal(few, many)
