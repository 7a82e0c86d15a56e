"""`grpo-dist scale`: change the rollout worker count of a running job from outside it."""

from __future__ import annotations

from grpo_dist.errors import UserError, first_line
from grpo_dist.preflight import check_reachable

# Ray >= 2.59 clusters started by `ray start` use token authentication; a missing or wrong token
# looks like any refused connection from the client's side.
AUTH_HINT = (
    "where the cluster uses token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
    "RAY_AUTH_TOKEN_PATH) to its token (`ray get-auth-token` on the head prints it)"
)


def scale(
    workers: int,
    address: str = "auto",
    namespace: str = "grpo-dist",
    timeout_s: float = 30.0,
    connect_timeout_s: float = 10.0,
) -> dict:
    import ray
    from ray._private.services import get_ray_address_from_environment

    # A missing or unreachable cluster is one line here, before Ray's own (long, retrying) connect.
    try:
        resolved = get_ray_address_from_environment(address, None)
    except ConnectionError:
        raise UserError(
            f"--address {address}: no running Ray cluster found (no RAY_ADDRESS, no local head); is a "
            "grpo-dist job running? Pass its cluster's address with --address"
        ) from None
    check_reachable(resolved, connect_timeout_s, field="--address", bound="--connect-timeout")

    try:
        ray.init(address=address, namespace=namespace, logging_level="ERROR")
    except ConnectionError as e:  # after Ray's own ~20 s of retries (and its warnings) on a refused token
        raise UserError(f"--address {address}: {first_line(e)}; {AUTH_HINT}") from None
    try:
        try:
            control = ray.get_actor("grpo-control", namespace=namespace)
        except ValueError:
            raise UserError(
                f"--address {address}: the Ray cluster runs no grpo-dist job (no 'grpo-control' actor in "
                f"namespace {namespace!r}); start one with `grpo-dist run` or `grpo-dist submit`"
            ) from None
        n = ray.get(control.set_desired_workers.remote(workers), timeout=timeout_s)
        return {"desired_workers": n, "note": "applied by the job between steps; new workers get current weights first"}
    finally:
        ray.shutdown()
