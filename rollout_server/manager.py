"""RolloutManager: the driver-side handle on the rollout workers (plain Python using Ray).

It creates the ``rollout-{i}`` actors, spreads each step's unique prompts over them in
contiguous balanced chunks, gathers the batches in prompt order, and hands out weight-sync
ranks. The number of workers is independent of the learner and may change between steps
(``add_worker`` / ``remove_worker``); a new worker serves the initial checkpoint (version 0)
until the next weight push. Every wait is bounded.

Worker failures. A worker that dies while generating (its ``generate`` raises RayActorError)
does not fail the step: ``collect`` re-issues its prompt chunk to the live workers serving the
batch's weight version. With none left it waits for Ray's restart of the dead actor
(``max_restarts``), which comes back on the initial checkpoint (version 0), calls the
``ensure_weights`` hook (the job pushes the learner's weights) and regenerates there. A worker
whose restarts are exhausted is dropped from the pool.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from collections import Counter
from typing import Any, Callable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from grpo_dist.batch import RolloutBatch
from grpo_dist.config import AlgoConfig, ClusterConfig, ModelConfig, RewardsConfig, RolloutConfig
from grpo_dist.errors import first_line
from grpo_dist.weight_sync import ParamSpec
from rollout_server.placement import cpu_bind_ranges, cpu_worker_env, oversubscribed, split_contiguous, sync_rank_offsets
from rollout_server.worker import DEFAULT_BUCKET_BYTES, RolloutWorker

log = logging.getLogger(__name__)

_RemoteWorker = ray.remote(RolloutWorker)
# Threads per actor: one generate or weight load at a time (the engine thread), plus cheap
# queries (ping, get_version, check_manifest) that must answer meanwhile.
_ACTOR_CONCURRENCY = 8
# Polling a restarting actor: seconds per attempt, and how many ActorDiedError answers in a row
# (one second apart) mean its restarts are exhausted (a restarting actor answers "unavailable").
_POLL_S = 10.0
_DEAD_ANSWERS = 3


@dataclass
class _Worker:
    name: str
    handle: Any  # ray ActorHandle
    slot: int  # placement slot: decides the CPU cores
    engine_world_size: int


@dataclass
class PendingRollout:
    """What ``submit`` returns; pass it to ``collect``."""

    refs: list  # one ObjectRef per worker that got prompts
    names: list[str]
    chunks: list[tuple[int, int]]  # [start, stop) prompt range of each ref
    submitted_at: float
    # Kept so a chunk lost with its worker can be generated again elsewhere.
    prompts: list[dict]
    n: int | None
    sampling: dict | None


@dataclass
class _Chunk:
    """One generate call in flight inside ``collect``."""

    name: str
    ref: Any
    start: int
    stop: int
    deadline: float


class RolloutManager:
    def __init__(
        self,
        rollout_cfg: RolloutConfig,
        model_cfg: ModelConfig,
        algo_cfg: AlgoConfig,
        rewards_cfg: RewardsConfig,
        cluster_cfg: ClusterConfig,
        max_model_len: int,
        ensure_weights: Callable[[], None] | None = None,
    ) -> None:
        """``ensure_weights`` (optional) brings every worker to the learner's current weights; ``collect``
        calls it after a restarted worker (version 0) came back and before it regenerates a lost chunk."""
        self.rollout_cfg, self.model_cfg, self.algo_cfg = rollout_cfg, model_cfg, algo_cfg
        self.rewards_cfg, self.cluster_cfg, self.max_model_len = rewards_cfg, cluster_cfg, max_model_len
        self.ensure_weights = ensure_weights
        # Cumulative over the run; each batch also carries its own counts in ``metrics``.
        self.counters = {"worker_failures": 0, "prompts_reissued": 0, "workers_lost": 0}
        self._workers: list[_Worker] = []
        self._next_id = 0
        # Core ids this driver may use; CPU workers are bound to disjoint slices of them.
        self._cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))

    # ------------------------------------------------------------ lifecycle

    @property
    def uses_gpu(self) -> bool:
        return self.cluster_cfg.num_gpus_per_rollout > 0

    @property
    def worker_names(self) -> list[str]:
        return [w.name for w in self._workers]

    def start(self, timeout_s: float | None = None) -> dict[str, dict]:
        """Create ``rollout.num_workers`` workers and wait until every engine is ready."""
        if self._workers:
            raise RuntimeError(f"RolloutManager already started with workers {self.worker_names}")
        new = [self._create() for _ in range(self.rollout_cfg.num_workers)]
        return self._wait_ready(new, timeout_s)

    def add_worker(self, timeout_s: float | None = None) -> str:
        """Start one more worker (version 0 until the next weight push); returns its name."""
        w = self._create()
        self._wait_ready([w], timeout_s)
        return w.name

    def remove_worker(self, name: str | None = None) -> str:
        """Kill one worker (the newest by default) between steps; returns its name."""
        if not self._workers:
            raise RuntimeError("no rollout worker to remove")
        if name is None:
            w = self._workers[-1]
        else:
            matches = [w for w in self._workers if w.name == name]
            if not matches:
                raise ValueError(f"no rollout worker named {name!r}; workers: {self.worker_names}")
            w = matches[0]
        self._workers.remove(w)
        ray.kill(w.handle, no_restart=True)
        return w.name

    def shutdown(self) -> None:
        for w in self._workers:
            ray.kill(w.handle, no_restart=True)
        self._workers = []

    def _free_slot(self) -> int:
        used = {w.slot for w in self._workers}
        return next(s for s in range(len(used) + 1) if s not in used)

    def _create(self) -> _Worker:
        name = f"rollout-{self._next_id}"
        self._next_id += 1
        slot = self._free_slot()
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if not self.uses_gpu:
            threads = self.rollout_cfg.cpu_threads_per_worker
            if oversubscribed(slot + 1, threads, len(self._cores)):
                log.warning("%s: %d workers x %d threads exceed the %d cores; cores are shared", name, slot + 1, threads, len(self._cores))
            idx = cpu_bind_ranges(slot + 1, threads, len(self._cores))[slot]
            env = cpu_worker_env([self._cores[i] for i in idx], self.rollout_cfg.cpu_kvcache_space_gib)
        handle = _RemoteWorker.options(
            name=name,
            num_cpus=self.cluster_cfg.num_cpus_per_rollout,
            num_gpus=self.cluster_cfg.num_gpus_per_rollout,
            max_restarts=self.cluster_cfg.max_worker_restarts,
            max_task_retries=0,
            max_concurrency=_ACTOR_CONCURRENCY,
            runtime_env={"env_vars": env},
        ).remote(name, self.rollout_cfg, self.model_cfg, self.algo_cfg, self.rewards_cfg, self.max_model_len)
        w = _Worker(name=name, handle=handle, slot=slot, engine_world_size=self.rollout_cfg.tensor_parallel_size)
        self._workers.append(w)
        return w

    def _wait_ready(self, workers: list[_Worker], timeout_s: float | None) -> dict[str, dict]:
        timeout = self.cluster_cfg.rpc_timeout_s if timeout_s is None else timeout_s
        refs = [w.handle.info.remote() for w in workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        late = [w for w, r in zip(workers, refs) if r not in ready]
        failed: dict[str, str] = {}
        infos: dict[str, dict] = {}
        for w, r in zip(workers, refs):
            if r in ready:
                try:
                    infos[w.name] = ray.get(r, timeout=timeout)
                except Exception as e:  # the constructor (engine start) raised
                    failed[w.name] = str(e)
        if late or failed:
            for w in workers:
                self._workers.remove(w)
                ray.kill(w.handle, no_restart=True)
            parts = [f"{w.name} not ready within {timeout:.0f}s" for w in late]
            parts += [f"{n} failed to start: {msg}" for n, msg in failed.items()]
            raise RuntimeError("rollout workers did not start: " + "; ".join(parts))
        return infos

    # ------------------------------------------------------------ generation

    def submit(self, prompts: list[dict], n: int | None = None, sampling: dict | None = None) -> PendingRollout:
        """Start generating for ``prompts`` (unique rows) without waiting; see ``collect``."""
        if not self._workers:
            raise RuntimeError("no rollout workers: call start() first")
        if not prompts:
            raise ValueError("submit() needs at least one prompt row")
        refs, names, chunks = [], [], []
        for w, (a, b) in zip(self._workers, split_contiguous(len(prompts), len(self._workers))):
            if a == b:
                continue
            refs.append(w.handle.generate.remote(prompts[a:b], n, sampling))
            names.append(w.name)
            chunks.append((a, b))
        return PendingRollout(refs=refs, names=names, chunks=chunks, submitted_at=time.monotonic(), prompts=prompts,
                              n=n, sampling=sampling)

    def collect(self, handle: PendingRollout, timeout_s: float | None = None) -> RolloutBatch:
        """Wait (at most ``timeout_s``, default rollout.generate_timeout_s from submission) and
        return one batch with the prompts in submission order, G consecutive rows each.

        A worker dying mid-generation is survived (module docstring): its chunk is generated again,
        with a fresh ``generate_timeout_s``, by workers serving the batch's weight version. The batch's
        ``metrics`` count ``worker_failures`` and ``prompts_reissued`` of this call."""
        timeout = self.rollout_cfg.generate_timeout_s if timeout_s is None else timeout_s
        deadline = handle.submitted_at + timeout
        pending = [_Chunk(n, r, a, b, deadline) for n, r, (a, b) in zip(handle.names, handle.refs, handle.chunks)]
        done: dict[int, RolloutBatch] = {}  # by first prompt index
        failures = reissued = 0
        while pending:
            wait_s = max(0.0, min(c.deadline for c in pending) - time.monotonic())
            ready, _ = ray.wait([c.ref for c in pending], num_returns=1, timeout=wait_s)
            if not ready:
                late = [f"{c.name} (prompts {c.start}..{c.stop - 1})" for c in pending if c.deadline <= time.monotonic()]
                if late:
                    raise TimeoutError(f"rollout workers {late} did not finish generating within {timeout:.0f}s")
                continue
            for c in [c for c in pending if c.ref in ready]:
                pending.remove(c)
                try:
                    done[c.start] = ray.get(c.ref, timeout=self.cluster_cfg.rpc_timeout_s)
                except RayActorError as e:
                    failures += 1
                    reissued += c.stop - c.start
                    log.warning("%s died while generating prompts %d..%d; generating them again (%s)", c.name, c.start,
                                c.stop - 1, first_line(e))
                    pending += self._reissue(handle, c, done)
        self.counters["worker_failures"] += failures
        self.counters["prompts_reissued"] += reissued
        parts = [done[a] for a in sorted(done)]
        batch = RolloutBatch.concat(parts)
        batch.metrics.update(worker_failures=float(failures), prompts_reissued=float(reissued))
        return batch

    def _reissue(self, handle: PendingRollout, lost: _Chunk, done: dict[int, RolloutBatch]) -> list[_Chunk]:
        """Generate ``lost``'s prompts again on the live workers that serve the batch's version (the
        version of the chunks already back, else the most common one); with none, on the restarted
        worker once ``ensure_weights`` has brought it up to date."""
        finished = Counter(b.weight_version for b in done.values())
        target = finished.most_common(1)[0][0] if finished else None
        live = self._live_versions(exclude=lost.name)
        if target is None and live:
            counts = Counter(live.values())
            target = max(counts, key=lambda v: (counts[v], v))
        names = [n for n, v in live.items() if v == target]
        if not names:
            target = self._restarted_for(lost.name, target)
            names = [lost.name]
        deadline = time.monotonic() + self.rollout_cfg.generate_timeout_s
        by_name = {w.name: w for w in self._workers}
        out = []
        for name, (a, b) in zip(names, split_contiguous(lost.stop - lost.start, len(names))):
            if a == b:
                continue
            a, b = lost.start + a, lost.start + b
            ref = by_name[name].handle.generate.remote(handle.prompts[a:b], handle.n, handle.sampling)
            out.append(_Chunk(name, ref, a, b, deadline))
        log.warning("prompts %d..%d of %s re-issued to %s (weight version %s)", lost.start, lost.stop - 1, lost.name,
                    names, target)
        return out

    def _live_versions(self, exclude: str) -> dict[str, int]:
        """Version of each worker that answers now (a dead or restarting one is left out)."""
        refs = {w.name: w.handle.get_version.remote() for w in self._workers if w.name != exclude}
        out = {}
        for name, ref in refs.items():
            try:
                v = ray.get(ref, timeout=_POLL_S)
            except (RayActorError, GetTimeoutError):
                continue
            if v >= 0:
                out[name] = v
        return out

    def _restarted_for(self, name: str, target: int | None) -> int:
        """Wait for Ray to restart ``name`` and bring it to the learner's weights; return the version it
        serves then, which must be ``target`` (None: any)."""
        w = next((w for w in self._workers if w.name == name), None)
        if w is None:
            raise RuntimeError(f"{name} died while generating and is no longer in the pool; no other worker serves "
                               f"weight version {target}")
        version = self._await_alive(w, self.cluster_cfg.rpc_timeout_s)
        if version is None:
            self._drop(w)
            raise RuntimeError(f"{name} died while generating and has no restarts left "
                               f"(cluster.max_worker_restarts={self.cluster_cfg.max_worker_restarts}); no other worker "
                               f"serves weight version {target}")
        if self.ensure_weights is not None:
            log.warning("%s restarted at weight version %d; pushing the current weights before it regenerates", name,
                        version)
            self.ensure_weights()
            version = self._await_alive(w, self.cluster_cfg.rpc_timeout_s)
        if target is not None and version != target:
            raise RuntimeError(f"{name} restarted and serves weight version {version}, but the rest of the batch has "
                               f"version {target}; refusing to mix versions")
        return version

    def _await_alive(self, w: _Worker, timeout_s: float) -> int | None:
        """``w``'s version once it answers (a restarting actor is waited for; -1, a worker about to exit
        for a restart, counts as not back yet), or None when its restarts are exhausted."""
        deadline = time.monotonic() + timeout_s
        died = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{w.name} did not come back within {timeout_s:.0f}s after failing "
                                   f"(cluster.max_worker_restarts={self.cluster_cfg.max_worker_restarts})")
            try:
                version = ray.get(w.handle.get_version.remote(), timeout=min(_POLL_S, left))
                if version >= 0:
                    return version
                died = 0
            except ActorDiedError:
                died += 1
                if died >= _DEAD_ANSWERS:
                    return None
            except (ActorUnavailableError, GetTimeoutError):
                died = 0
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _drop(self, w: _Worker) -> None:
        log.error("%s is dead for good (restarts exhausted); continuing without it", w.name)
        if w in self._workers:
            self._workers.remove(w)
            self.counters["workers_lost"] += 1

    def wait_alive(self, timeout_s: float | None = None) -> dict[str, int]:
        """Every worker's version once each answers: restarting workers are waited for (at most
        ``timeout_s``, default cluster.rpc_timeout_s, each), ones with no restarts left are dropped.
        Raises RuntimeError when no worker is left."""
        timeout = self.cluster_cfg.rpc_timeout_s if timeout_s is None else timeout_s
        versions = {}
        for w in list(self._workers):
            v = self._await_alive(w, timeout)
            if v is None:
                self._drop(w)
            else:
                versions[w.name] = v
        if not versions:
            raise RuntimeError("every rollout worker is dead and out of restarts")
        return versions

    def generate(
        self, prompts: list[dict], n: int | None = None, sampling: dict | None = None, timeout_s: float | None = None
    ) -> RolloutBatch:
        """``n`` (default num_generations) scored completions per prompt, in prompt order."""
        return self.collect(self.submit(prompts, n, sampling), timeout_s)

    # ------------------------------------------------------------ versions and weights

    def _call_all(self, method: str, *args, timeout_s: float | None = None) -> dict[str, Any]:
        timeout = self.cluster_cfg.rpc_timeout_s if timeout_s is None else timeout_s
        refs = {w.name: getattr(w.handle, method).remote(*args) for w in self._workers}
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref, timeout=timeout)
            except GetTimeoutError:
                raise TimeoutError(f"{name}.{method} did not answer within {timeout:.0f}s") from None
        return out

    def weight_versions(self, timeout_s: float | None = None) -> dict[str, int]:
        """Version served by each worker: 0 = initial checkpoint, -1 = broken by a failed update."""
        return self._call_all("get_version", timeout_s=timeout_s)

    def workers_info(self, timeout_s: float | None = None) -> dict[str, dict]:
        return self._call_all("info", timeout_s=timeout_s)

    def world_size(self) -> int:
        """Weight-sync group size: learner rank 0 plus every engine worker of every rollout worker."""
        return 1 + sum(w.engine_world_size for w in self._workers)

    def check_manifest(self, manifest: list[ParamSpec], timeout_s: float | None = None) -> None:
        """Raise ValueError from the first worker that refuses ``manifest`` (names what is wrong)."""
        self._call_all("check_manifest", manifest, timeout_s=timeout_s)

    def receive_weights(
        self,
        manifest: list[ParamSpec],
        version: int,
        host: str,
        port: int,
        timeout_s: float,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> list:
        """Tell every worker to join the sync group at ``host:port`` and load ``version``.

        The manifest is checked on every worker first (ValueError before anyone joins, so the
        learner is never left waiting for a refusing worker). Returns one ObjectRef per worker
        (each resolves to load stats); the caller makes learner rank 0 join as rank 0 of
        ``world_size()`` and send, then waits on the refs. ``bucket_bytes`` must equal the
        sender's. A running generate finishes before its worker joins.
        """
        if not self._workers:
            raise RuntimeError("no rollout workers to receive weights")
        self.check_manifest(manifest)
        world = self.world_size()
        offsets = sync_rank_offsets([w.engine_world_size for w in self._workers])
        manifest_ref = ray.put(manifest)
        return [
            w.handle.receive_weights.remote(manifest_ref, version, host, port, rank, world, timeout_s, bucket_bytes)
            for w, rank in zip(self._workers, offsets)
        ]
