"""Pure pieces of the learner: DeepSpeed config, LR schedule, batch split, placement, metrics."""

from __future__ import annotations

import pytest
import torch

from grpo_dist.config import LearnerConfig, ModelConfig
from learner.ds_config import build_ds_config, grad_accum_steps, lr_multiplier, ref_ds_config, resolve_dtype
from learner.placement import placement_bundles, rank_env
from learner.step import METRIC_KEYS, lerp_, micro_slices, pack_metrics, rank_rows, unpack_metrics


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
        zero_stage=3, micro_batch_size=4, lr=2e-5, adam_betas=(0.9, 0.95), weight_decay=0.1, max_grad_norm=0.5
    )
    cfg = build_ds_config(lc, torch.float32, world_size=2, gradient_accumulation_steps=3)
    assert cfg["train_batch_size"] == 24
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 2e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True},
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
        with pytest.raises(KeyboardInterrupt):
            with _signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                seen.append("still inside")
        assert seen[-1] == "still inside"
    finally:
        signal.signal(signal.SIGTERM, previous)
