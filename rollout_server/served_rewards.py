"""The rollout worker's caller of the served reward models (``reward_server``).

``ServedRewards.start`` sends a batch's rows to every model's actors at once and returns; the
rollout worker runs its reward functions meanwhile and then ``finish``es. Each model's rows are
split over its actors in contiguous chunks; a chunk whose attempt fails (the actor raised, died or
is restarting, or the attempt timed out) is sent again to the model's next actor after a backoff,
at most ``retries`` times (``grpo_dist.reward_models.call_with_retries``), and then its rows are
NaN. Actors are found by name (``reward-<name>-<i>``, listed at most once a second), so a group
scaled up or down, or an actor Ray restarted, is used within a second (``RayActors``). Scores are
placed by row index, whichever answer comes back first.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from grpo_dist.config import RewardModelSpec
from grpo_dist.reward_models import DIED, EXCEPTION, actor_index, call_with_retries
from rollout_server.worker_placement import split_contiguous

log = logging.getLogger(__name__)

# How long an actor listing is reused (a GCS call; the engine thread makes one per finished group).
_LIST_TTL_S = 1.0


def actor_names(model: str) -> list[str]:
    """The named actors (this job's namespace) serving ``model``, in index order."""
    from ray.util import list_named_actors

    found = ((actor_index(model, n), n) for n in list_named_actors())
    return [n for i, n in sorted(x for x in found if x[0] is not None)]


def failure_kind(e: BaseException) -> str:
    from ray.exceptions import RayActorError

    return DIED if isinstance(e, RayActorError) or "ActorUnavailable" in type(e).__name__ else EXCEPTION


@dataclass
class PendingScores:
    futures: dict[str, list[tuple[int, int, Future]]]  # model -> (start, stop, future of (values, failures))
    n: int


class ServedRewards:
    """One rollout worker's handle on every served reward model (module docstring)."""

    def __init__(self, specs: list[RewardModelSpec], actors: RayActors | None = None) -> None:
        """``actors`` reaches the models' actors (default: by name in Ray; tests pass a fake)."""
        self.specs = list(specs)
        self._actors = actors or RayActors()
        # Each thread waits on one chunk's attempts; a pool per model, so a slow model never holds up
        # another's chunks.
        self._pools = {
            s.name: ThreadPoolExecutor(max_workers=16, thread_name_prefix=f"served-{s.name}") for s in self.specs
        }
        self._turn = itertools.count()  # spreads first attempts of successive requests over the actors

    def start(self, rows: list[dict[str, str]]) -> PendingScores:
        """Send ``rows`` (``question``, ``answer``, ``reference``, ``prompt`` each) to every model."""
        futures: dict[str, list[tuple[int, int, Future]]] = {}
        for spec in self.specs:
            try:
                width = max(1, self._actors.count(spec.name))
            except Exception as e:  # the listing failed: one chunk, whose attempts find the actors again
                log.warning("reward model %s: could not list its actors (%s)", spec.name, e)
                width = 1
            offset = next(self._turn)
            futures[spec.name] = [
                (a, b, self._pools[spec.name].submit(self._chunk, spec, rows[a:b], k + offset))
                for k, (a, b) in enumerate(split_contiguous(len(rows), width))
                if a < b
            ]
        return PendingScores(futures, len(rows))

    @staticmethod
    def join(parts: list[PendingScores]) -> PendingScores:
        """One request's worth of scores from several started separately (rows in ``parts``' order)."""
        futures: dict[str, list[tuple[int, int, Future]]] = {}
        offset = 0
        for p in parts:
            for name, chunks in p.futures.items():
                futures.setdefault(name, []).extend((a + offset, b + offset, f) for a, b, f in chunks)
            offset += p.n
        return PendingScores(futures, offset)

    def finish(self, pending: PendingScores) -> tuple[dict[str, list[float]], dict[str, int]]:
        """Each model's scores (NaN where none) and failures as ``"<model>/<kind>": count``. Never waits
        longer than each chunk's attempts allow."""
        scores: dict[str, list[float]] = {}
        failures: dict[str, int] = {}
        for name, chunks in pending.futures.items():
            values = [math.nan] * pending.n
            for a, b, fut in chunks:
                got, failed = fut.result()
                values[a:b] = got
                for kind, count in failed.items():
                    failures[f"{name}/{kind}"] = failures.get(f"{name}/{kind}", 0) + count
            scores[name] = values
        return scores, failures

    def _chunk(self, spec: RewardModelSpec, rows: list[dict], first: int) -> tuple[list[float], dict[str, int]]:
        values, failures = call_with_retries(
            lambda attempt: self._actors.send(spec.name, first + attempt, rows, spec.timeout_s),
            len(rows),
            spec.timeout_s,
            spec.retries,
            spec.backoff_s,
            failure_kind,
        )
        if failures:
            log.warning("reward model %s: %d rows, failed attempts %s", spec.name, len(rows), failures)
        return values, failures

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)


class RayActors:
    """The served models' actors by name, listed at most once per ``_LIST_TTL_S`` (scaling and restarts
    apply within that). The actors of the first listing are taken as ready (at job start the job waited
    for their models before it started the rollout workers; a rollout worker restarted later may meet
    one still loading, which costs an attempt's timeout). One that appears later, or whose request
    died, gets requests once it answered a ``ping``. So an actor still loading its model (or being
    restarted) is skipped while another is ready, instead of costing a request its timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listed: dict[str, tuple[float, list[str]]] = {}  # model -> (when, names)
        self._ready: set[str] = set()
        self._pings: dict[str, Any] = {}  # name -> its ping in flight
        # Actors whose request died, filled by future callbacks: those run on Ray's own thread, which
        # must never wait for a lock held around a Ray call (deque appends need no lock).
        self._died: collections.deque[str] = collections.deque()

    def _names(self, model: str) -> list[str]:
        import ray

        with self._lock:
            while self._died:
                self._ready.discard(self._died.popleft())  # pinged again before it gets more requests
            when, names = self._listed.get(model, (-math.inf, []))
            if time.monotonic() - when > _LIST_TTL_S:
                first = model not in self._listed
                names = actor_names(model)
                self._listed[model] = (time.monotonic(), names)
                if first:  # the job started these and waited for their models before any rollout
                    self._ready.update(names)
            for n in names:
                if n not in self._ready and n not in self._pings:
                    try:
                        self._pings[n] = ray.get_actor(n).ping.remote()
                    except ValueError:  # removed since the listing
                        continue
            if self._pings:
                done, _ = ray.wait(list(self._pings.values()), num_returns=len(self._pings), timeout=0)
                for n, ref in list(self._pings.items()):
                    if ref in done:
                        del self._pings[n]
                        try:
                            ray.get(ref, timeout=0)
                            self._ready.add(n)
                        except Exception:  # dead or failed to start: pinged again at the next listing
                            pass
            ready = [n for n in names if n in self._ready]
            return ready or names  # none ready yet: the request waits in an actor's queue

    def count(self, model: str) -> int:
        return len(self._names(model))

    def send(self, model: str, k: int, rows: list[dict], timeout_s: float) -> Future:
        """One attempt on the model's ``k``-th ready actor (modulo their number): a future of its scores."""
        import ray

        names = self._names(model)
        if not names:
            raise RuntimeError(f"no actor serves reward model {model!r}")
        name = names[k % len(names)]
        fut = ray.get_actor(name).score.remote(rows, timeout_s).future()

        def forget(f: Future) -> None:
            if not f.cancelled() and f.exception() is not None and failure_kind(f.exception()) == DIED:
                self._died.append(name)

        fut.add_done_callback(forget)
        return fut


def served_rows(rows: list[dict], groups: list[int], texts: list[str]) -> list[dict]:
    """What a served model reads of each completion: ``texts[i]`` answers prompt row ``rows[groups[i]]``
    (its ``prompt``, ``question`` and reference ``answer``)."""
    return [
        {
            "prompt": str(rows[g].get("prompt", "")),
            "question": str(rows[g].get("question", "")),
            "answer": t,
            "reference": str(rows[g].get("answer", "")),
        }
        for g, t in zip(groups, texts, strict=True)
    ]
