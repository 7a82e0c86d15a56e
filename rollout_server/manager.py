"""RolloutManager: the driver-side handle on the rollout workers (plain Python using Ray).

It creates the ``rollout-{i}`` actors, spreads each step's unique prompts over them in
contiguous balanced chunks, gathers the batches in prompt order, and hands out weight-sync
ranks. The number of workers is independent of the learner and may change between steps
(``add_worker`` / ``start_add_worker`` / ``remove_worker``); a new worker serves the initial
checkpoint (version 0) until the next weight push. Every wait is bounded.

Worker failures and node loss. Each worker is ``serving`` (in the generation pool), ``awaiting``
(reachable, but its weights are not the job's: a restarted or newly started actor; weight pushes
reach it, generation does not), ``down`` (not answering: Ray restarts it, possibly waiting for
a node with room) or ``starting`` (a new actor whose engine is not up yet). ``refresh`` polls them
all with a short bound and never waits for a down worker while another one serves, so losing a
node costs the job that node's share of the work, not a stall; the worker rejoins when Ray has
restarted it somewhere and the job pushed the current weights (the worker itself refuses to
generate before that). Every restart is logged with the node it left and the one it came back on,
and counted (``worker_restarts``, ``nodes_lost``).

A worker that dies while generating (its ``generate`` raises) does not fail the step: ``collect``
re-issues its prompt chunk to the serving workers on the batch's weight version; if none serves
that version any more, the whole batch is generated again on one version. A chunk re-issued before
the others came back can still land on a newer version than theirs (a sync reached the survivors
between their generate calls): the chunks left on the older version are then generated again on the
newer one, so a batch always holds one version. With no serving worker
left it waits for Ray's restart of the dead actor (``max_restarts``), calls the ``ensure_weights``
hook (the job pushes the learner's weights) and regenerates there. A worker whose restarts are
exhausted is dropped from the pool (``workers_lost``).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from grpo_dist.batch import RolloutBatch
from grpo_dist.config import AlgoConfig, ClusterConfig, ModelConfig, RewardsConfig, RolloutConfig
from grpo_dist.errors import first_line
from grpo_dist.metrics import ROLLOUT_COUNT, counter_names
from grpo_dist.weight_sync import ParamSpec
from rollout_server.feed import StreamFeed
from rollout_server.pool import AWAITING, DOWN, SERVING, STARTING, STATUS_S, Member, decide, gone, poll
from rollout_server.worker import DEFAULT_BUCKET_BYTES, RolloutWorker, WorkerRestarted
from rollout_server.worker_placement import (
    cpu_bind_ranges,
    cpu_worker_env,
    oversubscribed,
    split_contiguous,
    sync_rank_offsets,
)

log = logging.getLogger(__name__)

_RemoteWorker = ray.remote(RolloutWorker)
# Threads per actor: one generate or weight load at a time (the engine thread), plus cheap
# queries (ping, get_weight_version, check_manifest) that must answer meanwhile.
_ACTOR_CONCURRENCY = 8
# Polling a restarting actor: seconds per attempt, and how many ActorDiedError answers in a row
# (one second apart) mean its restarts are exhausted (a restarting actor answers "unavailable").
_POLL_S = 10.0
_DEAD_ANSWERS = 3


@dataclass
class PendingRollout:
    """What ``start_generate`` returns; pass it to ``collect``."""

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


def stale_chunks(versions: dict[int, int]) -> list[int]:
    """The chunks (by first prompt) whose weight version is older than the newest among ``versions``:
    a batch is trained on one version, so these are generated again."""
    newest = max(versions.values(), default=None)
    return sorted(a for a, v in versions.items() if v != newest)


class RolloutManager:
    """The driver's handle on the rollout workers (module docstring).

    Naming: ``start_<call>`` returns at once (a handle, refs or a name to wait on); ``<call>`` waits until done.
    """

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
        # Cumulative over the run (declared as count/rollout_<name> in grpo_dist.metrics); each batch
        # also carries its own counts in ``metrics``.
        self.counters = dict.fromkeys(counter_names("rollout", ROLLOUT_COUNT), 0)
        self._lost_nodes: set[str] = set()
        self.synced_weight_version = 0  # what the pool is meant to serve: the last version pushed
        self._workers: list[Member] = []
        self._feed: StreamFeed | None = None
        self._next_id = 0
        # Core ids this driver may use; CPU workers are bound to disjoint slices of them.
        self._cores = (
            sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        )

    # ------------------------------------------------------------ lifecycle

    @property
    def uses_gpu(self) -> bool:
        return self.cluster_cfg.num_gpus_per_rollout > 0

    @property
    def worker_names(self) -> list[str]:
        """Workers that weight pushes reach (serving or awaiting weights)."""
        return [w.name for w in self._reachable()]

    @property
    def num_registered(self) -> int:
        """Every worker of the job, down and starting ones included (what `scale` counts)."""
        return len(self._workers)

    def states(self) -> dict[str, str]:
        return {w.name: w.state for w in self._workers}

    def placement(self) -> dict[str, str]:
        """Worker name -> node id it was last seen on."""
        return {w.name: w.node_id for w in self._workers if w.node_id}

    def _serving(self) -> list[Member]:
        return [w for w in self._workers if w.state == SERVING]

    def _reachable(self) -> list[Member]:
        return [w for w in self._workers if w.state in (SERVING, AWAITING)]

    def start(self, timeout_s: float | None = None) -> dict[str, dict]:
        """Create ``rollout.num_workers`` workers and wait until every engine is ready."""
        if self._workers:
            raise RuntimeError(f"RolloutManager already started with workers {self.worker_names}")
        new = [self._create() for _ in range(self.rollout_cfg.num_workers)]
        return self._wait_ready(new, timeout_s)

    def add_worker(self, timeout_s: float | None = None) -> str:
        """Start one more worker and wait until its engine is up (version 0 until the next weight
        push); returns its name."""
        w = self._create()
        self._wait_ready([w], timeout_s)
        return w.name

    def start_add_worker(self) -> str:
        """Start one more worker without waiting: it joins at a later ``refresh`` once its engine is
        up (and placed: it may wait for a node with room), awaiting the job's weights."""
        w = self._create()
        w.state, w.since = STARTING, time.monotonic()
        log.info("%s starting (it joins once its engine is up and the job pushed the current weights)", w.name)
        return w.name

    def remove_worker(self, name: str | None = None) -> str:
        """Kill one worker (by default a down one if any, else the newest) between steps; returns its name."""
        if not self._workers:
            raise RuntimeError("no rollout worker to remove")
        if name is None:
            idle = [w for w in self._workers if w.state in (DOWN, STARTING)]
            w = idle[-1] if idle else self._workers[-1]
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

    def _create(self) -> Member:
        name = f"rollout-{self._next_id}"
        self._next_id += 1
        slot = self._free_slot()
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if not self.uses_gpu:
            threads = self.rollout_cfg.cpu_threads_per_worker
            if oversubscribed(slot + 1, threads, len(self._cores)):
                log.warning(
                    "%s: %d workers x %d threads exceed the %d cores; cores are shared",
                    name,
                    slot + 1,
                    threads,
                    len(self._cores),
                )
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
            label_selector=dict(self.cluster_cfg.rollout_label_selector) or None,
        ).remote(name, self.rollout_cfg, self.model_cfg, self.algo_cfg, self.rewards_cfg, self.max_model_len)
        w = Member(
            name=name,
            handle=handle,
            slot=slot,
            num_engine_workers=self.rollout_cfg.tensor_parallel_size,
            since=time.monotonic(),
        )
        self._workers.append(w)
        return w

    def _wait_ready(self, workers: list[Member], timeout_s: float | None) -> dict[str, dict]:
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
                    w.node_id, w.node_ip, w.pid = (
                        infos[w.name]["node_id"],
                        infos[w.name]["node_ip"],
                        infos[w.name]["pid"],
                    )
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

    def start_generate(self, prompts: list[dict], n: int | None = None, sampling: dict | None = None) -> PendingRollout:
        """Start generating for ``prompts`` (unique rows) without waiting; see ``collect``."""
        if not self._workers:
            raise RuntimeError("no rollout workers: call start() first")
        if not prompts:
            raise ValueError("start_generate() needs at least one prompt row")
        if not self._serving():
            self.refresh()
        pool = self._serving()
        if not pool:
            raise RuntimeError(
                f"no rollout worker serves the job's weights (v{self.synced_weight_version}): {self.states()}"
            )
        refs, names, chunks = [], [], []
        for w, (a, b) in zip(pool, split_contiguous(len(prompts), len(pool))):
            if a == b:
                continue
            refs.append(w.handle.generate.remote(prompts[a:b], n, sampling))
            names.append(w.name)
            chunks.append((a, b))
        return PendingRollout(
            refs=refs,
            names=names,
            chunks=chunks,
            submitted_at=time.monotonic(),
            prompts=prompts,
            n=n,
            sampling=sampling,
        )

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
        stops: dict[int, int] = {}  # each done chunk's end
        failures = reissued = 0
        while pending or (stale := stale_chunks({a: b.weight_version for a, b in done.items()})):
            if not pending:
                # A chunk re-issued before the others came back can land on a newer version than
                # theirs (a sync reached the survivors meanwhile; nothing syncs during collect, so
                # the newest version is the serving one): the older chunks are generated again on it.
                for a in stale:
                    del done[a]
                    log.warning(
                        "prompts %d..%d came back on an older weight version; generating them again", a, stops[a] - 1
                    )
                before = reissued
                for a in stale:
                    fresh, whole = self._reissue(handle, a, stops[a], done, dead=None)
                    if whole:  # no worker serves the newest chunks' version: the batch starts over
                        reissued = before + len(handle.prompts)
                        done.clear()
                        pending = fresh
                        break
                    reissued += stops[a] - a
                    pending += fresh
                continue
            wait_s = max(0.0, min(c.deadline for c in pending) - time.monotonic())
            ready, _ = ray.wait([c.ref for c in pending], num_returns=1, timeout=wait_s)
            if not ready:
                late = [
                    f"{c.name} (prompts {c.start}..{c.stop - 1})" for c in pending if c.deadline <= time.monotonic()
                ]
                if late:
                    raise TimeoutError(f"rollout workers {late} did not finish generating within {timeout:.0f}s")
                continue
            for c in [c for c in pending if c.ref in ready]:
                pending.remove(c)
                try:
                    done[c.start] = ray.get(c.ref, timeout=self.cluster_cfg.rpc_timeout_s)
                    stops[c.start] = c.stop
                except (RayActorError, WorkerRestarted) as e:
                    failures += 1
                    reissued += c.stop - c.start
                    self._mark_down(c.name, first_line(e))
                    log.warning(
                        "%s failed while generating prompts %d..%d; generating them again (%s)",
                        c.name,
                        c.start,
                        c.stop - 1,
                        first_line(e),
                    )
                    fresh, whole = self._reissue(handle, c.start, c.stop, done, dead=c.name)
                    if whole:  # the batch starts over on one weight version
                        reissued += len(handle.prompts) - (c.stop - c.start)
                        done.clear()
                        pending = fresh
                        break
                    pending += fresh
        self.counters["worker_failures"] += failures
        self.counters["prompts_reissued"] += reissued
        parts = [done[a] for a in sorted(done)]
        batch = RolloutBatch.concat(parts)
        batch.metrics.update(worker_failures=float(failures), prompts_reissued=float(reissued))
        return batch

    def _reissue(
        self, handle: PendingRollout, start: int, stop: int, done: dict[int, RolloutBatch], dead: str | None
    ) -> tuple[list[_Chunk], bool]:
        """Chunks that generate prompts ``start..stop-1`` again, and whether they replace the whole batch.

        The serving workers on the version of the chunks already back take them; when none serves
        that version any more (a sync happened meanwhile), the whole batch is generated again on the
        version most serving workers have. ``dead`` is the worker that lost them, if it died: with
        no serving worker left, its restart is waited for and given the learner's weights
        (``ensure_weights``) first."""
        finished = Counter(b.weight_version for b in done.values())
        target = finished.most_common(1)[0][0] if finished else None
        live = self._serving_versions(exclude=dead)
        if not live and dead is not None:
            self._restarted_for(dead)
            live = self._serving_versions(exclude=None)
        if not live:
            raise RuntimeError(
                f"no rollout worker serves to generate prompts {start}..{stop - 1} again: {self.states()}"
            )
        names = [n for n, v in live.items() if v == target]
        whole = bool(finished) and not names
        if not names:
            counts = Counter(live.values())
            target = max(counts, key=lambda v: (counts[v], v))
            names = [n for n, v in live.items() if v == target]
        a0, b0 = (0, len(handle.prompts)) if whole else (start, stop)
        deadline = time.monotonic() + self.rollout_cfg.generate_timeout_s
        by_name = {w.name: w for w in self._workers}
        out = []
        for name, (a, b) in zip(names, split_contiguous(b0 - a0, len(names))):
            if a == b:
                continue
            a, b = a0 + a, a0 + b
            ref = by_name[name].handle.generate.remote(handle.prompts[a:b], handle.n, handle.sampling)
            out.append(_Chunk(name, ref, a, b, deadline))
        what = "the whole batch" if whole else f"prompts {start}..{stop - 1}" + (f" of {dead}" if dead else "")
        log.warning("%s re-issued to %s (weight version %s)", what, names, target)
        return out, whole

    def _serving_versions(self, exclude: str | None) -> dict[str, int]:
        """Version of each serving worker that answers now (others are marked down)."""
        out = {}
        for name, st in self._poll([w for w in self._serving() if w.name != exclude]).items():
            if isinstance(st, dict) and st["weight_version"] >= 0 and not st["awaiting_weights"]:
                out[name] = st["weight_version"]
            else:
                self._mark_down(name, st if isinstance(st, str) else "no answer")
        return out

    def _restarted_for(self, name: str) -> None:
        """Wait for Ray to restart ``name`` (the only worker left) and bring it to the learner's weights."""
        w = next((w for w in self._workers if w.name == name), None)
        if w is None:
            raise RuntimeError(f"{name} died while generating and is no longer in the pool; no other worker serves")
        version = self._await_alive(w, self.cluster_cfg.rpc_timeout_s)
        if version is None:
            self._drop(w)
            raise RuntimeError(
                f"{name} died while generating and has no restarts left "
                f"(cluster.max_worker_restarts={self.cluster_cfg.max_worker_restarts}); no other worker "
                "serves"
            )
        self.refresh()
        if self.ensure_weights is None:
            if w.state != SERVING:
                raise RuntimeError(
                    f"{name} restarted at weight version {version} and nobody pushes weights to it "
                    "(no ensure_weights hook); push weights before generating"
                )
            return
        log.warning(
            "%s restarted at weight version %d; pushing the current weights before it regenerates", name, version
        )
        self.ensure_weights()

    def _await_alive(self, w: Member, timeout_s: float) -> int | None:
        """``w``'s version once it answers (a restarting actor is waited for; -1, a worker about to exit
        for a restart, counts as not back yet), or None when its restarts are exhausted."""
        deadline = time.monotonic() + timeout_s
        died = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{w.name} did not come back within {timeout_s:.0f}s after failing "
                    f"(cluster.max_worker_restarts={self.cluster_cfg.max_worker_restarts})"
                )
            try:
                version = ray.get(w.handle.get_weight_version.remote(), timeout=min(_POLL_S, left))
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

    def _drop(self, w: Member, why: str = "restarts exhausted") -> None:
        log.error("%s is dead for good (%s); continuing without it", w.name, why)
        if w in self._workers:
            self._workers.remove(w)
            self.counters["workers_lost"] += 1

    def _poll(self, workers: list[Member]) -> dict[str, dict | str | None]:
        return poll(workers)

    def _mark_down(self, name: str, why: str) -> None:
        w = next((w for w in self._workers if w.name == name), None)
        if w is not None and w.state != DOWN:
            where = f"node {w.node_id[:8]} ({w.node_ip})" if w.node_id else "its node"
            log.warning(
                "%s on %s is down (%s); the job goes on with %d serving worker(s) while Ray restarts it",
                name,
                where,
                why,
                len([x for x in self._serving() if x is not w]),
            )
            w.state, w.since = DOWN, time.monotonic()

    def _alive_nodes(self) -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}

    def refresh(self, timeout_s: float | None = None) -> dict[str, int]:
        """Poll every worker once and update its state (module docstring); returns the version of each
        reachable worker. Restarts are logged and counted here. Only when no worker is reachable does
        it wait (at most ``timeout_s``, default cluster.rpc_timeout_s) for one to come back; workers
        with no restarts left are dropped. Raises RuntimeError when none is left."""
        statuses = self._poll(list(self._workers))
        alive_nodes = None
        for w in list(self._workers):
            st = statuses[w.name]
            d = decide(
                w.state,
                (w.pid, w.node_id) if w.pid else None,
                st,
                self.synced_weight_version,
                gone=isinstance(st, str) and gone(w.name),
            )
            if d.event == "dropped":
                self._drop(w, d.why)
                continue
            if d.state == DOWN:
                self._mark_down(w.name, d.why)
                continue
            if d.event == "restarted":
                alive_nodes = self._alive_nodes() if alive_nodes is None else alive_nodes
                self._note_restart(w, st, alive_nodes)
            elif d.event == "up":
                log.info(
                    "%s is up on node %s (%s) after %.1fs",
                    w.name,
                    st["node_id"][:8],
                    st["node_ip"],
                    time.monotonic() - w.since,
                )
            if d.state in (SERVING, AWAITING):  # a good answer: where it runs now
                w.node_id, w.node_ip, w.pid = st["node_id"], st["node_ip"], st["pid"]
            if d.state != w.state:
                w.state, w.since = d.state, time.monotonic()
        reachable = self._reachable()
        if reachable:
            return {w.name: statuses[w.name]["weight_version"] for w in reachable}
        if not self._workers:
            raise RuntimeError("every rollout worker is dead and out of restarts")
        timeout = self.cluster_cfg.rpc_timeout_s if timeout_s is None else timeout_s
        log.warning("no rollout worker answers (%s); waiting up to %.0fs for one to come back", self.states(), timeout)
        deadline = time.monotonic() + timeout
        while self._workers:
            w = min(self._workers, key=lambda w: w.since)  # the longest down first
            if self._await_alive(w, max(1.0, deadline - time.monotonic())) is None:
                self._drop(w)
                continue
            return self.refresh(timeout_s=max(1.0, deadline - time.monotonic()))
        raise RuntimeError("every rollout worker is dead and out of restarts")

    def _note_restart(self, w: Member, st: dict, alive_nodes: set[str]) -> None:
        self.counters["worker_restarts"] += 1
        old_dead = w.node_id not in alive_nodes
        if old_dead and w.node_id not in self._lost_nodes:
            self._lost_nodes.add(w.node_id)
            self.counters["nodes_lost"] += 1
        moved = f"on node {st['node_id'][:8]} ({st['node_ip']})"
        cause = (
            f"its node {w.node_id[:8]} ({w.node_ip}) is dead"
            if old_dead
            else f"pid {w.pid} on node {w.node_id[:8]} died"
        )
        log.warning(
            "%s was restarted by Ray %s after %.1fs down: %s; it waits for the job's current weights (v%d)",
            w.name,
            moved,
            time.monotonic() - w.since,
            cause,
            self.synced_weight_version,
        )

    def wait_alive(self, timeout_s: float | None = None) -> dict[str, int]:
        """Every worker's version once each answers: down workers are waited for (at most
        ``timeout_s`` each). For tests and tools that need the whole pool; the job uses ``refresh``."""
        timeout = self.cluster_cfg.rpc_timeout_s if timeout_s is None else timeout_s
        for w in list(self._workers):
            if self._await_alive(w, timeout) is None:
                self._drop(w)
        return self.refresh(timeout)

    def generate(
        self, prompts: list[dict], n: int | None = None, sampling: dict | None = None, timeout_s: float | None = None
    ) -> RolloutBatch:
        """``n`` (default num_generations) scored completions per prompt, in prompt order."""
        return self.collect(self.start_generate(prompts, n, sampling), timeout_s)

    # ------------------------------------------------------------ versions and weights

    def _call_all(self, method: str, *args, timeout_s: float | None = None) -> dict[str, Any]:
        timeout = self.cluster_cfg.rpc_timeout_s if timeout_s is None else timeout_s
        refs = {w.name: getattr(w.handle, method).remote(*args) for w in self._reachable()}
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref, timeout=timeout)
            except GetTimeoutError:
                raise TimeoutError(f"{name}.{method} did not answer within {timeout:.0f}s") from None
        return out

    def weight_versions(self, timeout_s: float | None = None) -> dict[str, int]:
        """Version of each reachable worker: 0 = initial checkpoint, -1 = broken by a failed update."""
        return self._call_all("get_weight_version", timeout_s=STATUS_S if timeout_s is None else timeout_s)

    def workers_info(self, timeout_s: float | None = None) -> dict[str, dict]:
        return self._call_all("info", timeout_s=timeout_s)

    def sync_group_size(self) -> int:
        """Weight-sync group size: learner rank 0 plus every engine worker of every rollout worker."""
        return 1 + sum(w.num_engine_workers for w in self._reachable())

    def check_manifest(self, manifest: list[ParamSpec], timeout_s: float | None = None) -> None:
        """Raise ValueError from the first worker that refuses ``manifest`` (names what is wrong)."""
        self._call_all("check_manifest", manifest, timeout_s=timeout_s)

    def start_receive_weights(
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
        ``sync_group_size()`` and send, then waits on the refs. ``bucket_bytes`` must equal the
        sender's. A running generate finishes before its worker joins.
        """
        pool = self._reachable()
        if not pool:
            raise RuntimeError(f"no reachable rollout worker to receive weights: {self.states()}")
        self.check_manifest(manifest)
        size = self.sync_group_size()
        offsets = sync_rank_offsets([w.num_engine_workers for w in pool])
        manifest_ref = ray.put(manifest)
        self.synced_weight_version = version
        return [
            w.handle.receive_weights.remote(manifest_ref, version, host, port, rank, size, timeout_s, bucket_bytes)
            for w, rank in zip(pool, offsets)
        ]

    # ------------------------------------------------------------ streaming (rollout.streaming)

    def serving_workers(self) -> list[Member]:
        """The serving workers (polled once when none serves)."""
        if not self._serving():
            self.refresh()
        return self._serving()

    def mark_down(self, name: str, why: str) -> None:
        self._mark_down(name, why)

    @property
    def feed(self) -> StreamFeed:
        if self._feed is None:
            self._feed = StreamFeed(self)
        return self._feed

    def stream_submit(self, groups: list[tuple[int, dict]]) -> None:
        """Queue ``(uid, row)`` groups of G completions each on the serving workers (``rollout_server.feed``)."""
        self.feed.submit(groups)

    def stream_take(self, want: int, timeout_s: float | None = None) -> tuple[RolloutBatch, list[int]]:
        """The first ``want`` groups to finish, in completion order, and their uids."""
        return self.feed.take(want, self.rollout_cfg.generate_timeout_s if timeout_s is None else timeout_s)

    def mark_synced(self, version: int) -> None:
        """Every reachable worker loaded ``version``: they all serve it from now on."""
        for w in self._reachable():
            if w.state == AWAITING:  # a new or restarted worker joins, by whichever push reached it first
                log.info("%s serves the job's weights (v%d) from now on", w.name, version)
            w.state, w.since = SERVING, time.monotonic()
        self.synced_weight_version = version
