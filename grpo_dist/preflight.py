"""Checks that need the file system or the device, run before any cluster resource is touched.

The schema (``grpo_dist.config``) checks shapes and arithmetic; this checks the world: that the
model exists and that this vLLM build can serve it. Each failure names the config field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from grpo_dist.config import Config, ConfigError

# vLLM's CPU attention backend only has kernels for these head sizes.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(text: str) -> bool:
    """``owner/name`` that is not meant as a local path (``runs/x``, ``./x`` and ``/x`` are)."""
    return bool(_HF_REPO_ID.match(text)) and not text.startswith(("runs/", "./", "../", "/"))


def model_head_dim(model_dir: Path) -> int | None:
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        return None
    c = json.loads(cfg_file.read_text())
    if c.get("head_dim"):
        return int(c["head_dim"])
    if c.get("hidden_size") and c.get("num_attention_heads"):
        return int(c["hidden_size"]) // int(c["num_attention_heads"])
    return None


def preflight(cfg: Config, cuda: bool) -> list[str]:
    """Raise ConfigError listing every problem; return notes (e.g. what was assumed)."""
    problems: list[str] = []
    notes: list[str] = []
    path = Path(cfg.model.path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            problems.append(f"model.path={cfg.model.path!r} is a directory without config.json")
        elif not cuda:
            hd = model_head_dim(path)
            if hd is not None and hd not in VLLM_CPU_HEAD_SIZES and hd < 128:
                problems.append(
                    f"model.path={cfg.model.path!r} has head_dim {hd}; vLLM-CPU supports {list(VLLM_CPU_HEAD_SIZES)}"
                )
    elif is_hub_id(cfg.model.path):
        notes.append(f"model.path={cfg.model.path!r} is not a local directory; it is resolved as a hub id on the cluster")
    else:
        problems.append(f"model.path={cfg.model.path!r} does not exist (run `grpo-dist make-tiny-model --out ...`?)")
    if cfg.model.tokenizer_path and not Path(cfg.model.tokenizer_path).is_dir() and not is_hub_id(
        cfg.model.tokenizer_path
    ):
        problems.append(f"model.tokenizer_path={cfg.model.tokenizer_path!r} does not exist")
    if not cuda:
        if cfg.rollout.enable_sleep_mode:
            problems.append("rollout.enable_sleep_mode=true: vLLM sleep mode is refused on CPU")
        if cfg.cluster.num_gpus_per_rollout or cfg.cluster.num_gpus_per_learner:
            notes.append("GPUs requested per actor but this machine has no CUDA: the cluster must provide them")
    if cfg.data.source in ("gsm8k", "hf") and cfg.data.path and not Path(cfg.data.path).exists():
        if cfg.data.source == "hf" and is_hub_id(cfg.data.path):
            notes.append(f"data.path={cfg.data.path!r} is not a local path; it is loaded from the hub")
        else:
            problems.append(f"data.path={cfg.data.path!r} does not exist")
    if problems:
        raise ConfigError("config rejected before launch:\n" + "\n".join(f"  {p}" for p in problems))
    return notes
