"""The CLI validates before it touches anything: bad configs fail with the field named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grpo_dist import cli
from grpo_dist.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "yaml_text, field",
    [
        ("algorithm:\n  num_generatoins: 4\n", "algorithm.num_generatoins"),
        ("learner:\n  micro_batch_size: 3\n", "learner.micro_batch_size"),
        ("algorithm:\n  beta: lots\n", "algorithm.beta"),
        ("rewards:\n  functions: [{name: 'nosuch.module:fn'}]\n", "rewards.functions"),
    ],
)
def test_submit_rejects_bad_config_before_contacting_ray(tmp_path, monkeypatch, capsys, yaml_text, field):
    import deploy.submit

    def boom(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("submit() was called with an invalid config")

    monkeypatch.setattr(deploy.submit, "submit", boom)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    rc = cli.main(["submit", str(cfg), "--address", "http://127.0.0.1:1"])
    assert rc == 2
    assert field in capsys.readouterr().err


def test_submit_leaves_cluster_paths_and_devices_to_the_job(tmp_path, monkeypatch):
    """A model path or GPU setting that exists only on the cluster is not refused on the laptop; the
    job's own preflight checks it there (the same checks `validate` runs here)."""
    import deploy.submit

    sent = []
    monkeypatch.setattr(deploy.submit, "submit", lambda cfg, **kw: sent.append(cfg) or ("job-1", None))
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text(
        "model:\n  path: /cluster/models/m\ncluster:\n  num_gpus_per_rollout: 1\n  num_gpus_per_learner: 1\n"
        "trainer:\n  output_dir: /cluster/runs/x\n"
    )
    assert cli.main(["submit", str(cfg), "--address", "http://127.0.0.1:1"]) == 0 and sent
    assert cli.main(["validate", str(cfg)]) == 2


def test_validate_prints_resolved_config(tmp_path, tiny_model_dir, capsys):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(f"model:\n  path: {tiny_model_dir}\n")
    assert cli.main(["validate", str(cfg), "--set", "algorithm.beta=0.0"]) == 0
    assert "beta: 0.0" in capsys.readouterr().out


def test_example_configs_validate():
    for path in sorted((ROOT / "deploy" / "configs").glob("*.yaml")):
        load_config(path)  # schema + cross-field checks (model paths are checked at launch)


def test_validate_does_not_import_cluster_libraries(tmp_path):
    code = (
        "import sys; from grpo_dist import cli; cli.main(['validate', sys.argv[1]]);"
        "print(sorted(m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules))"
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  path: Qwen/Qwen2.5-0.5B-Instruct\n")
    out = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_submit_refuses_paths_the_job_cannot_honour(tmp_path, tiny_model_dir, monkeypatch, capsys):
    # Relative outputs would die with the job's copy of the checkout; a relative local model is not shipped.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").symlink_to(tiny_model_dir)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  path: m\ntrainer:\n  output_dir: runs/x\n")
    rc = cli.main(["submit", str(cfg), "--address", "http://127.0.0.1:1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "trainer.output_dir='runs/x' is relative" in err
    assert "model.path='m' is a relative local path" in err
    cfg.write_text(f"model:\n  path: {tiny_model_dir}\ntrainer:\n  output_dir: {tmp_path / 'out'}\n")
    from deploy.submit import check_submittable

    check_submittable(load_config(cfg))  # absolute paths pass
