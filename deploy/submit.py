"""Submit a validated config to a Ray cluster through the Job Submission API."""

from __future__ import annotations

import secrets
import shlex
import time
from pathlib import Path

import yaml

from grpo_dist.config import Config, ConfigError, dump_config
from grpo_dist.errors import UserError, first_line, one_line
from grpo_dist.preflight import PREFLIGHT_PASSED

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_ENV = Path(__file__).resolve().parent / "runtime_env.yaml"
CONFIG_ENV_VAR = "GRPO_DIST_CONFIG_YAML"
JOB_ID_ENV_VAR = "GRPO_DIST_JOB_ID"
_ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


def runtime_env(cfg: Config, job_id: str) -> dict:
    """deploy/runtime_env.yaml + this checkout as working dir + the resolved config and job id.

    The config travels as an env var holding the validated YAML, so the job runs exactly what
    was checked here, overrides included. Ray gives a job's driver no variable with its own
    submission id, so it travels too (the output-directory lock names it)."""
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    env["working_dir"] = str(ROOT)
    env.setdefault("env_vars", {}).update({CONFIG_ENV_VAR: dump_config(cfg), JOB_ID_ENV_VAR: job_id})
    return env


def check_submittable(cfg: Config) -> None:
    """Refuse paths a submitted job cannot honour, before anything is uploaded.

    The job runs in a temporary copy of this checkout (without the runtime env's ``excludes``:
    .venv, runs, .git), on whichever node Ray picks: outputs under a relative directory would be
    deleted with that copy, and a relative input path that exists here is not what the job sees.
    """
    problems = []
    for field, value in (("trainer.output_dir", cfg.trainer.output_dir), ("checkpoint.dir", cfg.checkpoint.dir)):
        if value is not None and not Path(value).is_absolute():
            problems.append(
                f"{field}={value!r} is relative: the job's outputs would be written into its temporary "
                "copy of the checkout and lost; use an absolute path on storage the cluster keeps"
            )
    inputs = (
        ("model.path", cfg.model.path),
        ("model.tokenizer_path", cfg.model.tokenizer_path),
        ("data.path", cfg.data.path),
    )
    for field, value in inputs:
        if value is not None and not Path(value).is_absolute() and Path(value).exists():
            problems.append(
                f"{field}={value!r} is a relative local path: the job runs in a copy of the checkout "
                "without .venv, runs and .git, possibly on another node; use an absolute path on "
                "storage every node sees (or a hub id)"
            )
    if problems:
        raise ConfigError("cannot submit this config: " + one_line(problems))


def entrypoint_command(resume: bool) -> str:
    return shlex.join(["python", "-m", "deploy.entrypoint", *(["--resume"] if resume else [])])


def submit(
    cfg: Config,
    address: str,
    overrides: list[str],
    config_path: str,
    resume: bool = False,
    preflight_timeout_s: float = 0.0,
) -> tuple[str, bool | None]:
    """Submit the job; with ``preflight_timeout_s`` > 0 also wait for its preflight on the cluster.
    Returns the job id and whether the preflight passed (None: not waited for)."""
    from ray.job_submission import JobSubmissionClient

    check_submittable(cfg)
    try:
        client = JobSubmissionClient(address)
        job_id = f"raysubmit_grpo_{secrets.token_hex(8)}"
        client.submit_job(
            submission_id=job_id,
            entrypoint=entrypoint_command(resume),
            runtime_env=runtime_env(cfg, job_id),
            metadata={"config": str(config_path), "overrides": " ".join(overrides)[:1000]},
        )
    except Exception as e:  # unreachable dashboard, refused token, upload failure: say which
        raise UserError(
            f"--address {address}: submitting the job failed ({first_line(e)}); check the dashboard "
            "address, and RAY_AUTH_MODE=token with its token where the cluster uses token auth"
        ) from e
    if preflight_timeout_s <= 0:
        return job_id, None
    return job_id, await_preflight(client, job_id, preflight_timeout_s)


def await_preflight(client, job_id: str, timeout_s: float, poll_s: float = 1.0) -> bool:
    """Follow a submitted job until its own preflight on the cluster passed (True) or ``timeout_s``
    ran out (False). A job that ends first raises UserError with the job's one-line cause, so
    `submit` shows what `ray job logs` shows."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
        logs = client.get_job_logs(job_id)
        if PREFLIGHT_PASSED in logs:
            return True
        if status in _ENDED:
            said = [ln for ln in logs.splitlines() if ln.startswith("grpo-dist: ")]
            cause = said[-1][len("grpo-dist: ") :] if said else f"it ended {status} (see `ray job logs {job_id}`)"
            raise UserError(f"job {job_id} failed on the cluster before training: {cause}")
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
