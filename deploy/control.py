"""`grpo-dist scale`: change the rollout worker count of a running job from outside it."""

from __future__ import annotations

from grpo_dist.errors import UserError
from grpo_dist.preflight import check_reachable


def scale(workers: int, address: str = "auto", namespace: str = "grpo-dist", timeout_s: float = 30.0,
          connect_timeout_s: float = 10.0) -> dict:
    import ray
    from ray._private.services import get_ray_address_from_environment

    # A missing or unreachable cluster is one line here, before Ray's own (long, retrying) connect.
    try:
        resolved = get_ray_address_from_environment(address, None)
    except ConnectionError:
        raise UserError(f"--address {address}: no running Ray cluster found (no RAY_ADDRESS, no local head); is a "
                        "grpo-dist job running? Pass its cluster's address with --address") from None
    check_reachable(resolved, connect_timeout_s, field="--address", bound="--connect-timeout")

    ray.init(address=address, namespace=namespace, logging_level="ERROR")
    try:
        try:
            control = ray.get_actor("grpo-control", namespace=namespace)
        except ValueError:
            raise UserError(f"--address {address}: the Ray cluster runs no grpo-dist job (no 'grpo-control' actor in "
                            f"namespace {namespace!r}); start one with `grpo-dist run` or `grpo-dist submit`") from None
        n = ray.get(control.set_desired_workers.remote(workers), timeout=timeout_s)
        return {"desired_workers": n, "note": "applied by the job between steps; new workers get current weights first"}
    finally:
        ray.shutdown()
