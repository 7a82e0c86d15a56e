"""Per-request sampling seeds of the rollout workers (no Ray, no vLLM)."""

from __future__ import annotations

import pytest

from rollout_server.seeds import request_seeds


def test_request_seeds_spaced_by_n_and_distinct_across_calls():
    s0 = request_seeds(0, 0, 3, 4)
    assert s0 == [0, 4, 8]
    s1 = request_seeds(0, 1, 3, 4)
    assert s1 == [1 << 20, (1 << 20) + 4, (1 << 20) + 8]
    # vLLM seeds sample k of a request with seed + k: no two samples share a seed.
    samples = {s + k for seeds in (s0, s1, request_seeds(1, 0, 3, 4)) for s in seeds for k in range(4)}
    assert len(samples) == 36


def test_request_seeds_rejects_bad_input():
    with pytest.raises(ValueError):
        request_seeds(0, 0, 2, 0)
    with pytest.raises(ValueError, match="exceeds"):
        request_seeds(0, 0, 1 << 19, 4)
