"""RewardGroup: the driver's handle on one served reward model's actors (``reward-<name>-<i>``).

It follows the rollout workers' pattern (``rollout_server.pool``): named actors, placed by the
model's label selector, restarted by Ray (``cluster.max_worker_restarts``), polled between steps
with a bound, and scaled live (``grpo-dist scale --reward-workers name=N``). A reward model has no
weights to sync, so a member that answers serves. The rollout workers find the actors by name
for each request (``rollout_server.served_rewards``), so this handle never stands between them.
"""

from __future__ import annotations

import logging
import math
import time

import ray

from grpo_dist.config import RewardModelSpec
from grpo_dist.reward_models import actor_name
from reward_server.worker import CONTROL, RewardWorker
from rollout_server.pool import DOWN, SERVING, STARTING, Member, decide, gone, poll

log = logging.getLogger(__name__)

# Health queries (status, ping) have threads of their own, apart from the request threads.
_RemoteRewardWorker = ray.remote(concurrency_groups={CONTROL: 2})(RewardWorker)


class RewardGroup:
    def __init__(self, spec: RewardModelSpec, max_restarts: int, rpc_timeout_s: float) -> None:
        self.spec, self.max_restarts, self.rpc_timeout_s = spec, max_restarts, rpc_timeout_s
        self._members: list[Member] = []
        self._next_id = 0
        self.restarts = 0  # cumulative over the run
        self.lost = 0
        self._last: dict[str, dict] = {}  # each member's last status answer

    @property
    def names(self) -> list[str]:
        return [m.name for m in self._members]

    @property
    def num_registered(self) -> int:
        return len(self._members)

    def states(self) -> dict[str, str]:
        return {m.name: m.state for m in self._members}

    def _create(self) -> Member:
        name = actor_name(self.spec.name, self._next_id)
        self._next_id += 1
        env = {"OMP_NUM_THREADS": str(self.spec.cpu_threads)}
        if self.spec.kind == "judge" and not self.spec.num_gpus:
            env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
        handle = _RemoteRewardWorker.options(
            name=name,
            num_cpus=self.spec.num_cpus,
            num_gpus=self.spec.num_gpus,
            max_restarts=self.max_restarts,
            max_task_retries=0,  # the caller re-sends, to another member where there is one
            # Request threads (each waits for its rows; the queue bounds the rows in the model).
            max_concurrency=self.spec.max_concurrency,
            runtime_env={"env_vars": env},
            label_selector=dict(self.spec.label_selector) or None,
        ).remote(name, self.spec)
        m = Member(name=name, handle=handle, slot=self._next_id - 1, state=STARTING, since=time.monotonic())
        self._members.append(m)
        return m

    def start(self, timeout_s: float | None = None) -> None:
        """Create ``num_workers`` actors and wait until every model is loaded."""
        new = [self._create() for _ in range(self.spec.num_workers)]
        timeout = self.rpc_timeout_s if timeout_s is None else timeout_s
        refs = [m.handle.status.remote() for m in new]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        problems = []
        for m, ref in zip(new, refs):
            if ref not in ready:
                problems.append(f"{m.name} not ready within {timeout:.0f}s")
                continue
            try:
                st = ray.get(ref, timeout=timeout)
            except Exception as e:  # the constructor (model load) raised
                problems.append(f"{m.name} failed to start: {e}")
                continue
            m.state, m.node_id, m.node_ip, m.pid = SERVING, st["node_id"], st["node_ip"], st["pid"]
        if problems:
            self.shutdown()
            raise RuntimeError(f"reward model {self.spec.name!r} did not start: " + "; ".join(problems))

    def scale(self, want: int) -> tuple[int, int]:
        """Start or remove actors until ``want`` are registered; returns (added, removed). New ones join
        once their model is loaded (the rollout workers find them by name); removal takes the newest
        first, a down one before any."""
        if want < 1:
            raise ValueError(f"reward model {self.spec.name!r} needs at least one worker, got {want}")
        added = removed = 0
        while len(self._members) < want:
            m = self._create()
            log.info("%s starting (serves once its model is loaded)", m.name)
            added += 1
        while len(self._members) > want:
            idle = [m for m in self._members if m.state in (DOWN, STARTING)]
            m = idle[-1] if idle else self._members[-1]
            self._members.remove(m)
            ray.kill(m.handle, no_restart=True)
            log.info("scaling down: removed %s", m.name)
            removed += 1
        return added, removed

    def refresh(self) -> dict[str, str]:
        """Poll every member once (bounded) and update its state; restarts are counted and logged, a
        member Ray gave up on is dropped. Returns the states; raises RuntimeError once none is left
        (every row would go unscored)."""
        answers = poll(self._members)
        for m in list(self._members):
            st = answers[m.name]
            d = decide(
                m.state, (m.pid, m.node_id) if m.pid else None, st, None, gone=isinstance(st, str) and gone(m.name)
            )
            if d.event == "dropped":
                log.error("%s is dead for good (%s); continuing without it", m.name, d.why)
                self._members.remove(m)
                self.lost += 1
                continue
            if d.event == "restarted":
                self.restarts += 1
                log.warning(
                    "%s was restarted by Ray (pid %d -> %d); its requests were re-sent", m.name, m.pid, st["pid"]
                )
            elif d.event == "down":
                log.warning("%s is down (%s); Ray restarts it, requests go to the others", m.name, d.why)
            elif d.event == "up":
                log.info("%s serves after %.1fs", m.name, time.monotonic() - m.since)
            if d.state == SERVING:  # a good answer: where it runs now
                m.node_id, m.node_ip, m.pid = st["node_id"], st["node_ip"], st["pid"]
                self._last[m.name] = st
            if d.state != m.state:
                m.state, m.since = d.state, time.monotonic()
        if not self._members:
            raise RuntimeError(
                f"every actor of reward model {self.spec.name!r} is dead and out of restarts "
                f"(cluster.max_worker_restarts={self.max_restarts})"
            )
        return self.states()

    def metrics(self) -> dict[str, float]:
        """``served/<name>/...`` gauges from the last ``refresh`` (grpo_dist.metrics)."""
        serving = [self._last[m.name] for m in self._members if m.state == SERVING and m.name in self._last]
        pre = f"served/{self.spec.name}/"

        def worst(key: str) -> float:
            vals = [s[key] for s in serving if not math.isnan(s[key])]
            return max(vals) if vals else math.nan

        return {
            pre + "workers": float(len(serving)),
            pre + "requests": float(sum(s["requests"] for s in serving)),
            pre + "in_flight": float(sum(s["in_flight"] for s in serving)),
            pre + "queue_depth": float(sum(s["queue_depth"] for s in serving)),
            pre + "latency_p50": worst("latency_p50"),
            pre + "latency_p95": worst("latency_p95"),
            pre + "restarts": float(self.restarts),
        }

    def placement(self) -> dict[str, str]:
        return {m.name: m.node_id for m in self._members if m.node_id}

    def shutdown(self) -> None:
        for m in self._members:
            ray.kill(m.handle, no_restart=True)
        self._members = []
