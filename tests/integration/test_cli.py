"""The `visitas` command as an operator or a partner runs it: `validate` with no configuration and
no server, `report` with only [postgres], one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from visitas.dev import sample

VISITAS = str(Path(sys.executable).with_name("visitas"))
PRODUCTION_CFG = Path(__file__).resolve().parents[2] / "luigi.cfg"


def _visitas(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("VISITAS_", "LUIGI_"))}
    return subprocess.run([VISITAS, *args], cwd=cwd, env={**environment, **(env or {})},
                          capture_output=True, text=True, timeout=300)


def test_validate_needs_no_configuration_and_finds_every_planted_defect(tmp_path):
    manifest = sample.generate(tmp_path / "in", files=3, rows=300, seed=21, defects=0.05)
    (tmp_path / "in" / "report_9.txt").write_bytes(b"\x00\x01 not a report")
    files = [tmp_path / "in" / name for name in [*manifest["files"], "report_9.txt"]]
    result = _visitas("validate", "--format", "json", *map(str, files), cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # rows were rejected, and one file
    reports = {r["file"]: r for r in json.loads(result.stdout)}
    for name, info in manifest["files"].items():
        got = reports[name]
        assert (got["status"], got["rows_read"], got["rows_valid"], got["rows_rejected"], got["encoding"]) == (
            "valid", info["rows"], info["valid_rows"], info["rejected_rows"], info["encoding"])
        planted = {n for lines in info["defects"].values() for n in lines}
        assert {e["line"] for e in got["errors"]} == planted
        assert all(e["column"] and e["reason"] and e["message"] for e in got["errors"])
    assert (reports["report_9.txt"]["status"], reports["report_9.txt"]["reason"]) == ("rejected", "binary_file")

    text = _visitas("validate", str(files[0]), cwd=tmp_path)
    first_defect = min(n for lines in manifest["files"]["report_1.txt"]["defects"].values() for n in lines)
    assert f"line {first_defect:>7}" in text.stdout and "rows rejected" in text.stdout


def test_validate_exits_0_for_a_clean_file(tmp_path):
    sample.generate(tmp_path, files=1, rows=50, seed=3, defects=0.0)
    result = _visitas("validate", str(tmp_path / "report_1.txt"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("report_1.txt: ok — 50 rows read, 50 valid, 0 rejected")


def test_report_needs_only_postgres_and_errors_are_one_line(env, tmp_path):
    env.generate(files=2, rows=50)
    assert env.luigi().returncode == 0
    only_postgres = tmp_path / "report.cfg"
    only_postgres.write_text(f"[postgres]\ndsn = ${{VISITAS_DSN}}\nschema = {env.schema}\n"
                             "[logfile]\npath =\n")
    elsewhere = tmp_path / "operator"
    elsewhere.mkdir()
    ok = _visitas("report", "--format", "json", cwd=elsewhere,
                  env={"LUIGI_CONFIG_PATH": str(only_postgres), "VISITAS_DSN": env.dsn})
    assert ok.returncode == 0, ok.stderr
    assert sum(r["files_loaded"] for r in json.loads(ok.stdout)) == 2

    # The shipped luigi.cfg with none of its ${VAR}s set: one line that names the variable.
    failed = _visitas("report", cwd=elsewhere, env={"LUIGI_CONFIG_PATH": str(PRODUCTION_CFG)})
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
        "visitas: error: Config refers to a nonexisting environment variable VISITAS_DSN."
        " Section [postgres], option dsn=${VISITAS_DSN}"]
    debug = _visitas("--debug", "report", cwd=elsewhere, env={"LUIGI_CONFIG_PATH": str(PRODUCTION_CFG)})
    assert "Traceback" in debug.stderr


def test_version(tmp_path):
    from importlib.metadata import version

    result = _visitas("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout.strip()) == (0, f"visitas {version('visitas')}")
