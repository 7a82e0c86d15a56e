"""The chaos benchmark (`bench/chaos.py`): its bookkeeping on hand-made runs (unit), and a short run
of it in the fault tier: 30 async steps on a 4-node `ray.cluster_utils.Cluster` with one fault of
each kind (a worker SIGKILLed mid-generation, one SIGKILLed as a weight sync begins, a rollout node
removed and replaced, a reward function hung) and the learner's node lost at step 27, continued with
`--resume`. The 200-step runs, undisturbed against disturbed, are the benchmark."""

from __future__ import annotations

import argparse

import pytest

from bench import chaos
from grpo_dist.config import Config
from grpo_dist.data import PromptSampler, load_run_rows


def test_the_plan_puts_one_fault_every_n_steps_and_the_learner_loss_where_asked():
    plan = chaos.make_plan(200, 10, 150, seed=0)
    steps = [f["step"] for f in plan]
    assert steps == [*range(10, 150, 10), 150, *range(160, 200, 10)]
    assert [f["kind"] for f in plan if f["step"] == 150] == ["remove_learner_node"]
    assert {f["kind"] for f in plan} - {"remove_learner_node"} <= set(chaos.KINDS)
    assert plan == chaos.make_plan(200, 10, 150, seed=0)  # drawn from the seed
    turn = chaos.make_plan(30, 6, 27, seed=0, kinds=list(chaos.KINDS))
    assert [f["kind"] for f in turn] == [*chaos.KINDS, "remove_learner_node"]


def _run(prompts: list[dict], steps: int) -> dict:
    return {"prompts": prompts, "config": {"trainer": {"prompts_per_step": 3, "steps": steps}}}


def test_lineage_counts_rows_trained_twice_or_lost_and_a_resumed_step_counts_once():
    replay = PromptSampler(7, 3, 5)
    want = [replay.next_indices() for _ in range(4)]
    lines = [{"step": s + 1, "indices": idx} for s, idx in enumerate(want)]
    assert chaos.lineage(_run(lines, 4), 7, 5) == (0, 0)
    # Steps 3-4 trained again after a resume: the last line of a step is the one the run kept.
    assert chaos.lineage(_run(lines + lines[2:], 4), 7, 5) == (0, 0)
    twice = [*lines[:3], {"step": 4, "indices": [want[3][0]] * 3}]
    assert chaos.lineage(_run(twice, 4), 7, 5) == (2, 2)
    assert chaos.lineage(_run(lines[:3], 4), 7, 5) == (0, 3)  # step 4 never trained


def test_counts_sum_each_jobs_cluster_counters_and_every_steps_reward_timeouts():
    k = "reward_failures/bench.chaos_faults:hang_once/timeout"
    rows = [
        {"step": 1, "count/rollout_worker_restarts": 1.0, k: 1.0},
        {"step": 2, "count/rollout_worker_restarts": 2.0},  # the first job's last line
        {"step": 2, "count/rollout_worker_restarts": 0.0},  # the resumed job starts its counters at 0
        {"step": 3, "count/rollout_worker_restarts": 1.0, k: 1.0},
    ]
    res = {
        "metrics": rows,
        "segments": [{"lines_before": 0}, {"lines_before": 2}],
        "stderr": "grpo-dist: RuntimeError: job failed at step 3: node abcdef12 (10.0.0.1) is dead\n",
        "injected": [{"kind": "remove_learner_node", "node": "abcdef1234"}],
    }
    got = chaos.counted(res)
    assert got["rollout_worker_restarts"] == 3.0 and got["reward_timeouts"] == 2.0
    assert got["learner_node_failures"] == 1.0


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
@pytest.mark.multinode
@pytest.mark.timeout(1500)
def test_a_short_chaos_run_counts_every_fault_and_loses_repeats_or_mixes_nothing(tmp_path, tiny_model_dir):
    args = argparse.Namespace(
        model=tiny_model_dir,
        steps=30,
        fault_every=6,
        learner_loss_at=27,
        node_back_after=3,
        save_every=10,
        seed=0,
        kinds=list(chaos.KINDS),
    )
    res = chaos.run_once("async", True, args, tmp_path / "chaos")
    cfg = Config.model_validate(res["config"])
    got = chaos.summarize(res, len(load_run_rows(cfg)[0]), cfg.trainer.seed)
    print(chaos.table("async, 30 steps", got, got))
    assert got["injected"] == dict.fromkeys((*chaos.KINDS, "remove_learner_node"), 1), res["injected"]
    assert got["steps"] == 30 and got["resumes"] == 1
    # Every fault counted by the job under its kind; no step over max_staleness, no data row lost or
    # trained twice (the resume trains steps 21-27 again: the lineage keeps their last lines).
    assert chaos.verdict(got, got) == []
