"""Fault injection on a real `RayCluster` (2-rank DeepSpeed learner, vLLM-CPU rollout workers, tiny
model): rollout workers SIGKILLed while generating, while receiving weights and as a sync begins
with a batch in flight, and a learner rank killed. One cluster is shared by the module and the tests run in order (each leaves it healthy
for the next, except the last, which kills a learner rank).

A reward function that sleeps keeps each `generate` call busy for a few seconds, so the kill lands
inside the call. A reward function sleeping past its timeout in a real worker is covered by
tests/test_rollout_service.py (`hanging_reward`).
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

import pytest

ray = pytest.importorskip("ray")

from deploy.job import RayCluster  # noqa: E402
from grpo_dist.batch import check_groups  # noqa: E402
from grpo_dist.config import Config  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(900)]

G = 2
SCORE_SLEEP_S = 4.0  # each generate call lasts at least this long
KILL_AFTER_S = 1.5
QUESTIONS = ["1 + 1 =", "2 + 3 =", "Add 10 and 32.", "7 + 8 =", "hi", "What is 40 + 2?"]


def slow_reward(prompts, completions, **kwargs):
    """Reward 0 for every completion, after a pause long enough to kill the worker meanwhile."""
    time.sleep(SCORE_SLEEP_S)
    return [0.0] * len(completions)


def _config(model_dir, tmp_path) -> Config:
    return Config.model_validate(
        {
            "model": {"path": str(model_dir), "dtype": "float32"},
            "data": {"max_prompt_length": 32},
            "algorithm": {"num_generations": G, "max_completion_length": 8, "beta": 0.0},
            "rewards": {"functions": [{"name": "tests.test_faults:slow_reward"}], "timeout_s": 30},
            "rollout": {"num_workers": 2, "cpu_threads_per_worker": 1, "generate_timeout_s": 120},
            "learner": {"num_ranks": 2, "zero_stage": 2, "micro_batch_size": 2},
            "trainer": {"steps": 1, "prompts_per_step": 6, "output_dir": str(tmp_path)},
            "logging": {"ray_metrics": False},
            # Short collective timeout: a sync with a dead receiver fails (and is retried) quickly.
            "cluster": {"max_worker_restarts": 3, "rpc_timeout_s": 300, "collective_timeout_s": 30},
        }
    )


@contextmanager
def started_cluster(cfg: Config):
    """A RayCluster of ``cfg`` on a local Ray, its workers serving weight version 1."""
    assert not ray.is_initialized()
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    c = RayCluster(cfg)
    try:
        c.start()
        c.sync_weights(1)  # from here on the workers must serve version >= 1, never the initial 0
        yield c
    finally:
        c.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    with started_cluster(_config(tiny_model_dir, tmp_path_factory.mktemp("faults"))) as c:
        yield c


@pytest.fixture(scope="module")
def rows(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [{"prompt": q, "prompt_ids": tok(q, add_special_tokens=False)["input_ids"]} for q in QUESTIONS]


def worker_pid(name: str) -> int:
    return ray.get(ray.get_actor(name).info.remote(), timeout=60)["pid"]


def kill_during(cluster, rows, victim: str):
    """Submit ``rows``, SIGKILL ``victim`` while its generate call runs, collect."""
    pid = worker_pid(victim)
    handle = cluster.rollout.start_generate(rows)
    time.sleep(KILL_AFTER_S)
    assert not ray.wait(handle.refs, num_returns=len(handle.refs), timeout=0)[0], "generate ended before the kill"
    os.kill(pid, signal.SIGKILL)
    return cluster.rollout.collect(handle), pid


def rejoin(cluster, version: int, timeout_s: float = 300) -> dict:
    """Run the job's between-steps upkeep until every worker serves again (a restarted one comes
    back once Ray has restarted it); returns the last upkeep's metrics."""
    deadline = time.monotonic() + timeout_s
    while True:
        up = cluster.maintain(version)
        if set(cluster.rollout.states().values()) == {"serving"} and up["rollout/num_workers"] == 2:
            return up
        assert time.monotonic() < deadline, f"workers did not all serve again: {cluster.rollout.states()}"
        time.sleep(1)


def assert_every_prompt_once(batch, rows):
    check_groups(batch, rows, G)  # the driver's own check: each prompt's whole group once, in order


def test_worker_killed_while_generating_is_reissued_to_the_survivor(cluster, rows):
    assert cluster.rollout.weight_versions() == {"rollout-0": 1, "rollout-1": 1}
    batch, old_pid = kill_during(cluster, rows, "rollout-0")
    assert_every_prompt_once(batch, rows)
    assert batch.weight_version == 1
    # rollout-0 had prompts 0..2 (contiguous balanced chunks); rollout-1 regenerated them.
    assert batch.metrics["worker_failures"] == 1.0 and batch.metrics["prompts_reissued"] == 3.0
    assert batch.metrics["prompts"] == 6.0  # each prompt generated (and counted) once in the batch

    # Between steps: the steps go on with rollout-1 while Ray restarts rollout-0 on the initial
    # checkpoint; once it answers, maintain pushes v1 to it before it generates.
    up = rejoin(cluster, 1)
    assert cluster.rollout.weight_versions() == {"rollout-0": 1, "rollout-1": 1}
    assert worker_pid("rollout-0") != old_pid
    assert up["count/rollout_worker_failures"] == 1.0 and up["count/worker_restarts_repushed"] == 1.0
    assert up["count/rollout_worker_restarts"] == 1.0 and up["count/rollout_nodes_lost"] == 0.0


def test_worker_killed_during_weight_sync_recovers_on_retry(cluster, rows, monkeypatch):
    victim_pid = worker_pid("rollout-1")
    receive = cluster.rollout.start_receive_weights
    calls = []

    def receive_then_kill(*args, **kwargs):
        refs = receive(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # first attempt only: the worker dies once it was told to receive
            os.kill(victim_pid, signal.SIGKILL)
        return refs

    monkeypatch.setattr(cluster.rollout, "start_receive_weights", receive_then_kill)
    out = cluster.sync_weights(2)
    assert len(calls) == 2 and cluster.counters["sync_retries"] == 1
    assert out["version"] == 2
    # The retry went to the worker that answered; the restarted one gets v2 when it is back.
    rejoin(cluster, 2)
    assert cluster.rollout.weight_versions() == {"rollout-0": 2, "rollout-1": 2}
    assert worker_pid("rollout-1") != victim_pid
    monkeypatch.undo()
    batch = cluster.rollout.generate(rows[:2])
    assert batch.weight_version == 2 and batch.metrics["worker_failures"] == 0.0


def test_worker_killed_as_the_sync_begins_leaves_one_version_in_the_batch(cluster, rows):
    """Async: a batch is in flight when its worker dies and the job syncs the next version. The dead
    worker's chunk is collected first (the manager waits on chunks in prompt order) while the
    survivor's chunk, started on v2, is not collected yet: the survivor now serves v3, so the lost
    chunk is regenerated on v3 and the survivor's v2 chunk must be generated again on v3 too (the job
    used to stop at `refusing to mix weight versions [2, 3] in one batch`)."""
    assert cluster.rollout.weight_versions() == {"rollout-0": 2, "rollout-1": 2}
    pid = worker_pid("rollout-0")
    handle = cluster.rollout.start_generate(rows)
    time.sleep(KILL_AFTER_S)
    assert not ray.wait(handle.refs, num_returns=len(handle.refs), timeout=0)[0], "generate ended before the kill"
    os.kill(pid, signal.SIGKILL)
    # The survivor finishes its chunk on v2 and then loads v3; the dead worker misses the sync.
    cluster.sync_weights(3)
    assert cluster.rollout.weight_versions().get("rollout-1") == 3
    batch = cluster.rollout.collect(handle)
    assert_every_prompt_once(batch, rows)
    assert batch.weight_version == 3
    # rollout-0's prompts 0..2 lost, rollout-1's 3..5 generated again on v3.
    assert batch.metrics["worker_failures"] == 1.0 and batch.metrics["prompts_reissued"] == 6.0
    rejoin(cluster, 3)
    assert cluster.rollout.weight_versions() == {"rollout-0": 3, "rollout-1": 3}


def test_single_worker_restarts_and_gets_current_weights_before_regenerating(cluster, rows):
    assert cluster.rollout.remove_worker("rollout-1") == "rollout-1"
    pushes = cluster.counters["worker_restarts_repushed"]
    batch, old_pid = kill_during(cluster, rows[:3], "rollout-0")
    assert_every_prompt_once(batch, rows[:3])
    # The restarted actor came back at version 0 and was brought to v3 before regenerating.
    assert batch.weight_version == 3
    assert batch.metrics["worker_failures"] == 1.0 and batch.metrics["prompts_reissued"] == 3.0
    assert cluster.counters["worker_restarts_repushed"] == pushes + 1
    info = ray.get(ray.get_actor("rollout-0").info.remote(), timeout=60)
    assert info["pid"] != old_pid and info["weight_version"] == 3


def test_dead_learner_rank_fails_the_step_and_is_named(cluster, rows):
    batch = cluster.rollout.generate(rows[:4])
    batch.advantages = [0.0] * len(batch)
    rank1 = cluster.learner.actors[1]
    pid = ray.get(rank1.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(ray.exceptions.RayError):
        cluster.learner.train_step(batch)
    assert time.monotonic() - t0 < 120
    dead = cluster.dead_actors()
    assert list(dead) == ["learner rank 1 (learner-1)"], dead
    assert "died" in dead["learner rank 1 (learner-1)"] or "dead" in dead["learner rank 1 (learner-1)"]
