"""Torch-only pieces of the learner's train step: micro-batch slicing, metric packing for one
all-reduce, and the reference-model refresh. No ray/deepspeed, so they are unit-tested."""

from __future__ import annotations

import torch

from grpo_dist.losses import merge_metrics

# Token-weighted metrics of grpo_loss plus the policy entropy and the learner/engine log-prob gap;
# order fixes the packed layout.
METRIC_KEYS = ("kl", "ratio", "clip_low", "clip_high", "clip_region", "tis", "entropy", "sampler_gap")


def rank_rows(lengths: list[int], world_size: int, num_minibatches: int) -> list[list[int]]:
    """Row indices each data-parallel rank trains on, in its training order.

    The batch is cut into ``num_minibatches`` contiguous mini-batches (one optimizer step each).
    Inside each, rows are dealt to ranks in equal counts (gradient accumulation needs the same
    number of micro-batches on every rank) and near-equal token totals (every all-reduce waits
    for the slowest rank): longest row first, each to the rank with the fewest tokens that still
    has room. A rank's share stays longest-first, so consecutive rows -- its micro-batches --
    have similar lengths and padding each micro-batch to its own longest row wastes little.
    The loss is normalised by mini-batch totals, so any such split gives the same update.
    """
    n = len(lengths)
    if world_size < 1 or num_minibatches < 1 or n % (world_size * num_minibatches):
        raise ValueError(f"{n} rows cannot be split into {num_minibatches} mini-batches over {world_size} ranks")
    per_rank = n // (world_size * num_minibatches)
    out: list[list[int]] = [[] for _ in range(world_size)]
    mini = n // num_minibatches
    for start in range(0, n, mini):
        rows = sorted(range(start, start + mini), key=lambda i: (-lengths[i], i))
        share: list[list[int]] = [[] for _ in range(world_size)]
        tokens = [0] * world_size
        for i in rows:
            r = min((r for r in range(world_size) if len(share[r]) < per_rank), key=lambda r: (tokens[r], r))
            share[r].append(i)
            tokens[r] += lengths[i]
        for r in range(world_size):
            out[r] += share[r]
    return out


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
