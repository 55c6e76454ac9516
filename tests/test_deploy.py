"""Production install: the pinned, non-editable install without dev tools works; the systemd
units pass systemd-analyze; cron and systemd run `visitas run`; every runtime dependency is pinned
within its bounds."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "config" / "systemd"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_every_runtime_dependency_is_pinned_within_its_bounds():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    for text in project["dependencies"]:
        requirement = Requirement(text)
        assert requirement.name.lower() in pins, f"{requirement.name} is not in constraints.txt"
        assert Version(pins[requirement.name.lower()]) in requirement.specifier, text
        upper = [s for s in requirement.specifier if s.operator in ("<", "<=")]
        assert upper, f"{requirement.name} has no upper bound"


def test_the_production_install_is_pinned_not_editable_and_has_no_dev_tools(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-c",
                           str(ROOT / "constraints.txt"), str(ROOT)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    frozen = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True,
                            check=True).stdout
    installed = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
                 for line in frozen.splitlines() if "==" in line}
    pins = _pins()
    assert {k: v for k, v in installed.items() if k != "visitas"} == pins  # nothing more, nothing else
    assert "pytest" not in installed and "asyncssh" not in installed
    located = subprocess.run([str(python), "-c", "import visitas, sys; print(visitas.__file__)"],
                             capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert str(venv) in located  # installed into the venv, not a link to the checkout
    version = subprocess.run([str(venv / "bin" / "visitas"), "--version"], capture_output=True,
                             text=True, check=True, cwd=tmp_path).stdout
    assert version.startswith("visitas ")
    dev = subprocess.run([str(python), "-c", "import visitas.dev.servers"], capture_output=True,
                         cwd=tmp_path)
    assert dev.returncode != 0  # the dev tools are not shipped


def _read_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read(UNITS / name)
    return parser


def test_systemd_runs_visitas_run_daily_and_catches_up_a_missed_night():
    service, timer = _read_unit("visitas.service"), _read_unit("visitas.timer")
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["ExecStart"].split()[1:] == ["run"]
    assert service["Service"]["ExecStart"].endswith("/venv/bin/visitas run")
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["OnCalendar"] == "*-*-* 02:30:00"
    assert _read_unit("luigid.service")["Service"]["ExecStart"].split()[0].endswith("/venv/bin/luigid")
    cron = [line for line in (ROOT / "crontab.example").read_text().splitlines()
            if line and not line.startswith(("#", "SHELL", "MAILTO"))]
    assert len(cron) == 1 and "venv/bin/visitas run" in cron[0] and "luigi " not in cron[0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (.ci/run installs it)")
def test_the_systemd_units_pass_systemd_analyze_verify(tmp_path):
    """Verified as installed: /opt/visitas is this test's own tree, with a real venv's programs."""
    opt = tmp_path / "opt" / "visitas"
    (opt / "config").mkdir(parents=True)
    (opt / "config" / "visitas.env").write_text("VISITAS_DSN=postgresql://etl@db/visitas\n")
    (opt / "venv").symlink_to(Path(sys.executable).parent.parent)
    units = tmp_path / "units"
    units.mkdir()
    for unit in UNITS.iterdir():
        (units / unit.name).write_text(unit.read_text().replace("/opt/visitas", str(opt)))
    names = sorted(str(p) for p in units.iterdir())
    assert len(names) == 3
    done = subprocess.run(["systemd-analyze", "verify", *names], capture_output=True, text=True,
                          env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # no unknown key, no bad value

    # The check can fail: a misspelt key is reported.
    (units / "visitas.timer").write_text((units / "visitas.timer").read_text().replace(
        "Persistent=", "Persistant="))
    broken = subprocess.run(["systemd-analyze", "verify", *names], capture_output=True, text=True)
    assert "Persistant" in broken.stderr
