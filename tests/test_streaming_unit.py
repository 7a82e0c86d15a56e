"""Streaming rollouts without Ray or vLLM: the per-token version bookkeeping, the feed's decisions,
and the driver's stream (completion order, staleness per token, every prompt once across a resume)
against an in-process fake that finishes groups out of order."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_driver import FakeCluster, make_cfg, rows

from grpo_dist.batch import RolloutBatch
from grpo_dist.config import Config
from grpo_dist.data import PromptSampler
from grpo_dist.driver import Trainer
from grpo_dist.streaming import check_stream_groups, group_oldest, token_age_metrics
from rollout_server.feed import assign_groups, lost_groups
from rollout_server.stream import engine_load, token_versions

G = 4


def stream_cfg(tmp_path: Path, checkpoint: dict | None = None, **trainer) -> Config:
    data = make_cfg(tmp_path, **{"max_staleness": 1, **trainer}).model_dump()
    data["rollout"]["streaming"] = True
    data["checkpoint"].update(checkpoint or {})
    return Config.model_validate(data)


def group_batch(prompts: list[str], versions: list[list[int]]) -> RolloutBatch:
    """One group of G two-token rows per prompt; ``versions[g]`` is each of its rows' two tokens' versions."""
    B = len(prompts) * G
    tv = [list(versions[b // G]) for b in range(B)]
    return RolloutBatch(
        prompt_ids=[[1, 2]] * B,
        completion_ids=[[3, 4]] * B,
        sampling_logp=[[-1.0, -1.0]] * B,
        truncated=[False] * B,
        rewards=[float(b % 2) for b in range(B)],
        reward_components={"accuracy": [float(b % 2) for b in range(B)]},
        group_ids=[b // G for b in range(B)],
        weight_version=min(v for row in tv for v in row),
        prompts=[prompts[b // G] for b in range(B)],
        completions=["x"] * B,
        answers=["1"] * B,
        token_versions=tv,
    )


class FakeStream(FakeCluster):
    """A cluster whose rollout streams: groups finish in a shuffled order, their tokens sampled at the
    serving version (``old`` uids get one token two versions behind it)."""

    def __init__(self, old: set[int] = frozenset(), seed: int = 0):
        super().__init__()
        self.rollout.stream_submit = self.submit
        self.rollout.stream_take = self.take
        self.queue: list[tuple[int, dict]] = []
        self.submitted: list[int] = []
        self.submitted_rows: list[tuple[int, dict]] = []
        self.old = set(old)
        self.rng = random.Random(seed)

    def submit(self, groups):
        self.queue += groups
        self.submitted += [u for u, _ in groups]
        self.submitted_rows += groups

    def take(self, want):
        self.rng.shuffle(self.queue)
        done, self.queue = self.queue[:want], self.queue[want:]
        v = self.rollout.weight_version
        versions = [[max(v - 2, 0) if u in self.old else v, v] for u, _ in done]
        return group_batch([r["prompt"] for _, r in done], versions), [u for u, _ in done]


def trained_indices(run: Path) -> list[int]:
    """Data indices of every step, the last record of a step winning (a resumed run trains its steps
    after the checkpoint again)."""
    steps = {}
    for line in (run / "prompts.jsonl").read_text().splitlines():
        rec = json.loads(line)
        steps[rec["step"]] = rec["indices"]
    return [i for s in sorted(steps) for i in steps[s]]


def test_token_versions_follow_vllms_spans():
    span = SimpleNamespace
    assert token_versions([span(version="3", start=0, end=2), span(version="4", start=2, end=5)], 5, 9) == [
        3,
        3,
        4,
        4,
        4,
    ]
    assert token_versions(None, 3, 7) == [7, 7, 7]


def test_engine_load_weighs_every_window_by_its_steps_and_wall_time():
    a = {"steps": 2.0, "running_seqs": 8.0, "busy_seconds": 1.0, "wall_seconds": 4.0, "max_seqs": 8.0}
    b = {"steps": 0.0, "running_seqs": 0.0, "busy_seconds": 0.0, "wall_seconds": 4.0, "max_seqs": 8.0}
    assert engine_load([a, b]) == {"engine_idle_fraction": 1 - 1 / 8, "engine_occupancy": 8 / 8 / 2}
    assert engine_load([b]) == {"engine_idle_fraction": 1.0}  # no step: occupancy unknown, not 0


def test_groups_go_to_the_least_loaded_worker_and_lost_ones_are_found():
    assert assign_groups([1, 2, 3, 4], {"a": 2, "b": 0}) == {"b": [1, 2, 4], "a": [3]}
    assert lost_groups({1, 2, 3, 4}, returned=[1], held=[3]) == {2, 4}


def test_a_batch_with_per_token_versions_concatenates_across_versions_and_knows_its_oldest():
    a, b = group_batch(["p"], [[2, 3]]), group_batch(["q"], [[3, 3]])
    both = RolloutBatch.concat([a, b])
    assert both.weight_version == 2 and both.group_ids == [0] * G + [1] * G
    assert group_oldest(both, G) == [2, 3]
    assert token_age_metrics(both, 4) == {
        "rollout/token_age_mean": (4 * (2 + 1) + 4 * (1 + 1)) / 16,
        "rollout/token_age_max": 2.0,
        "rollout/mixed_version_rows": 4.0,
    }
    with pytest.raises(ValueError, match="oldest token"):
        RolloutBatch(**{**a.__dict__, "weight_version": 3})
    plain = RolloutBatch(**{**a.__dict__, "token_versions": None})
    with pytest.raises(ValueError, match="streaming rows"):
        RolloutBatch.concat([plain, b])


def test_a_streamed_batch_must_hold_its_groups_whole_and_once():
    batch = group_batch(["p", "q"], [[0, 0], [0, 0]])
    rows_by_uid = {7: {"prompt": "p"}, 9: {"prompt": "q"}}
    check_stream_groups(batch, [7, 9], rows_by_uid, G)
    with pytest.raises(RuntimeError, match="refusing to train"):
        check_stream_groups(batch, [9, 7], rows_by_uid, G)  # rows are not the uids' prompts
    with pytest.raises(RuntimeError, match="refusing to train"):
        check_stream_groups(batch.select(list(range(G + 2))), [7, 9], rows_by_uid, G)  # a group cut short
    with pytest.raises(RuntimeError, match="a group twice"):
        check_stream_groups(RolloutBatch.concat([batch, batch]), [7, 9, 7, 9], rows_by_uid, G)


def test_selecting_rows_keeps_their_own_oldest_version_and_copies_the_counts():
    batch = group_batch(["p", "q"], [[1, 2], [3, 3]])
    batch.metrics["completions"] = 8.0
    fresh = batch.select(list(range(G, 2 * G)))
    assert batch.weight_version == 1 and fresh.weight_version == 3
    fresh.metrics["completions"] = 4.0
    assert batch.metrics["completions"] == 8.0  # not the same dict


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("trainer", {"max_staleness": 0}, "max_staleness >= 1"),
        ("rollout", {"multi_turn": {"env": "grpo_dist.envs.retry:make_retry_env"}}, "single-turn rows"),
    ],
)
def test_streaming_config_refuses_what_it_cannot_run(tmp_path, field, value, match):
    data = stream_cfg(tmp_path).model_dump()
    data[field] = {**data[field], **value}
    with pytest.raises(ValueError, match=match):
        Config.model_validate(data)


def test_streaming_takes_a_lora_adapter_sync(tmp_path):
    data = stream_cfg(tmp_path).model_dump()
    data["model"] = {**data["model"], "lora": {"rank": 8, "sync": "adapter"}}
    assert Config.model_validate(data).rollout.streaming


def test_streaming_trains_groups_in_completion_order_each_drawn_prompt_once(tmp_path):
    cluster = FakeStream()
    Trainer(stream_cfg(tmp_path), cluster, rows(20), rows(4), tmp_path / "run").run()
    assert len(cluster.learner.trained) == 6 and cluster.rollout.weight_version == 6
    sampler = PromptSampler(20, 2, make_cfg(tmp_path).trainer.seed)
    drawn = [i for _ in range(6) for i in sampler.next_indices()]
    assert Counter(trained_indices(tmp_path / "run")) == Counter(drawn)
    assert cluster.submitted == sorted(cluster.submitted) and not cluster.queue
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= m["staleness"] <= 1 and m["rollout/token_age_max"] <= 1 for m in metrics)


def test_a_group_with_a_token_past_max_staleness_is_generated_again(tmp_path):
    cluster = FakeStream(old={0, 5, 6, 7, 8})
    trainer = Trainer(stream_cfg(tmp_path), cluster, rows(20), rows(4), tmp_path / "run")
    trainer.run()
    # Uid 0 is taken while every version is still 0 (nothing is stale then); uids 5-8 come later.
    assert trainer.counters["groups_dropped_stale"] >= 1
    sampler = PromptSampler(20, 2, make_cfg(tmp_path).trainer.seed)
    drawn = [i for _ in range(6) for i in sampler.next_indices()]
    assert Counter(trained_indices(tmp_path / "run")) == Counter(drawn)  # the dropped prompt trained once, later
    for b in cluster.learner.trained:
        assert trainer.learner_weight_version >= b.weight_version


def test_a_prompt_that_never_finishes_within_max_staleness_stops_the_run(tmp_path):
    class AlwaysOld(FakeStream):
        def take(self, want):
            batch, uids = super().take(want)
            self.old.update(u for u, _ in self.queue)  # every group still queued will come back stale
            return batch, uids

    cluster = AlwaysOld()
    cluster.rollout.stream_take = cluster.take
    trainer = Trainer(stream_cfg(tmp_path, steps=8), cluster, rows(20), rows(4), tmp_path / "run")
    with pytest.raises(RuntimeError, match="dropped 4 times"):
        trainer.run()


def test_a_streaming_checkpoint_is_not_resumed_without_streaming(tmp_path):
    ckpt = {"save_every": 2, "save_at_end": False}
    Trainer(stream_cfg(tmp_path, ckpt, steps=3), FakeStream(), rows(20), rows(4), tmp_path / "run").run()
    batch_mode = make_cfg(tmp_path, steps=6, max_staleness=1)
    with pytest.raises(ValueError, match=r"resume it with rollout\.streaming: true"):
        Trainer(batch_mode, FakeCluster(), rows(20), rows(4), tmp_path / "run").run(resume=True)


def test_a_resumed_stream_submits_the_prompts_in_flight_first_and_loses_none(tmp_path):
    # The job dies after step 3 (never checkpointed): step 2's checkpoint holds 2 prompts in flight.
    ckpt = {"save_every": 2, "save_at_end": False}
    first = FakeStream(seed=1)
    cfg = stream_cfg(tmp_path, ckpt, steps=3)
    Trainer(cfg, first, rows(20), rows(4), tmp_path / "run").run()
    state = json.loads((Path(cfg.checkpoint_dir) / "step-000002" / "state.json").read_text())
    assert len(state["in_flight"]) == 2
    second = FakeStream(seed=2)
    Trainer(stream_cfg(tmp_path, ckpt, steps=6), second, rows(20), rows(4), tmp_path / "run").run(resume=True)
    assert [r["prompt"] for _, r in second.submitted_rows[:2]] == [rows(20)[i]["prompt"] for i in state["in_flight"]]
    sampler = PromptSampler(20, 2, make_cfg(tmp_path).trainer.seed)
    drawn = [i for _ in range(6) for i in sampler.next_indices()]
    assert Counter(trained_indices(tmp_path / "run")) == Counter(drawn)
