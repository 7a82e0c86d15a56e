"""Group-relative advantages: one scalar per completion, from the rewards of its group.

Rows of one prompt are consecutive runs of ``group_size`` (``RolloutBatch`` guarantees it).
Missing rewards (NaN or inf: every reward function failed on that row) are left out of the
group statistics and get advantage 0; a group with fewer than 2 usable rewards has no baseline,
so all of its advantages are 0 and none of its rewards enter the ``batch`` std. Shape suffixes:
the legend in ``grpo_dist/losses.py``.

Estimators (``AlgoConfig.advantage``), all with the signature
``fn(rewards_UG, valid_UG, cfg) -> adv_UG`` (U groups of G; missing entries of ``rewards_UG``
are 0 and ``valid_UG`` is False there; every group has 0 or >= 2 valid rows; the caller
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


def _group_mean(rewards_UG: torch.Tensor, valid_UG: torch.Tensor) -> torch.Tensor:
    n_U1 = valid_UG.sum(dim=1, keepdim=True).clamp(min=1)
    return (rewards_UG * valid_UG).sum(dim=1, keepdim=True) / n_U1


def _unbiased_std(values: torch.Tensor, valid: torch.Tensor, dim: int | None) -> torch.Tensor:
    # Masked Bessel-corrected std; callers only use it where at least 2 values are valid.
    if dim is None:
        values, valid = values.reshape(-1), valid.reshape(-1)
        dim = 0
    n = valid.sum(dim=dim, keepdim=True)
    mean = (values * valid).sum(dim=dim, keepdim=True) / n.clamp(min=1)
    sq = (((values - mean) * valid) ** 2).sum(dim=dim, keepdim=True)
    return (sq / (n - 1).clamp(min=1)).sqrt()


def grpo_advantages(rewards_UG: torch.Tensor, valid_UG: torch.Tensor, cfg: AlgoConfig) -> torch.Tensor:
    centered_UG = rewards_UG - _group_mean(rewards_UG, valid_UG)
    if cfg.scale_rewards == "none":
        return centered_UG
    if cfg.scale_rewards == "group":
        std = _unbiased_std(rewards_UG, valid_UG, dim=1)
    else:  # batch
        std = _unbiased_std(rewards_UG, valid_UG, dim=None)
    return centered_UG / (std + cfg.adv_eps)


def rloo_advantages(rewards_UG: torch.Tensor, valid_UG: torch.Tensor, cfg: AlgoConfig) -> torch.Tensor:
    n_U1 = valid_UG.sum(dim=1, keepdim=True)
    sum_U1 = (rewards_UG * valid_UG).sum(dim=1, keepdim=True)
    baseline_UG = (sum_U1 - rewards_UG) / (n_U1 - 1).clamp(min=1)
    return rewards_UG - baseline_UG


def softmax_advantages(rewards_UG: torch.Tensor, valid_UG: torch.Tensor, cfg: AlgoConfig) -> torch.Tensor:
    logits_UG = (rewards_UG / cfg.softmax_temperature).masked_fill(~valid_UG, float("-inf"))
    # A group with no valid row would give NaN here; such groups are zeroed by the caller.
    return torch.softmax(logits_UG, dim=1).nan_to_num(0.0)


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
    r_UG = rewards_B.to(torch.float64).view(-1, group_size)
    finite_UG = torch.isfinite(r_UG)
    # Rows of a group with < 2 usable rewards are treated as missing too (no baseline exists).
    valid_UG = finite_UG & (finite_UG.sum(dim=1, keepdim=True) >= 2)
    r_UG = r_UG.masked_fill(~valid_UG, 0.0)
    adv_UG = ADVANTAGES[cfg.advantage](r_UG, valid_UG, cfg)
    adv_UG = torch.where(valid_UG, adv_UG, torch.zeros_like(adv_UG))
    return adv_UG.reshape(-1).to(torch.float32)
