"""The driver loop against an in-process fake cluster: versions, staleness, resume order,
dynamic sampling, checkpoint safety. No Ray, vLLM or DeepSpeed here (they have their own tiers)."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest
import torch

from grpo_dist.batch import RolloutBatch, check_groups
from grpo_dist.checkpoint import CheckpointWriteError, latest_checkpoint, save_checkpoint
from grpo_dist.config import Config
from grpo_dist.data import PromptSampler
from grpo_dist.driver import Trainer, zero_variance_groups


def make_cfg(tmp_path: Path, **trainer) -> Config:
    return Config.model_validate(
        {
            "algorithm": {"num_generations": 4, "max_completion_length": 8},
            "learner": {"num_ranks": 2, "micro_batch_size": 2},
            "trainer": {
                "steps": 6,
                "prompts_per_step": 2,
                "eval_num_prompts": 4,
                "output_dir": str(tmp_path / "run"),
                **trainer,
            },
            "logging": {"tensorboard": False, "progress_bar": False, "ray_metrics": False},
        }
    )


class FakeRollout:
    """Answers correctly on rows whose index within the group is below `solved` (per prompt id)."""

    def __init__(self, all_solved: bool = False):
        self.weight_version = 0
        self.seen: list[list[str]] = []
        self.all_solved = all_solved
        self.queue: list = []

    def generate(self, prompts, n=None, sampling=None):
        G = n or 4
        rows, comps, rewards = [], [], []
        self.seen.append([p["question"] for p in prompts])
        for p in prompts:
            for j in range(G):
                ok = self.all_solved or (j % 2 == 0)
                comps.append(f"<think>x</think><answer>{p['answer'] if ok else -1}</answer>")
                rewards.append(1.0 if ok else 0.0)
                rows.append(p)
        B = len(rows)
        return RolloutBatch(
            prompt_ids=[[1, 2]] * B,
            completion_ids=[[3, 4]] * B,
            sampling_logp=[[-1.0, -1.0]] * B,
            truncated=[False] * B,
            rewards=rewards,
            reward_components={"accuracy": list(rewards)},
            group_ids=[i // G for i in range(B)],
            weight_version=self.weight_version,
            prompts=[r["prompt"] for r in rows],
            completions=comps,
            answers=[r["answer"] for r in rows],
        )

    def start_generate(self, prompts):
        return self.generate(prompts)

    def collect(self, handle):
        return handle

    def weight_versions(self):
        return {"rollout-0": self.weight_version}


class FakeLearner:
    def __init__(self):
        self.trained: list[RolloutBatch] = []
        self.loaded = None

    def train_step(self, batch):
        assert batch.advantages is not None
        self.trained.append(batch)
        return {"loss": 0.5, "kl": 0.01, "time/ref_logp": 0.0}

    def save_hf(self, path):
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_text("w")

    def save_checkpoint(self, path):
        Path(path).mkdir(parents=True)
        (Path(path) / "state").write_text(str(len(self.trained)))

    def load_checkpoint(self, path):
        self.loaded = path


class FakeCluster:
    def __init__(self, **kw):
        self.rollout = FakeRollout(**kw)
        self.learner = FakeLearner()
        self.syncs: list[int] = []
        self.maintain_calls = 0

    def sync_weights(self, version):
        self.syncs.append(version)
        self.rollout.weight_version = version
        return {"seconds": 0.0, "bytes": 10}

    def maintain(self, version):
        # Like the real cluster: a worker behind the learner gets weights pushed (after the first call,
        # so a test can start with workers left behind).
        self.maintain_calls += 1
        if self.maintain_calls > 1 and self.rollout.weight_version != version:
            self.sync_weights(version)
        return {}

    def record_metrics(self, metrics):
        pass


def rows(n: int) -> list[dict]:
    return [{"question": f"{i}+1", "answer": str(i + 1), "prompt": f"{i}+1=", "prompt_ids": [1, 2]} for i in range(n)]


def test_on_policy_trains_on_current_weights(tmp_path):
    cfg = make_cfg(tmp_path)
    cluster = FakeCluster()
    summary = Trainer(cfg, cluster, rows(20), rows(4), tmp_path / "run").run()
    assert cluster.syncs == [1, 2, 3, 4, 5, 6]
    assert [b.weight_version for b in cluster.learner.trained] == [0, 1, 2, 3, 4, 5]
    assert summary["steps"] == 6 and summary["final_weight_version"] == 6
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(x)["staleness"] == 0 for x in lines)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("eval_before", "eval_after", "steps", "wall_seconds", "completions_per_second", "phase_seconds"):
        assert key in s
    assert set(s["eval_after"]) >= {"accuracy", "format_reward"}
    assert (tmp_path / "run" / "training.png").is_file()


def test_async_staleness_is_bounded(tmp_path):
    cfg = make_cfg(tmp_path, max_staleness=1)
    cluster = FakeCluster()
    Trainer(cfg, cluster, rows(20), rows(4), tmp_path / "run").run()
    stale = [json.loads(x)["staleness"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(cluster.learner.trained) == 6
    assert max(stale) == 1 and min(stale) >= 0


def test_async_drops_too_stale_batches(tmp_path):
    cfg = make_cfg(tmp_path, max_staleness=1)
    cluster = FakeCluster()
    trainer = Trainer(cfg, cluster, rows(20), rows(4), tmp_path / "run")
    trainer.learner_weight_version = 5  # as if the rollout workers were left far behind (e.g. restarted)
    cluster.rollout.weight_version = 0
    cfg.trainer.steps = 2
    trainer.run()
    assert trainer.counters["batches_dropped_stale"] >= 1
    assert [b.weight_version for b in cluster.learner.trained] == [5, 5]  # the second trained at staleness 1


def test_resume_follows_the_same_data_order(tmp_path):
    straight = FakeCluster()
    Trainer(make_cfg(tmp_path / "a", steps=6), straight, rows(7), rows(4), tmp_path / "a" / "run").run()

    first = FakeCluster()
    Trainer(make_cfg(tmp_path / "b", steps=4), first, rows(7), rows(4), tmp_path / "b" / "run").run()
    second = FakeCluster()
    cfg = make_cfg(tmp_path / "b", steps=6)
    t = Trainer(cfg, second, rows(7), rows(4), tmp_path / "b" / "run")
    t.run(resume=True)
    assert second.learner.loaded is not None and second.syncs[0] == 4  # resumed weights pushed first
    order = [b.prompts for b in straight.learner.trained]
    resumed = [b.prompts for b in first.learner.trained + second.learner.trained]
    assert resumed == order
    # prompts.jsonl: the data rows of every step, the sampler's stream, also across the resume.
    replay = PromptSampler(7, 2, make_cfg(tmp_path).trainer.seed)
    want = [{"step": s, "weight_version": s - 1, "indices": replay.next_indices()} for s in range(1, 7)]
    for run in ("a", "b"):
        lines = (tmp_path / run / "run" / "prompts.jsonl").read_text().splitlines()
        assert [json.loads(ln) for ln in lines] == want


@pytest.mark.parametrize(
    "rows_of",
    [
        lambda b, G: list(range(G, 2 * G)),  # a group lost
        lambda b, G: list(range(G)) * 2,  # a group twice
        lambda b, G: list(range(G - 1)) + list(range(G, 2 * G)),  # a group cut short
        lambda b, G: list(range(G, 2 * G)) + list(range(G)),  # groups out of draw order
    ],
    ids=["lost", "twice", "cut", "reordered"],
)
def test_a_batch_that_loses_duplicates_or_cuts_a_group_is_refused(rows_of):
    drawn = rows(2)
    batch = FakeRollout().generate(drawn)
    check_groups(batch, drawn, 4)
    bad = batch.select(rows_of(batch, 4))
    with pytest.raises(RuntimeError, match="does not hold the 2 drawn prompts x 4 completions in order"):
        check_groups(bad, drawn, 4)


def test_dynamic_sampling_drops_zero_variance_groups(tmp_path):
    cfg = make_cfg(tmp_path, steps=1)
    cfg.algorithm.dynamic_sampling = True
    cluster = FakeCluster(all_solved=True)  # every group has identical rewards
    t = Trainer(cfg, cluster, rows(40), rows(4), tmp_path / "run")
    t.run()
    assert t.counters["groups_dropped_zero_variance"] > 0
    assert t.counters["extra_generate_calls"] == 4  # bounded top-up rounds
    assert len(cluster.learner.trained[0]) == cfg.rows_per_step  # padded back to the batch shape


def test_zero_variance_groups_ignores_missing_rewards():
    r = torch.tensor([1.0, 1.0, math.nan, 1.0, 0.0, 1.0, 1.0, 1.0])
    assert zero_variance_groups(r, 4).tolist() == [True, False]


def test_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    ok = save_checkpoint(root, 1, {"step": 1}, {"policy": lambda p: Path(p).mkdir()})

    def disk_full(path):
        Path(path).mkdir()
        (Path(path) / "half").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(root, 2, {"step": 2}, {"policy": disk_full})
    assert str(e.value) == (
        f"checkpoint step 2 could not be written under {root} (OSError: [Errno 28] No space "
        f"left on device); the previous checkpoint {ok} is intact and --resume continues from it"
    )
    assert latest_checkpoint(root) == ok
    assert not (root / "step-000002").exists() and not list(root.glob(".tmp-*"))  # nothing half-written is left

    def bug(path):
        raise RuntimeError("not a disk fault")

    with pytest.raises(RuntimeError, match="not a disk fault"):  # anything else is not dressed up as a disk fault
        save_checkpoint(root, 2, {"step": 2}, {"policy": bug})
    assert latest_checkpoint(root) == ok
    again = save_checkpoint(root, 2, {"step": 2}, {"policy": lambda p: Path(p).mkdir()})
    assert latest_checkpoint(root) == again and not list(root.glob(".tmp-*"))


def test_every_key_the_loop_writes_to_metrics_jsonl_is_declared(tmp_path):
    """A real metrics.jsonl: the loop with evaluation and checkpoints, its batches assembled by the
    rollout worker's own build_batch (with a failing reward function) and the learner's keys packed
    by learner.step from grpo_loss's metrics. The learner actor's other keys and the Ray cluster's
    (maintain, sync) need Ray: tests/test_e2e.py checks its metrics.jsonl the same way."""
    from grpo_dist.config import AlgoConfig
    from grpo_dist.losses import grpo_loss
    from grpo_dist.metrics import undeclared
    from grpo_dist.rewards import REWARDS, BuiltReward
    from learner.step import pack_metrics, unpack_metrics
    from rollout_server.scoring import build_batch

    def boom(prompts, completions, **_):
        raise RuntimeError("reward exploded")

    specs = [BuiltReward("accuracy", REWARDS["accuracy"], 1.0, {}), BuiltReward("boom", boom, 1.0, {})]

    class WorkerRollout(FakeRollout):
        def generate(self, prompts, n=None, sampling=None):
            G = n or 4
            recs = [
                {"group": p, "ids": [3, 4], "logp": [-1.0, -1.0], "truncated": j == 0, "text": str(j)}
                for p in range(len(prompts))
                for j in range(G)
            ]
            return build_batch(prompts, G, recs, self.weight_version, specs, 1.0, 0.1)

    class PackingLearner(FakeLearner):
        def train_step(self, batch):
            super().train_step(batch)
            logp = torch.tensor([[-1.0, -2.0]])
            loss, m = grpo_loss(logp, None, logp - 0.1, torch.tensor([1.0]), torch.ones(1, 2), AlgoConfig(beta=0.04))
            m |= {"entropy": torch.tensor(1.0), "sampler_gap": torch.tensor(0.0)}
            return unpack_metrics(pack_metrics([m], float(loss)), 1) | {"time/ref_logp": 0.0}

    cfg = make_cfg(tmp_path, steps=4, eval_every=2)
    cfg.checkpoint.save_every = 2
    cluster = FakeCluster()
    cluster.rollout, cluster.learner = WorkerRollout(), PackingLearner()
    Trainer(cfg, cluster, rows(20), rows(4), tmp_path / "run").run()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    keys = {k for line in lines for k in json.loads(line)}
    assert len(lines) == 4 and undeclared(keys) == []
    for key in ("rollout/reward_failures/boom/exception", "reward/boom", "learner/sampler_gap", "eval/accuracy"):
        assert key in keys  # the run wrote what the assertion above is meant to cover
    assert {"time/checkpoint", "sync/bytes", "count/batches_dropped_stale"} <= keys
