"""The suite's own rules: helpers live in ``tests/support/``, no test module imports another, and pytest runs strict
(unknown options, a passing xfail and any warning fail the run)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _is_test_module(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "tests" and (parts[-1].startswith("test_") or parts[-1] == "conftest")


def test_no_module_of_the_suite_or_the_benchmarks_imports_a_test_module_or_a_conftest() -> None:
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for folder in (TESTS, ROOT / "benchmarks")
        for path in folder.rglob("*.py")
        for name in _imported_modules(path)
        if _is_test_module(name)
    }
    assert not offenders, sorted(offenders)


def test_shared_helpers_live_in_the_support_package_only() -> None:
    loose = {
        path.name
        for path in TESTS.glob("*.py")
        if not path.name.startswith("test_") and path.name not in {"__init__.py", "conftest.py"}
    }
    assert not loose, f"helpers belong in tests/support/: {sorted(loose)}"


def test_pytest_runs_strict_and_turns_every_warning_into_an_error() -> None:
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert {"--strict-markers", "--strict-config"} <= set(options["addopts"].split())
    assert options["xfail_strict"] is True
    assert options["filterwarnings"][0] == "error"
    assert set(options["filterwarnings"][1:]) <= {"default::ResourceWarning"}, "a new ignore needs its reason here"
    assert "-m" not in options["addopts"].split() and "--deselect" not in options["addopts"], "nothing deselected"


def test_the_support_packages_repo_root_is_the_repository() -> None:
    from tests.support import REPO_ROOT

    assert REPO_ROOT == ROOT and (REPO_ROOT / "pyproject.toml").is_file()


def test_settings_made_for_tests_write_no_checkpoint_into_the_checkout() -> None:
    from tests.support.databases import make_settings

    assert not make_settings().audit_anchor_dir.resolve().is_relative_to(ROOT)
