"""The engine thread of a streaming rollout worker (``rollout.streaming``).

One thread owns the vLLM engine, as in batch mode; instead of one blocking ``generate`` per batch
it runs a loop: run the queued commands (start-up, weight loads, queries), admit queued groups
while the engine has room, take one engine step, hand the groups whose G completions all finished
to ``take``. So the engine is never idle while groups wait, a long group never holds back a short
one, and a weight load waits for one engine step, not for a batch.

Weight updates. In-flight (``rollout.in_flight_updates``, the default), a load runs between two
steps and the running requests are preempted (vLLM's ``reset_prefix_cache(reset_running_requests=
True)``): they resume by recomputing their KV cache under the new weights, so every token after
the switch is the new weights' own sample and its log-prob is exact. vLLM labels each output
token with the weight version current when it was sampled (``CompletionOutput.weight_versions``);
the rows carry those labels per token. Without in-flight updates a load is parked: no group is
admitted, the running ones finish on their start version, then it runs (one version per row).

Thread safety: commands and groups enter through locked queues; the loop is the only code that
touches the engine.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from grpo_dist.errors import first_line

log = logging.getLogger(__name__)

# Longest the loop sleeps when it has nothing to do (it wakes at once on a command or group).
_IDLE_WAIT_S = 0.5


@dataclass
class StreamGroup:
    """One prompt's G completions, as the driver submitted them."""

    uid: int  # the driver's id of this group (unique in the job)
    row: dict  # the prompt row (prompt_ids, prompt, answer, ...)
    params: dict[str, Any]  # SamplingParams keywords of its one vLLM request, seed included
    channel: str = "train"  # whose ``take`` gets it: the driver's stream, or one blocking ``generate`` call
    scoring: Any = None  # what ``on_finished`` started for it (the served reward models' pending scores)


def engine_load(windows: list[dict[str, float]]) -> dict[str, float]:
    """``rollout/engine_occupancy`` (unfinished sequences per step over the most a step may run) and
    ``rollout/engine_idle_fraction`` (wall time without a step) over ``stats`` windows of one or more
    engines; occupancy is left out when no window held a step."""
    wall = sum(w["wall_seconds"] for w in windows)
    out = {"engine_idle_fraction": max(0.0, 1.0 - sum(w["busy_seconds"] for w in windows) / wall)} if wall > 0 else {}
    steps = sum(w["steps"] for w in windows)
    if steps:
        out["engine_occupancy"] = sum(w["running_seqs"] / w["max_seqs"] for w in windows) / steps
    return out


def token_versions(spans: list[Any] | None, num_tokens: int, default: int) -> list[int]:
    """Per-token weight versions from vLLM's ``WeightVersionSpan`` list (labels are the version's
    decimal string); ``default`` for tokens no span covers (none, when every load set a label)."""
    out = [default] * num_tokens
    for s in spans or ():
        for t in range(s.start, min(s.end, num_tokens)):
            out[t] = int(s.version)
    return out


class EngineLoop:
    """Owns the engine thread (module docstring). ``submit(fn, *args)`` runs ``fn`` on it between
    engine steps and returns a Future, like the batch worker's single-thread executor.

    An exception inside the engine (``add_request`` or ``step``) is final for it: every group it held
    and every command still waiting fail, ``on_failure`` is called once (the worker exits so Ray
    restarts it), and the thread stops stepping."""

    def __init__(
        self,
        name: str,
        in_flight_updates: bool,
        on_failure: Callable[[], None] | None = None,
        on_finished: Callable[[StreamGroup, Any], Any] | None = None,
    ) -> None:
        """``on_finished(group, output)``, if given, runs on the engine thread as each training group
        finishes, before ``take`` can return it; what it returns is kept as ``group.scoring`` (the worker
        starts the served reward models' requests there, so scoring overlaps the engine's next steps)."""
        self.name = name
        self.in_flight_updates = in_flight_updates
        self.on_failure = on_failure
        self.on_finished = on_finished
        self.llm: Any = None  # set by ``attach`` (the start-up command)
        self.lora_request: Any = None  # the LoRA adapter every admitted request runs (set on this thread)
        self.max_running_seqs = 1
        self.failure: str | None = None  # the engine raised: nothing more is generated
        self._lock = threading.Condition()
        self._commands: collections.deque = collections.deque()
        self._parked: collections.deque = collections.deque()  # weight loads waiting for the running groups
        self._queued: collections.deque[StreamGroup] = collections.deque()
        self._running: dict[str, StreamGroup] = {}  # vLLM request id -> group
        self._done: dict[str, collections.deque[tuple[StreamGroup, Any]]] = collections.defaultdict(collections.deque)
        self._dropped: set[str] = set()  # channels of blocking calls that gave up
        self._requests = 0  # vLLM request ids are unique per engine even when a uid is sent twice
        self._steps = 0
        self._occupied = 0.0  # sum over steps of unfinished sequences
        self._busy_s = 0.0
        self._since = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"{name}-engine", daemon=True)
        self._thread.start()

    def attach(self, llm: Any) -> None:
        """Serve ``llm`` (called on the engine thread once it is built); the load statistics start here."""
        with self._lock:
            self.max_running_seqs = llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
            self.llm = llm
            self._since = time.monotonic()

    # ------------------------------------------------------------ called from other threads

    def submit(self, fn, *args, park: bool = False) -> Future:
        """Run ``fn(*args)`` on the engine thread between steps; ``park``: a weight load, which in
        one-version mode waits until no group runs and admits none meanwhile."""
        fut: Future = Future()
        with self._lock:
            if self.failure is not None:
                fut.set_exception(RuntimeError(self.failure))
                return fut
            self._commands.append((fn, args, fut, park))
            self._lock.notify_all()
        return fut

    def add(self, groups: list[StreamGroup], first: bool = False) -> None:
        """Queue ``groups``; ``first``: ahead of the queued ones (a blocking call's, e.g. evaluation)."""
        with self._lock:
            if first:
                self._queued.extendleft(reversed(groups))
            else:
                self._queued.extend(groups)
            self._lock.notify_all()

    def take(self, channel: str, max_groups: int, wait_s: float) -> list[tuple[StreamGroup, Any]]:
        """Up to ``max_groups`` finished groups of ``channel`` (group, vLLM RequestOutput), in
        completion order; waits at most ``wait_s`` for the first one."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            done = self._done[channel]
            while not done and self.failure is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            out = [done.popleft() for _ in range(min(max_groups, len(done)))]
            if channel != "train" and not done:
                del self._done[channel]
            return out

    def drop(self, channel: str) -> None:
        """Forget a blocking call's groups (it gave up): queued ones are not started, finished ones
        are discarded; running ones finish and are discarded."""
        with self._lock:
            self._queued = collections.deque(g for g in self._queued if g.channel != channel)
            self._done.pop(channel, None)
            self._dropped.add(channel)

    def held(self) -> list[int]:
        """Uids of the training groups queued, running or finished and not yet taken."""
        with self._lock:
            return [
                g.uid
                for g in (*self._queued, *self._running.values(), *(g for g, _ in self._done["train"]))
                if g.channel == "train"
            ]

    def stats(self) -> dict[str, float]:
        """Engine steps, unfinished sequences summed over them, seconds in steps and wall seconds since
        the last call, and the most sequences a step may run (``engine_load`` turns them into
        occupancy and idle fraction)."""
        with self._lock:
            now = time.monotonic()
            out = {
                "steps": float(self._steps),
                "running_seqs": self._occupied,
                "busy_seconds": self._busy_s,
                "wall_seconds": now - self._since,
                "max_seqs": float(self.max_running_seqs),
            }
            self._steps, self._occupied, self._busy_s, self._since = 0, 0.0, 0.0, now
            return out

    # ------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (
                    self._commands or (self.failure is None and (self._running or self._parked or self._admissible()))
                ):
                    self._lock.wait(_IDLE_WAIT_S)
                commands = list(self._commands)
                self._commands.clear()
            for cmd in commands:
                if cmd[3] and not self.in_flight_updates and self._running:
                    self._parked.append(cmd)  # one-version mode: the running groups finish first
                else:
                    self._execute(cmd)
            while self._parked and not self._running:
                self._execute(self._parked.popleft())
            if self.failure is not None:
                continue
            try:
                self._admit()
                if self._running:
                    self._step()
            except Exception as e:
                # The scheduler's state is undefined after an exception inside the engine.
                log.exception("%s: vLLM engine failed while streaming", self.name)
                self._fail(
                    f"{self.name}: vLLM engine failed while streaming {len(self._running)} groups: {first_line(e)}"
                )

    def _fail(self, why: str) -> None:
        with self._lock:
            self.failure = why
            waiting = [c[2] for c in (*self._commands, *self._parked)]
            self._commands.clear()
            self._parked.clear()
            self._queued.clear()
            self._running.clear()
            self._lock.notify_all()
        for fut in waiting:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError(why))
        if self.on_failure is not None:
            self.on_failure()

    def _admissible(self) -> bool:
        return bool(self._queued) and self.llm is not None and not self._parked

    def _execute(self, cmd: tuple) -> None:
        fn, args, fut, _park = cmd
        if not fut.set_running_or_notify_cancel():
            return  # its caller gave up waiting
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # handed to the caller
            fut.set_exception(e)

    def _admit(self) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        engine = self.llm.llm_engine
        while True:
            with self._lock:
                if not self._admissible():
                    return
                g = self._queued[0]
                if self._running and engine.get_num_unfinished_requests() + g.params["n"] > self.max_running_seqs:
                    return
                self._queued.popleft()
                rid = f"{g.channel}-{g.uid}-{self._requests}"
                self._requests += 1
                # Held from here on (``held`` must never miss a group between queue and engine).
                self._running[rid] = g
            # One request per group (vLLM fans out the n samples); FINAL_ONLY: one output, when all n finished.
            params = SamplingParams(**g.params, output_kind=RequestOutputKind.FINAL_ONLY)
            engine.add_request(
                rid, TokensPrompt(prompt_token_ids=list(g.row["prompt_ids"])), params, lora_request=self.lora_request
            )

    def _step(self) -> None:
        engine = self.llm.llm_engine
        unfinished = engine.get_num_unfinished_requests()
        t0 = time.monotonic()
        outs = engine.step()
        dt = time.monotonic() - t0
        with self._lock:
            self._steps += 1
            self._occupied += unfinished
            self._busy_s += dt
            # Still counted as running (``held``) until they are handed to ``take`` below.
            finished = [(self._running[o.request_id], o) for o in outs if o.finished]
        for g, out in finished:
            if self.on_finished is not None and g.channel == "train":
                try:
                    g.scoring = self.on_finished(g, out)
                except Exception as e:  # not the engine's failure: the group is scored when taken
                    log.warning("%s: on_finished failed for group %d: %s", self.name, g.uid, first_line(e))
        with self._lock:
            for g, out in finished:
                del self._running[out.request_id]
                if g.channel not in self._dropped:
                    self._done[g.channel].append((g, out))
            if finished:
                self._lock.notify_all()
