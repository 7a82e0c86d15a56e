"""`grpo-dist submit` against a live Ray head started with `ray start`, as a user submits to a
cluster: the job runs from the uploaded checkout with deploy/runtime_env.yaml, finishes, writes its
outputs where the config says, and its named actors are visible through the dashboard's state API."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_e2e import cli_env, config

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(1500)]
ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


# Waits for the job (bounded), then prints its status, logs and the names of the cluster's actors.
WATCH = """
import json, sys, time
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors
address, job_id = sys.argv[1:]
client = JobSubmissionClient(address)
deadline = time.monotonic() + 1200
while str(status := client.get_job_status(job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
    if time.monotonic() > deadline:
        sys.exit(f"job {job_id} still {status} after 1200 s")
    time.sleep(2)
actors = sorted({a.name for a in list_actors(address=address, limit=1000) if a.name})
print(json.dumps({"status": str(status), "logs": client.get_job_logs(job_id), "actors": actors}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_runs_a_job_on_a_live_head(tmp_path, tiny_model_dir):
    cfg_path = config(tmp_path, tiny_model_dir)  # absolute model path and output_dir, as submit requires
    out_dir = tmp_path / "run"
    # Ray >= 2.59 turns token authentication on for local clusters; use a token of our own so the
    # run does not depend on ~/.ray, and check that submit carries it.
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    env = {**cli_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_AUTH_TOKEN", None)
    # As on a cluster whose image holds the dependencies: the job's `python` is this venv's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    dash, gcs = free_port(), free_port()
    address = f"http://127.0.0.1:{dash}"
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=4",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    try:
        refused = subprocess.run(
            [sys.executable, "-m", "grpo_dist.cli", "submit", str(cfg_path), "--address", address],
            cwd=ROOT,
            env={**env, "RAY_AUTH_MODE": "disabled"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert refused.returncode == 2 and f"--address {address}: submitting the job failed" in refused.stderr, (
            refused.stderr[-3000:]
        )
        assert "Traceback" not in refused.stderr
        # A path that exists only where the job runs is checked there, by the job's own preflight;
        # submit follows the job until then and shows its one-line cause.
        missing = subprocess.run(
            [
                sys.executable,
                "-m",
                "grpo_dist.cli",
                "submit",
                str(cfg_path),
                "--address",
                address,
                "--set",
                "model.path=/nonexistent/model",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        said = [ln for ln in missing.stderr.splitlines() if ln.startswith("grpo-dist:")]
        assert missing.returncode == 2 and len(said) == 1, missing.stderr[-3000:]
        assert (
            "failed on the cluster before training: config rejected before launch: "
            "model.path='/nonexistent/model' does not exist" in said[0]
        ), said
        sub = subprocess.run(
            [sys.executable, "-m", "grpo_dist.cli", "submit", str(cfg_path), "--address", address],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert sub.returncode == 0, sub.stderr[-5000:]
        assert "its preflight passed on the cluster" in sub.stdout
        job_id = re.search(r"submitted job (\S+)", sub.stdout).group(1)
        # The job client runs in a subprocess: Ray caches its auth mode per process, and later tests in
        # this one start their own local clusters.
        watch = subprocess.run(
            [sys.executable, "-c", WATCH, address, job_id], env=env, capture_output=True, text=True, timeout=1300
        )
        assert watch.returncode == 0, watch.stderr[-5000:]
        seen = json.loads(watch.stdout.strip().splitlines()[-1])
        assert seen["status"] == "SUCCEEDED", seen["logs"][-10000:]
        assert "eval after" in seen["logs"]
        summary = json.loads((out_dir / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["final_weight_version"] == 2
        assert (out_dir / "metrics.jsonl").read_text().count("\n") == 2
        assert {"learner-0", "learner-1", "rollout-0", "grpo-metrics", "grpo-control"} <= set(seen["actors"]), seen[
            "actors"
        ]
        # `grpo-dist scale` connects with the token (and finds the job gone); without it, one line says why.
        for mode, code, cause in (
            ("token", 2, "the Ray cluster runs no grpo-dist job"),
            ("disabled", 2, "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"),
        ):
            out = subprocess.run(
                [sys.executable, "-m", "grpo_dist.cli", "scale", "--workers", "2", "--address", f"127.0.0.1:{gcs}"],
                cwd=ROOT,
                env={**env, "RAY_AUTH_MODE": mode},
                capture_output=True,
                text=True,
                timeout=180,
            )
            said = [ln for ln in out.stderr.splitlines() if ln.startswith("grpo-dist:")]
            assert out.returncode == code and len(said) == 1 and cause in said[0], out.stderr[-3000:]
            assert "Traceback" not in out.stderr
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=180)
