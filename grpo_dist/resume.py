"""What ``--resume`` changes: the fields that differ from the checkpoint's config, checked before
any actor starts. Changes that cannot work are refused, naming the field; the rest are listed and
allowed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grpo_dist.checkpoint import latest_checkpoint
from grpo_dist.config import Config
from grpo_dist.errors import UserError, one_line

# The DeepSpeed state (partitioned optimizer, per-rank files) and the reference model are tied to
# these; a different value cannot load the checkpoint, or would silently train something else.
REFUSED = {
    "model.path": "the reference model and the architecture come from it",
    "model.tokenizer_path": "token ids would change meaning",
    "model.dtype": "the saved weights and optimizer state have the checkpoint's dtype",
    "learner.num_ranks": "the DeepSpeed checkpoint holds one optimizer partition per rank",
    "learner.zero_stage": "the DeepSpeed optimizer state of one ZeRO stage cannot be read by another",
    "model.lora": "the checkpoint holds the parameters and optimizer state of a full fine-tune or of an adapter",
    "model.lora.rank": "the adapter's shapes come from it",
    "model.lora.target_modules": "the adapter's layers come from it",
    "model.lora.alpha": "it scales the saved adapter's update: the policy would change",
}
# Fields of the model's config.json that define the architecture.
ARCH_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "intermediate_size",
    "tie_word_embeddings",
)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict[str, Any], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """``{field: (checkpoint's value, this run's value)}`` for every field that differs."""
    old, new = _flat(saved), _flat(cfg.model_dump(mode="json"))
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def _arch(model_dir: Path) -> dict[str, Any] | None:
    f = model_dir / "config.json"
    return {k: v for k, v in json.loads(f.read_text()).items() if k in ARCH_KEYS} if f.is_file() else None


def check_resume(cfg: Config) -> list[str]:
    """Notes on what this resume changes; UserError for changes that cannot work."""
    path = latest_checkpoint(cfg.checkpoint_dir)
    if path is None:
        return [f"--resume: no checkpoint under {cfg.checkpoint_dir}; starting from scratch"]
    saved = json.loads((path / "state.json").read_text()).get("config")
    if saved is None:
        return [f"--resume from {path}: the checkpoint records no config, so changes cannot be listed"]
    changes = config_changes(saved, cfg)
    refused = [f"{k}: {old!r} -> {new!r} ({REFUSED[k]})" for k, (old, new) in changes.items() if k in REFUSED]
    arch_then, arch_now = _arch(path / "policy"), _arch(Path(cfg.model.path))
    if arch_then and arch_now and arch_then != arch_now:
        diff = {k: (arch_then.get(k), arch_now.get(k)) for k in ARCH_KEYS if arch_then.get(k) != arch_now.get(k)}
        refused.append(f"model.path={cfg.model.path!r} has another architecture than the checkpoint ({diff})")
    if refused:
        raise UserError(
            f"--resume from {path} refused: "
            + one_line(refused)
            + "; start a new run (another trainer.output_dir) or restore these values"
        )
    return [f"--resume from {path}: {k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()]
