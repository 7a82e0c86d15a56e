"""Weight-sync protocol between learner rank 0 and the rollout engines (pure torch).

Both sides import this module; neither imports the other. One update, in order (side, then
``file: function``):

1. Driver, ``grpo_dist/driver.py``: ``Trainer._sync`` (every ``trainer.sync_every`` steps and the last)
   and ``Trainer.resume`` call ``Cluster.sync_weights(version)``; so do ``RayCluster.maintain`` (a
   restarted or new worker) and ``RayCluster._push_current_weights`` (the manager's
   ``ensure_weights`` hook).
2. Driver, ``deploy/job.py``: ``RayCluster.sync_weights`` refreshes the pool
   (``RolloutManager.refresh``) and runs ``_sync_once``, retried once on a fresh port. The group's
   timeout is half of ``cluster.collective_timeout_s``: the other learner ranks wait in a DeepSpeed
   collective meanwhile.
3. Learner rank 0, ``learner/actor.py``: ``LearnerActor.weight_manifest`` (asked once) is the send
   order, one ``ParamSpec`` per tensor, from ``_entries``: the HF parameters without a tied
   ``lm_head``; with LoRA, ``model.lora.sync=adapter`` sends the adapter tensors by PEFT name,
   ``merged`` the base names with each adapted weight merged on the fly. ``sync_address`` opens the
   group's ``TCPStore`` (``open_sync_store``) before anyone is told its port.
4. Rollout manager, ``rollout_server/manager.py``: ``RolloutManager.start_receive_weights`` has every
   reachable worker check the manifest (``RolloutWorker.check_manifest`` -> ``check_manifest``; a
   mismatch raises before anyone joins), gives each worker its first rank (``sync_rank_offsets``:
   rank 0 is the learner, an engine's tensor-parallel workers take consecutive ranks; group size
   ``sync_group_size()``) and starts ``RolloutWorker.receive_weights`` on each, returning the refs.
   Both sides cut buckets of ``learner.weight_sync_bucket_mb``.
5. Rollout worker, ``rollout_server/worker.py``: ``RolloutWorker.receive_weights`` checks the manifest
   again and, on the engine thread (after a running generate), runs ``_load_weights`` ->
   ``LLM.collective_rpc("grpo_receive_weights")``, or for an adapter ``_load_adapter`` ->
   ``"grpo_receive_adapter"``.
6. vLLM worker extension, ``rollout_server/vllm_extension.py``, on each engine worker:
   ``WeightSyncExtension.grpo_receive_weights`` joins (``init_sync_group``, rank offset +
   ``self.rank``) and streams ``recv_weights`` into ``self.reload_weights(weights_iterator=...)``, then
   ``refresh_tied_modules`` on CPU; ``grpo_receive_adapter`` collects the tensors, builds the adapter
   in memory (``LoRAModel.from_lora_tensors``) and replaces the engine's previous one.
7. Learner, every rank: the driver calls ``LearnerGroup.broadcast_weights`` right after step 4 (steps
   5-7 run at once: the rendezvous needs every rank). In ``LearnerActor.broadcast_weights`` rank 0 joins
   as rank 0 on its store; ``_raise_if_rank_failed`` tells every rank whether it did; every rank walks
   ``_gathered`` (ZeRO-3 gathers are collective, bucket by bucket) while rank 0 sends
   (``send_weights``: ``plan_buckets``, one flat buffer per bucket and dtype, one broadcast each).
8. Rollout worker: ``_adopt`` resets the prefix cache and serves the new version (an adapter replaces
   the previous one under the same vLLM id, so streaming requests move to it at their next step).
   A failure after the first tensor (``grpo_weights_partial``) leaves the engine half-updated:
   version -1, and the process exits for Ray to restart it (a failed adapter update leaves the
   previous adapter serving).
9. Driver, ``RayCluster._sync_once``: waits for the refs, checks ``RolloutManager.weight_versions``
   and calls ``RolloutManager.mark_synced``.

Backend (``pick_backend``, by each side's own device): CUDA -> NCCL through ``NcclSyncGroup`` (vLLM's
``PyNcclCommunicator`` on a ``StatelessProcessGroup`` over the group's store, after a ``store_barrier``;
vLLM is imported only there, so this module stays pure torch where CUDA is absent); otherwise a torch
``ProcessGroupGloo`` on the store. Either way the group is separate from DeepSpeed's and vLLM's own
worlds, has an explicit timeout and lives for one update.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32" (strings so the manifest pickles/JSONs cleanly)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def spec_of(name: str, t: torch.Tensor) -> ParamSpec:
    return ParamSpec(name, tuple(t.shape), dtype_name(t.dtype))


def plan_buckets(manifest: list[ParamSpec], bucket_bytes: int) -> list[list[int]]:
    """Group manifest indices into buckets of one dtype and at most ``bucket_bytes`` each.

    Order is preserved (so the sender can stream parameters layer by layer). A tensor larger
    than the bound gets a bucket of its own.
    """
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be positive")
    buckets: list[list[int]] = []
    cur: list[int] = []
    cur_bytes = 0
    cur_dtype: str | None = None
    for i, spec in enumerate(manifest):
        nb = spec.nbytes
        if cur and (spec.dtype != cur_dtype or cur_bytes + nb > bucket_bytes):
            buckets.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += nb
        cur_dtype = spec.dtype
    if cur:
        buckets.append(cur)
    return buckets


def check_manifest(manifest: list[ParamSpec], expected: dict[str, ParamSpec]) -> None:
    """Raise ValueError naming every parameter whose name, shape or dtype does not match."""
    problems = []
    got = {s.name for s in manifest}
    for s in manifest:
        e = expected.get(s.name)
        if e is None:
            problems.append(f"unknown parameter {s.name!r}")
        elif e.shape != s.shape:
            problems.append(f"{s.name}: shape {list(s.shape)} != expected {list(e.shape)}")
        elif e.dtype != s.dtype:
            problems.append(f"{s.name}: dtype {s.dtype} != expected {e.dtype}")
    missing = sorted(set(expected) - got)
    if missing:
        problems.append(f"missing parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
        raise ValueError(f"weight update refused: {shown}")


def pick_backend(device: torch.device | str | None = None) -> str:
    """NCCL when CUDA is present (or the device is CUDA), gloo otherwise."""
    if device is not None:
        return "nccl" if torch.device(device).type == "cuda" else "gloo"
    return "nccl" if torch.cuda.is_available() else "gloo"


def open_sync_store(timeout_s: float) -> dist.TCPStore:
    """Rank 0's TCPStore for one weight-sync group, listening on a free port (``store.port``).

    Opened before any receiver is told the address: a client that finds nobody listening backs
    off and retries (measured: it then joined 0.5-0.75 s late in about one sync in four)."""
    return dist.TCPStore(
        "0.0.0.0", 0, None, is_master=True, timeout=_dt.timedelta(seconds=timeout_s), wait_for_workers=False
    )


def store_barrier(store: dist.Store, rank: int, sync_group_size: int, timeout_s: float) -> None:
    """Return once every rank of the group has reached this call; raise ``DistStoreError`` after
    ``timeout_s`` otherwise. Keys are per group (each group has its own store)."""
    store.set(f"grpo_sync_joined/{rank}", b"1")
    store.wait([f"grpo_sync_joined/{r}" for r in range(sync_group_size)], _dt.timedelta(seconds=timeout_s))


class NcclSyncGroup:
    """The CUDA weight-sync group: vLLM's ``PyNcclCommunicator`` over a ``StatelessProcessGroup`` on
    the group's own TCPStore, the communicator vLLM's NCCL weight-transfer engine, OpenRLHF and verl
    use between a trainer and vLLM workers. Unlike a c10d ``ProcessGroupNCCL`` it joins no
    torch.distributed state of the process (DeepSpeed's device-bound world on the learner, vLLM's
    world in an engine worker) and has no watchdog that tears the process down when a peer dies;
    the bounds are ours instead: a store barrier before NCCL's unbounded init, a deadline on every
    broadcast, then an abort. Same ``broadcast(tensor, root).wait()`` use as a torch group."""

    def __init__(self, store: dist.Store, rank: int, sync_group_size: int, timeout_s: float, device: torch.device):
        self.comm = None
        self.timeout_s = timeout_s
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup
        from vllm.utils.nccl import unpinned_nccl_env

        # ncclCommInitRank waits for every rank without a bound: only start it once all are here.
        store_barrier(store, rank, sync_group_size, timeout_s)
        # The communicator's warm-up runs on vLLM's current_stream(), which in a process where vLLM
        # never ran (the learner) makes a new stream current: the caller's stream is put back.
        stream = torch.cuda.current_stream(device)
        # unpinned_nccl_env: without NCCL settings vLLM may have pinned for its own communicators,
        # which the other side of this group does not have (as vLLM's weight-transfer engine does).
        try:
            with unpinned_nccl_env():
                comm = PyNcclCommunicator(
                    StatelessProcessGroup(rank=rank, world_size=sync_group_size, store=store), device
                )
        finally:
            torch.cuda.set_stream(stream)
        if comm.disabled:  # it would then broadcast nothing, silently
            raise RuntimeError(
                "vLLM's NCCL communicator is disabled here (NCCL library not loadable, or "
                "VLLM_DISABLE_PYNCCL set): the CUDA weight sync needs it"
            )
        self.comm = comm

    def broadcast(self, tensor: torch.Tensor, root: int) -> _NcclWork:
        stream = torch.cuda.current_stream(tensor.device)
        self.comm.broadcast(tensor, src=root, stream=stream)
        done = torch.cuda.Event()
        done.record(stream)
        return _NcclWork(self, done)

    def close(self) -> None:
        """Abort the communicator (idempotent); an aborted collective returns on every stream."""
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None

    def __del__(self) -> None:  # callers drop the group after an update, as they drop a gloo group
        self.close()


class _NcclWork:
    def __init__(self, group: NcclSyncGroup, done: torch.cuda.Event) -> None:
        self.group, self.done = group, done

    def wait(self) -> None:
        """Block until the broadcast completed; past the group's timeout (a peer died or never
        sent), abort the communicator and raise ``TimeoutError``."""
        deadline = time.monotonic() + self.group.timeout_s
        while not self.done.query():
            if time.monotonic() > deadline:
                self.group.close()
                raise TimeoutError(
                    f"weight-sync broadcast did not complete within {self.group.timeout_s:.0f}s "
                    "(a peer left the group); the NCCL communicator was aborted"
                )
            time.sleep(0.001)


def init_sync_group(
    host: str,
    port: int,
    rank: int,
    sync_group_size: int,
    timeout_s: float,
    backend: str = "gloo",
    store: dist.TCPStore | None = None,
    device: torch.device | str | None = None,
) -> dist.ProcessGroup | NcclSyncGroup:
    """Join the weight-sync group (all ranks call this concurrently).

    Rank 0 hosts the TCPStore: ``store`` from ``open_sync_store``, or one started here
    (``wait_for_workers=False``: it starts without peers). Building the group then waits for
    every rank at most ``timeout_s`` and raises ``TimeoutError`` naming the group if one never
    joins, instead of hanging. ``device``: this rank's CUDA device (``nccl`` only)."""
    timeout = _dt.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(
            host, port, sync_group_size, is_master=(rank == 0), timeout=timeout, wait_for_workers=False
        )
    else:
        store.set_timeout(timeout)  # the rendezvous waits on the store: this call's bound, not the opener's
    try:
        if backend == "gloo":
            return dist.ProcessGroupGloo(store, rank, sync_group_size, timeout)
        if backend == "nccl":
            if device is None or torch.device(device).type != "cuda":
                raise ValueError(f"the nccl weight-sync group needs this rank's CUDA device, got {device!r}")
            device = torch.device(device)
            index = torch.cuda.current_device() if device.index is None else device.index
            return NcclSyncGroup(store, rank, sync_group_size, timeout_s, torch.device("cuda", index))
    except dist.DistStoreError as e:
        raise TimeoutError(
            f"weight-sync group {host}:{port} (rank {rank} of {sync_group_size}): not every rank joined "
            f"within {timeout_s:.0f}s ({e})"
        ) from None
    raise ValueError(f"unknown weight-sync backend {backend!r}")


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1).clone()


def send_weights(
    group: dist.ProcessGroup,
    manifest: list[ParamSpec],
    tensors: Iterable[torch.Tensor],
    bucket_bytes: int,
    device: torch.device | str = "cpu",
) -> int:
    """Broadcast ``tensors`` (in manifest order) from group rank 0. Returns bytes sent.

    ``tensors`` may be a generator so ZeRO-3 callers gather one layer at a time.
    """
    it = iter(tensors)
    sent = 0
    for bucket in plan_buckets(manifest, bucket_bytes):
        parts = []
        for i in bucket:
            t = next(it)
            spec = manifest[i]
            if tuple(t.shape) != spec.shape or dtype_name(t.dtype) != spec.dtype:
                raise ValueError(f"sender: {spec.name} is {tuple(t.shape)}/{t.dtype}, manifest says {spec}")
            parts.append(t.detach().to(device))
        flat = _flatten(parts)
        group.broadcast(flat, 0).wait()
        sent += flat.numel() * flat.element_size()
    return sent


def recv_weights(
    group: dist.ProcessGroup, manifest: list[ParamSpec], bucket_bytes: int, device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Receive what ``send_weights`` broadcasts; yields ``(name, tensor)`` bucket by bucket."""
    for bucket in plan_buckets(manifest, bucket_bytes):
        specs = [manifest[i] for i in bucket]
        flat = torch.empty(sum(s.numel for s in specs), dtype=specs[0].torch_dtype, device=device)
        group.broadcast(flat, 0).wait()
        offset = 0
        for s in specs:
            yield s.name, flat[offset : offset + s.numel].view(s.shape)
            offset += s.numel
