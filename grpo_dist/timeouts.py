"""Calls to user code (reward functions, tools, environments) bounded by a timeout.

Each call runs on a daemon thread. Python has no way to kill a thread (it can only be asked to
stop, which stuck user code would not hear), so a call past its bound is abandoned: it runs on in
the background until it returns, its result dropped, and never blocks interpreter exit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class TimedCall:
    """``fn(*args, **kwargs)`` started on a daemon thread named ``name``; ``wait`` collects it.

    Several can run at once: start them all, then wait on each until its own deadline
    (``wait_until``), so their bounds overlap instead of adding up."""

    def __init__(self, fn: Callable, args: tuple = (), kwargs: dict | None = None, name: str = "call") -> None:
        self._box: dict[str, Any] = {}
        self.started = time.perf_counter()
        kwargs = kwargs or {}

        def run() -> None:
            try:
                self._box["ok"] = fn(*args, **kwargs)
            except BaseException as e:
                self._box["exception"] = e
            self._box["seconds"] = time.perf_counter() - self.started

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def wait(self, timeout_s: float) -> tuple[str, Any]:
        """("ok", result) | ("exception", exc) | ("timeout", None), waiting at most ``timeout_s``."""
        return self.wait_until(time.perf_counter() + timeout_s)

    def wait_until(self, deadline: float) -> tuple[str, Any]:
        """As ``wait``, until the ``time.perf_counter()`` instant ``deadline``."""
        self._thread.join(max(0.0, deadline - time.perf_counter()))
        if self._thread.is_alive():
            return "timeout", None
        if "exception" in self._box:
            return "exception", self._box["exception"]
        return "ok", self._box["ok"]

    @property
    def seconds(self) -> float:
        """How long the call ran (until now, if it still runs)."""
        return self._box.get("seconds", time.perf_counter() - self.started)


def call_with_timeout(fn: Callable, kwargs: dict, timeout_s: float, name: str = "call") -> tuple[str, Any]:
    """("ok", result) | ("exception", exc) | ("timeout", None) of ``fn(**kwargs)`` within ``timeout_s``."""
    return TimedCall(fn, kwargs=kwargs, name=name).wait(timeout_s)
