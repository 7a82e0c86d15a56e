"""Health accounting of an actor group, shared by the rollout workers and the reward workers.

Each member is ``serving``, ``awaiting`` (reachable, but its weights are not the job's: only a
group with weights has this state), ``down`` (not answering: Ray restarts it) or ``starting`` (a
new actor not up yet). ``decide`` is the whole state machine as a pure function of one status
answer; ``poll`` asks every member for that answer within a bound. A member whose actor Ray gave
up on (its name is gone) is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from grpo_dist.errors import first_line

SERVING, AWAITING, DOWN, STARTING = "serving", "awaiting", "down", "starting"
# How long a member may take to answer a status query before it counts as down this round.
STATUS_S = 10.0


@dataclass
class Member:
    name: str
    handle: Any  # ray ActorHandle
    slot: int  # placement slot (decides a CPU rollout worker's cores)
    num_engine_workers: int = 1  # a rollout worker's weight-sync ranks
    state: str = SERVING
    node_id: str = ""  # where it ran when last seen
    node_ip: str = ""
    pid: int = 0
    since: float = 0.0  # monotonic time of the last state change


@dataclass(frozen=True)
class Decision:
    state: str  # the member's state after this answer
    event: str | None = None  # "restarted" (a new process answered), "up" (back from down/starting),
    # "down" (newly down), "dropped" (Ray gave up on it), or None
    why: str = ""  # for down / dropped: the reason


def decide(
    state: str, pid_node: tuple[int, str] | None, answer: dict | str | None, synced_version: int | None, gone: bool
) -> Decision:
    """A member's next state from one status ``answer``: a dict (``pid``, ``node_id``, and for a group
    with weights ``weight_version`` and ``awaiting_weights``), None (no answer in time) or the line it
    died with. ``pid_node`` is where it last answered from (None: never); ``synced_version`` is the
    version the group serves (None: a group without weights); ``gone``: Ray no longer knows its name."""
    if isinstance(answer, dict) and answer.get("weight_version", 0) >= 0:
        if synced_version is None:
            new = SERVING
        else:
            fresh = answer["weight_version"] == synced_version and not answer["awaiting_weights"]
            new = SERVING if fresh else AWAITING
        if pid_node and (answer["pid"], answer["node_id"]) != pid_node:
            return Decision(new, "restarted")
        return Decision(new, "up" if state in (DOWN, STARTING) else None)
    if isinstance(answer, str) and gone:
        return Decision(state, "dropped", answer)
    if state == STARTING:
        return Decision(STARTING)
    if answer is None:
        why = f"no answer within {STATUS_S:.0f}s"
    elif isinstance(answer, str):
        why = answer
    else:  # weight version -1
        why = "a failed update broke its weights; it restarts"
    return Decision(DOWN, None if state == DOWN else "down", why)


def poll(members: list[Member], method: str = "status") -> dict[str, dict | str | None]:
    """Each member's ``method()`` answer within ``STATUS_S``: a dict, None (no answer: restarting,
    waiting for a node, or busy), or the one-line error it died with."""
    refs = {m.name: getattr(m.handle, method).remote() for m in members}
    if refs:
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=STATUS_S)
    out: dict[str, dict | str | None] = {}
    for name, ref in refs.items():
        try:
            out[name] = ray.get(ref, timeout=0.1)
        except GetTimeoutError:
            out[name] = None
        except RayActorError as e:
            out[name] = death_reason(e)
    return out


def death_reason(e: BaseException) -> str:
    """Ray's "The actor is dead because ..." line of an actor error, else its first line."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    return next((ln for ln in lines if ln.startswith("The actor is dead because")), first_line(e))


def gone(name: str) -> bool:
    """True once Ray has given up on the actor: its name is no longer registered."""
    try:
        ray.get_actor(name)
        return False
    except ValueError:
        return True
