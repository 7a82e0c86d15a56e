"""The per-token loss mask of multi-turn rows: the loss, its normaliser and every token metric see
the model's own tokens only; tokens the model did not write (environment messages, template
boundaries) get exactly zero gradient and change nothing when their log-probs change."""

from __future__ import annotations

import pytest
import torch

from grpo_dist.batch import RolloutBatch
from grpo_dist.config import AlgoConfig
from grpo_dist.losses import completion_logprobs, grpo_loss, sampler_gap

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
V = 11


def batch(loss_mask=None, sampling_logp=None, completion_ids=None) -> RolloutBatch:
    """Two rows of one group; row 0 is a 3-turn episode: model, env, model, env (a truncated turn's
    end marker after the last model turn)."""
    comps = completion_ids or [[1, 2, 7, 8, 3, 4, 9], [5, 6, 2]]
    return RolloutBatch(
        prompt_ids=[[10, 3], [10, 3]],
        completion_ids=comps,
        sampling_logp=sampling_logp or [[-1.0, -2.0, 0.0, 0.0, -1.5, -0.5, 0.0], [-2.5, -1.0, -0.25]],  # float32-exact
        truncated=[False, False],
        rewards=[1.0, 0.0],
        reward_components={},
        group_ids=[0, 0],
        weight_version=0,
        advantages=[1.0, -1.0],
        loss_mask=loss_mask,
    )


MASK = [[1, 1, 0, 0, 1, 1, 0], [1, 1, 1]]


def loss_of(b: RolloutBatch, loss_type: str, logits: torch.Tensor):
    t = b.to_tensors(pad_id=0)
    logp, _ = completion_logprobs(logits, t["input_ids_BL"], t["prompt_len_B"], t["loss_mask_BT"], 1.0)
    cfg = AlgoConfig(loss_type=loss_type, beta=0.1, rollout_correction={"max": 2.0}, max_completion_length=8)
    ref = logp.detach() - 0.1
    loss, m = grpo_loss(
        logp,
        logp.detach() + 0.05,
        ref,
        t["adv_B"],
        t["loss_mask_BT"],
        cfg,
        **{"sampling_logp_BT": t["sampling_logp_BT"]},
    )
    return loss, m, logp, t


def logits_for(b: RolloutBatch) -> torch.Tensor:
    L = max(len(p) + len(c) for p, c in zip(b.prompt_ids, b.completion_ids))
    g = torch.Generator().manual_seed(0)
    return torch.randn(len(b), L, V, generator=g, dtype=torch.float64, requires_grad=True)


def test_batch_validates_selects_and_concatenates_the_mask():
    with pytest.raises(ValueError, match=r"row 1: the loss mask must hold one 0 or 1 per completion token \(3\)"):
        batch(loss_mask=[[1] * 7, [1, 1]])
    with pytest.raises(ValueError, match="one 0 or 1"):
        batch(loss_mask=[[1] * 7, [1, 2, 1]])
    masked = batch(loss_mask=MASK)
    assert masked.select([1, 0]).loss_mask == [MASK[1], MASK[0]]
    assert batch().select([0]).loss_mask is None
    # Single-turn batches concatenated with a multi-turn one get all-ones rows.
    assert RolloutBatch.concat([batch(), masked]).loss_mask == [[1] * 7, [1] * 3] + MASK
    assert RolloutBatch.concat([batch(), batch()]).loss_mask is None
    t = masked.to_tensors(pad_id=0)
    assert t["loss_mask_BT"].tolist() == [[float(x) for x in MASK[0]], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_ones_mask_is_the_single_turn_batch(loss_type):
    plain, ones = batch(), batch(loss_mask=[[1] * 7, [1] * 3])
    logits = logits_for(plain)
    a, ma, _, _ = loss_of(plain, loss_type, logits)
    b, mb, _, _ = loss_of(ones, loss_type, logits)
    assert a.item() == b.item() and ma == mb


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_tokens_the_model_did_not_write_have_zero_gradient_and_no_effect(loss_type):
    masked = batch(loss_mask=MASK)
    logits = logits_for(masked)
    loss, m, logp, t = loss_of(masked, loss_type, logits)
    (grad,) = torch.autograd.grad(loss, logits)
    # Completion token j of row 0 is scored by the logits at position P + j - 1 (P = 2).
    for j, keep in enumerate(MASK[0]):
        assert (grad[0, 1 + j].abs().sum() > 0) == bool(keep), j
    # Token counts and token metrics count the model's tokens only.
    assert m["num_tokens"] == sum(map(sum, MASK)) == 7
    gap_want = (
        sum(
            abs(logp[i, j].item() - masked.sampling_logp[i][j])
            for i, mk in enumerate(MASK)
            for j, k in enumerate(mk)
            if k
        )
        / 7
    )
    assert sampler_gap(logp, t["sampling_logp_BT"], t["loss_mask_BT"]).item() == pytest.approx(gap_want, rel=1e-12)

    # Other engine log-probs on those tokens, and other ids for the trailing ones (nothing attends to
    # them), change neither the loss nor a metric.
    other_lp = [list(r) for r in masked.sampling_logp]
    other_ids = [list(r) for r in masked.completion_ids]
    for j, keep in enumerate(MASK[0]):
        if not keep:
            other_lp[0][j] = -7.0
    other_ids[0][6] = 5
    changed = batch(loss_mask=MASK, sampling_logp=other_lp, completion_ids=other_ids)
    loss2, m2, _, _ = loss_of(changed, loss_type, logits)
    assert loss2.item() == loss.item() and m2 == m


@pytest.mark.parametrize("layout", ["rows", "shared"])
def test_model_tokens_after_environment_tokens_see_them(tiny_model_dir, layout):
    """Both forward layouts attend to every completion token and score only the masked ones: a
    model token's log-prob after environment tokens is the one it has with nothing masked."""
    from test_shared_prompt import grouped_batch
    from transformers import AutoModelForCausalLM

    from grpo_dist.forward import row_logprobs, shared_prompt_logprobs, unwrap

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    full = grouped_batch(groups=2, G=3, seed=5, vocab=model.config.vocab_size, completion=(6, 14))
    g = torch.Generator().manual_seed(1)
    holes = [[int(torch.rand(1, generator=g) < 0.6) for _ in c] for c in full.completion_ids]
    masked = RolloutBatch(**{**full.__dict__, "loss_mask": holes})
    fn = shared_prompt_logprobs if layout == "shared" else row_logprobs
    head = unwrap(model).get_output_embeddings()
    with torch.no_grad():
        want, _ = fn(model, full.to_tensors(0), slice(0, 6), 1.0, lm_head=head, chunk_tokens=None)
        t = masked.to_tensors(0)
        got, _ = fn(model, t, slice(0, 6), 1.0, lm_head=head, chunk_tokens=None)
    keep = t["loss_mask_BT"] > 0
    assert 0 < int(keep.sum()) < int((full.to_tensors(0)["loss_mask_BT"] > 0).sum())
    torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=1e-12)
    assert bool((got[~keep] == 0).all())
