"""Every ```python block of the README and of docs/ runs as written; the README says what SPEC promises it says.

Each block runs in a fresh temporary directory with the database and the journal pointed there: a block holding a
test (the fault-kit example) is run by pytest, any other by the interpreter. The records' field table in
``docs/records.md`` is checked against the models.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT
from tests.support.docs import BLOCK, DOCS, README, python_blocks
from tests.support.model_reference import END, START, model_reference


def readme_blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def block_id(item: tuple[str, str]) -> str:
    page, block = item
    first = next(line for line in block.splitlines() if line.startswith(("from ", "import ")))
    return f"{page}:{python_blocks().index(item)}:{first[:40]}"


def run_block(block: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "PERSISTENCE_", "ENABLE_"))}
    environment.update(
        PYTHONPATH=str(REPO_ROOT),
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'readme.db'}",
        PERSISTENCE_JOURNAL_DIR=str(tmp_path / "journal"),
    )
    is_test = re.search(r"^(async )?def test_", block, re.MULTILINE) is not None
    script = tmp_path / ("test_readme_example.py" if is_test else "readme_example.py")
    script.write_text(block)
    command = (
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", script.name]
        if is_test
        else [
            sys.executable,
            script.name,
        ]
    )
    return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)


def test_the_readme_starts_with_the_two_commands() -> None:
    # SPEC, "Set-up on a fresh machine": the README starts with exactly these.
    lines = README.read_text().splitlines()
    assert lines[0] == "# persistence-sidecar"
    body = [line for line in lines[1:] if line.strip()]
    assert body[:2] == [
        "    make run     # creates .venv, installs, runs the demo orchestrator on SQLite (the main job)",
        "    make test    # creates .venv if needed, installs, runs the whole test suite",
    ]


def test_the_pages_have_the_examples_this_test_runs() -> None:
    blocks = [block for _, block in python_blocks()]
    assert len(blocks) >= 8
    assert any("record_snapshot" in block and "asyncio.run(main())" in block for block in readme_blocks())
    assert any("import pytest" in block and "def test_" in block for block in blocks)
    assert {page for page, _ in python_blocks()} >= {"README.md", "docs/testing.md", "docs/export.md"}


@pytest.mark.parametrize("item", python_blocks(), ids=block_id)
def test_every_python_block_of_the_readme_and_the_docs_runs_as_written(item: tuple[str, str], tmp_path: Path) -> None:
    _, block = item
    result = run_block(block, tmp_path)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr


def test_the_embedding_example_persists_every_record_and_prints_only_the_hosts_own_lines(tmp_path: Path) -> None:
    [block] = [block for block in readme_blocks() if "record_snapshot" in block]
    result = run_block(block, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "persisted" and lines[1] == "1 closed" and lines[-1] == "T-0001 1.08610000 18.50000000"
    assert len(lines) == 4, "the library printed something on the host's stdout"
    assert "persisted=6" in lines[2]  # signal, trade, execution, closed trade, snapshot, change
    assert "dropped=0" in lines[2]


def test_the_fault_kit_example_says_it_needs_pytest_asyncio() -> None:
    kit = (DOCS / "testing.md").read_text()
    assert "pytest-asyncio" in kit[: kit.index("```python")]


def test_the_field_reference_table_matches_the_models() -> None:
    text = (DOCS / "records.md").read_text()
    assert START in text and END in text, "docs/records.md lost its model-reference markers"
    table = text[text.index(START) : text.index(END) + len(END)]
    assert table == model_reference(), "regenerate it with: python -m tests.support.model_reference"
