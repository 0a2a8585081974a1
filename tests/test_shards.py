"""``make test`` runs the suite in shards (:mod:`tests.support.shards`): between them the shards run every test
exactly once, and the tests that read the chaos soak's figures all run in shard 0, beside the soak."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
