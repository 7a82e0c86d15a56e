"""Submit a validated config to a Ray cluster through the Job Submission API."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from grpo_dist.config import Config, dump_config

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_ENV = Path(__file__).resolve().parent / "runtime_env.yaml"
CONFIG_ENV_VAR = "GRPO_DIST_CONFIG_YAML"


def runtime_env(cfg: Config) -> dict:
    """deploy/runtime_env.yaml + this checkout as working dir + the resolved config.

    The config travels as an env var holding the validated YAML, so the job runs exactly what
    was checked here, overrides included."""
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    env["working_dir"] = str(ROOT)
    env.setdefault("env_vars", {})[CONFIG_ENV_VAR] = dump_config(cfg)
    return env


def entrypoint_command(resume: bool) -> str:
    return shlex.join(["python", "-m", "deploy.entrypoint", *(["--resume"] if resume else [])])


def submit(cfg: Config, address: str, overrides: list[str], config_path: str, resume: bool = False) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    return client.submit_job(
        entrypoint=entrypoint_command(resume),
        runtime_env=runtime_env(cfg),
        metadata={"config": str(config_path), "overrides": " ".join(overrides)[:1000]},
    )
