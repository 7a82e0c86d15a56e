"""Group-relative advantages: one scalar per completion, from the rewards of its group.

Rows of one prompt are consecutive runs of ``group_size`` (``RolloutBatch`` guarantees it).
Missing rewards (NaN or inf: every reward function failed on that row) are left out of the
group statistics and get advantage 0; a group with fewer than 2 usable rewards has no baseline,
so all of its advantages are 0 and none of its rewards enter the ``batch`` std.

Estimators (``AlgoConfig.advantage``), all with the signature
``fn(rewards_NG, valid_NG, cfg) -> adv_NG`` (N groups of G; missing entries of ``rewards_NG``
are 0 and ``valid_NG`` is False there; every group has 0 or >= 2 valid rows; the caller
zeroes the invalid rows):

- ``grpo``: ``(r - mean_g) / (std + adv_eps)`` with the unbiased std (TRL). ``scale_rewards``:
  ``group`` = the group's std, ``batch`` = std of every usable reward in the batch, ``none`` =
  no division (Dr. GRPO).
- ``rloo``: ``r_i - mean of the other usable rewards of the group`` (no std scaling).
- ``softmax``: seed 003's weights, ``softmax(r / softmax_temperature)`` over the group's usable
  rewards, used as the advantages as-is (non-negative, summing to 1 per group). On-policy with
  ``loss_type="grpo"`` the policy gradient is then
  ``(1 / (num_groups * G)) * sum_groups grad[-sum_i w_i * mean_t log pi(y_i,t)]``: seed 003's
  weighted log-likelihood loss (its ``cross_entropy`` is a per-token mean) averaged over
  groups and divided by G.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from grpo_dist.config import AlgoConfig


def _group_mean(rewards_NG: torch.Tensor, valid_NG: torch.Tensor) -> torch.Tensor:
    n_N1 = valid_NG.sum(dim=1, keepdim=True).clamp(min=1)
    return (rewards_NG * valid_NG).sum(dim=1, keepdim=True) / n_N1


def _unbiased_std(values: torch.Tensor, valid: torch.Tensor, dim: int | None) -> torch.Tensor:
    # Masked Bessel-corrected std; callers only use it where at least 2 values are valid.
    if dim is None:
        values, valid = values.reshape(-1), valid.reshape(-1)
        dim = 0
    n = valid.sum(dim=dim, keepdim=True)
    mean = (values * valid).sum(dim=dim, keepdim=True) / n.clamp(min=1)
    sq = (((values - mean) * valid) ** 2).sum(dim=dim, keepdim=True)
    return (sq / (n - 1).clamp(min=1)).sqrt()


def grpo_advantages(rewards_NG: torch.Tensor, valid_NG: torch.Tensor, cfg: AlgoConfig) -> torch.Tensor:
    centered_NG = rewards_NG - _group_mean(rewards_NG, valid_NG)
    if cfg.scale_rewards == "none":
        return centered_NG
    if cfg.scale_rewards == "group":
        std = _unbiased_std(rewards_NG, valid_NG, dim=1)
    else:  # batch
        std = _unbiased_std(rewards_NG, valid_NG, dim=None)
    return centered_NG / (std + cfg.adv_eps)


def rloo_advantages(rewards_NG: torch.Tensor, valid_NG: torch.Tensor, cfg: AlgoConfig) -> torch.Tensor:
    n_N1 = valid_NG.sum(dim=1, keepdim=True)
    sum_N1 = (rewards_NG * valid_NG).sum(dim=1, keepdim=True)
    baseline_NG = (sum_N1 - rewards_NG) / (n_N1 - 1).clamp(min=1)
    return rewards_NG - baseline_NG


def softmax_advantages(rewards_NG: torch.Tensor, valid_NG: torch.Tensor, cfg: AlgoConfig) -> torch.Tensor:
    logits_NG = (rewards_NG / cfg.softmax_temperature).masked_fill(~valid_NG, float("-inf"))
    # A group with no valid row would give NaN here; such groups are zeroed by the caller.
    return torch.softmax(logits_NG, dim=1).nan_to_num(0.0)


ADVANTAGES: dict[str, Callable[[torch.Tensor, torch.Tensor, AlgoConfig], torch.Tensor]] = {
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
    "softmax": softmax_advantages,
}


def compute_advantages(rewards_B: torch.Tensor, group_size: int, cfg: AlgoConfig) -> torch.Tensor:
    """Advantages ``adv_B`` (float32, on ``rewards_B``'s device) for consecutive groups of ``group_size``."""
    rewards_B = torch.as_tensor(rewards_B)
    if rewards_B.dim() != 1:
        raise ValueError(f"rewards_B must be 1-D, got shape {tuple(rewards_B.shape)}")
    if group_size < 1 or rewards_B.numel() % group_size:
        raise ValueError(f"{rewards_B.numel()} rewards cannot be split into groups of group_size={group_size}")
    if cfg.advantage not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {cfg.advantage!r}; known: {sorted(ADVANTAGES)}")
    # float64 so hand-worked values hold to tight tolerances whatever the input dtype.
    r_NG = rewards_B.to(torch.float64).view(-1, group_size)
    finite_NG = torch.isfinite(r_NG)
    # Rows of a group with < 2 usable rewards are treated as missing too (no baseline exists).
    valid_NG = finite_NG & (finite_NG.sum(dim=1, keepdim=True) >= 2)
    r_NG = r_NG.masked_fill(~valid_NG, 0.0)
    adv_NG = ADVANTAGES[cfg.advantage](r_NG, valid_NG, cfg)
    adv_NG = torch.where(valid_NG, adv_NG, torch.zeros_like(adv_NG))
    return adv_NG.reshape(-1).to(torch.float32)
