"""A load run of a live job: many small steps, scaled from 1 to 2 rollout workers while it runs
(`grpo-dist scale`), then resource bounds: no growth of actor memory or threads past the
stated bounds, every step trained on current weights, nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import psutil
import pytest
from test_e2e import ROOT, assert_no_ray_left, cli_env, config, ray_daemon_pids, read_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(1500)]
# The new worker joins once its engine is up (it does not stall the steps): growth is measured from a
# few steps after it serves.
STEPS, SCALE_AT, SETTLE = 60, 5, 5
RSS_GROWTH_BOUND_MB = 64  # per actor process, from SETTLE steps after the scale-up to the end (measured: < 6 MB)
THREAD_GROWTH_BOUND = 4


def actor_processes() -> dict[int, psutil.Process]:
    out = {}
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        text = " ".join(p.info["cmdline"] or [])
        if text.startswith(("ray::RolloutWorker", "ray::LearnerActor")):
            out[p.info["pid"]] = p
    return out


def test_live_scale_and_resource_bounds_over_a_long_run(tmp_path, tiny_model_dir):
    cfg = config(
        tmp_path,
        tiny_model_dir,
        trainer={"steps": STEPS, "prompts_per_step": 2},
        learner={"micro_batch_size": 2},
        checkpoint={"save_every": None, "save_at_end": False},
        algorithm={"num_generations": 4, "max_completion_length": 8},
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    before = ray_daemon_pids()
    samples: dict[int, list[tuple[int, float, int]]] = {}  # pid -> (step, rss MB, threads)
    stop = threading.Event()

    def steps_done() -> int:
        return len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    def sample() -> None:
        while not stop.is_set():
            step = steps_done()
            for pid, p in actor_processes().items():
                try:
                    samples.setdefault(pid, []).append((step, p.memory_info().rss / 2**20, p.num_threads()))
                except psutil.Error:
                    pass
            stop.wait(1.0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "grpo_dist.cli", "run", str(cfg)],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        deadline = time.monotonic() + 600
        while steps_done() < SCALE_AT:
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach the scaling step"
            time.sleep(0.5)
        scaled = subprocess.run(
            [sys.executable, "-m", "grpo_dist.cli", "scale", "--workers", "2"],
            cwd=ROOT,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert scaled.returncode == 0, scaled.stderr[-3000:]
        out, _ = proc.communicate(timeout=1200)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-5000:]
    assert_no_ray_left(before)

    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["rollout/num_workers"] == 2 and rows[-1]["count/workers_added"] == 1
    joined = next(r["step"] for r in rows if r["rollout/num_workers"] == 2)
    measure_from = joined + SETTLE
    assert measure_from < STEPS - 10, f"the second worker served only from step {joined}"
    assert all(r["staleness"] == 0 for r in rows)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["weight_versions"] == {"rollout-0": STEPS, "rollout-1": STEPS}

    growth = {}
    for pid, s in samples.items():
        late = [x for x in s if x[0] >= measure_from]
        if len(late) >= 2:
            growth[pid] = (late[-1][1] - late[0][1], late[-1][2] - late[0][2])
    assert len(growth) >= 4, f"expected 2 learner and 2 rollout processes sampled, got {growth}"
    print("per-actor (RSS MB, threads) growth from step", measure_from, "to the end:", growth)
    for pid, (rss, threads) in growth.items():
        assert rss < RSS_GROWTH_BOUND_MB, f"pid {pid} grew {rss:.0f} MB"
        assert threads <= THREAD_GROWTH_BOUND, f"pid {pid} grew {threads} threads"
