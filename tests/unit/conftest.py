import luigi.configuration
import polars as pl
import pytest

HEADER = ("email,jyv,Badmail,Baja,Fecha envio,Fecha open,Opens,Opens virales,Fecha click,"
          "Clicks,Clicks virales,Links,IPs,Navegadores,Plataformas")
GOOD_ROW = ('ana@example.com,1,,,08/02/2013 18:30,08/02/2013 19:00,2,0,-,0,0,-,'
            '"65.49.14.78,65.49.14.93","IE 9.0,",Windows')


def row(**changes: str) -> str:
    """GOOD_ROW with some fields replaced, by internal column name."""
    from visitas.transform.contract import COLUMNS, split_line

    fields = split_line(GOOD_ROW)
    for name, value in changes.items():
        fields[COLUMNS.index(name)] = value
    return ",".join(f'"{f}"' if "," in f else f for f in fields)


@pytest.fixture
def check():
    """Validate data lines (numbered from 2, as after a header) -> the checked frame."""
    from visitas.transform import contract

    def _check(*lines: str) -> pl.DataFrame:
        n = len(lines)
        frame = pl.DataFrame({"line_no": list(range(2, 2 + n)), "line": list(lines),
                              "cp1252": [False] * n, "too_long": [False] * n},
                             schema=contract.LINES_SCHEMA)
        return contract.validate_lines(frame)

    return _check


@pytest.fixture
def errors_of(check):
    """Validate data lines -> list of (line_no, column_name, reason, message)."""
    from visitas.transform import contract

    def _errors(*lines: str) -> list[tuple]:
        frame = contract.error_rows(check(*lines).lazy(), "report_1.txt").collect()
        return list(frame.select("line_no", "column_name", "reason", "message").iter_rows())

    return _errors


@pytest.fixture
def luigi_config():
    """An empty Luigi configuration of the test's own, restored afterwards (this process may
    have read ./luigi.cfg, whose ${VAR} references point at production)."""
    config = luigi.configuration.get_config()
    saved = {s: {k: config.get(s, k, raw=True) for k in config.options(s)} for s in config.sections()}
    for section in config.sections():
        config.remove_section(section)
    yield config
    for section in config.sections():
        config.remove_section(section)
    for section, values in saved.items():
        config.add_section(section)
        for key, value in values.items():
            config.set(section, key, value)
