"""The cluster's nodes as a job sees them (pure: plain dicts in the shape of ``ray.nodes()``, no Ray).

Which nodes a label selector admits, which node is the head (where the job's control and
metrics actors live: the cluster dies with it anyway), and the one-line placement summary the
job logs at start and the one-line cause when a node took actors with it.
"""

from __future__ import annotations

import re

HEAD_RESOURCE = "node:__internal_head__"  # Ray gives this resource to the head node only
_SET = re.compile(r"(!?)in\((.*)\)")


def label_matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    """Ray's label-selector semantics: every key's condition holds ('v', '!v', 'in(a,b)', '!in(a,b)');
    a negated condition holds on a node without the label."""
    for key, cond in selector.items():
        have = labels.get(key)
        m = _SET.fullmatch(cond)
        if m:
            negate, values = m.group(1) == "!", {v.strip() for v in m.group(2).split(",")}
        else:
            negate, values = cond.startswith("!"), {cond.lstrip("!")}
        if (have in values) == negate:
            return False
    return True


def alive(nodes: list[dict]) -> list[dict]:
    return [n for n in nodes if n.get("Alive")]


def head_node_id(nodes: list[dict]) -> str | None:
    return next((n["NodeID"] for n in alive(nodes) if HEAD_RESOURCE in n.get("Resources", {})), None)


def selector_problems(nodes: list[dict], selectors: dict[str, dict[str, str]]) -> list[str]:
    """One line per config field whose selector no alive node matches, naming the labels there are."""
    out = []
    for field, selector in selectors.items():
        if selector and not any(label_matches(n.get("Labels", {}), selector) for n in alive(nodes)):
            seen = sorted(
                {
                    f"{k}={v}"
                    for n in alive(nodes)
                    for k, v in n.get("Labels", {}).items()
                    if not k.startswith("ray.io/node-id")
                }
            )
            out.append(
                f"{field}={selector}: no alive node of the cluster matches; node labels there: "
                f"{', '.join(seen) or 'none'} (label nodes with `ray start --labels key=value`)"
            )
    return out


def _node(nodes: list[dict], node_id: str) -> str:
    n = next((n for n in nodes if n["NodeID"] == node_id), None)
    ip = n.get("NodeManagerAddress", "?") if n else "?"
    return f"node {node_id[:8]} ({ip})"


def describe_placement(actor_nodes: dict[str, str], nodes: list[dict]) -> str:
    """``{"learner-0": node_id, ...}`` -> "learner-0, learner-1 on node 1a2b3c4d (10.0.0.5); ...",
    nodes in order of their first actor, the head marked."""
    by_node: dict[str, list[str]] = {}
    for actor, node_id in actor_nodes.items():
        by_node.setdefault(node_id, []).append(actor)
    head = head_node_id(nodes)
    parts = []
    for node_id, actors in by_node.items():
        label = _node(nodes, node_id) + (" [head]" if node_id == head else "")
        parts.append(f"{', '.join(actors)} on {label}")
    return "; ".join(parts)


def lost_nodes(actor_nodes: dict[str, str], nodes: list[dict]) -> str | None:
    """One line naming each dead node that hosted actors of the job and those actors, else None."""
    dead = {n["NodeID"] for n in nodes if not n.get("Alive")}
    hit: dict[str, list[str]] = {}
    for actor, node_id in actor_nodes.items():
        if node_id in dead:
            hit.setdefault(node_id, []).append(actor)
    if not hit:
        return None
    return "; ".join(f"{_node(nodes, nid)} is dead, and with it {', '.join(actors)}" for nid, actors in hit.items())
