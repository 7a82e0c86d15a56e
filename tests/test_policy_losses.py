"""The policy losses (clip, GSPO, dual clip, CISPO, SAPO), the rollout correction and the entropy
bonus, on hand-worked vectors in float64: values to 1e-12, the limits the papers state, and that
only model tokens (mask 1) ever enter or receive a gradient. Splitting a batch over ranks and
micro-batches is covered for each of them in test_losses.py; agreement with TRL's own code in
bench/trl_loss_parity.py."""

import math

import pytest
import torch
from pydantic import ValidationError

from grpo_dist.config import AlgoConfig, RolloutCorrectionConfig
from grpo_dist.losses import aggregate, completion_logprobs, grpo_loss, per_token_loss, rollout_correction_weights

EXACT = dict(rtol=0, atol=1e-12)


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def grad_of(loss_fn, logp):
    logp = logp.clone().requires_grad_()
    loss_fn(logp).backward()
    return logp.grad


# ---------------------------------------------------------------- GSPO: the sequence-level ratio


def test_gspo_ratio_is_the_exp_of_the_mean_log_ratio_over_model_tokens():
    cfg = AlgoConfig(beta=0.0, importance_sampling_level="sequence")
    old = t([[-1.0, -2.0, -3.0, -1.0]])
    logp = old + t([[0.05, 0.15, 99.0, 0.10]])  # position 2 is an environment token: not counted
    mask = t([[1, 1, 0, 1]])
    _, terms = per_token_loss(logp, old, None, t([1.0]), mask, cfg)
    torch.testing.assert_close(terms["ratio_BT"], torch.full((1, 4), math.exp(0.1), dtype=torch.float64), **EXACT)


def test_gspo_inside_the_clip_gives_each_token_ratio_times_a_over_length():
    # s = e^0.1 = 1.105 inside [0.8, 1.2]: per-row loss -s*A; d/dlogp_t = -A * s / n (grpo aggregation, B=1).
    cfg = AlgoConfig(beta=0.0, importance_sampling_level="sequence", loss_type="grpo")
    old, mask, adv = t([[-1.0, -2.0, -3.0]]), t([[1, 1, 1]]), t([0.5])
    logp = old + 0.1
    loss, _ = grpo_loss(logp, old, None, adv, mask, cfg)
    assert loss.item() == pytest.approx(-0.5 * math.exp(0.1), abs=1e-12)
    g = grad_of(lambda x: grpo_loss(x, old, None, adv, mask, cfg)[0], logp)
    torch.testing.assert_close(g, torch.full((1, 3), -0.5 * math.exp(0.1) / 3, dtype=torch.float64), **EXACT)
    # s = e^0.3 = 1.35 > 1.2 with A > 0: the whole row is clipped, every token's gradient is 0.
    g_clipped = grad_of(lambda x: grpo_loss(x, old, None, adv, mask, cfg)[0], old + 0.3)
    assert g_clipped.abs().max().item() == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_gspo_at_pi_old_has_grpos_gradient_with_per_sequence_token_means(loss_type):
    # At pi = pi_old the sequence ratio's gradient is the row's mean of grad log pi: GSPO's gradient on
    # token t of row i is GRPO's (token level) averaged over row i's tokens.
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64)
    mask = t([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 1, 0]])
    adv = t([0.7, -1.2, 0.4])
    token_cfg = AlgoConfig(beta=0.0, loss_type=loss_type, max_completion_length=5)
    seq_cfg = AlgoConfig(beta=0.0, loss_type=loss_type, max_completion_length=5, importance_sampling_level="sequence")
    for old in (None, logp.clone()):  # on-policy (mu = 1) and an explicit pi_old equal to pi
        g_tok = grad_of(lambda x, old=old: grpo_loss(x, old, None, adv, mask, token_cfg)[0], logp)
        g_seq = grad_of(lambda x, old=old: grpo_loss(x, old, None, adv, mask, seq_cfg)[0], logp)
        row_mean = (g_tok * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(g_seq, row_mean * mask, **EXACT)


# ---------------------------------------------------------------- dual clip


def test_dual_clip_bounds_negative_advantage_loss_at_c_times_abs_a():
    cfg = AlgoConfig(beta=0.0, clip_ratio_c=3.0)
    old = t([[0.0, 0.0, 0.0, 0.0]])
    logp = t([[math.log(5.0), math.log(2.0), math.log(5.0), math.log(0.5)]])
    adv = t([-2.0])
    loss, _ = per_token_loss(logp, old, None, adv, torch.ones_like(logp), cfg)
    # r=5: PPO's loss 10 is cut to c*|A| = 6 (and has no gradient); r=2: 4 < 6 stays; r=0.5: clipped at 0.8 -> 1.6.
    torch.testing.assert_close(loss, t([[6.0, 4.0, 6.0, 1.6]]), **EXACT)
    g = grad_of(lambda x: per_token_loss(x, old, None, adv, torch.ones_like(x), cfg)[0].sum(), logp)
    torch.testing.assert_close(g, t([[0.0, 4.0, 0.0, 0.0]]), **EXACT)
    # Positive advantages are untouched: r=5 is clipped at 1.2 as without the dual clip.
    pos, _ = per_token_loss(logp[:, :1], old[:, :1], None, t([2.0]), t([[1.0]]), cfg)
    assert pos.item() == pytest.approx(-2.4, abs=1e-12)


# ---------------------------------------------------------------- CISPO


def test_cispo_weight_is_the_detached_capped_ratio_on_log_pi():
    cfg = AlgoConfig(beta=0.0, policy_loss="cispo", cispo_max_ratio=5.0)
    old = t([[0.0, 0.0, 0.0]])
    logp = t([[math.log(6.0), math.log(0.5), math.log(2.0)]])
    adv = t([1.5])
    mask = torch.ones_like(logp)
    loss, terms = per_token_loss(logp, old, None, adv, mask, cfg)
    torch.testing.assert_close(loss, -1.5 * t([[5.0, 0.5, 2.0]]) * logp, **EXACT)
    g = grad_of(lambda x: per_token_loss(x, old, None, adv, mask, cfg)[0].sum(), logp)
    torch.testing.assert_close(g, -1.5 * t([[5.0, 0.5, 2.0]]), **EXACT)  # r = 6 keeps weight 5
    assert terms["cispo_clip"].tolist() == [[1.0, 0.0, 0.0]]
    # The same r = 6 token under the clip loss: clipped at 1.2, zero gradient.
    g_clip = grad_of(lambda x: per_token_loss(x, old, None, adv, mask, AlgoConfig(beta=0.0))[0][0, 0], logp)
    assert g_clip.abs().max().item() == 0.0


def test_cispo_on_policy_is_reinforce():
    cfg = AlgoConfig(beta=0.0, policy_loss="cispo", loss_type="dapo")
    logp = t([[-0.3, -1.7], [-2.0, -0.1]])
    adv, mask = t([0.8, -0.5]), t([[1, 1], [1, 0]])
    g = grad_of(lambda x: grpo_loss(x, None, None, adv, mask, cfg)[0], logp)
    torch.testing.assert_close(g, -adv[:, None] * mask / 3, **EXACT)  # -A grad log pi / N


# ---------------------------------------------------------------- SAPO


def test_sapo_soft_gate_hand_numbers():
    cfg = AlgoConfig(beta=0.0, policy_loss="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    old = t([[0.0]])
    logp = t([[math.log(1.5)]])
    sig = 1 / (1 + math.exp(-0.5))
    pos, _ = per_token_loss(logp, old, None, t([1.0]), t([[1.0]]), cfg)
    assert pos.item() == pytest.approx(-4 * sig, abs=1e-12)
    g = grad_of(lambda x: per_token_loss(x, old, None, t([1.0]), t([[1.0]]), cfg)[0].sum(), logp)
    assert g.item() == pytest.approx(-4 * sig * (1 - sig) * 1.5, abs=1e-12)  # d/dlogp = sigma' * 4 * r
    sig_n = 1 / (1 + math.exp(-1.05 * 0.5))
    neg, _ = per_token_loss(logp, old, None, t([-1.0]), t([[1.0]]), cfg)
    assert neg.item() == pytest.approx(4 / 1.05 * sig_n, abs=1e-12)


@pytest.mark.parametrize("policy_loss", ["clip", "cispo", "sapo"])
def test_every_policy_loss_has_grpos_gradient_on_policy(policy_loss):
    logp = t([[-0.4, -2.2, -1.0], [-0.9, -0.2, -3.0]])
    adv, mask = t([1.3, -0.6]), t([[1, 1, 1], [1, 1, 0]])
    cfg = AlgoConfig(beta=0.0, policy_loss=policy_loss)
    g = grad_of(lambda x: grpo_loss(x, None, None, adv, mask, cfg)[0], logp)
    torch.testing.assert_close(g, -adv[:, None] * mask / (mask.sum(1, keepdim=True) * 2), **EXACT)


# ---------------------------------------------------------------- rollout correction


BEHAVIOUR = t([[math.log(0.5)] * 3])
SAMPLING = t([[math.log(0.4), math.log(0.1), math.log(0.5)]])  # token weights 1.25, 5, 1; product 6.25


@pytest.mark.parametrize(
    ("rc", "weights", "rejected"),
    [
        ({"level": "token", "mode": "truncate", "max": 3.0}, [1.25, 3.0, 1.0], [0, 0, 0]),
        ({"level": "token", "mode": "truncate", "max": 3.0, "min": 1.1}, [1.25, 3.0, 1.1], [0, 0, 0]),
        ({"level": "token", "mode": "mask", "max": 3.0}, [1.25, 0.0, 1.0], [0, 1, 0]),
        ({"level": "token", "mode": "mask", "max": 3.0, "min": 1.1}, [1.25, 0.0, 0.0], [0, 1, 1]),
        ({"level": "sequence", "mode": "truncate", "max": 3.0}, [3.0] * 3, [0] * 3),
        ({"level": "sequence", "mode": "mask", "max": 3.0}, [0.0] * 3, [1] * 3),
        ({"level": "sequence", "mode": "mask", "max": 7.0}, [6.25] * 3, [0] * 3),
        ({"level": "geometric", "mode": "mask", "max": 3.0}, [6.25 ** (1 / 3)] * 3, [0] * 3),
    ],
)
def test_rollout_correction_modes_hand_numbers(rc, weights, rejected):
    w, r = rollout_correction_weights(BEHAVIOUR, SAMPLING, torch.ones_like(BEHAVIOUR), RolloutCorrectionConfig(**rc))
    torch.testing.assert_close(w, t([weights]), **EXACT)
    assert r.tolist() == [[float(x) for x in rejected]]


def test_rollout_correction_ignores_tokens_outside_the_mask():
    # An environment token with a huge learner/engine gap does not enter a row's product or mean.
    behaviour = t([[math.log(0.5), 0.0, math.log(0.5)]])
    sampling = t([[math.log(0.4), -50.0, math.log(0.5)]])
    mask = t([[1, 0, 1]])
    for level, expected in (("sequence", 1.25), ("geometric", 1.25**0.5)):
        w, _ = rollout_correction_weights(behaviour, sampling, mask, RolloutCorrectionConfig(level=level, max=3.0))
        assert w[0, 0].item() == pytest.approx(expected, abs=1e-12)


def test_geometric_level_keeps_long_rows_the_product_drops():
    # The same per-token gap (log w_t = 0.01) on a 50-token and a 2,000-token row: the product is
    # e^0.5 = 1.65 and e^20 = 4.9e8, so masking at 3 drops the long row; the geometric mean is e^0.01 for both.
    T = 2000
    behaviour = torch.full((2, T), -1.0, dtype=torch.float64)
    sampling = behaviour - 0.01
    mask = torch.zeros(2, T, dtype=torch.float64)
    mask[0, :50], mask[1, :] = 1, 1
    seq, seq_rej = rollout_correction_weights(
        behaviour, sampling, mask, RolloutCorrectionConfig(level="sequence", mode="mask", max=3.0)
    )
    assert seq[0, 0].item() == pytest.approx(math.exp(0.5), rel=1e-12) and seq_rej[1].min().item() == 1.0
    geo, geo_rej = rollout_correction_weights(
        behaviour, sampling, mask, RolloutCorrectionConfig(level="geometric", mode="mask", max=3.0)
    )
    torch.testing.assert_close(geo[:, 0], t([math.exp(0.01)] * 2), rtol=1e-12, atol=0)
    assert geo_rej.max().item() == 0.0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_masked_tokens_get_zero_gradient_and_keep_their_place_in_the_denominator(level):
    # dapo: sum over tokens / N_tot. Row 1 is masked out by the sequence correction (or token 1 of row 0
    # by the token one); the loss is the kept tokens' sum over ALL model tokens, as in TRL.
    cfg = AlgoConfig(beta=0.0, loss_type="dapo", rollout_correction={"level": level, "mode": "mask", "max": 2.0})
    logp = t([[-1.0, -1.0], [-1.0, -1.0]])
    sampling = t([[-1.0, -3.0], [-1.0, -1.0]]) if level == "token" else t([[-1.0, -1.0], [-2.0, -1.0]])
    adv, mask = t([1.0, 1.0]), torch.ones(2, 2, dtype=torch.float64)
    loss, m = grpo_loss(logp, None, None, adv, mask, cfg, sampling_logp_BT=sampling)
    kept = t([[1, 0], [1, 1]]) if level == "token" else t([[1, 1], [0, 0]])
    assert loss.item() == pytest.approx(-kept.sum().item() / 4, abs=1e-12)
    g = grad_of(lambda x: grpo_loss(x, None, None, adv, mask, cfg, sampling_logp_BT=sampling)[0], logp)
    torch.testing.assert_close(g, -kept / 4, **EXACT)
    assert m["correction_masked_fraction"].item() == pytest.approx(1 - kept.mean().item(), abs=1e-12)


# ---------------------------------------------------------------- entropy bonus


def test_entropy_bonus_is_aggregated_like_the_loss_and_has_the_entropy_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 5, (2, 4), generator=g)
    plen, mask = torch.tensor([1, 1]), t([[1, 1, 1], [1, 0, 0]])
    logp, ent = completion_logprobs(logits, ids, plen, mask, 1.0, entropy="grad")
    assert ent.requires_grad
    # The entropy of each scored position, as torch.distributions computes it (value and gradient).
    ref_ent = torch.distributions.Categorical(logits=logits[:, :3]).entropy() * mask
    torch.testing.assert_close(ent, ref_ent, **EXACT)
    cfg = AlgoConfig(beta=0.0, entropy_coef=0.3, loss_type="grpo", max_completion_length=3)
    adv = t([0.5, -1.0])
    loss, _ = grpo_loss(logp, None, None, adv, mask, cfg, ent_BT=ent)
    plain, _ = grpo_loss(logp, None, None, adv, mask, cfg.model_copy(update={"entropy_coef": 0.0}))
    bonus = aggregate(ref_ent, mask, "grpo", 3)
    assert loss.item() == pytest.approx(plain.item() - 0.3 * bonus.item(), abs=1e-12)
    (g_loss,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g_expected,) = torch.autograd.grad(plain - 0.3 * bonus, logits)
    torch.testing.assert_close(g_loss, g_expected, **EXACT)
    with pytest.raises(ValueError, match="entropy_coef needs the entropy"):
        grpo_loss(logp, None, None, adv, mask, cfg)
    # Without "grad" the entropy is a detached metric.
    assert not completion_logprobs(logits, ids, plen, mask, 1.0, entropy=True)[1].requires_grad


# ---------------------------------------------------------------- multi-turn masks compose


VARIANTS = [
    dict(),
    dict(importance_sampling_level="sequence"),
    dict(clip_ratio_c=1.5),
    dict(policy_loss="cispo"),
    dict(policy_loss="sapo"),
    dict(rollout_correction={"level": "sequence", "mode": "mask", "max": 5.0}),
    dict(rollout_correction={"level": "geometric", "max": 1.2}),
    dict(entropy_coef=0.1),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}" for k in v) or "clip")
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_only_model_tokens_enter_any_loss(loss_type, variant):
    # A multi-turn row: model tokens, then environment tokens (mask 0), then model tokens again.
    g = torch.Generator().manual_seed(2)
    mask = t([[1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 1]])
    logp = -torch.rand(2, 6, generator=g, dtype=torch.float64)
    old = logp + 0.2 * torch.randn(2, 6, generator=g, dtype=torch.float64)
    sampling = old + 0.1 * torch.randn(2, 6, generator=g, dtype=torch.float64)
    ent = torch.rand(2, 6, generator=g, dtype=torch.float64)
    adv = t([0.9, -0.4])
    cfg = AlgoConfig(beta=0.05, loss_type=loss_type, max_completion_length=6, **variant)

    def loss_of(lp, o, s, e):
        return grpo_loss(lp, o, logp - 0.1, adv, mask, cfg, sampling_logp_BT=s, ent_BT=e)[0]

    base = loss_of(logp, old, sampling, ent)
    # Anything at an environment position may change without changing the loss...
    noise = 7.0 * (1 - mask)
    assert loss_of(logp + noise, old - noise, sampling + noise, ent + noise).item() == pytest.approx(
        base.item(), abs=1e-12
    )
    # ...and gets exactly zero gradient.
    lp, e = logp.clone().requires_grad_(), ent.clone().requires_grad_()
    loss_of(lp, old, sampling, e).backward()
    assert (lp.grad * (1 - mask)).abs().max().item() == 0.0
    assert e.grad is None or (e.grad * (1 - mask)).abs().max().item() == 0.0


# ---------------------------------------------------------------- config: meaningless combinations


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(policy_loss="cispo", importance_sampling_level="sequence"), "is not supported: CISPO weights each token"),
        (dict(policy_loss="cispo", epsilon_high=5.0), "CISPO's cap is algorithm.cispo_max_ratio"),
        (dict(policy_loss="sapo", clip_ratio_c=3.0), "only policy_loss=clip reads it"),
        (dict(cispo_max_ratio=3.0), "only policy_loss=cispo reads it"),
        (dict(sapo_temperature_neg=2.0), "only policy_loss=sapo reads it"),
        (dict(tis_cap=2.0), "rollout_correction: {level: token, mode: truncate, max: 2.0}"),
        (dict(rollout_correction={"max": None}), "needs max or min"),
        (dict(rollout_correction={"min": 2.0, "max": 1.0}), "must be below max"),
        (dict(clip_ratio_c=1.0), "greater than 1"),
        (dict(clip_ratio_c=1.2), "must be above 1 \\+ epsilon_high = 1.2"),
        (dict(rollout_correction={"level": "sequence", "max": None, "min": 0.5}), "level=sequence needs a max"),
    ],
)
def test_meaningless_combinations_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message.replace("{", r"\{").replace("}", r"\}")):
        AlgoConfig(**fields)


def test_a_config_saved_before_rollout_correction_loads_with_tis_cap_off():
    assert AlgoConfig(tis_cap=None) == AlgoConfig()


def test_non_finite_weights_outside_the_mask_cannot_reach_the_loss_or_gradient():
    # A padding position whose engine log-prob is -1e4 would get weight e^1e4 = inf (no max set);
    # the loss and every gradient stay finite and equal those of the row without it.
    cfg = AlgoConfig(beta=0.0, loss_type="grpo", rollout_correction={"min": 0.5, "max": None})
    logp = t([[-1.0, -2.0, 0.0]])
    mask = t([[1, 1, 0]])
    sampling = t([[-1.1, -2.0, -1e4]])

    def loss_of(x, s):
        return grpo_loss(x, None, None, t([1.0]), mask, cfg, sampling_logp_BT=s)[0]

    g = grad_of(lambda x: loss_of(x, sampling), logp)
    assert torch.isfinite(g).all() and math.isfinite(loss_of(logp, sampling).item())
    clean = sampling.clone()
    clean[0, 2] = 0.0
    assert loss_of(logp, sampling).item() == loss_of(logp, clean).item()


def test_a_dumped_config_with_a_non_clip_loss_loads_again():
    cfg = AlgoConfig(policy_loss="cispo", rollout_correction={"level": "geometric", "mode": "mask", "min": 0.5})
    assert AlgoConfig(**cfg.model_dump(mode="json")) == cfg
