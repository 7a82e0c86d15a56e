"""Weight-sync protocol pieces in one process: buckets, manifest checks, and a real gloo group
with receivers in threads."""

from __future__ import annotations

import datetime
import threading
import time

import pytest
import torch

from grpo_dist.weight_sync import (
    ParamSpec,
    check_manifest,
    init_sync_group,
    open_sync_store,
    plan_buckets,
    recv_weights,
    send_weights,
    spec_of,
    store_barrier,
)


def test_plan_buckets_bounds_bytes_splits_dtypes_and_keeps_order():
    m = [
        ParamSpec("a", (4,), "float32"),
        ParamSpec("b", (2,), "float32"),
        ParamSpec("c", (8,), "float32"),
        ParamSpec("d", (2,), "bfloat16"),
        ParamSpec("e", (1,), "bfloat16"),
    ]
    # 24 bytes: a+b (24) fit, c (32) is alone (over the bound), dtype change starts d+e.
    assert plan_buckets(m, 24) == [[0, 1], [2], [3, 4]]
    with pytest.raises(ValueError, match="positive"):
        plan_buckets(m, 0)


def test_check_manifest_names_every_problem():
    want = {"w": ParamSpec("w", (2, 3), "float32"), "b": ParamSpec("b", (3,), "float32")}
    check_manifest(list(want.values()), want)
    bad = [ParamSpec("w", (3, 2), "float32"), ParamSpec("x", (1,), "float32")]
    with pytest.raises(
        ValueError, match=r"w: shape \[3, 2\] != expected \[2, 3\].*unknown parameter 'x'.*missing parameters \['b'\]"
    ):
        check_manifest(bad, want)


def test_receivers_that_connect_first_join_a_pre_opened_store_and_get_exact_weights():
    gen = torch.Generator().manual_seed(0)
    params = {
        "emb": torch.randn(50, 8, generator=gen),
        "w": torch.randn(8, 8, generator=gen),
        "b": torch.randn(8, generator=gen),
    }
    manifest = [spec_of(n, t) for n, t in params.items()]
    bucket = 600  # bytes: emb (1600) alone, then w + b
    store = open_sync_store(timeout_s=30)
    got: dict[int, dict[str, torch.Tensor]] = {}
    joined: dict[int, float] = {}

    def receive(rank: int) -> None:
        t0 = time.perf_counter()
        group = init_sync_group("127.0.0.1", store.port, rank, 3, timeout_s=30)
        joined[rank] = time.perf_counter() - t0
        got[rank] = {n: t.clone() for n, t in recv_weights(group, manifest, bucket)}

    threads = [threading.Thread(target=receive, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # the receivers are already waiting on the store when rank 0 builds its group
    group = init_sync_group("127.0.0.1", store.port, 0, 3, timeout_s=30, store=store)
    sent = send_weights(group, manifest, params.values(), bucket)
    for t in threads:
        t.join(timeout=30)
    assert sent == sum(s.nbytes for s in manifest)
    for rank in (1, 2):
        assert joined[rank] < 5.0  # they waited for rank 0, not for a reconnect back-off
        assert set(got[rank]) == set(params)
        for n, t in params.items():
            assert torch.equal(got[rank][n], t)


def test_join_times_out_with_the_group_named_when_a_receiver_never_comes():
    store = open_sync_store(timeout_s=60)
    t0 = time.perf_counter()
    # The call's own (short) timeout bounds the rendezvous, not the store opener's.
    with pytest.raises(TimeoutError, match=rf"weight-sync group 127.0.0.1:{store.port} \(rank 0 of 2\)"):
        init_sync_group("127.0.0.1", store.port, 0, 2, timeout_s=2, store=store)
    assert time.perf_counter() - t0 < 30


def test_store_barrier_waits_for_every_rank_and_times_out():
    # The bound the NCCL group puts in front of NCCL's own (unbounded) init; pure TCPStore, so CPU.
    store = open_sync_store(timeout_s=60)
    peer = torch.distributed.TCPStore(
        "127.0.0.1", store.port, None, is_master=False, timeout=datetime.timedelta(seconds=30)
    )
    done = []
    t = threading.Thread(target=lambda: (store_barrier(peer, 1, 2, 30), done.append(1)))
    t.start()
    store_barrier(store, 0, 2, 30)
    t.join(30)
    assert done == [1]
    t0 = time.perf_counter()
    with pytest.raises(torch.distributed.DistStoreError):
        store_barrier(open_sync_store(timeout_s=60), 0, 2, 1)  # rank 1 never comes
    assert time.perf_counter() - t0 < 15


def test_nccl_group_needs_a_cuda_device():
    store = open_sync_store(timeout_s=60)
    with pytest.raises(ValueError, match="needs this rank's CUDA device"):
        init_sync_group("127.0.0.1", store.port, 0, 2, timeout_s=2, backend="nccl", store=store, device="cpu")
