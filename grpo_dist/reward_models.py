"""Served reward models and judges: what is pure about them (``rewards.models``).

A served scorer is a group of Ray actors (``reward_server``); this module holds the parts that
need no Ray and no model: what a judge or classifier reads (``render``), how a judge's two answer
log-probs become a score (``choice_score``), the bounded queue an actor admits rows from
(``ScoreQueue``), the retry loop a caller runs around one request (``call_with_retries``) and the
latency percentiles the metrics report.

A row that gets no score after its retries is missing (NaN): ``grpo_dist.rewards.add_component``
then makes its combined reward missing, so it leaves its group's baseline and gets advantage 0.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from grpo_dist.config import RewardModelSpec
from grpo_dist.rewards import finite_or_nan

# Failure kinds, counted per model (``reward_failures/<name>/<kind>``).
TIMEOUT, EXCEPTION, DIED = "timeout", "exception", "died"


def actor_name(model: str, index: int) -> str:
    """The Ray actor name of a served model's ``index``-th worker."""
    return f"reward-{model}-{index}"


def actor_index(model: str, name: str) -> int | None:
    """``index`` if ``name`` is ``actor_name(model, index)``, else None."""
    prefix = f"reward-{model}-"
    tail = name[len(prefix) :] if name.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


def render(spec: RewardModelSpec, question: str, answer: str, reference: str, prompt: str) -> str:
    """The text a served model reads for one row: its template filled in, or (a classifier without a
    template) the policy's prompt followed by the completion."""
    if spec.prompt_template is None:
        return prompt + answer
    return spec.prompt_template.format(question=question, answer=answer, reference=reference)


def choice_score(logp_yes: float, logp_no: float) -> float:
    """P(yes) / (P(yes) + P(no)) from the two answers' log-probs: ``sigmoid(logp_yes - logp_no)``.

    Renormalised over the two answers so mass on other tokens (a space, "yes" in lower case) does
    not lower every score alike; NaN when both are -inf."""
    d = logp_yes - logp_no
    if math.isnan(d):
        return math.nan
    return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by linear interpolation between order statistics; NaN if empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class _Pending:
    item: Any
    future: Future
    deadline: float  # time.monotonic() after which nobody waits for it: it is failed, not scored


@dataclass
class QueueStats:
    in_flight: int = 0  # rows handed to the model and not yet answered
    peak_in_flight: int = 0  # the most at any time since start
    rows: int = 0  # rows answered
    requests: int = 0  # requests queued
    expired: int = 0  # rows failed unscored: their deadline passed in the queue
    latencies: deque = field(default_factory=lambda: deque(maxlen=1024))  # seconds, per answered request


class ScoreQueue:
    """Rows waiting for one actor's model, handed out at most ``max_in_flight`` at a time.

    Callers (the actor's request threads) ``put`` rows and wait on their futures; the model thread
    ``take``s a batch, scores it and ``finish``es it. So a request of many rows is scored in batches
    with other requests' rows (a judge is never called one row at a time), and never more than
    ``max_in_flight`` rows are inside the model at once. A row still waiting at its deadline (its
    caller gave up and sent it elsewhere) fails with TimeoutError instead of being scored, so
    retries under load do not pile work onto the model."""

    def __init__(self, max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self._waiting: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self.stats = QueueStats()

    def put(self, items: list[Any], timeout_s: float) -> list[Future]:
        """Queue ``items``; each future resolves to its score, or fails (TimeoutError after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        pending = [_Pending(x, Future(), deadline) for x in items]
        with self._cond:
            self._waiting.extend(pending)
            self.stats.requests += 1
            self._cond.notify_all()
        return [p.future for p in pending]

    def take(self, wait_s: float) -> list[_Pending]:
        """Up to ``max_in_flight - in_flight`` waiting rows (blocks up to ``wait_s`` for one); rows past
        their deadline are failed on the way."""
        expired = []
        with self._cond:
            self._cond.wait_for(lambda: self._waiting and self.stats.in_flight < self.max_in_flight, timeout=wait_s)
            now = time.monotonic()
            out = []
            while self._waiting and len(out) < self.max_in_flight - self.stats.in_flight:
                p = self._waiting.popleft()
                (expired if p.deadline <= now else out).append(p)
            self.stats.in_flight += len(out)
            self.stats.expired += len(expired)
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
        for p in expired:
            p.future.set_exception(TimeoutError("the caller's deadline passed while the row waited"))
        return out

    def finish(self, batch: list[_Pending], values: list[float] | BaseException) -> None:
        """Answer ``batch`` with one value per row, or fail every row with an exception."""
        with self._cond:
            self.stats.in_flight -= len(batch)
            self.stats.rows += len(batch)
            self._cond.notify_all()
        for i, p in enumerate(batch):
            if isinstance(values, BaseException):
                p.future.set_exception(values)
            else:
                p.future.set_result(float(values[i]))

    def fail_all(self, error: BaseException) -> None:
        """Fail every waiting row (the model thread stopped)."""
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for p in waiting:
            p.future.set_exception(error)

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._waiting)


def call_with_retries(
    submit: Callable[[int], Future],
    n: int,
    timeout_s: float,
    retries: int,
    backoff_s: float,
    failure_kind: Callable[[BaseException], str],
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[float], dict[str, int]]:
    """Run one request of ``n`` rows: ``submit(attempt)`` starts attempt 0, 1, ... (the caller may
    send each to another actor) and returns a future of ``n`` scores. An attempt that raises, times
    out after ``timeout_s`` or answers the wrong number of scores is retried after
    ``backoff_s * 2**k`` seconds, at most ``retries`` times; then every row is NaN.

    Returns the scores and the failures by kind (``failure_kind(exc)`` names an exception's kind;
    ``timeout`` and ``wrong_length`` are this function's). Each attempt's failure is counted."""
    failures: dict[str, int] = {}
    for attempt in range(retries + 1):
        if attempt:
            sleep(backoff_s * 2 ** (attempt - 1))
        try:
            fut = submit(attempt)
            values = fut.result(timeout=timeout_s)
        except FutureTimeout:
            fut.cancel()
            kind = TIMEOUT
        except Exception as e:  # the actor raised or died: the caller names the kind
            kind = failure_kind(e)
        else:
            if len(values) == n:
                return [finite_or_nan(v) for v in values], failures
            kind = "wrong_length"
        failures[kind] = failures.get(kind, 0) + 1
    return [math.nan] * n, failures
