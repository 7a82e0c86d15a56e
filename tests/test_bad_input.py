"""Fail well: each bad input or operator mistake runs the real CLI in a subprocess, as a user does,
and must give exit code 2, exactly one `grpo-dist:` line on stderr that names the cause, no
traceback on the terminal, an answer well within a minute, and nothing written into the output
directory."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from grpo_dist.checkpoint import save_checkpoint
from grpo_dist.config import load_config
from grpo_dist.lock import LOCK_NAME
from grpo_dist.preflight import cpu_fp16_supported
from tests.test_e2e import cli_env, ray_daemon_pids

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 45.0  # preflight answers are seconds; this bounds a hang


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, model: Path, name: str = "c.yaml", **sections) -> Path:
    cfg = {
        "model": {"path": str(model)},
        "data": {"source": "synthetic", "max_prompt_length": 32, "synthetic": {"num_train": 50, "num_test": 8}},
        "algorithm": {"num_generations": 4, "max_completion_length": 16},
        "learner": {"num_ranks": 2, "micro_batch_size": 4},
        "trainer": {"steps": 2, "prompts_per_step": 4, "output_dir": str(tmp_path / "out")},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def no_tokenizer_model(tiny: Path, tmp_path: Path) -> Path:
    d = tmp_path / "no-tokenizer"
    shutil.copytree(tiny, d)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (d / f).unlink(missing_ok=True)
    return d


def sliding_window_model(tiny: Path, tmp_path: Path, window: int) -> Path:
    """The tiny Qwen2 with a sliding window of ``window`` tokens in every layer."""
    d = tmp_path / "sliding"
    shutil.copytree(tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(
        use_sliding_window=True,
        sliding_window=window,
        max_window_layers=0,
        layer_types=["sliding_attention"] * cfg["num_hidden_layers"],
    )
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def small_vocab_model(tiny: Path, tmp_path: Path) -> Path:
    """The tiny model's files with a config.json that embeds fewer tokens than its tokenizer has."""
    d = tmp_path / "small-vocab"
    shutil.copytree(tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = 200
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def rewriting_template_model(tiny: Path, tmp_path: Path) -> Path:
    """The tiny model with a chat template that drops <think>...</think> from earlier assistant turns
    (as Qwen3's does): not append-only."""
    d = tmp_path / "rewriting"
    shutil.copytree(tiny, d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    template = (
        "{% for m in messages %}{% set c = m['content'] %}"
        "{% if m['role'] == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}"
        "<|{{ m['role'] }}|>{{ c }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (d / "chat_template.jinja").unlink(missing_ok=True)
    tc["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return d


def edited_model(tiny: Path, tmp_path: Path, name: str, template: str | None = None, **files: dict) -> Path:
    """The tiny model's files with keys of its JSON files replaced (``config={...}``,
    ``tokenizer_config={...}``) and, when given, another chat template."""
    d = tmp_path / name
    shutil.copytree(tiny, d)
    for stem, changes in files.items():
        f = d / f"{stem}.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))
    if template is not None:
        (d / "chat_template.jinja").write_text(template)
    return d


def tp_on_gpus(tp: int) -> list[str]:
    """Overrides that run each engine with tensor parallelism ``tp`` on as many GPUs (a config
    the schema takes; preflight checks it against the model on a CPU machine too)."""
    sets = [
        f"rollout.tensor_parallel_size={tp}",
        f"cluster.num_gpus_per_rollout={tp}",
        "cluster.num_gpus_per_learner=1",
    ]
    return [a for s in sets for a in ("--set", s)]


# A chat template that, like Gemma's, refuses a system message.
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def two_argument_factory(row, difficulty):
    """Not an environment factory: it takes two arguments."""


def undocumented_tool(x: int) -> int:
    return x


def fake_checkpoint(tmp_path: Path, cfg_path: Path, **changed) -> None:
    """A checkpoint (state.json only) whose recorded config differs from cfg_path's by ``changed``."""
    saved = load_config(cfg_path).model_dump(mode="json")
    for dotted, value in changed.items():
        section, field = dotted.split(".")
        saved[section][field] = value
    save_checkpoint(tmp_path / "out" / "checkpoints", 2, {"step": 2, "config": saved}, {})


# name -> (argv after `grpo-dist`, or a case set up in the test; the fragment the one line must contain)
def cases(tmp_path: Path, tiny: Path) -> dict:
    port = closed_port()
    ok = write_config(tmp_path, tiny)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  path: m\nalgorithm: {beta: 0.1\n")
    return {
        "yaml syntax error": (
            ["run", str(bad_yaml)],
            f"config file {bad_yaml}: line 4, column 1: expected ',' or '}}'",
        ),
        "missing config file": (["run", str(tmp_path / "nope.yaml")], "config file not found"),
        "reward module that does not exist": (
            ["run", str(ok), "--set", "rewards.functions=[{name: 'nosuch.module:fn'}]"],
            "rewards.functions: reward function 'nosuch.module:fn': cannot import module 'nosuch.module'",
        ),
        "cluster address nothing listens on": (
            ["run", str(ok), "--set", f"cluster.address=127.0.0.1:{port}", "--set", "cluster.connect_timeout_s=3"],
            f"cluster.address='127.0.0.1:{port}': no Ray head answers there within 3s",
        ),
        "model directory without tokenizer files": (
            ["run", str(write_config(tmp_path, no_tokenizer_model(tiny, tmp_path), "no-tok.yaml"))],
            "has no tokenizer files",
        ),
        "model directory that does not exist": (
            ["run", str(ok), "--set", "model.path=/nonexistent/m"],
            "model.path='/nonexistent/m' does not exist",
        ),
        "prompt filter leaves less than one step": (
            ["run", str(ok), "--set", "data.max_prompt_length=3"],
            "data: synthetic split 'train' has 0 usable rows, fewer than the 4 needed: 50 of 50 rows dropped "
            "(prompt_too_long=50); raise data.max_prompt_length=3",
        ),
        "output directory below a file": (
            ["run", str(ok), "--set", f"trainer.output_dir={ok}/out"],
            f"trainer.output_dir='{ok}/out' cannot be created: {ok} is a file",
        ),
        "LoRA target modules the model does not have": (
            ["run", str(ok), "--set", "model.lora.target_modules=[q_proj, qkv_proj]"],
            "model.lora.target_modules: ['qkv_proj'] not in model.path=",
        ),
        "LoRA rank above what the engines serve": (
            ["run", str(ok), "--set", "model.lora.rank=64"],
            "model.lora.rank=64 is above rollout.max_lora_rank=16",
        ),
        "shared-prompt forward on a sliding-window model": (
            ["run", str(write_config(tmp_path, sliding_window_model(tiny, tmp_path, 32), "sliding.yaml"))],
            "learner.shared_prompt_forward (on by default) needs every layer to attend to every earlier token, but it "
            "attends over a sliding window of 32 tokens, shorter than its rows of up to 48; set "
            "learner.shared_prompt_forward=false",
        ),
        "multi-turn environment that does not import": (
            ["run", str(ok), "--set", "rollout.multi_turn.env=nosuch.envs:make"],
            "rollout.multi_turn: environment factory 'nosuch.envs:make': cannot import module 'nosuch.envs'",
        ),
        "multi-turn environment factory with the wrong signature": (
            ["run", str(ok), "--set", "rollout.multi_turn.env=tests.test_bad_input:two_argument_factory"],
            "must take one positional argument (the row dict)",
        ),
        "tool without a JSON schema": (
            ["run", str(ok), "--set", "rollout.multi_turn.tools=[tests.test_bad_input:undocumented_tool]"],
            "rollout.multi_turn: tool 'tests.test_bad_input:undocumented_tool'",
        ),
        "tools for a chat template that takes none": (
            ["run", str(ok), "--set", "rollout.multi_turn.tools=[grpo_dist.envs:calculator]"],
            "the chat template takes no tools= (SmolLM2's and the tiny model's do not); set "
            "rollout.multi_turn.tools_prompt=system",
        ),
        "chat template that rewrites earlier turns": (
            [
                "run",
                str(write_config(tmp_path, rewriting_template_model(tiny, tmp_path), "rewriting.yaml")),
                "--set",
                "rollout.multi_turn.env=grpo_dist.envs:make_retry_env",
            ],
            "the chat template cannot carry episodes token for token: model turn 2: the render of the conversation "
            "so far differs from the turn-by-turn transcript",
        ),
        "multi-turn limits beyond the context": (
            [
                "run",
                str(ok),
                "--set",
                "rollout.multi_turn.env=grpo_dist.envs:make_retry_env",
                "--set",
                "rollout.max_model_len=128",
            ],
            "rollout.max_model_len=128 is shorter than data.max_prompt_length + algorithm.max_completion_length + "
            "rollout.multi_turn.max_turns * rollout.multi_turn.max_env_tokens_per_turn = 1072",
        ),
        "a sequence-level ratio for CISPO": (
            [
                "run",
                str(ok),
                "--set",
                "algorithm.policy_loss=cispo",
                "--set",
                "algorithm.importance_sampling_level=sequence",
            ],
            "algorithm.importance_sampling_level=sequence with policy_loss=cispo",
        ),
        "the removed tis_cap": (
            ["run", str(ok), "--set", "algorithm.tis_cap=2"],
            "algorithm.tis_cap was replaced by algorithm.rollout_correction",
        ),
        "a context beyond the model's positions": (
            ["run", str(ok), "--set", "rollout.max_model_len=4096"],
            "rollout.max_model_len = 4096 is beyond the 2048 positions of model.path=",
        ),
        "tensor parallelism that does not divide the attention heads": (
            [
                "run",
                str(ok),
                "--set",
                "rollout.tensor_parallel_size=3",
                "--set",
                "cluster.num_gpus_per_rollout=3",
                "--set",
                "cluster.num_gpus_per_learner=1",
            ],
            "rollout.tensor_parallel_size=3 does not divide the 4 attention heads of model.path=",
        ),
        "a tokenizer larger than the model's vocabulary": (
            ["run", str(write_config(tmp_path, small_vocab_model(tiny, tmp_path), "small-vocab.yaml"))],
            "has 265 tokens but model.path=",
        ),
        "a model that ships its own code without trust_remote_code": (
            [
                "run",
                str(
                    write_config(
                        tmp_path,
                        edited_model(
                            tiny,
                            tmp_path,
                            "custom-code",
                            config={
                                "model_type": "tinycustom",
                                "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig"},
                            },
                        ),
                        "custom-code.yaml",
                    )
                ),
            ],
            "model.trust_remote_code=false but model.path=",
        ),
        "a context beyond the model's n_positions": (
            [
                "run",
                str(
                    write_config(
                        tmp_path, edited_model(tiny, tmp_path, "n-pos", config={"n_positions": 64}), "n-pos.yaml"
                    )
                ),
                "--set",
                "rollout.max_model_len=128",
            ],
            "rollout.max_model_len = 128 is beyond the 64 positions of model.path=",
        ),
        "tensor parallelism that splits the key/value heads unevenly": (
            [
                "run",
                str(
                    write_config(
                        tmp_path,
                        edited_model(
                            tiny, tmp_path, "kv-heads", config={"num_attention_heads": 12, "num_key_value_heads": 4}
                        ),
                        "kv-heads.yaml",
                    )
                ),
                *tp_on_gpus(6),
            ],
            "rollout.tensor_parallel_size=6 neither divides nor is a multiple of the 4 key/value heads of model.path=",
        ),
        "tensor parallelism that does not divide the MLP": (
            [
                "run",
                str(
                    write_config(
                        tmp_path, edited_model(tiny, tmp_path, "mlp", config={"intermediate_size": 513}), "mlp.yaml"
                    )
                ),
                *tp_on_gpus(2),
            ],
            "rollout.tensor_parallel_size=2 does not divide the 513 MLP channels of model.path=",
        ),
        "float16 for a model type vLLM refuses in float16": (
            [
                "run",
                str(
                    write_config(
                        tmp_path, edited_model(tiny, tmp_path, "gemma2", config={"model_type": "gemma2"}), "g.yaml"
                    )
                ),
                "--set",
                "model.dtype=float16",
            ],
            "is a 'gemma2' model (model_type in its config.json), which vLLM refuses to run in float16",
        ),
        "float16 on a CPU without float16": (
            ["run", str(ok), "--set", "model.dtype=float16"],
            "model.dtype=float16 but the learner runs on CPU",
        ),
        "LoRA on a module that is not a layer": (
            ["run", str(ok), "--set", "model.lora.target_modules=[q_proj, mlp]"],
            "model.lora.target_modules: 'mlp' (Qwen2MLP) in model.path=",
        ),
        "LoRA on the input embedding": (
            ["run", str(ok), "--set", "model.lora.target_modules=[q_proj, embed_tokens]"],
            "model.lora.target_modules: ['embed_tokens'] are embeddings in model.path=",
        ),
        "merged LoRA on a tied LM head": (
            ["run", str(ok), "--set", "model.lora={target_modules: [q_proj, lm_head], sync: merged}"],
            "model.lora.target_modules: 'lm_head' with model.lora.sync=merged, but model.path=",
        ),
        "gradient checkpointing on a model without it": (
            [
                "run",
                str(
                    write_config(
                        tmp_path, edited_model(tiny, tmp_path, "jetmoe", config={"model_type": "jetmoe"}), "jetmoe.yaml"
                    )
                ),
                "--set",
                "model.gradient_checkpointing=true",
                "--set",
                "learner.shared_prompt_forward=false",
            ],
            "(JetMoeForCausalLM) does not support it",
        ),
        "a system prompt the chat template refuses": (
            [
                "run",
                str(write_config(tmp_path, edited_model(tiny, tmp_path, "no-system", NO_SYSTEM_TEMPLATE), "ns.yaml")),
                "--set",
                "data.system_prompt=Be brief.",
            ],
            "data.system_prompt='Be brief.' but the chat template of the tokenizer at model.path=",
        ),
        "a tokenizer without a pad or eos token": (
            [
                "run",
                str(
                    write_config(
                        tmp_path,
                        edited_model(tiny, tmp_path, "no-pad", tokenizer_config={"pad_token": None, "eos_token": None}),
                        "no-pad.yaml",
                    )
                ),
            ],
            "has neither a pad token nor an eos token",
        ),
        "resume with another model": ("resume", "--resume from"),
        "output directory held by a running job": ("locked", "is in use by pid"),
        "scale to a cluster that is not there": (
            ["scale", "--workers", "3", "--address", f"127.0.0.1:{port}", "--connect-timeout", "3"],
            f"--address='127.0.0.1:{port}': no Ray head answers there",
        ),
        "submit to a dashboard that is not there": (
            [
                "submit",
                str(ROOT / "deploy" / "configs" / "gsm8k_qwen0.5b_gpu.yaml"),
                "--address",
                f"http://127.0.0.1:{port}",
            ],
            f"--address http://127.0.0.1:{port}: submitting the job failed",
        ),
    }


CASES = [
    "yaml syntax error",
    "missing config file",
    "reward module that does not exist",
    "cluster address nothing listens on",
    "model directory without tokenizer files",
    "model directory that does not exist",
    "prompt filter leaves less than one step",
    "output directory below a file",
    "LoRA target modules the model does not have",
    "LoRA rank above what the engines serve",
    "shared-prompt forward on a sliding-window model",
    "multi-turn environment that does not import",
    "multi-turn environment factory with the wrong signature",
    "tool without a JSON schema",
    "tools for a chat template that takes none",
    "chat template that rewrites earlier turns",
    "multi-turn limits beyond the context",
    "a sequence-level ratio for CISPO",
    "the removed tis_cap",
    "a context beyond the model's positions",
    "tensor parallelism that does not divide the attention heads",
    "a tokenizer larger than the model's vocabulary",
    "a model that ships its own code without trust_remote_code",
    "a context beyond the model's n_positions",
    "tensor parallelism that splits the key/value heads unevenly",
    "tensor parallelism that does not divide the MLP",
    "float16 for a model type vLLM refuses in float16",
    "float16 on a CPU without float16",
    "LoRA on a module that is not a layer",
    "LoRA on the input embedding",
    "merged LoRA on a tied LM head",
    "gradient checkpointing on a model without it",
    "a system prompt the chat template refuses",
    "a tokenizer without a pad or eos token",
    "resume with another model",
    "output directory held by a running job",
    "scale to a cluster that is not there",
    "submit to a dashboard that is not there",
]


def run_cli(argv: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "grpo_dist.cli", *argv],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=LIMIT_S + 60,
    )
    return out, time.monotonic() - t0


@pytest.mark.parametrize("name", CASES)
def test_bad_input_fails_in_one_line(name, tmp_path, tiny_model_dir):
    if name == "float16 on a CPU without float16" and (torch.cuda.is_available() or cpu_fp16_supported()):
        pytest.skip("this machine runs a float16 learner (CUDA, or oneDNN float16 on its CPU)")
    argv, fragment = cases(tmp_path, tiny_model_dir)[name]
    out_dir = tmp_path / "out"
    if argv == "resume":
        cfg = write_config(tmp_path, tiny_model_dir)
        fake_checkpoint(tmp_path, cfg, **{"model.path": "/models/another"})
        argv = ["run", str(cfg), "--resume"]
        fragment = "model.path: '/models/another' -> "
    elif argv == "locked":
        out_dir.mkdir()
        (out_dir / LOCK_NAME).write_text(
            json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job_id": None, "since": "now"})
        )
        argv = ["run", str(write_config(tmp_path, tiny_model_dir))]
    before = sorted(p.relative_to(out_dir) for p in out_dir.rglob("*")) if out_dir.exists() else None
    ray_before = ray_daemon_pids()

    out, seconds = run_cli(argv)

    said = [ln for ln in out.stderr.splitlines() if ln.startswith("grpo-dist:")]
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert len(said) == 1 and fragment in said[0], said or out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert seconds < LIMIT_S
    after = sorted(p.relative_to(out_dir) for p in out_dir.rglob("*")) if out_dir.exists() else None
    assert after == before, f"{name} wrote into the output directory: {after}"
    assert ray_daemon_pids() <= ray_before  # nothing was started


@pytest.mark.skipif(bool(ray_daemon_pids()), reason="a Ray cluster runs on this machine; 'auto' would find it")
def test_scale_with_no_job_running_is_one_line():
    out, seconds = run_cli(["scale", "--workers", "3"])
    said = [ln for ln in out.stderr.splitlines() if ln.startswith("grpo-dist:")]
    assert out.returncode == 2 and len(said) == 1 and "no running Ray cluster found" in said[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr and seconds < LIMIT_S
