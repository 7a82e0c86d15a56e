import math

import pytest
import torch

from grpo_dist.batch import RolloutBatch
from grpo_dist.config import AlgoConfig
from grpo_dist.losses import (
    AGGREGATIONS,
    aggregate,
    completion_logprobs,
    grpo_loss,
    kl_penalty,
    merge_metrics,
    per_token_loss,
    sampler_gap,
)

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def ones(x):
    return torch.ones_like(x)


# ---------------------------------------------------------------- log-probs


def _two_rows():
    # Two rows with different prompt lengths, right-padded like RolloutBatch.to_tensors.
    batch = RolloutBatch(
        prompt_ids=[[5, 6, 7], [8]],
        completion_ids=[[1, 2], [3, 4, 0]],
        sampling_logp=[[0.0, 0.0], [0.0, 0.0, 0.0]],
        truncated=[False, False],
        rewards=[1.0, 0.0],
        reward_components={},
        group_ids=[0, 0],
        weight_version=0,
    )
    return batch.to_tensors(pad_id=9)


def test_completion_logprobs_shift_and_temperature():
    tens = _two_rows()
    ids_BL, plen_B, mask_BT = tens["input_ids_BL"], tens["prompt_len_B"], tens["loss_mask_BT"]
    B, L, V, temp = 2, ids_BL.shape[1], 10, 0.7
    logits = torch.randn(B, L, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    logp, ent = completion_logprobs(logits, ids_BL, plen_B, mask_BT, temp, entropy=True)
    # Row 0: prompt length 3, completion tokens at positions 3, 4 are scored by logits 2, 3.
    lsm = torch.log_softmax(logits.detach() / temp, -1)
    want = [
        [lsm[0, 2, 1].item(), lsm[0, 3, 2].item(), 0.0],  # third slot is padding (row ends at L)
        [lsm[1, 0, 3].item(), lsm[1, 1, 4].item(), lsm[1, 2, 0].item()],
    ]
    torch.testing.assert_close(logp, t(want), rtol=0, atol=1e-12)
    assert logp.shape == mask_BT.shape
    (logp * mask_BT).sum().backward()
    assert logits.grad[0, 4].abs().sum() == 0  # logit at the last position predicts nothing scored
    assert logits.grad[0, :2].abs().sum() == 0  # prompt positions are never projected
    torch.testing.assert_close(ent[1, 0], -(lsm[1, 0].exp() * lsm[1, 0]).sum(), rtol=0, atol=1e-12)
    assert ent[0, 2] == 0


@pytest.mark.parametrize("chunk", [None, 1, 2, 4])
def test_completion_logprobs_chunked_head_equals_full_logits(chunk):
    """From hidden states through an LM head, in chunks (recomputed in backward), the log-probs and
    the gradients of hidden states and head equal those of the full logits."""
    tens = _two_rows()
    ids_BL, plen_B, mask_BT = tens["input_ids_BL"], tens["prompt_len_B"], tens["loss_mask_BT"]
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, ids_BL.shape[1], 6, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(6, 10, bias=False).double()
    logp_full, _ = completion_logprobs(head(hidden), ids_BL, plen_B, mask_BT, 0.7)
    w = torch.randn(logp_full.shape, generator=g, dtype=torch.float64)
    gh_full, gw_full = torch.autograd.grad((logp_full * w).sum(), [hidden, head.weight])
    logp, _ = completion_logprobs(hidden, ids_BL, plen_B, mask_BT, 0.7, lm_head=head, chunk_tokens=chunk)
    gh, gw = torch.autograd.grad((logp * w).sum(), [hidden, head.weight])
    torch.testing.assert_close(logp, logp_full, rtol=0, atol=1e-12)
    torch.testing.assert_close(gh, gh_full, rtol=0, atol=1e-12)
    torch.testing.assert_close(gw, gw_full, rtol=0, atol=1e-12)


def test_completion_logprobs_projects_at_most_a_chunk_at_a_time():
    """The [tokens, V] logits never exceed chunk_tokens rows, forward or backward (recomputed)."""
    tens = _two_rows()
    seen = []
    head = torch.nn.Linear(6, 10, bias=False).double()
    head.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    hidden = torch.randn(2, tens["input_ids_BL"].shape[1], 6, dtype=torch.float64, requires_grad=True)
    logp, _ = completion_logprobs(
        hidden, tens["input_ids_BL"], tens["prompt_len_B"], tens["loss_mask_BT"], 1.0, lm_head=head, chunk_tokens=2
    )
    logp.sum().backward()
    assert max(seen) == 2 and sum(seen) == 2 * int(tens["loss_mask_BT"].sum())  # 5 tokens, each projected twice


def test_completion_logprobs_rejects_bad_rows():
    mask = torch.ones(1, 2)
    with pytest.raises(ValueError, match="row 0: prompt length 0"):
        completion_logprobs(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), torch.tensor([0]), mask, 1.0)
    with pytest.raises(ValueError, match="beyond the 3 positions"):
        completion_logprobs(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), torch.tensor([2]), mask, 1.0)


def test_entropy_uniform_and_peaked():
    # One row: a 1-token prompt, then 2 completion tokens scored by a uniform and a peaked position.
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    ids_BL, plen_B, mask_BT = torch.zeros(1, 3, dtype=torch.long), torch.tensor([1]), torch.ones(1, 2)
    _, ent = completion_logprobs(logits, ids_BL, plen_B, mask_BT, 1.0, entropy=True)
    torch.testing.assert_close(ent, torch.tensor([[math.log(4), 0.0]]), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- per-token terms, hand-worked


def test_clip_ratio_seed_numbers():
    # Seeds 001/004: pi=0.9 vs pi_old=0.5 -> ratio 1.8 clipped to 1.2; pi=0.2 -> 0.4 clipped to 0.8.
    cfg = AlgoConfig(beta=0.0)
    logp = t([[math.log(0.9), math.log(0.2)]])
    old = t([[math.log(0.5), math.log(0.5)]])
    loss_pos, terms = per_token_loss(logp, old, None, t([1.0]), ones(logp), cfg)
    torch.testing.assert_close(terms["ratio_BT"], t([[1.8, 0.4]]), rtol=0, atol=1e-12)
    # A > 0: min(1.8, 1.2) = 1.2 (clipped); min(0.4, 0.8) = 0.4 (unclipped, pessimistic side).
    torch.testing.assert_close(loss_pos, t([[-1.2, -0.4]]), rtol=0, atol=1e-12)
    loss_neg, terms_neg = per_token_loss(logp, old, None, t([-1.0]), ones(logp), cfg)
    # A < 0: min(-1.8, -1.2) = -1.8; min(-0.4, -0.8) = -0.8 (clipped to 0.8).
    torch.testing.assert_close(loss_neg, t([[1.8, 0.8]]), rtol=0, atol=1e-12)
    assert terms["clip_high"].tolist() == [[1.0, 0.0]] and terms["clip_low"].tolist() == [[0.0, 0.0]]
    assert terms_neg["clip_low"].tolist() == [[0.0, 1.0]] and terms_neg["clip_high"].tolist() == [[0.0, 0.0]]


def test_clip_higher_asymmetric():
    cfg = AlgoConfig(beta=0.0, epsilon_low=0.2, epsilon_high=0.28)
    loss, _ = per_token_loss(t([[math.log(1.5)]]), t([[0.0]]), None, t([1.0]), t([[1.0]]), cfg)
    torch.testing.assert_close(loss, t([[-1.28]]), rtol=0, atol=1e-12)


def test_kl_estimators_seed_numbers():
    # Seed 000: pi=0.3, pi_ref=0.1 -> Delta = log 3 = 1.0986, ratio 3, k3 = exp(-Delta) + Delta - 1 = 0.4319.
    logp, ref = t([[math.log(0.3)]]), t([[math.log(0.1)]])
    delta = math.log(3)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(1 / 3 + delta - 1, abs=1e-12)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.4319, abs=1e-4)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(delta, abs=1e-12)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * delta**2, abs=1e-12)
    assert kl_penalty(ref, ref, "k3").item() == 0.0


def test_kl_added_with_beta_and_skipped_without():
    logp, ref = t([[math.log(0.3)]]), t([[math.log(0.1)]])
    k3 = 1 / 3 + math.log(3) - 1
    loss, terms = per_token_loss(logp, None, ref, t([0.0]), ones(logp), AlgoConfig(beta=0.1))
    assert loss.item() == pytest.approx(0.1 * k3, abs=1e-12) and "kl_BT" in terms
    loss0, terms0 = per_token_loss(logp, None, ref, t([0.0]), ones(logp), AlgoConfig(beta=0.0))
    assert loss0.item() == 0.0 and "kl_BT" not in terms0
    lossn, _ = per_token_loss(logp, None, None, t([0.0]), ones(logp), AlgoConfig(beta=0.1))
    assert lossn.item() == 0.0


def test_mu1_value_is_minus_mean_advantage_but_gradient_is_not_zero():
    # Seed 002: with old = current, ratio == 1 so the loss value is -mean(A) whatever logp is.
    cfg = AlgoConfig(beta=0.0, loss_type="grpo")
    adv = t([0.8, -0.8, 0.3])
    mask = t([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    for seed in (0, 1):
        logp = (-torch.rand(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).requires_grad_()
        loss, metrics = grpo_loss(logp, None, None, adv, mask, cfg)
        assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-12)
        assert metrics["ratio"].item() == pytest.approx(1.0, abs=1e-12)
        loss.backward()
        # d loss / d logp_it = -A_i * m_it / (n_i * B)
        n = mask.sum(1, keepdim=True)
        torch.testing.assert_close(logp.grad, -adv[:, None] * mask / (n * 3), rtol=0, atol=1e-12)


def test_rollout_correction_token_truncate():
    cfg = AlgoConfig(beta=0.0, rollout_correction={"max": 2.0})
    logp = t([[math.log(0.5), math.log(0.5)]]).requires_grad_()
    old = t([[math.log(0.5), math.log(0.5)]])
    sampling = t([[math.log(0.4), math.log(0.1)]])  # weights 1.25 and 5 -> capped at 2
    loss_BT, terms = per_token_loss(logp, old, None, t([1.0]), ones(logp), cfg, sampling)
    torch.testing.assert_close(terms["correction_BT"], t([[1.25, 2.0]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(loss_BT.detach(), t([[-1.25, -2.0]]), rtol=0, atol=1e-12)
    loss_BT.sum().backward()
    torch.testing.assert_close(logp.grad, t([[-1.25, -2.0]]), rtol=0, atol=1e-12)  # weight is detached
    plain, _ = per_token_loss(logp, old, None, t([1.0]), ones(logp), AlgoConfig(beta=0.0), sampling)
    assert plain.tolist() == [[-1.0, -1.0]]  # off: the engine's log-probs are not used
    with pytest.raises(ValueError, match="needs the engine's log-probs"):
        per_token_loss(logp, old, None, t([1.0]), ones(logp), cfg, None)


def test_rollout_correction_on_policy_uses_detached_logp():
    cfg = AlgoConfig(beta=0.0, rollout_correction={"max": 10.0})
    logp = t([[math.log(0.6)]])
    _, terms = per_token_loss(logp, None, None, t([1.0]), ones(logp), cfg, t([[math.log(0.3)]]))
    assert terms["correction_BT"].item() == pytest.approx(2.0, abs=1e-12)


def test_sampler_gap_is_the_masked_mean_absolute_logp_difference():
    logp = t([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]]).requires_grad_()
    sampling = t([[-1.5, -2.0, -2.0], [-0.5, -0.25, 0.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])  # the padded position's huge difference does not count
    gap = sampler_gap(logp, sampling, mask)
    assert gap.item() == pytest.approx((0.5 + 0.0 + 1.0 + 0.0 + 0.25) / 5, abs=1e-12)
    assert not gap.requires_grad


# ---------------------------------------------------------------- aggregation


def test_aggregation_hand_numbers():
    loss_BT = t([[2.0, 9.0, 9.0], [1.0, 1.0, 1.0]])
    mask_BT = t([[1, 0, 0], [1, 1, 1]])
    assert set(AGGREGATIONS) == set(LOSS_TYPES)
    assert aggregate(loss_BT, mask_BT, "grpo", 4).item() == pytest.approx((2 + 1) / 2, abs=1e-12)
    assert aggregate(loss_BT, mask_BT, "bnpo", 4).item() == pytest.approx(5 / 4, abs=1e-12)
    assert aggregate(loss_BT, mask_BT, "dr_grpo", 4).item() == pytest.approx(5 / 8, abs=1e-12)
    assert aggregate(loss_BT, mask_BT, "dapo", 4).item() == pytest.approx(5 / 4, abs=1e-12)
    assert aggregate(loss_BT, mask_BT, "dapo", 4, num_tokens_total=10).item() == pytest.approx(0.5, abs=1e-12)
    assert aggregate(loss_BT, mask_BT, "grpo", 4, num_sequences_total=6).item() == pytest.approx(3 / 6, abs=1e-12)
    assert aggregate(loss_BT, mask_BT, "dr_grpo", 4, num_sequences_total=5).item() == pytest.approx(5 / 20, abs=1e-12)
    with pytest.raises(ValueError, match="unknown loss_type 'mean'"):
        aggregate(loss_BT, mask_BT, "mean", 4)


def test_empty_completion_row_counts_as_zero():
    loss_BT = t([[3.0, 3.0], [5.0, 5.0]])
    mask_BT = t([[1, 1], [0, 0]])
    assert aggregate(loss_BT, mask_BT, "grpo", 2).item() == pytest.approx(1.5, abs=1e-12)


def _toy_problem(seed=0, B=8, T=5, D=4, V=7):
    g = torch.Generator().manual_seed(seed)
    x_BTD = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    ids_BT = torch.randint(0, V, (B, T), generator=g)
    W = torch.randn(D, V, generator=g, dtype=torch.float64)
    lengths = [1, 5, 3, 2, 5, 4, 1, 3]
    mask_BT = t([[1.0] * n + [0.0] * (T - n) for n in lengths])
    adv_B = torch.randn(B, generator=g, dtype=torch.float64)
    # Old / reference / sampling log-probs near the policy's so every clip branch is hit.
    logp0 = torch.log_softmax(x_BTD @ W, -1).gather(-1, ids_BT.unsqueeze(-1)).squeeze(-1)
    old = logp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp0 + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    sampling = old + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return x_BTD, ids_BT, W, mask_BT, adv_B, old, ref, sampling


def _loss(W, rows, data, cfg, **totals):
    x_BTD, ids_BT, _, mask_BT, adv_B, old, ref, sampling = data
    logits_BTV = torch.log_softmax(x_BTD[rows] @ W, -1)
    logp = logits_BTV.gather(-1, ids_BT[rows].unsqueeze(-1)).squeeze(-1)
    ent = -(logits_BTV.exp() * logits_BTV).sum(-1)
    return grpo_loss(
        logp,
        old[rows],
        ref[rows],
        adv_B[rows],
        mask_BT[rows],
        cfg,
        sampling_logp_BT=sampling[rows],
        ent_BT=ent,
        **totals,
    )


# Every policy loss, ratio level, dual clip, rollout-correction level and mode, and the entropy bonus,
# each on a toy problem (seed) where its branch is taken: some tokens clipped, capped or masked.
SPLIT_VARIANTS = {
    "clip": (0, dict(epsilon_high=0.28, rollout_correction={"max": 1.5})),
    "gspo": (0, dict(importance_sampling_level="sequence")),
    "dual_clip": (3, dict(clip_ratio_c=1.25)),
    "cispo": (0, dict(policy_loss="cispo", cispo_max_ratio=1.2)),
    "sapo": (0, dict(policy_loss="sapo")),
    "correction_sequence_mask": (
        0,
        dict(rollout_correction={"level": "sequence", "mode": "mask", "min": 0.7, "max": 1.4}),
    ),
    "correction_geometric": (0, dict(rollout_correction={"level": "geometric", "min": 0.97, "max": 1.03})),
    "entropy_bonus": (0, dict(entropy_coef=0.01)),
}


@pytest.mark.parametrize("variant", sorted(SPLIT_VARIANTS))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_distributed_split_reproduces_full_batch_loss_and_gradient(loss_type, variant):
    """R=2 fake ranks x GAS=2 micro-batches, DeepSpeed semantics: each backward is scaled by
    1/GAS, rank gradients are averaged. With the step totals and loss * R * GAS the result
    equals the full-batch loss and gradient."""
    seed, variant_cfg = SPLIT_VARIANTS[variant]
    data = _toy_problem(seed)
    cfg = AlgoConfig(loss_type=loss_type, beta=0.05, max_completion_length=6, **variant_cfg)
    W0 = data[2]
    B, R, GAS = 8, 2, 2
    mask_BT = data[3]

    W_full = W0.clone().requires_grad_()
    full, _ = _loss(W_full, list(range(B)), data, cfg)
    full.backward()

    totals = {"num_sequences_total": B, "num_tokens_total": mask_BT.sum().item()}
    rank_grads, loss_sum = [], 0.0
    per_rank = B // R
    for r in range(R):
        W_r = W0.clone().requires_grad_()
        shard = list(range(r * per_rank, (r + 1) * per_rank))
        for m in range(GAS):
            rows = shard[m * per_rank // GAS : (m + 1) * per_rank // GAS]
            loss, _ = _loss(W_r, rows, data, cfg, **totals)
            loss_sum += loss.item()
            ((loss * R * GAS) / GAS).backward()  # learner scaling, then DeepSpeed's 1/GAS
        rank_grads.append(W_r.grad)
    averaged = torch.stack(rank_grads).mean(0)  # DeepSpeed all-reduce mean over ranks

    assert loss_sum == pytest.approx(full.item(), abs=1e-12)
    torch.testing.assert_close(averaged, W_full.grad, rtol=1e-10, atol=1e-12)
    # And without the totals the split is NOT the full batch (the normalizers matter).
    if loss_type in ("bnpo", "dapo"):
        local = sum(_loss(W0, list(range(i, i + 2)), data, cfg)[0].item() for i in range(0, B, 2)) / 4
        assert abs(local - full.item()) > 1e-6


def test_metrics_hand_numbers_and_merge():
    cfg = AlgoConfig(beta=0.1)
    logp = t([[math.log(0.9), math.log(0.2), 0.0]])
    old = t([[math.log(0.5), math.log(0.5), 0.0]])
    ref = logp.clone()
    mask = t([[1, 1, 0]])
    _, m = grpo_loss(logp, old, ref, t([1.0]), mask, cfg)
    assert m["ratio"].item() == pytest.approx((1.8 + 0.4) / 2, abs=1e-12)
    assert m["clip_high"].item() == 0.5 and m["clip_low"].item() == 0.0 and m["clip_region"].item() == 0.5
    assert m["kl"].item() == 0.0 and m["correction_weight_mean"].item() == 1.0 and m["num_tokens"].item() == 2
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
    _, m2 = grpo_loss(logp, old, ref, t([-1.0]), t([[1, 1, 1]]), cfg)
    merged = merge_metrics([m, m2])
    assert merged["num_tokens"] == 5
    assert merged["ratio"] == pytest.approx((1.8 + 0.4 + 1.8 + 0.4 + 1.0) / 5, abs=1e-12)
    assert merged["clip_low"] == pytest.approx(1 / 5, abs=1e-12)
