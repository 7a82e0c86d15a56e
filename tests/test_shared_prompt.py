"""The shared-prompt forward (``learner.shared_prompt_forward``): each unique prompt of a micro-batch
forwarded once, its rows' completions on top of its key/value cache. It must give the row layout's
log-probs and gradients, however a batch's groups are dealt to ranks and cut into micro-batches, and
count the work it does (micro-batch cost, real tokens) for the token budget and the metrics."""

from __future__ import annotations

import random

import pytest
import torch

from grpo_dist.batch import RolloutBatch
from grpo_dist.config import AlgoConfig, Config
from grpo_dist.forward import prompt_layout, row_logprobs, shared_prompt_logprobs, unwrap
from grpo_dist.losses import grpo_loss
from learner.step import backward_scale, micro_cost, pack_by_tokens, rank_rows, token_micro_batches, unique_tokens


def grouped_batch(groups: int, G: int, seed: int, vocab: int, prompt=(3, 14), completion=(1, 12)) -> RolloutBatch:
    """``groups`` prompts of ragged lengths with G ragged completions each (G consecutive rows)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randrange(*prompt))] for _ in range(groups)]
    comps = [[rng.randrange(3, vocab) for _ in range(rng.randrange(*completion))] for _ in range(groups * G)]
    rows = groups * G
    return RolloutBatch(
        prompt_ids=[prompts[i // G] for i in range(rows)],
        completion_ids=comps,
        sampling_logp=[[rng.uniform(-6.0, -4.0) for _ in c] for c in comps],
        truncated=[False] * rows,
        rewards=[0.0] * rows,
        reward_components={},
        group_ids=[i // G for i in range(rows)],
        weight_version=0,
        advantages=[rng.uniform(-1.5, 1.5) for _ in range(rows)],
    )


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny Qwen2 in float64, in train mode (dropout is 0). Log-probs of both layouts agree to
    ~1e-12; gradients to ~1e-7, because Qwen2's RMSNorm computes in float32 even in a float64 model
    (forward and backward), and the layouts sum a prompt's gradient over its rows on either side of it."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    return m.train()


def _logp_and_grads(model, t, micro, layout, temperature=0.9):
    fn = shared_prompt_logprobs if layout == "shared" else row_logprobs
    model.zero_grad()
    head = unwrap(model).get_output_embeddings()
    parts = []
    for rows in micro:
        logp_BT, ent_BT = fn(model, t, rows, temperature, lm_head=head, chunk_tokens=7, entropy=True)
        (
            logp_BT * t["loss_mask_BT"][rows] * torch.linspace(0.5, 1.5, logp_BT.shape[1], dtype=logp_BT.dtype)
        ).sum().backward()
        parts.append((logp_BT.detach(), ent_BT))
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return parts, grads


def test_shared_prompt_gives_the_row_layouts_logprobs_entropy_and_gradients(model):
    """Ragged prompts and completions; micro-batches that hold whole groups, split a group, and mix
    prompts of different lengths."""
    batch = grouped_batch(groups=3, G=4, seed=0, vocab=model.config.vocab_size)
    t = batch.to_tensors(pad_id=0)
    micro = [slice(0, 4), slice(4, 10), slice(10, 12)]
    rows_parts, rows_grads = _logp_and_grads(model, t, micro, "rows")
    shared_parts, shared_grads = _logp_and_grads(model, t, micro, "shared")
    for (a, ea), (b, eb), rows in zip(rows_parts, shared_parts, micro):
        m = t["loss_mask_BT"][rows] > 0
        assert torch.allclose(a[m], b[m], rtol=0, atol=1e-12), float((a - b)[m].abs().max())
        assert torch.allclose(ea[m], eb[m], rtol=0, atol=1e-12)
        assert bool((b[~m] == 0).all())
    assert float((rows_grads - shared_grads).norm() / rows_grads.norm()) < 1e-6


def test_shared_prompt_matches_rows_in_float32_and_without_gradients(tiny_model_dir):
    """The dtype the CPU learner trains in, and the no-grad reference pass."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    t = grouped_batch(groups=4, G=2, seed=3, vocab=m.config.vocab_size, prompt=(10, 40), completion=(5, 30)).to_tensors(
        0
    )
    head = unwrap(m).get_output_embeddings()
    with torch.no_grad():
        a, _ = row_logprobs(m, t, slice(0, 8), 1.0, lm_head=head, chunk_tokens=None)
        b, _ = shared_prompt_logprobs(m, t, slice(0, 8), 1.0, lm_head=head, chunk_tokens=None)
    mask = t["loss_mask_BT"] > 0
    assert float((a - b)[mask].abs().max()) < 1e-5


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_groups_dealt_to_two_fake_ranks_under_a_token_budget_give_the_full_batch_gradient(model, loss_type):
    """The learner's whole path on 2 fake ranks: groups dealt by rank_rows(groups=...), each rank's
    rows packed under a token budget that counts each prompt once (the agreed count), shared-prompt
    forwards, loss scaled by backward_scale, DeepSpeed's division and rank mean: the gradient of the
    whole batch forwarded row by row in one piece."""
    cfg = AlgoConfig(loss_type=loss_type, beta=0.0, max_completion_length=12, epsilon_high=0.28, num_generations=4)
    batch = grouped_batch(groups=4, G=4, seed=5, vocab=model.config.vocab_size)
    world, budget = 2, 40
    head = unwrap(model).get_output_embeddings()
    lengths = [len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids)]

    def loss_of(t, rows, fn, **totals):
        logp, _ = fn(model, t, rows, 1.0, lm_head=head, chunk_tokens=None)
        s = t["sampling_logp_BT"][rows].double()
        return grpo_loss(logp, s, None, t["adv_B"][rows].double(), t["loss_mask_BT"][rows], cfg, **totals)[0]

    full = batch.to_tensors(0)
    model.zero_grad()
    loss_of(full, slice(0, len(batch)), row_logprobs).backward()
    want = torch.cat([p.grad.flatten() for p in model.parameters()])

    row_prompts = [(g, len(p)) for g, p in zip(batch.group_ids, batch.prompt_ids)]
    shards = [batch.select(mine).to_tensors(0) for mine in rank_rows(lengths, world, 1, row_prompts)]
    prompts = [list(zip(t["group_B"].tolist(), t["prompt_len_B"].tolist())) for t in shards]
    shard_lengths = [t["attention_mask_BL"].sum(1).tolist() for t in shards]
    local = [len(token_micro_batches(n, 1, budget, prompts=p)[0]) for n, p in zip(shard_lengths, prompts)]
    plans = [token_micro_batches(n, 1, budget, [max(local)], p)[0] for n, p in zip(shard_lengths, prompts)]
    assert all(micro_cost(n, s, p) <= budget for n, p, plan in zip(shard_lengths, prompts, plans) for s in plan)
    totals = {"num_sequences_total": len(batch), "num_tokens_total": float(full["loss_mask_BT"].sum())}
    got = torch.zeros_like(want)
    for t, plan in zip(shards, plans):
        model.zero_grad()
        for rows in plan:
            (
                loss_of(t, rows, shared_prompt_logprobs, **totals) * backward_scale(len(plan), world) / len(plan)
            ).backward()
        got += torch.cat([p.grad.flatten() for p in model.parameters()]) / world
    assert float((got - want).norm() / want.norm()) < 1e-6


def test_prompt_layout_maps_rows_to_their_unique_prompts_in_order_of_appearance():
    first, of = prompt_layout(torch.tensor([7, 7, 2, 2, 2, 9]))
    assert first.tolist() == [0, 2, 5] and of.tolist() == [0, 0, 1, 1, 1, 2]
    first, of = prompt_layout(torch.tensor([3, 1, 3]))  # a group split by another one
    assert first.tolist() == [0, 1] and of.tolist() == [0, 1, 0]


def test_rank_rows_keeps_each_groups_rows_together_on_one_rank_and_balances_the_shared_work():
    # 4 groups of 4 rows over 2 ranks; each group's work is its prompt once plus its completions.
    prompt_len = [8, 20, 4, 2]
    completions = [[2, 4, 3, 1], [10, 11, 9, 10], [16, 16, 17, 15], [3, 4, 2, 3]]
    lengths = [prompt_len[g] + c for g in range(4) for c in completions[g]]
    prompts = [(g, prompt_len[g]) for g in range(4) for _ in range(4)]
    share = rank_rows(lengths, 2, 1, prompts)
    # Work: group 0 = 18, group 1 = 60, group 2 = 68, group 3 = 14. Dealt costliest first: 2 -> rank 0,
    # 1 -> rank 1, 0 -> rank 1 (60 < 68), 3 -> rank 0 (68 < 78): 82 and 78. Rows longest first inside a group.
    assert share == [[10, 8, 9, 11, 13, 12, 15, 14], [5, 4, 7, 6, 1, 2, 0, 3]]
    work = [
        sum(prompt_len[g] for g in {prompts[i][0] for i in rows}) + sum(lengths[i] - prompts[i][1] for i in rows)
        for rows in share
    ]
    assert work == [82, 78]
    # Group size 3 does not divide 4 rows per rank: a group is split, its longest rows first.
    split = rank_rows([9, 8, 7, 6, 5, 4, 3, 2], 2, 1, [(0, 1)] * 3 + [(1, 1)] * 3 + [(2, 1)] * 2)
    assert split == [[0, 1, 2, 6], [3, 4, 5, 7]]
    # Without prompts: rows longest first, as before.
    assert rank_rows([1, 2, 3, 4, 8, 7, 6, 5], 2, 2) == [[3, 0, 4, 7], [2, 1, 5, 6]]


def test_halving_to_the_agreed_count_cuts_at_a_group_boundary():
    lengths = [10] * 6
    prompts = [(0, 4)] * 2 + [(1, 4)] * 4  # boundaries: after row 2
    assert pack_by_tokens(lengths, 100, count=2, prompts=prompts) == [slice(0, 2), slice(2, 6)]
    assert pack_by_tokens(lengths, 100, count=2) == [slice(0, 3), slice(3, 6)]  # row layout: the middle


def test_models_whose_attention_the_shared_prompt_forward_cannot_apply_are_named():
    from types import SimpleNamespace as NS

    from grpo_dist.forward import attention_window, shared_prompt_problem

    assert shared_prompt_problem(NS(layer_types=["full_attention"] * 4), 512) is None
    # Qwen2 ships sliding_window with use_sliding_window=false: full attention.
    qwen = NS(layer_types=["full_attention"] * 2, sliding_window=4096, use_sliding_window=False)
    assert attention_window(qwen) is None and shared_prompt_problem(qwen, 10**6) is None
    mistral = NS(sliding_window=4096)
    assert shared_prompt_problem(mistral, 4096) is None
    assert "sliding window of 4096 tokens, shorter than its rows of up to 8192" in shared_prompt_problem(mistral, 8192)
    gemma = NS(layer_types=["sliding_attention", "full_attention"], sliding_window=512)
    assert attention_window(gemma) == 512 and shared_prompt_problem(gemma, None) is None
    assert "linear_attention" in shared_prompt_problem(NS(layer_types=["full_attention", "linear_attention"]), None)
    # A composite (vision-language) config keeps its decoder's layout in its text config.
    composite = NS(get_text_config=lambda decoder: gemma)
    assert attention_window(composite) == 512 and "window of 512" in shared_prompt_problem(composite, 1024)
    # RoPE that rescales with the forward's length: fine within its original length, refused past it.
    phi = NS(
        rope_parameters={"rope_type": "longrope", "original_max_position_embeddings": 4096},
        max_position_embeddings=131072,
    )
    assert shared_prompt_problem(phi, 4096) is None and shared_prompt_problem(phi, None) is None
    assert "longrope RoPE changes frequencies with the forward's length beyond 4096" in shared_prompt_problem(phi, 5000)
    assert shared_prompt_problem(NS(rope_parameters={"rope_type": "linear", "factor": 2.0}), 10**6) is None


def test_padded_completion_columns_make_no_position_beyond_the_row_layouts():
    """A dynamic RoPE rescales once the forward's longest position passes its original length. Rows
    reach exactly that length; if the padded columns of the long-prompt group counted on past their
    completion, the completion forward would rescale and differ from the row layout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=12,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
    )
    model = LlamaForCausalLM(cfg).double().eval()
    # Group 0: a 10-token prompt with 2-token completions; group 1: a 2-token prompt with 10-token ones.
    rows = [([5] * 10, [7, 8]), ([5] * 10, [9, 10]), ([6, 6], list(range(3, 13))), ([6, 6], list(range(13, 23)))]
    batch = RolloutBatch(
        prompt_ids=[p for p, _ in rows],
        completion_ids=[c for _, c in rows],
        sampling_logp=[[0.0] * len(c) for _, c in rows],
        truncated=[False] * 4,
        rewards=[0.0] * 4,
        reward_components={},
        group_ids=[0, 0, 1, 1],
        weight_version=0,
        advantages=[0.0] * 4,
    )
    t = batch.to_tensors(pad_id=0)
    head = model.get_output_embeddings()
    with torch.no_grad():
        a, _ = row_logprobs(model, t, slice(0, 4), 1.0, lm_head=head, chunk_tokens=None)
        b, _ = shared_prompt_logprobs(model, t, slice(0, 4), 1.0, lm_head=head, chunk_tokens=None)
    m = t["loss_mask_BT"] > 0
    assert torch.allclose(a[m], b[m], rtol=0, atol=1e-12), float((a - b)[m].abs().max())


def test_rows_of_one_group_with_different_prompts_are_refused(tiny_model_dir):
    """The group id promises a shared prompt; a batch that breaks it must not train one row on another's prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    batch = grouped_batch(groups=2, G=2, seed=3, vocab=model.config.vocab_size, prompt=(6, 7))
    batch.prompt_ids[1] = list(reversed(batch.prompt_ids[1]))
    t = batch.to_tensors(pad_id=0)
    with torch.no_grad(), pytest.raises(ValueError, match="same group id have different prompts"):
        shared_prompt_logprobs(model, t, slice(0, 4), 1.0, lm_head=model.get_output_embeddings(), chunk_tokens=None)


def test_micro_cost_and_unique_tokens_count_each_prompt_once():
    lengths = [10, 12, 7, 9]  # rows: prompt 6 + 4, prompt 6 + 6, prompt 3 + 4, prompt 3 + 6
    prompts = [(0, 6), (0, 6), (1, 3), (1, 3)]
    assert micro_cost(lengths, slice(0, 4)) == 4 * 12
    assert micro_cost(lengths, slice(0, 4), prompts) == 2 * 6 + 4 * 6
    assert micro_cost(lengths, slice(2, 3), prompts) == 7  # one row: its own length
    assert unique_tokens(lengths, [slice(0, 2), slice(2, 4)], prompts) == (6 + 4 + 6) + (3 + 4 + 6)
    assert unique_tokens(lengths, [slice(0, 1), slice(1, 4)], prompts) == 10 + (6 + 3 + 6 + 4 + 6)


def test_gradient_checkpointing_with_the_shared_prompt_forward_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match=r"learner\.shared_prompt_forward=false"):
        Config.model_validate({"model": {"gradient_checkpointing": True}})
    Config.model_validate({"model": {"gradient_checkpointing": True}, "learner": {"shared_prompt_forward": False}})
