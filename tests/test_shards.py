"""The suite in shards (:mod:`tests.support.shards`): between them the shards run every test exactly once, the tests
that read the chaos soak's figures all run in shard 0, beside the soak, and a shard's failure is the run's."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import REPO_ROOT
from tests.support.shards import parse_shard, split


@given(pinned=st.lists(st.booleans(), max_size=60), shards=st.integers(min_value=1, max_value=5))
def test_the_shards_run_every_test_exactly_once_and_pinned_tests_in_shard_0(pinned: list[bool], shards: int) -> None:
    items = list(range(len(pinned)))
    runs = [split(items, shard, shards, pinned)[0] for shard in range(shards)]
    assert sorted(item for run in runs for item in run) == items
    assert all(item in runs[0] for item in items if pinned[item])
    for shard, run in enumerate(runs):  # and each keeps the collection's order
        assert run == sorted(run), shard
        assert set(split(items, shard, shards, pinned)[1]) == set(items) - set(run)


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1/0", "x/2", "1"])
def test_a_shard_outside_its_count_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected K/N"):
        parse_shard(text)


def test_a_shard_within_its_count_is_read() -> None:
    assert parse_shard("1/2") == (1, 2)


def run_shards(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.support.shards", *arguments],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TEST_SHARDS": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_shard_that_fails_fails_the_run_and_one_with_nothing_to_run_does_not() -> None:
    one_test = "tests/test_shards.py::test_a_shard_within_its_count_is_read"
    alone = run_shards(one_test, "-q")  # one shard runs it, the other selects nothing (pytest's status 5)
    assert alone.returncode == 0 and alone.stdout.rstrip().endswith("all passed"), alone.stdout
    assert "shard 1 of 2: exit status 0" in alone.stdout and "shard 2 of 2: exit status 5" in alone.stdout
    assert [int(count) for count in re.findall(r"(\d+) passed", alone.stdout)] == [1]
    refused = run_shards(one_test, "--no-such-option")  # pytest's usage error, status 4, in both
    assert refused.returncode == 4 and refused.stdout.rstrip().endswith("FAILED")
