"""`grpo-dist scale`: change the rollout or reward worker counts of a running job from outside it."""

from __future__ import annotations

from grpo_dist.errors import UserError, first_line
from grpo_dist.preflight import check_reachable

# Ray >= 2.59 clusters started by `ray start` use token authentication; a missing or wrong token
# looks like any refused connection from the client's side.
AUTH_HINT = (
    "where the cluster uses token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
    "RAY_AUTH_TOKEN_PATH) to its token (`ray get-auth-token` on the head prints it)"
)


def parse_reward_workers(items: list[str]) -> dict[str, int]:
    """``["judge=2", ...]`` -> ``{"judge": 2}``; UserError naming a malformed item."""
    out: dict[str, int] = {}
    for item in items:
        name, _, count = item.partition("=")
        if not name or not count.strip().lstrip("-").isdigit():
            raise UserError(f"--reward-workers {item!r}: expected NAME=COUNT, e.g. judge=2")
        out[name] = int(count)
    return out


def scale(
    workers: int | None,
    address: str = "auto",
    namespace: str = "grpo-dist",
    timeout_s: float = 30.0,
    connect_timeout_s: float = 10.0,
    reward_workers: dict[str, int] | None = None,
) -> dict:
    """Ask the job for ``workers`` rollout workers and/or ``reward_workers`` actors per served model."""
    if workers is None and not reward_workers:
        raise UserError("scale: give --workers N and/or --reward-workers NAME=N")
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
        out: dict = {}
        try:
            served = ray.get(control.desired_reward_workers.remote(), timeout=timeout_s)
            unknown = sorted(set(reward_workers or {}) - set(served))
            if unknown:  # before anything is applied
                raise UserError(
                    f"--reward-workers: the job serves no reward model {unknown[0]!r}; it serves {sorted(served)}"
                )
            if workers is not None:
                out["desired_workers"] = ray.get(control.set_desired_workers.remote(workers), timeout=timeout_s)
            for name, n in (reward_workers or {}).items():
                ray.get(control.set_desired_reward_workers.remote(name, n), timeout=timeout_s)
                out.setdefault("desired_reward_workers", {})[name] = n
        except ray.exceptions.RayTaskError as e:  # the job refused the count (it names why)
            raise UserError(f"scale: {first_line(e.cause if e.cause is not None else e)}") from None
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"scale: the job's control actor did not answer within {timeout_s:.0f}s") from None
        out["note"] = "applied by the job between steps; new rollout workers get current weights first"
        return out
    finally:
        ray.shutdown()
