"""Loss parity with TRL: grpo-dist's pure loss functions against TRL 1.16.0's own code, on fixed
float64 tensors, loss value and gradient.

TRL is a benchmark-only dependency (the ``bench`` extra), installed beside the project's pins
without touching them (its other requirements are already in the venv):

    .venv/bin/pip install --no-deps trl==1.16.0

Run from the repo root (no model, no Ray, no vLLM engine; ~10 s on CPU, mostly importing TRL):

    .venv/bin/python bench/trl_loss_parity.py [--tol 1e-6] [--seed 0]

What is compared, on ``B=4`` rows of ``T=6`` completion tokens (row lengths 2, 6, 4, 5), log-probs
around -1..-3, old log-probs off by ~0.3 (one ratio above 5), advantages of both signs and engine
log-probs off by ~0.2 with a few larger gaps (so every correction bound is hit):

- the loss: ``grpo_dist.losses.grpo_loss`` against ``GRPOTrainer._compute_loss``, run on a trainer
  made without ``__init__`` whose model forward is replaced by the fixed ``logp_BT`` (a float64
  leaf), for GRPO, GSPO, DAPO, CISPO, SAPO, BNPO, Dr. GRPO, the KL term and the entropy bonus;
  both sides use local counts (TRL's ``num_items_in_batch`` is this batch's mask sum);
- the rollout correction: ``grpo_dist.losses.rollout_correction_weights`` against the block of
  ``GRPOTrainer._generate_and_score_completions`` that computes ``importance_sampling_ratio``
  (TRL has no function for it, so that block's own source is extracted and executed), for
  ``token_truncate``, ``token_mask``, ``sequence_truncate`` and ``sequence_mask``; then the full
  loss with that ratio (TRL) and with ``rollout_correction`` set (grpo-dist).

A case passes when ``|loss diff| <= tol * max(1, |TRL loss|)`` and
``max |grad diff| <= tol * max(1, max |TRL grad|)`` (weights: ``max |w diff| <= tol * max(1, max
|TRL w|)``); the table prints the absolute differences. Exit code 1 if any case fails.

Deliberately not compared (no counterpart on the other side, or a documented difference):
TRL's default ``use_bias_correction_kl=True`` multiplies the KL term by the ratio, grpo-dist's KL
is not reweighted, so TRL runs with it off here; TRL's entropy bonus is a token mean under every
``loss_type`` while grpo-dist aggregates it like the loss, so only ``bnpo`` (where both are the
token mean) is compared; grpo-dist's ``clip_ratio_c`` and ``geometric`` correction, TRL's
``delta``, ``luspo``, ``vespo``, off-policy masking and top-entropy masking have no counterpart.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import textwrap
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from grpo_dist.config import AlgoConfig, RolloutCorrectionConfig
from grpo_dist.losses import grpo_loss, rollout_correction_weights

TRL_VERSION = "1.16.0"
B, T = 4, 6
LENGTHS = (2, 6, 4, 5)
MAX_COMPLETION_LENGTH = 8  # > T, so dr_grpo's constant is not confused with the padded width
BETA = 0.04
IS_BLOCK_START = "if self.use_vllm and self.vllm_importance_sampling_correction:"
IS_BLOCK_END = "# Compute the per-token log probabilities for the reference model"


def import_trl():
    try:
        # Importing TRL probes vLLM and warns that 0.32 is newer than it supports; this script
        # never uses vLLM, so the warning is noise here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            import trl
            from trl.trainer.grpo_trainer import GRPOTrainer
    except ImportError as e:
        sys.exit(f"TRL is not installed ({e}); install it with: .venv/bin/pip install --no-deps trl=={TRL_VERSION}")
    if trl.__version__ != TRL_VERSION:
        print(f"note: TRL {trl.__version__} installed, this script was written against {TRL_VERSION}")
    return trl.__version__, GRPOTrainer


# ---------------------------------------------------------------- test tensors


def make_tensors(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64)

    mask = (torch.arange(T) < torch.tensor(LENGTHS).unsqueeze(1)).to(torch.float64)
    logp = -1 - 2 * torch.rand(B, T, dtype=torch.float64)
    old = logp + 0.3 * randn(B, T)
    old[1, 2] = logp[1, 2] - 1.8  # ratio e^1.8 ~ 6 with A > 0: above CISPO's cap of 5
    ref = logp + 0.1 * randn(B, T)
    samp = old + 0.2 * randn(B, T)
    # Larger engine gaps, so that each correction bound truncates or masks something:
    samp[0] += 0.5  # row 0: sequence weight ~ e^-1 < 0.5
    samp[3] -= 0.5  # row 3: sequence weight ~ e^2.5 > 3
    samp[2, 1] = old[2, 1] - 1.3  # token weight e^1.3 > 3
    samp[1, 3] = old[1, 3] + 0.9  # token weight e^-0.9 < 0.5
    return {
        "logp": logp,
        "old": old,
        "ref": ref,
        "samp": samp,
        "ent": 2 * torch.rand(B, T, dtype=torch.float64),
        "adv": torch.tensor([0.9, 1.3, -0.7, -1.1], dtype=torch.float64),
        "mask": mask,
    }


# ---------------------------------------------------------------- TRL side


class _Accelerator:
    """Single process: every collective is the identity."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def trl_trainer(GRPOTrainer, spec: Case, logp: torch.Tensor, ent: torch.Tensor):
    """A GRPOTrainer with only the attributes ``_compute_loss`` reads; its forward returns ``logp``."""
    t = object.__new__(GRPOTrainer)  # __init__ would load a model and build a vLLM/generation stack
    t.loss_type = spec.trl_loss_type
    t.importance_sampling_level = spec.algo.get("importance_sampling_level", "token")
    t.epsilon_low = spec.algo.get("epsilon_low", 0.2)
    # Under loss_type="cispo", TRL's epsilon_high is CISPO's cap (grpo-dist's cispo_max_ratio).
    t.epsilon_high = (
        spec.algo.get("cispo_max_ratio", 5.0) if spec.trl_loss_type == "cispo" else spec.algo.get("epsilon_high", 0.2)
    )
    t.beta = spec.algo.get("beta", 0.0)
    t.top_entropy_quantile = 1.0
    t.off_policy_mask_threshold = None
    t.use_vllm = spec.trl_is_mode is not None
    t.vllm_importance_sampling_correction = spec.trl_is_mode is not None
    t.max_completion_length = MAX_COMPLETION_LENGTH
    t.current_gradient_accumulation_steps = 1
    t.accelerator = _Accelerator()
    t.args = SimpleNamespace(
        delta=None,
        # TRL 1.16's default (True) multiplies the KL by the ratio; grpo-dist's KL is not reweighted.
        use_bias_correction_kl=False,
        sapo_temperature_pos=spec.algo.get("sapo_temperature_pos", 1.0),
        sapo_temperature_neg=spec.algo.get("sapo_temperature_neg", 1.05),
        steps_per_generation=1,
        entropy_target=0.0,
    )
    t._metrics = defaultdict(lambda: defaultdict(list))
    t.model = SimpleNamespace(training=True)
    t.entropy_coef = spec.algo.get("entropy_coef", 0.0)
    t._entropy_bonus_enabled = t.entropy_coef != 0.0
    t.use_adaptive_entropy = False
    t.aux_loss_enabled = False
    t._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logp, ent, None)
    return t


def trl_is_block(GRPOTrainer, version: str) -> str:
    """Source of the block of ``_generate_and_score_completions`` that computes TRL's
    ``vllm_importance_sampling_ratio`` (dedented): run as is, so it is TRL's code that is compared."""
    lines = inspect.getsource(GRPOTrainer._generate_and_score_completions).splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == IS_BLOCK_START]
    for s in starts:
        ends = [j for j in range(s + 1, len(lines)) if lines[j].strip() == IS_BLOCK_END]
        if ends and any("per_token_logps_diff" in line for line in lines[s : ends[0]]):
            block = textwrap.dedent("\n".join(lines[s : ends[0]]))
            if "vllm_importance_sampling_ratio" in block:
                return block
    raise SystemExit(
        f"could not find TRL {version}'s importance-sampling-ratio block in "
        f"GRPOTrainer._generate_and_score_completions (from {IS_BLOCK_START!r} computing per_token_logps_diff "
        f"to {IS_BLOCK_END!r}); this script was written against TRL {TRL_VERSION}"
    )


def trl_is_ratio(block: str, mode: str, clip_min, clip_max, x: dict[str, torch.Tensor]) -> torch.Tensor:
    self = SimpleNamespace(
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=clip_min,
        vllm_importance_sampling_clip_max=clip_max,
    )
    ns = {
        "self": self,
        "completion_mask": x["mask"],
        "tool_mask": None,
        "old_per_token_logps": x["old"],
        "sampling_per_token_logps": x["samp"],
        "torch": torch,
        "math": math,
    }
    exec(block, ns)
    return ns["vllm_importance_sampling_ratio"]


# ---------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    trl_loss_type: str
    algo: dict[str, Any] = field(default_factory=dict)  # AlgoConfig fields (grpo-dist names)
    rc: dict[str, Any] | None = None  # RolloutCorrectionConfig fields
    trl_is_mode: str | None = None  # TRL's vllm_importance_sampling_mode for rc


# (name, TRL mode, grpo-dist rollout_correction); each bound is hit by the test tensors.
CORRECTIONS = [
    ("token_truncate max 3", "token_truncate", {"level": "token", "mode": "truncate", "max": 3.0}),
    ("token_truncate [0.5, 3]", "token_truncate", {"level": "token", "mode": "truncate", "min": 0.5, "max": 3.0}),
    ("token_mask [0.5, 3]", "token_mask", {"level": "token", "mode": "mask", "min": 0.5, "max": 3.0}),
    ("sequence_truncate max 3", "sequence_truncate", {"level": "sequence", "mode": "truncate", "max": 3.0}),
    ("sequence_mask [0.5, 3]", "sequence_mask", {"level": "sequence", "mode": "mask", "min": 0.5, "max": 3.0}),
]

LOSS_CASES = [
    Case("GRPO (clip, token, grpo)", "grpo", {"loss_type": "grpo"}),
    Case("GRPO + KL k3, beta 0.04", "grpo", {"loss_type": "grpo", "beta": BETA}),
    Case("GSPO (clip, sequence, grpo)", "grpo", {"loss_type": "grpo", "importance_sampling_level": "sequence"}),
    Case(
        "GSPO eps 3e-4/4e-4, dr_grpo",
        "dr_grpo",
        {"loss_type": "dr_grpo", "importance_sampling_level": "sequence", "epsilon_low": 3e-4, "epsilon_high": 4e-4},
    ),
    Case("DAPO (clip 0.2/0.28, dapo)", "dapo", {"loss_type": "dapo", "epsilon_high": 0.28}),
    Case("CISPO (cap 5, dapo)", "cispo", {"policy_loss": "cispo", "loss_type": "dapo", "cispo_max_ratio": 5.0}),
    Case("SAPO (tau 1.0/1.05, grpo)", "sapo", {"policy_loss": "sapo", "loss_type": "grpo"}),
    Case("BNPO (clip, token, bnpo)", "bnpo", {"loss_type": "bnpo"}),
    Case("Dr. GRPO (clip, token, dr_grpo)", "dr_grpo", {"loss_type": "dr_grpo"}),
    Case("BNPO + entropy bonus 0.01", "bnpo", {"loss_type": "bnpo", "entropy_coef": 0.01}),
] + [
    Case(f"GRPO + KL + {name}", "grpo", {"loss_type": "grpo", "beta": BETA}, rc, mode) for name, mode, rc in CORRECTIONS
]


def _grad(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x) if x.grad is None else x.grad


def run_loss_case(GRPOTrainer, block: str, case: Case, x: dict[str, torch.Tensor]):
    """``(|loss diff|, max |grad diff|, TRL loss, max |TRL grad|)``; gradients w.r.t. logp and entropy."""
    beta = case.algo.get("beta", 0.0)
    inputs = {
        "prompt_ids": torch.zeros(B, 3, dtype=torch.long),
        "prompt_mask": torch.ones(B, 3, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": x["mask"],
        "advantages": x["adv"],
        "old_per_token_logps": x["old"],
        "num_items_in_batch": x["mask"].sum(),
    }
    if beta != 0:
        inputs["ref_per_token_logps"] = x["ref"]
    if case.trl_is_mode is not None:
        rc = case.rc or {}
        inputs["importance_sampling_ratio"] = trl_is_ratio(block, case.trl_is_mode, rc.get("min"), rc.get("max"), x)

    logp_t, ent_t = x["logp"].clone().requires_grad_(), x["ent"].clone().requires_grad_()
    loss_t = trl_trainer(GRPOTrainer, case, logp_t, ent_t)._compute_loss(None, inputs)
    loss_t.backward()

    cfg = AlgoConfig(
        max_completion_length=MAX_COMPLETION_LENGTH,
        beta=beta,
        rollout_correction=case.rc,
        **{k: v for k, v in case.algo.items() if k != "beta"},
    )
    logp_g, ent_g = x["logp"].clone().requires_grad_(), x["ent"].clone().requires_grad_()
    loss_g, _ = grpo_loss(
        logp_g,
        x["old"],
        x["ref"] if beta != 0 else None,
        x["adv"],
        x["mask"],
        cfg,
        sampling_logp_BT=x["samp"] if case.rc is not None else None,
        ent_BT=ent_g if cfg.entropy_coef != 0 else None,
    )
    loss_g.backward()

    grad_t = torch.cat([_grad(logp_t), _grad(ent_t)])
    grad_g = torch.cat([_grad(logp_g), _grad(ent_g)])
    return (
        abs(loss_g.item() - loss_t.item()),
        (grad_g - grad_t).abs().max().item(),
        loss_t.item(),
        grad_t.abs().max().item(),
    )


def run_weight_case(block: str, mode: str, rc: dict[str, Any], x: dict[str, torch.Tensor]):
    """``(max |w diff|, max |TRL w|, how many weights the bound changed)`` on the model tokens."""
    w_t = trl_is_ratio(block, mode, rc.get("min"), rc.get("max"), x).expand(B, T)
    w_g, _ = rollout_correction_weights(x["old"], x["samp"], x["mask"], RolloutCorrectionConfig(**rc))
    # The unbounded weights, to count what the bound changed: a bound that changes nothing tests nothing.
    raw = rollout_correction_weights(
        x["old"],
        x["samp"],
        x["mask"],
        RolloutCorrectionConfig(**rc | {"mode": "truncate", "min": None, "max": math.inf}),
    )[0]
    on = x["mask"] > 0
    if rc["level"] == "sequence":
        hit = f"{int((w_t[:, 0] != raw[:, 0]).sum())} rows bounded"
    else:
        hit = f"{int((w_t[on] != raw[on]).sum())} tokens bounded"
    return (w_g[on] - w_t[on]).abs().max().item(), w_t[on].abs().max().item(), hit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tol", type=float, default=1e-6, help="tolerance, relative to max(1, |TRL value|)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the test tensors")
    args = ap.parse_args()

    # TRL's SAPO builds its temperatures with torch.where on Python floats, a default-dtype tensor: at
    # float32, 1.05's rounding alone moves the loss by ~4e-8. float64 compares the formulas, not that.
    torch.set_default_dtype(torch.float64)
    version, GRPOTrainer = import_trl()
    block = trl_is_block(GRPOTrainer, version)
    x = make_tensors(args.seed)

    on = x["mask"] > 0
    ratio = torch.exp(x["logp"] - x["old"])[on]
    print(
        f"TRL {version} vs grpo-dist, float64, B={B} T={T} lengths {list(LENGTHS)}: ratios in "
        f"[{ratio.min():.3f}, {ratio.max():.3f}], {int(((ratio < 0.8) | (ratio > 1.2)).sum())}/{int(on.sum())} "
        f"outside [0.8, 1.2]; pass if diff <= {args.tol:g} * max(1, |TRL value|)\n"
    )
    failures = []
    n_cases = 0

    print(f"{'rollout-correction weight':<32} {'max |w diff|':>13}  bounds hit")
    for name, mode, rc in CORRECTIONS:
        dw, scale, hit = run_weight_case(block, mode, rc, x)
        n_cases += 1
        ok = dw <= args.tol * max(1.0, scale)
        if not ok:
            failures.append(f"weights {name}: max |w diff| {dw:.3e}")
        print(f"{name:<32} {dw:>13.3e}  {hit}{'' if ok else '  FAIL'}")

    print(f"\n{'loss':<40} {'|loss diff|':>12} {'max |grad diff|':>16} {'TRL loss':>11}")
    for case in LOSS_CASES:
        dl, dg, loss, gscale = run_loss_case(GRPOTrainer, block, case, x)
        n_cases += 1
        ok_l, ok_g = dl <= args.tol * max(1.0, abs(loss)), dg <= args.tol * max(1.0, gscale)
        if not ok_l:
            failures.append(f"{case.name}: |loss diff| {dl:.3e}")
        if not ok_g:
            failures.append(f"{case.name}: max |grad diff| {dg:.3e}")
        print(f"{case.name:<40} {dl:>12.3e} {dg:>16.3e} {loss:>11.6f}{'' if ok_l and ok_g else '  FAIL'}")

    if failures:
        print(f"\n{len(failures)} failure(s) of {n_cases} cases (tol {args.tol:g}):")
        for f in failures:
            print(f"  {f}")
        sys.exit(1)
    print(f"\nall {n_cases} cases within {args.tol:g} (relative to max(1, |TRL value|))")


if __name__ == "__main__":
    main()
