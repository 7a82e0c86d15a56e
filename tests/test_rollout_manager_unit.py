"""The rollout manager's decisions on plain data (no actors)."""

from rollout_server.manager import stale_chunks


def test_chunks_older_than_the_newest_version_are_generated_again():
    assert stale_chunks({}) == []
    assert stale_chunks({0: 3, 3: 3}) == []
    assert stale_chunks({0: 2, 3: 3}) == [0]
    assert stale_chunks({4: 2, 0: 1, 2: 3}) == [0, 4]
