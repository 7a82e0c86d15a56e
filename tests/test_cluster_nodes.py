"""The cluster's nodes as a job sees them (deploy/cluster_nodes.py) and the label-selector config fields,
on hand-written `ray.nodes()` rows: no Ray started."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from deploy.cluster_nodes import describe_placement, head_node_id, label_matches, lost_nodes, selector_problems
from grpo_dist.config import ClusterConfig

HEAD = {
    "NodeID": "aa" * 28,
    "Alive": True,
    "NodeManagerAddress": "10.0.0.1",
    "Resources": {"node:__internal_head__": 1.0},
    "Labels": {"ray.io/node-id": "aa" * 28},
}
LEARN = {
    "NodeID": "bb" * 28,
    "Alive": True,
    "NodeManagerAddress": "10.0.0.2",
    "Resources": {"CPU": 8.0, "GPU": 4.0},
    "Labels": {"grpo-role": "learner", "ray.io/accelerator-type": "H100"},
}
ROLL = {
    "NodeID": "cc" * 28,
    "Alive": True,
    "NodeManagerAddress": "10.0.0.3",
    "Resources": {"CPU": 8.0},
    "Labels": {"grpo-role": "rollout", "market": "spot"},
}


@pytest.mark.parametrize(
    "selector, learner, rollout",
    [
        ({}, True, True),
        ({"grpo-role": "learner"}, True, False),
        ({"grpo-role": "!learner"}, False, True),
        ({"ray.io/accelerator-type": "in(A100, H100)"}, True, False),
        ({"ray.io/accelerator-type": "!in(A100,H100)"}, False, True),  # a node without the label is not H100
        ({"grpo-role": "rollout", "market": "spot"}, False, True),
        ({"grpo-role": "rollout", "market": "on-demand"}, False, False),
    ],
)
def test_label_selectors_follow_rays_semantics(selector, learner, rollout):
    assert label_matches(LEARN["Labels"], selector) is learner
    assert label_matches(ROLL["Labels"], selector) is rollout


def test_the_head_is_the_node_with_rays_head_resource():
    assert head_node_id([LEARN, HEAD, ROLL]) == HEAD["NodeID"]
    assert head_node_id([LEARN, {**HEAD, "Alive": False}]) is None


def test_a_selector_no_node_matches_is_one_line_naming_the_field_and_the_labels_there_are():
    problems = selector_problems(
        [HEAD, LEARN, ROLL],
        {
            "cluster.learner_label_selector": {"grpo-role": "trainer"},
            "cluster.rollout_label_selector": {"grpo-role": "rollout"},
        },
    )
    assert problems == [
        "cluster.learner_label_selector={'grpo-role': 'trainer'}: no alive node of the cluster matches; node labels "
        "there: grpo-role=learner, grpo-role=rollout, market=spot, ray.io/accelerator-type=H100 (label nodes with "
        "`ray start --labels key=value`)"
    ]
    # A dead node's labels do not count.
    assert selector_problems([HEAD, {**LEARN, "Alive": False}], {"f": {"grpo-role": "learner"}})


def test_placement_and_lost_nodes_name_nodes_and_their_actors():
    actors = {
        "learner-0": LEARN["NodeID"],
        "learner-1": LEARN["NodeID"],
        "rollout-0": ROLL["NodeID"],
        "grpo-control": HEAD["NodeID"],
    }
    assert describe_placement(actors, [HEAD, LEARN, ROLL]) == (
        "learner-0, learner-1 on node bbbbbbbb (10.0.0.2); rollout-0 on node cccccccc (10.0.0.3); "
        "grpo-control on node aaaaaaaa (10.0.0.1) [head]"
    )
    assert lost_nodes(actors, [HEAD, LEARN, ROLL]) is None
    assert lost_nodes(actors, [HEAD, {**LEARN, "Alive": False}, ROLL]) == (
        "node bbbbbbbb (10.0.0.2) is dead, and with it learner-0, learner-1"
    )


@pytest.mark.parametrize("value", ["learner", "!spot", "in(A100, H100)", "!in(a,b)", "H100-80G"])
def test_selector_values_in_rays_syntax_are_accepted(value):
    assert ClusterConfig(learner_label_selector={"k": value}).learner_label_selector == {"k": value}


@pytest.mark.parametrize("value", ["", "a b", "-spot", "in()", "in(a,", "!!x"])
def test_selector_values_outside_rays_syntax_are_refused_naming_the_field(value):
    with pytest.raises(ValidationError, match="rollout_label_selector"):
        ClusterConfig(rollout_label_selector={"grpo-role": value})


def test_the_grafana_dashboard_is_a_dashboard_of_grpo_series():
    board = json.loads((Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "grpo-dist.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    assert board["uid"] == "grpo-dist-job" and len(board["panels"]) >= 12
    assert all(re.search(r"ray_grpo_", e) for e in exprs), exprs
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


def test_a_job_failure_names_a_restarted_workers_new_node_not_the_one_it_lost_earlier(monkeypatch):
    """Found by bench/chaos.py: rollout-0's node was removed at step 39 and Ray restarted it on a new
    node; when the learner's node went at step 150 the failure line said rollout-0 was dead with its
    old node too. Rollout workers are where the rollout manager last saw them."""
    import ray

    from deploy.job import RayCluster

    class Rollout:
        def placement(self):
            return {"rollout-0": ROLL2["NodeID"]}

    ROLL2 = {**ROLL, "NodeID": "dddddddd" * 7, "NodeManagerAddress": "10.0.0.4"}
    cluster = RayCluster.__new__(RayCluster)  # only the bookkeeping: no Ray actors
    cluster._fixed_nodes = {"learner-0": LEARN["NodeID"], "learner-1": LEARN["NodeID"]}
    cluster.rollout = Rollout()
    cluster.rewards = {}  # no served reward models
    monkeypatch.setattr(ray, "nodes", lambda: [HEAD, {**LEARN, "Alive": False}, {**ROLL, "Alive": False}, ROLL2])
    assert cluster.lost_nodes() == "node bbbbbbbb (10.0.0.2) is dead, and with it learner-0, learner-1"
