"""`grpo-dist scale`: change the rollout worker count of a running job from outside it."""

from __future__ import annotations

import ray


def scale(workers: int, address: str = "auto", namespace: str = "grpo-dist", timeout_s: float = 30.0) -> dict:
    ray.init(address=address, namespace=namespace, logging_level="ERROR")
    try:
        try:
            control = ray.get_actor("grpo-control", namespace=namespace)
        except ValueError:
            raise RuntimeError(f"no running grpo-dist job in namespace {namespace!r} at {address}") from None
        n = ray.get(control.set_desired_workers.remote(workers), timeout=timeout_s)
        return {"desired_workers": n, "note": "applied by the job between steps; new workers get current weights first"}
    finally:
        ray.shutdown()
