"""Where the rollout workers' work goes: pure arithmetic (no Ray, no vLLM)."""

from __future__ import annotations

import pytest

from rollout_server.worker_placement import (
    cpu_bind_ranges,
    cpu_list_str,
    cpu_worker_env,
    oversubscribed,
    split_contiguous,
    sync_rank_offsets,
)


def test_split_contiguous_balanced_in_order():
    assert split_contiguous(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert split_contiguous(6, 2) == [(0, 3), (3, 6)]
    assert split_contiguous(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert split_contiguous(0, 2) == [(0, 0), (0, 0)]


def test_split_contiguous_covers_every_item_once():
    for items in range(0, 20):
        for parts in range(1, 6):
            chunks = split_contiguous(items, parts)
            covered = [i for a, b in chunks for i in range(a, b)]
            assert covered == list(range(items))
            sizes = [b - a for a, b in chunks]
            assert max(sizes) - min(sizes) <= 1


def test_split_contiguous_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_parts"):
        split_contiguous(3, 0)
    with pytest.raises(ValueError, match="num_items"):
        split_contiguous(-1, 2)


def test_cpu_bind_ranges_disjoint_when_they_fit():
    assert cpu_bind_ranges(2, 1, 2) == [[0], [1]]
    assert cpu_bind_ranges(3, 2, 8) == [[0, 1], [2, 3], [4, 5]]
    assert not oversubscribed(3, 2, 8)


def test_cpu_bind_ranges_wrap_when_oversubscribed():
    assert cpu_bind_ranges(3, 1, 2) == [[0], [1], [0]]
    assert cpu_bind_ranges(2, 3, 4) == [[0, 1, 2], [3, 0, 1]]
    assert oversubscribed(3, 1, 2)


def test_cpu_bind_ranges_rejects_impossible():
    with pytest.raises(ValueError, match="threads_per_worker=3 exceeds the 2 cores"):
        cpu_bind_ranges(1, 3, 2)
    with pytest.raises(ValueError, match="positive"):
        cpu_bind_ranges(0, 1, 2)


def test_cpu_worker_env():
    env = cpu_worker_env([2, 3], 4)
    assert cpu_list_str([2, 3]) == "2,3"
    assert env == {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "VLLM_CPU_OMP_THREADS_BIND": "2,3",
        "OMP_NUM_THREADS": "2",
        "OMP_PLACES": "{2},{3}",
        "OMP_PROC_BIND": "close",
    }


def test_sync_rank_offsets():
    assert sync_rank_offsets([1, 1]) == [1, 2]
    assert sync_rank_offsets([2, 1, 4]) == [1, 3, 4]  # sync group size 1 + 7 = 8
    with pytest.raises(ValueError, match="at least one engine worker"):
        sync_rank_offsets([1, 0])
