"""The Makefile on a fresh machine: each install step is announced, and pip's progress is shown, never hidden."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_the_first_install_announces_each_step_and_shows_pips_progress(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["make", "--dry-run", "--always-make", f"VENV={venv}", f"{venv}/.installed"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()
    installs = [i for i, line in enumerate(commands) if " -m pip install " in line]
    assert len(installs) == 2 and all("--quiet" not in commands[i] and " -q" not in commands[i] for i in installs)
    assert all("--progress-bar on" in commands[i] for i in installs)
    for i in installs:
        assert commands[i - 1].startswith("echo"), f"no announcement before: {commands[i]}"
    assert any("installing persistence-sidecar" in line for line in commands)
