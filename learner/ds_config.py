"""Pure arithmetic of the learner: DeepSpeed config, LR schedule, batch splitting.

Nothing here imports deepspeed or ray, so all of it is unit-tested directly.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from grpo_dist.config import LearnerConfig, ModelConfig
from grpo_dist.config import resolve_dtype as config_resolve_dtype  # the shared rule; this module's returns torch


def resolve_dtype(model_cfg: ModelConfig, cuda: bool) -> torch.dtype:
    """The training dtype: `grpo_dist.config.resolve_dtype`'s rule, as a torch dtype."""
    return getattr(torch, config_resolve_dtype(model_cfg.dtype, cuda))


def grad_accum_steps(rows: int, world_size: int, micro_batch_size: int, optimizer_steps: int) -> int:
    """Micro-batches per rank per optimizer step for a rollout batch of ``rows`` rows."""
    per = world_size * micro_batch_size * optimizer_steps
    if rows <= 0 or rows % per:
        raise ValueError(
            f"a batch of {rows} rows cannot be split into learner.num_ranks={world_size} x "
            f"learner.micro_batch_size={micro_batch_size} x learner.optimizer_steps_per_batch={optimizer_steps} "
            f"(= {per}) equal parts"
        )
    return rows // per


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """LR factor for optimizer step ``step`` (0-based): linear warmup, then constant/cosine/linear to 0.

    ``step`` counts optimizer steps already taken, so the first update uses ``lr_multiplier(0, ...)``.
    Warmup reaches the full LR at ``step == warmup_steps`` and starts at 1/(warmup_steps+1), never 0,
    so no update is wasted.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown learner.lr_schedule {schedule!r} (constant, cosine, linear)")


def build_ds_config(
    learner_cfg: LearnerConfig,
    dtype: torch.dtype,
    world_size: int,
    gradient_accumulation_steps: int,
) -> dict[str, Any]:
    """The DeepSpeed config of the policy engine.

    The LR schedule is not in here: DeepSpeed's WarmupLR family forces at least 2 warmup steps
    starting from ``warmup_min_lr``, so the learner passes a LambdaLR over ``lr_multiplier``
    instead (DeepSpeed still steps and checkpoints it).
    """
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    micro = learner_cfg.micro_batch_size
    zero: dict[str, Any] = {"stage": learner_cfg.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if learner_cfg.zero_stage == 3:
        # Weight broadcast and HF save gather parameters explicitly, bucket by bucket.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_batch_size": micro * gradient_accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": learner_cfg.max_grad_norm,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": learner_cfg.lr,
                "betas": list(learner_cfg.adam_betas),
                "eps": learner_cfg.adam_eps,
                "weight_decay": learner_cfg.weight_decay,
                # torch.optim.AdamW: no op compilation, identical math on CPU and CUDA.
                "torch_adam": True,
            },
        },
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def ref_ds_config(zero_stage: int, dtype: torch.dtype, micro_batch_size: int, world_size: int) -> dict[str, Any]:
    """Inference-only engine for the frozen reference under ZeRO-3 (partitioned like the policy)."""
    return {
        "train_batch_size": micro_batch_size * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,
    }
