"""The metric declaration (grpo_dist/metrics.py) against what produces and reads metrics: the
learner's packed keys and grpo_loss, the rollout worker's batch metrics, the Grafana dashboard's
queries, the README and the docs pages. The keys the driver loop writes to metrics.jsonl: tests/test_driver.py;
the learner actor's and the Ray cluster's keys (Ray needed): tests/test_e2e.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from grpo_dist.config import AlgoConfig
from grpo_dist.losses import grpo_loss
from grpo_dist.metrics import (
    LEARNER,
    METRICS,
    WORKER_SERIES,
    lookup,
    metric_for_series,
    series_name,
    undeclared,
)
from grpo_dist.rewards import REWARDS, BuiltReward
from learner.step import METRIC_KEYS, pack_metrics, unpack_metrics
from rollout_server.scoring import build_batch

ROOT = Path(__file__).resolve().parent.parent


def dashboard_exprs() -> list[str]:
    boards = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
    assert boards
    return [t["expr"] for b in boards for p in json.loads(b.read_text())["panels"] for t in p.get("targets", [])]


def queried_series(expr: str) -> list[str]:
    """The series a PromQL expression names: plain names, and ``{__name__=~"prefix(a|b)suffix"}``
    selectors expanded (the only regex form the dashboard uses; anything else fails here). A ``.+``
    in the prefix or suffix (a pattern key's ``<name>`` part, e.g. a reward model's name) stands for
    the name ``any``."""
    names = []
    for rx in re.findall(r'__name__=~"([^"]*)"', expr):
        m = re.fullmatch(r"([A-Za-z0-9_.+]*)\(([A-Za-z0-9_|]+)\)([A-Za-z0-9_.+]*)", rx)
        assert m, f"cannot expand the selector {rx!r}"
        head, tail = (g.replace(".+", "any") for g in (m.group(1), m.group(3)))
        assert not re.search(r"[.+]", head + tail), f"cannot expand the selector {rx!r}"
        names += [head + alt + tail for alt in m.group(2).split("|")]
    rest = re.sub(r'__name__=~"[^"]*"', "", expr)
    return names + re.findall(r"\bray_grpo_[A-Za-z0-9_]+", rest)


def test_declarations_map_to_distinct_prometheus_series():
    exact = [m for m in (*METRICS.values(), *WORKER_SERIES.values()) if m.exported and not m.is_pattern]
    names = [series_name(m) for m in exact]
    assert len(set(names)) == len(names), sorted(n for n in names if names.count(n) > 1)
    for m in exact:
        assert metric_for_series(series_name(m)) is m
    assert metric_for_series("ray_grpo_no_such_key") is None
    assert lookup("reward/accuracy") is METRICS["reward/<reward>"] and lookup("reward/mean") is METRICS["reward/mean"]
    assert undeclared(["step", "time/step", "reward/a/b", "bogus"]) == ["reward/a/b", "bogus"]


def test_the_learners_packed_keys_and_grpo_loss_keys_are_declared():
    # The packed layout's order (summed over ranks in one all-reduce) follows the declaration.
    assert METRIC_KEYS == (
        "kl",
        "ratio",
        "clip_low",
        "clip_high",
        "clip_region",
        "cispo_clip_fraction",
        "correction_weight_mean",
        "correction_masked_fraction",
        "entropy",
        "sampler_gap",
    )
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    for cfg, ref, sampling in (
        (AlgoConfig(beta=0.0), None, None),
        (AlgoConfig(beta=0.04, rollout_correction={"max": 2.0}), logp - 0.1, logp - 0.2),
        (AlgoConfig(beta=0.0, policy_loss="cispo", rollout_correction={"mode": "mask"}), None, logp - 0.2),
    ):
        loss, m = grpo_loss(logp, logp - 0.05, ref, torch.tensor([1.0]), mask, cfg, sampling_logp_BT=sampling)
        loss_keys = set(m) - {"num_tokens"}
        # pack_metrics packs exactly METRIC_KEYS: a loss metric outside them would be dropped silently.
        assert loss_keys <= set(METRIC_KEYS)
        assert set(METRIC_KEYS) - loss_keys == {"entropy", "sampler_gap"}  # the learner adds these two
        m |= {"entropy": torch.tensor(1.0), "sampler_gap": torch.tensor(0.0)}
        out = unpack_metrics(pack_metrics([m], float(loss)), 1)
        assert undeclared(LEARNER + k for k in out) == []


def test_the_rollout_workers_batch_metrics_are_declared():
    def boom(prompts, completions, **_):
        raise RuntimeError("reward exploded")

    specs = [BuiltReward("accuracy", REWARDS["accuracy"], 1.0, {}), BuiltReward("boom", boom, 1.0, {})]
    rows = [{"prompt": "1+1=", "prompt_ids": [1, 2], "answer": "2"}]
    recs = [{"group": 0, "ids": [3], "logp": [-1.0], "truncated": j == 0, "text": "2"} for j in range(2)]
    batch = build_batch(rows, 2, recs, 0, specs, 1.0, 0.1)
    assert "reward_failures/boom/exception" in batch.metrics
    assert undeclared("rollout/" + k for k in batch.metrics) == []
    assert undeclared("reward/" + k for k in batch.reward_components) == []


def test_every_series_the_dashboard_queries_is_declared():
    queried = [s for e in dashboard_exprs() for s in queried_series(e)]
    assert len(queried) >= 20 and "ray_grpo_time_idle" in queried  # the regex selector was expanded
    assert [s for s in queried if metric_for_series(s) is None] == []
    # A per-reward series must name a built-in reward function (the pattern alone takes any name).
    for s in queried:
        if metric_for_series(s) is METRICS["reward/<reward>"]:
            assert s.removeprefix("ray_grpo_reward_") in REWARDS, s


def test_the_series_the_readme_and_docs_name_are_declared():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = re.findall(r"\bray_grpo_[A-Za-z0-9_]+", "\n".join(p.read_text() for p in pages))
    assert named and [s for s in named if metric_for_series(s) is None] == []
