"""The run's guards before Ray starts: one job per output directory (a lock naming its owner) and
what `--resume` may change."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from grpo_dist.checkpoint import save_checkpoint
from grpo_dist.config import load_config
from grpo_dist.errors import UserError
from grpo_dist.lock import LOCK_NAME, OutputLock
from grpo_dist.resume import check_resume, config_changes


def test_lock_names_its_owner_and_refuses_a_second_job(tmp_path):
    with OutputLock(tmp_path, job_id="raysubmit_1") as first:
        held = json.loads((tmp_path / LOCK_NAME).read_text())
        assert held["host"] == socket.gethostname() and held["pid"] == os.getpid() and held["job_id"] == "raysubmit_1"
        with pytest.raises(UserError, match=rf"in use by pid {os.getpid()} on host .* \(job raysubmit_1, since "):
            OutputLock(tmp_path).acquire()
        assert (tmp_path / LOCK_NAME).exists()  # the refused job did not touch the owner's lock
    assert not (tmp_path / LOCK_NAME).exists() and first.path == tmp_path / LOCK_NAME


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(
        json.dumps({"host": socket.gethostname(), "pid": pid, "job_id": None, "since": "earlier"})
    )
    with caplog.at_level(logging.WARNING), OutputLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock {tmp_path / LOCK_NAME} of pid {pid}" in caplog.text


def test_a_lock_from_another_host_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "job_id": "j", "since": "s"}))
    with pytest.raises(UserError, match="in use by pid 1 on host elsewhere"):
        OutputLock(tmp_path).acquire()


def _resumable(tmp_path, **changed):
    cfg = load_config(overrides=[f"trainer.output_dir={tmp_path / 'run'}"])
    saved = cfg.model_dump(mode="json")
    for dotted, value in changed.items():
        section, field = dotted.split(".")
        saved[section][field] = value
    save_checkpoint(cfg.checkpoint_dir, 3, {"step": 3, "config": saved}, {})
    return cfg


def test_resume_lists_what_changed_and_allows_it(tmp_path):
    cfg = _resumable(tmp_path, **{"algorithm.num_generations": 4, "trainer.steps": 10})
    notes = check_resume(cfg)
    assert [n.split(": ", 1)[1] for n in notes] == ["algorithm.num_generations: 4 -> 8", "trainer.steps: 10 -> 20"]
    assert notes[0].startswith(f"--resume from {cfg.checkpoint_dir}/step-000003")


@pytest.mark.parametrize(
    "field, old",
    [("learner.zero_stage", 3), ("learner.num_ranks", 4), ("model.path", "/m"), ("model.dtype", "bfloat16")],
)
def test_resume_refuses_what_the_checkpoint_cannot_serve(tmp_path, field, old):
    cfg = _resumable(tmp_path, **{field: old, "trainer.steps": 10})
    with pytest.raises(UserError, match=rf"refused: {field}: {old!r} -> .*; start a new run"):
        check_resume(cfg)


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path):
    cfg = load_config(overrides=[f"trainer.output_dir={tmp_path}"])
    assert check_resume(cfg) == [f"--resume: no checkpoint under {cfg.checkpoint_dir}; starting from scratch"]
    assert config_changes(cfg.model_dump(mode="json"), cfg) == {}


def test_resume_refuses_turning_lora_on_or_off_or_reshaping_the_adapter(tmp_path):
    from grpo_dist.config import LoraConfig

    saved = LoraConfig(rank=8, alpha=16).model_dump(mode="json")
    cfg = _resumable(tmp_path, **{"model.lora": saved})  # saved with LoRA, resumed without
    with pytest.raises(UserError, match=r"refused: model.lora.alpha: 16.0 -> None .* model.lora.rank: 8 -> None"):
        check_resume(cfg)
    on = load_config(overrides=[f"trainer.output_dir={tmp_path / 'run'}", "model.lora.rank=8", "model.lora.alpha=16"])
    assert not [n for n in check_resume(on) if "lora" in n]  # the same adapter resumes
