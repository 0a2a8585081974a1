"""The package's public surface: its version from the installed metadata, what a constructor takes is exported, and
every error the library raises on purpose sits under ``PersistenceError`` in ``persistence.errors``."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import pkgutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

import pytest

import persistence
from persistence import errors
from persistence.observe import events
from persistence.sidecar import PersistenceSidecar
from persistence.write.breaker import CircuitBreaker
from persistence.write.journal import Journal


def test_version_is_the_installed_distributions() -> None:
    assert persistence.__version__ == version("persistence-sidecar")
    assert "__version__" in persistence.__all__


def test_everything_in_all_is_importable() -> None:
    for name in persistence.__all__:
        assert hasattr(persistence, name), name


def _modules_loaded_by(code: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(n for n in {names!r} if n in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.split()


def test_importing_the_package_loads_no_heavy_dependency_until_a_name_is_used() -> None:
    """Every ``python -m persistence`` run and every host pays for ``import persistence``: it stays cheap."""
    heavy = ("sqlalchemy", "alembic", "pydantic", "fastapi", "prometheus_client", "persistence.sidecar")
    assert _modules_loaded_by("import persistence", heavy) == []
    used = "from persistence import PersistenceSidecar, __version__"
    assert {"sqlalchemy", "persistence.sidecar"} <= set(_modules_loaded_by(used, heavy))  # loaded on first use


def test_the_command_line_loads_the_server_audit_keys_and_postgresql_driver_only_when_a_command_needs_them() -> None:
    needed_later = ("uvicorn", "fastapi", "cryptography", "asyncpg")
    assert _modules_loaded_by("import persistence.app.cli.main", needed_later) == []


def test_what_the_sidecar_constructor_takes_is_exported() -> None:
    parameters = inspect.signature(PersistenceSidecar).parameters
    assert "bus" in parameters and "retry" in parameters
    assert persistence.EventBus is events.EventBus
    assert dataclasses.is_dataclass(persistence.RetryPolicy)
    event_classes = {
        name for name, value in vars(events).items() if inspect.isclass(value) and issubclass(value, events.Event)
    }
    assert event_classes <= set(persistence.__all__)


def test_a_listener_on_an_exported_bus_sees_exported_events() -> None:
    seen: list[persistence.Event] = []
    bus = persistence.EventBus()
    bus.subscribe(seen.append)
    bus.publish(persistence.PersistenceToggled(enabled=False))
    assert seen == [persistence.PersistenceToggled(enabled=False)]


# Modules that run on import (the command line, Alembic's environment script): read, never imported.
RUN_ON_IMPORT = {"persistence.__main__", "persistence.migrations.env"}


def _every_module() -> list[str]:
    names = [info.name for info in pkgutil.walk_packages(persistence.__path__, "persistence.")]
    assert len(names) > 50 and "persistence.write.breaker" in names and "persistence.app.cli.main" in names
    return names


def _exception_classes(module: ModuleType) -> list[type[BaseException]]:
    """The exception classes ``module`` defines itself (not those it imports)."""
    return [
        value
        for value in vars(module).values()
        if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.__name__
    ]


def test_no_module_of_the_package_defines_an_exception_class_outside_errors() -> None:
    offenders: list[str] = []
    for name in _every_module():
        if name == "persistence.errors":
            continue
        if name in RUN_ON_IMPORT:
            spec = importlib.util.find_spec(name)
            assert spec is not None and spec.origin is not None
            tree = ast.parse(Path(spec.origin).read_text())
            offenders += [f"{name}.{node.name}" for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
            continue
        offenders += [f"{name}.{cls.__name__}" for cls in _exception_classes(importlib.import_module(name))]
    assert not offenders, f"error classes belong in persistence/errors.py: {offenders}"


def test_every_error_class_derives_from_persistence_error_and_is_exported() -> None:
    defined = _exception_classes(errors)
    signals = [cls for cls in defined if issubclass(cls, errors.InternalSignal)]
    assert len(defined) - len(signals) > 20
    for cls in signals:  # raised and caught inside the package: never a caller's business
        assert not issubclass(cls, errors.PersistenceError) and cls.__name__ not in persistence.__all__, cls
    for cls in set(defined) - set(signals):
        assert issubclass(cls, errors.PersistenceError), cls
        assert cls.__name__ in persistence.__all__, f"{cls.__name__} is not in persistence.__all__"
        assert getattr(persistence, cls.__name__) is cls
    exported = [getattr(persistence, name) for name in persistence.__all__]
    for value in exported:
        if inspect.isclass(value) and issubclass(value, BaseException):
            assert value.__module__ == "persistence.errors", value


def test_everything_in_all_resolves_once() -> None:
    assert len(persistence.__all__) == len(set(persistence.__all__))
    for name in persistence.__all__:
        assert getattr(persistence, name, None) is not None, name


def test_the_breaker_and_the_journal_raise_typed_state_errors_with_their_context(tmp_path: Path) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_seconds=5.0)
    breaker.record_failure(breaker.admit(0.0)[0], 0.0)
    refused, _ = breaker.admit(1.0)
    assert not refused.allowed
    with pytest.raises(errors.BreakerAdmissionError) as caught:
        breaker.record_success(refused, 1.0)
    assert (caught.value.state, caught.value.generation) == ("open", refused.generation)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(errors.ConfigurationError) as invalid:
        CircuitBreaker(failure_threshold=0, reset_seconds=5.0)
    assert invalid.value.variable == "failure_threshold"

    journal = Journal(tmp_path / "journal")
    try:
        journal.append([{"n": 1}])
        (entry,) = journal.peek(10)
        with pytest.raises(errors.JournalPositionError) as unknown:
            journal.acknowledge_through((entry.segment, entry.end_offset + 1))
        error = unknown.value
        assert (error.segment, error.offset, error.path) == (entry.segment, entry.end_offset + 1, tmp_path / "journal")
        assert isinstance(error, errors.JournalError) and isinstance(error, ValueError)
    finally:
        journal.close()


def test_journal_error_and_port_error_carry_their_context() -> None:
    journal_error = errors.JournalError("cannot append", Path("/tmp/journal"))
    assert journal_error.path == Path("/tmp/journal") and "cannot append" in str(journal_error)
    port_error = errors.ApiPortUnavailableError("127.0.0.1", 8089, "in use")
    assert (port_error.host, port_error.port) == ("127.0.0.1", 8089) and "PERSISTENCE_API_PORT" in str(port_error)
