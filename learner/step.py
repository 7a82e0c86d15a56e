"""Torch-only pieces of the learner's train step: micro-batch slicing, metric packing for one
all-reduce, and the reference-model refresh. No ray/deepspeed, so they are unit-tested."""

from __future__ import annotations

import torch

from grpo_dist.losses import merge_metrics

# Token-weighted metrics of grpo_loss plus the policy entropy; order fixes the packed layout.
METRIC_KEYS = ("kl", "ratio", "clip_low", "clip_high", "clip_region", "tis", "entropy")


def micro_slices(start: int, micro_batch_size: int, count: int) -> list[slice]:
    """``count`` consecutive row slices of ``micro_batch_size`` rows from ``start``."""
    return [slice(start + j * micro_batch_size, start + (j + 1) * micro_batch_size) for j in range(count)]


def pack_metrics(per_micro: list[dict[str, torch.Tensor | float]], loss_sum: float) -> torch.Tensor:
    """One float64 vector ``[sum(value * tokens) per METRIC_KEYS..., tokens, loss_sum]``: summing
    it over ranks and unpacking gives token-weighted means over every rank's tokens."""
    merged = merge_metrics(per_micro)
    tokens = merged["num_tokens"]
    return torch.tensor([merged[k] * tokens for k in METRIC_KEYS] + [tokens, loss_sum], dtype=torch.float64)


def unpack_metrics(vec: torch.Tensor, num_optimizer_steps: int) -> dict[str, float]:
    """Inverse of ``pack_metrics`` after the rank sum; ``loss`` is the mean mini-batch loss
    (each micro-batch loss is already normalised by its mini-batch's totals)."""
    vals = vec.tolist()
    tokens = vals[len(METRIC_KEYS)]
    out = {k: v / max(tokens, 1.0) for k, v in zip(METRIC_KEYS, vals)}
    out["loss"] = vals[len(METRIC_KEYS) + 1] / num_optimizer_steps
    return out


@torch.no_grad()
def lerp_(dst: list[torch.Tensor], src: list[torch.Tensor], alpha: float) -> None:
    """``dst <- alpha * src + (1 - alpha) * dst`` in place (TRL's sync_ref_model).

    Works on ZeRO-3 shards too: policy and reference are partitioned identically, so each
    rank updates its own shard without communication."""
    if len(dst) != len(src):
        raise ValueError(f"reference has {len(dst)} parameters, policy {len(src)}")
    for i, (d, s) in enumerate(zip(dst, src)):
        if d.shape != s.shape:
            raise ValueError(f"parameter {i}: reference part {tuple(d.shape)} != policy part {tuple(s.shape)}")
        d.lerp_(s.to(d.dtype), alpha)
