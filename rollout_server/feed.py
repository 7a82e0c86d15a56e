"""The driver's stream of completed groups over the rollout workers (``rollout.streaming``).

The driver submits groups (a uid and a prompt row each); each goes to the serving worker holding
the fewest, whose engine generates it alongside the others (``rollout_server.stream``). ``take``
returns finished groups in completion order. Every group the feed has handed out is tracked by
uid on the worker that holds it, so none is lost or returned twice:

- a worker that fails, restarts, is removed or stops serving loses what it held: those groups are
  generated again, whole and from the start, on the serving workers (``prompts_reissued``);
- a worker that answers but no longer holds a group it was given (Ray restarted it and the job
  pushed it weights before the feed asked it again) has lost that group, which is re-issued the
  same way;
- a group that comes back from a worker it is no longer tracked on (it was re-issued meanwhile)
  is dropped, so each uid is trained on once.

Only finished groups leave a worker, so no partly generated row is ever trained on.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from grpo_dist.batch import RolloutBatch
from grpo_dist.errors import first_line
from rollout_server.stream import engine_load

if TYPE_CHECKING:
    from rollout_server.manager import RolloutManager

log = logging.getLogger(__name__)

# Longest one ``stream_take`` call waits inside a worker before answering (it answers at once when
# a group is ready); the feed loops until its own deadline.
_TAKE_WAIT_S = 2.0


def assign_groups(uids: list[int], load: dict[str, int]) -> dict[str, list[int]]:
    """Each uid to the worker holding the fewest groups at that point (ties: the order of ``load``)."""
    load = dict(load)
    out: dict[str, list[int]] = {name: [] for name in load}
    for uid in uids:
        name = min(load, key=lambda k: load[k])
        out[name].append(uid)
        load[name] += 1
    return {k: v for k, v in out.items() if v}


def lost_groups(tracked: set[int], returned: list[int], held: list[int]) -> set[int]:
    """Uids a worker was given that it neither returned now nor still holds."""
    return tracked - set(returned) - set(held)


class StreamFeed:
    """Submits groups to the manager's serving workers and takes finished ones (module docstring)."""

    def __init__(self, manager: RolloutManager) -> None:
        self.m = manager
        self.rows: dict[int, dict] = {}  # uid -> row of every group handed out and not yet returned
        self.on: dict[str, set[int]] = {}  # worker name -> uids it holds
        self._ready: list[tuple[RolloutBatch, list[int]]] = []  # finished groups beyond what take asked for

    @property
    def in_flight(self) -> int:
        """Groups submitted and not yet returned by ``take``."""
        return len(self.rows) + sum(len(u) for _, u in self._ready)

    def submit(self, groups: list[tuple[int, dict]]) -> None:
        """Queue ``(uid, row)`` groups on the serving workers."""
        for uid, row in groups:
            self.rows[uid] = row
        self._send([uid for uid, _ in groups])

    def _send(self, uids: list[int]) -> None:
        pending = list(uids)
        while pending:
            pool = self.m.serving_workers()
            if not pool:
                raise RuntimeError(f"no rollout worker serves to generate {len(pending)} groups: {self.m.states()}")
            plan = assign_groups(pending, {w.name: len(self.on.get(w.name, ())) for w in pool})
            by_name = {w.name: w for w in pool}
            refs = {
                name: by_name[name].handle.stream_submit.remote([self.rows[u] for u in us], us)
                for name, us in plan.items()
            }
            pending = []
            for name, ref in refs.items():
                try:
                    ray.get(ref, timeout=self.m.cluster_cfg.rpc_timeout_s)
                    self.on.setdefault(name, set()).update(plan[name])
                except (RayActorError, GetTimeoutError, RuntimeError) as e:
                    self.m.counters["worker_failures"] += 1
                    self.m.mark_down(name, first_line(e))
                    pending += plan[name]

    def _reissue(self, name: str, uids: set[int], why: str) -> None:
        if not uids:
            return
        self.on[name] -= uids
        self.m.counters["prompts_reissued"] += len(uids)
        log.warning("%s lost %d group(s) (%s); generating them again from the start", name, len(uids), why)
        self._send(sorted(uids))

    def _reclaim(self) -> None:
        """Re-issue what workers that no longer serve (down, restarting, removed) held."""
        serving = {w.name for w in self.m.serving_workers()}
        registered = self.m.states()
        for name in [n for n in self.on if n not in serving and self.on[n]]:
            if name in registered:  # down or restarted; a worker removed by scaling did not fail
                self.m.counters["worker_failures"] += 1
            self._reissue(name, set(self.on[name]), "it no longer serves")

    def take(self, want: int, timeout_s: float) -> tuple[RolloutBatch, list[int]]:
        """The first ``want`` groups to finish, in completion order, as one batch, and their uids.
        Raises TimeoutError when they do not finish within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        got, self._ready = self._ready, []
        stats: list[dict[str, float]] = []
        while sum(len(u) for _, u in got) < want:
            self._reclaim()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{want} groups did not finish within {timeout_s:.0f}s ({self.in_flight} in flight)")
            need = want - sum(len(u) for _, u in got)
            asked = [w for w in self.m.serving_workers() if self.on.get(w.name)]
            if not asked:
                raise RuntimeError(f"no rollout worker holds the {len(self.rows)} groups in flight: {self.m.states()}")
            wait = min(_TAKE_WAIT_S, left)
            refs = {w.name: w.handle.stream_take.remote(need, wait) for w in asked}
            ray.wait(list(refs.values()), num_returns=len(refs), timeout=wait + self.m.cluster_cfg.rpc_timeout_s)
            for name, ref in refs.items():
                try:
                    res = ray.get(ref, timeout=0.1)
                except GetTimeoutError:
                    continue  # it answers in a later round
                except (RayActorError, RuntimeError) as e:  # died, restarted (WorkerRestarted), engine failed
                    self.m.counters["worker_failures"] += 1
                    self.m.mark_down(name, first_line(e))
                    self._reissue(name, set(self.on.get(name, ())), first_line(e))
                    continue
                got += self._accept(name, res)
                stats.append(res["stats"])
        batch, uids = _first_groups(got, want, self)
        # The engine's time is every window this take read, also those of calls that found no group
        # finished (a worker's batch counts only the window of the call that returned it).
        batch.timings["generate"] = sum(s["busy_seconds"] for s in stats)
        batch.metrics.update(engine_load(stats))
        return batch, uids

    def _accept(self, name: str, res: dict[str, Any]) -> list[tuple[RolloutBatch, list[int]]]:
        tracked = self.on.setdefault(name, set())
        lost = lost_groups(tracked, res["uids"], res["held"])
        out = []
        if res["batch"] is not None:
            batch, G = res["batch"], len(res["batch"]) // max(len(res["uids"]), 1)
            keep = [k for k, u in enumerate(res["uids"]) if u in tracked]
            if len(keep) < len(res["uids"]):
                log.warning(
                    "%s returned %d group(s) already re-issued elsewhere; dropped", name, len(res["uids"]) - len(keep)
                )
            if keep:
                uids = [res["uids"][k] for k in keep]
                out.append((batch.select([k * G + j for k in keep for j in range(G)]), uids))
                tracked -= set(uids)
                for u in uids:
                    self.rows.pop(u, None)
        self._reissue(name, lost, "its engine no longer holds them")
        return out


def _first_groups(
    got: list[tuple[RolloutBatch, list[int]]], want: int, feed: StreamFeed
) -> tuple[RolloutBatch, list[int]]:
    """The first ``want`` groups of ``got`` as one batch; the rest wait in the feed for the next take."""
    batch = RolloutBatch.concat([b for b, _ in got])
    uids = [u for _, us in got for u in us]
    if len(uids) > want:
        G = len(batch) // len(uids)
        rest = batch.select(list(range(want * G, len(batch))))
        rest.metrics, rest.timings = {}, {}  # counted with this take's batch already
        feed._ready = [(rest, uids[want:])]
        batch, uids = batch.select(list(range(want * G))), uids[:want]
    return batch, uids
