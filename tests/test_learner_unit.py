"""Pure pieces of the learner: DeepSpeed config, LR schedule, batch split, placement, metrics."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest
import torch

from grpo_dist.batch import RolloutBatch
from grpo_dist.config import AlgoConfig, LearnerConfig, ModelConfig
from grpo_dist.losses import completion_logprobs, grpo_loss
from learner.ds_config import build_ds_config, grad_accum_steps, lr_multiplier, ref_ds_config, resolve_dtype
from learner.rank_placement import placement_bundles, rank_env
from learner.step import (
    METRIC_KEYS,
    backward_scale,
    forward_positions,
    lerp_,
    micro_slices,
    pack_by_tokens,
    pack_metrics,
    rank_rows,
    token_micro_batches,
    unpack_metrics,
)


@pytest.mark.parametrize(
    "schedule, step, want",
    [
        ("constant", 0, 0.25),  # warmup 3: (step + 1) / 4
        ("constant", 2, 0.75),
        ("constant", 3, 1.0),
        ("constant", 50, 1.0),
        ("cosine", 3, 1.0),  # decay over total 13 - warmup 3 = 10 steps
        ("cosine", 8, 0.5),
        ("cosine", 13, 0.0),
        ("linear", 5, 0.8),
        ("linear", 8, 0.5),
        ("linear", 20, 0.0),  # past the end stays at 0
    ],
)
def test_lr_multiplier_hand_values(schedule, step, want):
    assert lr_multiplier(step, warmup_steps=3, total_steps=13, schedule=schedule) == pytest.approx(want, abs=1e-12)


def test_lr_multiplier_without_warmup_starts_at_full_lr():
    assert lr_multiplier(0, 0, 10, "cosine") == 1.0
    assert lr_multiplier(0, 0, 10, "linear") == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_multiplier(5, 0, 10, "step")


def test_grad_accum_steps():
    assert grad_accum_steps(16, world_size=2, micro_batch_size=2, optimizer_steps=2) == 2
    assert grad_accum_steps(8, 2, 4, 1) == 1
    with pytest.raises(ValueError, match=r"12 rows .*learner.micro_batch_size=4.* \(= 8\)"):
        grad_accum_steps(12, 2, 4, 1)
    with pytest.raises(ValueError):
        grad_accum_steps(0, 1, 1, 1)


def test_build_ds_config_zero3_fp32():
    lc = LearnerConfig(
        zero_stage=3,
        micro_batch_size=4,
        lr=2e-5,
        adam_betas=(0.9, 0.95),
        adam_eps=1e-6,
        weight_decay=0.1,
        max_grad_norm=0.5,
    )
    cfg = build_ds_config(lc, torch.float32, world_size=2, gradient_accumulation_steps=3)
    assert cfg["train_batch_size"] == 24
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 2e-5, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1, "torch_adam": True},
    }
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}
    assert cfg["zero_optimization"]["stage"] == 3
    assert "scheduler" not in cfg  # the LR schedule is a LambdaLR over lr_multiplier


def test_build_ds_config_zero2_bf16_and_bad_accumulation():
    lc = LearnerConfig(zero_stage=2, micro_batch_size=1)
    cfg = build_ds_config(lc, torch.bfloat16, world_size=4, gradient_accumulation_steps=2)
    assert cfg["bf16"] == {"enabled": True} and cfg["train_batch_size"] == 8
    assert cfg["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        build_ds_config(lc, torch.float32, 1, 0)


def test_ref_ds_config_has_no_optimizer():
    cfg = ref_ds_config(3, torch.bfloat16, micro_batch_size=2, world_size=2)
    assert cfg["zero_optimization"] == {"stage": 3} and "optimizer" not in cfg and cfg["bf16"]["enabled"]


def test_resolve_dtype():
    assert resolve_dtype(ModelConfig(dtype="auto"), cuda=True) == torch.bfloat16
    assert resolve_dtype(ModelConfig(dtype="auto"), cuda=False) == torch.float32
    assert resolve_dtype(ModelConfig(dtype="float16"), cuda=False) == torch.float16


def test_placement_bundles_and_rank_env():
    assert placement_bundles(2, 1.0, 0.0) == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert placement_bundles(3, 4.0, 1.0) == [{"CPU": 4.0, "GPU": 1.0}] * 3
    with pytest.raises(ValueError, match="num_ranks"):
        placement_bundles(0, 1.0, 0.0)
    env = rank_env(1, 2, "10.0.0.5", 29500)
    assert env == {
        "MASTER_ADDR": "10.0.0.5",
        "MASTER_PORT": "29500",
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
    }


def test_rank_rows_hand_worked():
    # One mini-batch, 2 ranks x 3 rows: longest first to the rank with fewer tokens.
    lengths = [10, 50, 20, 40, 30, 60]
    assert rank_rows(lengths, 2, 1) == [[5, 4, 2], [1, 3, 0]]  # 110 and 100 tokens
    # Two mini-batches: rows 0-3 and 4-7 never mix, so each optimizer step sees the same rows.
    assert rank_rows([1, 2, 3, 4, 8, 7, 6, 5], 2, 2) == [[3, 0, 4, 7], [2, 1, 5, 6]]


@pytest.mark.parametrize("world, minis", [(1, 1), (2, 1), (2, 3), (4, 2), (3, 4)])
def test_rank_rows_is_a_balanced_longest_first_partition(world, minis):
    gen = torch.Generator().manual_seed(world * 10 + minis)
    n = world * minis * 8
    lengths = torch.randint(5, 300, (n,), generator=gen).tolist()
    out = rank_rows(lengths, world, minis)
    assert sorted(i for rows in out for i in rows) == list(range(n))
    per = n // (world * minis)
    mini = n // minis
    for k in range(minis):
        parts = [rows[k * per : (k + 1) * per] for rows in out]
        assert all(k * mini <= i < (k + 1) * mini for p in parts for i in p)
        for p in parts:
            assert [lengths[i] for i in p] == sorted((lengths[i] for i in p), reverse=True)
        # Greedy dealing keeps token totals within one row's length of each other.
        totals = [sum(lengths[i] for i in p) for p in parts]
        assert max(totals) - min(totals) <= max(lengths[k * mini : (k + 1) * mini])


def test_rank_rows_refuses_uneven_splits():
    with pytest.raises(ValueError, match="7 rows cannot be split into 1 mini-batches over 2 ranks"):
        rank_rows([1] * 7, 2, 1)


def test_micro_slices():
    assert micro_slices(4, 2, 3) == [slice(4, 6), slice(6, 8), slice(8, 10)]


def test_forward_positions_pads_each_micro_batch_to_its_longest_row():
    assert forward_positions([9, 4, 3, 3, 1], [slice(0, 2), slice(2, 5)]) == 2 * 9 + 3 * 3


def test_pack_by_tokens_hand_worked():
    lengths = [10, 9, 5, 5, 4, 3, 2]
    # Budget 20: 2 x 10, then 4 x 5 (a fifth row would cost 25), then the last row alone.
    assert pack_by_tokens(lengths, 20) == [slice(0, 2), slice(2, 6), slice(6, 7)]
    # Exactly 4: the costliest (20 and 20, the first on ties) is halved; then 5: [2, 6) costs the most.
    assert pack_by_tokens(lengths, 20, count=4) == [slice(0, 1), slice(1, 2), slice(2, 6), slice(6, 7)]
    assert pack_by_tokens(lengths, 20, count=5) == [slice(0, 1), slice(1, 2), slice(2, 4), slice(4, 6), slice(6, 7)]
    assert pack_by_tokens(lengths, 20, count=7) == [slice(i, i + 1) for i in range(7)]
    # Any order is packed within the budget (the cost is rows x the longest so far).
    assert pack_by_tokens([2, 9, 3], 20) == [slice(0, 2), slice(2, 3)]


def test_pack_by_tokens_refuses_rows_over_the_budget_and_impossible_counts():
    with pytest.raises(ValueError, match=r"a row of 21 tokens does not fit learner\.max_tokens_per_micro_batch=20"):
        pack_by_tokens([21, 3], 20)
    with pytest.raises(ValueError, match="3 rows packed into 2 micro-batches cannot make exactly 1"):
        pack_by_tokens([10, 10, 10], 20, count=1)
    with pytest.raises(ValueError, match="cannot make exactly 4"):
        pack_by_tokens([10, 10, 10], 20, count=4)


def _set_partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1 :]
        yield [[first]] + part


@pytest.mark.parametrize("seed", range(20))
def test_pack_by_tokens_on_longest_first_rows_is_the_fewest_micro_batches_of_any_split(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = sorted(torch.randint(1, 40, (7,), generator=gen).tolist(), reverse=True)
    budget = int(torch.randint(lengths[0], 3 * lengths[0] + 1, (1,), generator=gen))
    fewest = min(
        len(part)
        for part in _set_partitions(list(range(7)))
        if all(len(g) * max(lengths[i] for i in g) <= budget for g in part)
    )
    assert len(pack_by_tokens(lengths, budget)) == fewest


# Budgets at which some rank's greedy count is below another's, so it must split further.
@pytest.mark.parametrize("world, minis, budget", [(1, 1, 600), (2, 1, 600), (2, 3, 700), (4, 2, 512)])
def test_token_micro_batches_respect_the_budget_and_agree_on_counts_across_ranks(world, minis, budget):
    gen = torch.Generator().manual_seed(7 * world + minis)
    n = world * minis * 12
    lengths = torch.randint(20, 300, (n,), generator=gen).tolist()
    shards = [[lengths[i] for i in rows] for rows in rank_rows(lengths, world, minis)]
    local = [[len(m) for m in token_micro_batches(s, minis, budget)] for s in shards]
    counts = [max(c[k] for c in local) for k in range(minis)]  # the actor's all-reduce MAX
    plans = [token_micro_batches(s, minis, budget, counts) for s in shards]
    assert plans == [token_micro_batches(s, minis, budget, counts) for s in shards]  # deterministic
    mini = n // (world * minis)
    for shard, plan in zip(shards, plans):
        assert [len(micro) for micro in plan] == counts
        for k, micro in enumerate(plan):
            # Consecutive slices that cover the mini-batch's rows once each: no row is split or lost.
            assert micro[0].start == k * mini and micro[-1].stop == (k + 1) * mini
            assert all(a.stop == b.start and a.start < a.stop for a, b in pairwise(micro))
            assert all(forward_positions(shard, [s]) <= budget for s in micro)
    # Non-vacuous: micro-batches differ in size, and some rank had to split more than its own greedy count.
    assert len({s.stop - s.start for plan in plans for micro in plan for s in micro}) > 1
    if world > 1:
        assert any(c != counts for c in local)
    with pytest.raises(ValueError, match="7 rows cannot be split into 2 equal mini-batches"):
        token_micro_batches([5] * 7, 2, 100)


def _ragged_batch(rows: int, seed: int) -> RolloutBatch:
    """Prompts of 2-9 and completions of 1-12 tokens over a 12-token vocabulary, 4 rows per group."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(12) for _ in range(rng.randrange(2, 10))] for _ in range(rows // 4)]
    comps = [[rng.randrange(12) for _ in range(rng.randrange(1, 13))] for _ in range(rows)]
    return RolloutBatch(
        prompt_ids=[prompts[i // 4] for i in range(rows)],
        completion_ids=comps,
        sampling_logp=[[rng.uniform(-3.2, -1.8) for _ in c] for c in comps],
        truncated=[False] * rows,
        rewards=[0.0] * rows,
        reward_components={},
        group_ids=[i // 4 for i in range(rows)],
        weight_version=0,
        advantages=[rng.uniform(-1.5, 1.5) for _ in range(rows)],
    )


def _micro_loss(params, t, rows, cfg, **totals):
    """The actor's micro-batch loss on a toy causal model (embedding, a running mean over earlier
    positions, LM head): the forward is cut to the micro-batch's longest row like ``_forward``,
    old / reference log-probs are fixed offsets of the engine's."""
    emb, head = params
    attn_BL = t["attention_mask_BL"][rows]
    L = int(attn_BL.sum(1).max())
    ids_BL = t["input_ids_BL"][rows, :L]
    x_BLH = emb[ids_BL]
    hidden_BLH = torch.tanh(x_BLH.cumsum(1) / torch.arange(1, L + 1, dtype=x_BLH.dtype).view(1, L, 1))
    logp_BT, _ = completion_logprobs(
        hidden_BLH, ids_BL, t["prompt_len_B"][rows], t["loss_mask_BT"][rows], 0.9, lm_head=lambda h: h @ head
    )
    sampling_BT = t["sampling_logp_BT"][rows].double()
    return grpo_loss(
        logp_BT,
        sampling_BT + 0.05,
        sampling_BT - 0.1,
        t["adv_B"][rows].double(),
        t["loss_mask_BT"][rows],
        cfg,
        sampling_logp_BT=sampling_BT,
        **totals,
    )[0]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("minis", [1, 2])
def test_token_budget_micro_batches_over_two_ranks_give_the_full_batch_gradient(loss_type, minis):
    """2 fake ranks, rows dealt by rank_rows and packed under a token budget into uneven micro-batches
    (the agreed count per optimizer step), each loss scaled by backward_scale, then DeepSpeed's
    arithmetic: each backward divided by the accumulation steps, gradients averaged over ranks.
    Each optimizer step's gradient equals that of its whole mini-batch in one piece."""
    rows, world, budget = 16, 2, 36
    cfg = AlgoConfig(
        loss_type=loss_type, beta=0.05, rollout_correction={"max": 1.5}, max_completion_length=12, epsilon_high=0.28
    )
    batch = _ragged_batch(rows, seed=1)
    gen = torch.Generator().manual_seed(0)
    params0 = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((12, 6), (6, 12))]
    full_t = batch.to_tensors(pad_id=0)
    lengths = [len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids)]
    shards = [batch.select(mine).to_tensors(pad_id=0) for mine in rank_rows(lengths, world, minis)]
    shard_lengths = [t["attention_mask_BL"].sum(1).tolist() for t in shards]
    local = [[len(m) for m in token_micro_batches(s, minis, budget)] for s in shard_lengths]
    counts = [max(c[k] for c in local) for k in range(minis)]
    plans = [token_micro_batches(s, minis, budget, counts) for s in shard_lengths]
    assert len({s.stop - s.start for plan in plans for micro in plan for s in micro}) > 1  # uneven
    assert local[0] != local[1]  # and one rank splits beyond its own greedy count to match the other
    mini = rows // minis
    for k in range(minis):
        whole = [p.clone().requires_grad_() for p in params0]
        _micro_loss(whole, full_t, slice(k * mini, (k + 1) * mini), cfg).backward()
        totals = {
            "num_sequences_total": mini,
            "num_tokens_total": float(full_t["loss_mask_BT"][k * mini : (k + 1) * mini].sum()),
        }
        for scaled in (True, False):
            rank_grads = []
            for t, plan in zip(shards, plans):
                params = [p.clone().requires_grad_() for p in params0]
                ga = len(plan[k])
                for micro_rows in plan[k]:
                    if scaled:
                        loss = _micro_loss(params, t, micro_rows, cfg, **totals) * backward_scale(ga, world)
                    else:  # the classic bug: each micro-batch normalised by its own counts
                        loss = _micro_loss(params, t, micro_rows, cfg)
                    (loss / ga).backward()  # DeepSpeed's division by the accumulation steps
                rank_grads.append([p.grad for p in params])
            for i, p in enumerate(whole):
                got = torch.stack([g[i] for g in rank_grads]).mean(0)  # DeepSpeed's mean over ranks
                rel = float((got - p.grad).norm() / p.grad.norm())
                if scaled:
                    assert rel < 1e-6, f"step {k}, parameter {i}: relative gradient error {rel:.3g}"
                else:
                    assert rel > 1e-3


def _m(tokens: float, value: float) -> dict[str, torch.Tensor]:
    d = {k: torch.tensor(value) for k in METRIC_KEYS}
    d["num_tokens"] = torch.tensor(tokens)
    return d


def test_pack_then_rank_sum_then_unpack_is_token_weighted():
    # Rank 0: micro-batches with 3 tokens (value 1) and 1 token (value 5); rank 1: 4 tokens (value 2).
    rank0 = pack_metrics([_m(3, 1.0), _m(1, 5.0)], loss_sum=0.3)
    rank1 = pack_metrics([_m(4, 2.0)], loss_sum=0.5)
    out = unpack_metrics(rank0 + rank1, num_optimizer_steps=2)
    # (3*1 + 1*5 + 4*2) / 8 = 2
    assert all(out[k] == pytest.approx(2.0) for k in METRIC_KEYS)
    assert out["loss"] == pytest.approx(0.4)  # (0.3 + 0.5) over 2 optimizer steps


def test_lerp_mixes_in_place_and_checks_shapes():
    dst, src = [torch.tensor([1.0, 3.0])], [torch.tensor([3.0, -1.0])]
    lerp_(dst, src, 0.25)
    assert torch.equal(dst[0], torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError, match="reference part"):
        lerp_([torch.zeros(2)], [torch.zeros(3)], 0.5)
    with pytest.raises(ValueError, match="parameters"):
        lerp_([torch.zeros(2)], [], 0.5)


def test_a_signal_during_the_hand_out_to_all_ranks_waits_until_every_rank_has_the_call():
    """SIGTERM or Ctrl-C while a call is handed to the ranks is held until all have it, then handled."""
    import os
    import signal

    from learner.group import _signals_deferred

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: seen.append(signum))
    try:
        with _signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("all ranks called")
        assert seen == ["all ranks called", signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt), _signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            seen.append("still inside")
        assert seen[-1] == "still inside"
    finally:
        signal.signal(signal.SIGTERM, previous)
