"""The package's public surface: its version from the installed metadata, what a constructor takes is exported, and
every error the library raises on purpose sits under ``PersistenceError`` in ``persistence.errors``."""

from __future__ import annotations

import dataclasses
import inspect
from importlib.metadata import version
from pathlib import Path

import persistence
from persistence import errors
from persistence.observe import events
from persistence.sidecar import PersistenceSidecar


def test_version_is_the_installed_distributions() -> None:
    assert persistence.__version__ == version("persistence-sidecar")
    assert "__version__" in persistence.__all__


def test_everything_in_all_is_importable() -> None:
    for name in persistence.__all__:
        assert hasattr(persistence, name), name


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


def test_every_error_class_lives_in_errors_under_persistence_error() -> None:
    for name in ("JournalError", "ApiPortUnavailableError"):
        cls = getattr(errors, name)
        assert issubclass(cls, errors.PersistenceError)
        assert getattr(persistence, name) is cls
    exported = [getattr(persistence, name) for name in persistence.__all__]
    for cls in exported:
        if inspect.isclass(cls) and issubclass(cls, Exception):
            assert cls.__module__ == "persistence.errors", cls
            assert issubclass(cls, errors.PersistenceError), cls


def test_journal_error_and_port_error_carry_their_context() -> None:
    journal_error = errors.JournalError("cannot append", Path("/tmp/journal"))
    assert journal_error.path == Path("/tmp/journal") and "cannot append" in str(journal_error)
    port_error = errors.ApiPortUnavailableError("127.0.0.1", 8089, "in use")
    assert (port_error.host, port_error.port) == ("127.0.0.1", 8089) and "PERSISTENCE_API_PORT" in str(port_error)
