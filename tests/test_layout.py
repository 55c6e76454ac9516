"""The package's layout rules: production code never imports the dev-only area, and an install
ships production code (with its migrations) and nothing of the dev-only area."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "visitas"
DEV = PACKAGE / "dev"


def _production_modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if DEV not in p.parents]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_production_code_never_imports_the_dev_only_area():
    modules = _production_modules()
    assert len(modules) > 20  # the rule is checked over the whole package
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p)
                                                     if n == "visitas.dev" or n.startswith("visitas.dev."))
                 for p in modules}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_wheel_ships_production_code_and_migrations_only(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(tmp_path), str(PACKAGE.parent)],
                   check=True, capture_output=True)
    [wheel] = tmp_path.glob("visitas-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("visitas/")}
    expected = {str(p.relative_to(PACKAGE.parent)) for p in _production_modules()}
    migrations = {str(p.relative_to(PACKAGE.parent)) for p in (PACKAGE / "db" / "migrations").glob("*.sql")}
    assert shipped == expected | migrations
