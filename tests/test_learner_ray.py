"""The learner group on CPU: 2 Ray ranks over gloo, ZeRO-2 and ZeRO-3, tiny model.

Groups are module-scoped and reused; the first training test on each group compares its very
first update against a single-process reference, so it must run before the others (file order).
"""

from __future__ import annotations

import math
import random
import threading
from functools import partial
from pathlib import Path

import pytest
import ray
import torch

from grpo_dist.batch import RolloutBatch
from grpo_dist.config import Config
from grpo_dist.losses import completion_logprobs, grpo_loss
from grpo_dist.weight_sync import init_sync_group, recv_weights
from learner import LearnerGroup, lr_multiplier

pytestmark = pytest.mark.ray
REPO = str(Path(__file__).resolve().parents[1])
ROWS, G, WORLD, TOTAL_STEPS = 8, 4, 2, 10


@pytest.fixture(scope="module")
def ray_cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=8, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    yield
    if started:
        ray.shutdown()


def make_cfg(model_dir: Path, **learner) -> Config:
    algo, data = learner.pop("algorithm", {}), learner.pop("data", {})
    return Config.model_validate(
        {
            "model": {"path": str(model_dir), "dtype": "float32"},
            "data": data,
            "algorithm": {"num_generations": G, "beta": 0.04, "max_completion_length": 8, **algo},
            "trainer": {"prompts_per_step": ROWS // G},
            "learner": {"num_ranks": WORLD, "lr": 1e-3, "max_grad_norm": 1.0, **learner},
            "cluster": {"collective_timeout_s": 60, "rpc_timeout_s": 120},
        }
    )


def make_batch(seed: int, rows: int = ROWS) -> RolloutBatch:
    """Ragged prompts and completions (different lengths per row) with fixed advantages."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(5, 200) for _ in range(rng.randrange(2, 6))] for _ in range(-(-rows // G))]
    comps = [[rng.randrange(5, 200) for _ in range(rng.randrange(1, 9))] for _ in range(rows)]
    return RolloutBatch(
        prompt_ids=[prompts[i // G] for i in range(rows)],
        completion_ids=comps,
        # Near the tiny model's ~-5.6 so TIS weights are O(1), some capped.
        sampling_logp=[[rng.uniform(-6.5, -5.0) for _ in c] for c in comps],
        truncated=[False] * rows,
        rewards=[0.0] * rows,
        reward_components={},
        group_ids=[i // G for i in range(rows)],
        weight_version=0,
        advantages=[rng.uniform(-1.5, 1.5) for _ in range(rows)],
    )


def start_group(cfg: Config, name: str) -> LearnerGroup:
    group = LearnerGroup(
        cfg.learner,
        cfg.model,
        cfg.algorithm,
        cfg.cluster,
        total_steps=TOTAL_STEPS,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        name_prefix=name,
    )
    group.start(timeout_s=180)
    return group


# ---------------------------------------------------------------- what "the same update" means
# The learner's first update is compared with a single-process reference's. The two differ only in
# float32 summation order (micro-batch shapes, gradient accumulation, the all-reduce), so the bound
# comes from that rounding, not from one machine's run:
# - Adam's step is lr * m / (sqrt(v) + eps): at the default eps (1e-8) an element whose gradient is
#   near eps moves anywhere in (-lr, lr) on its gradient's last bits, and no bound on the update holds
#   across machines. These groups run AdamW with eps = max_grad_norm, which no element of a clipped
#   gradient exceeds: there g -> g / (|g| + eps) has slope between 1/(4 eps) and 1/eps, so the update's
#   relative error is at most twice the clipped gradient's, which clipping (dividing by the norm) makes
#   at most twice the raw gradient's. And unlike sign-like Adam, the update then scales with the
#   gradient: a wrong loss scale or accumulation boundary changes it.
# - A float32 sum of K terms is exact to K * 2**-24 of its terms' magnitudes (first-order forward error
#   analysis). Back from the loss to any weight, a gradient passes the LM head's sum over the vocabulary,
#   each layer's over its hidden and intermediate widths, and the sum over a mini-batch's positions.
# - lr = eps / 10 moves each weight (~lr * |g|) far above its float32 spacing; that spacing (one
#   rounding of w + update per optimizer step on each side) is added to the bound, computed per weight.
SMOOTH_ADAM = dict(max_grad_norm=1.0, adam_eps=1.0, lr=0.1)
U32 = 2.0**-24
VOCAB, HIDDEN, INTERMEDIATE, LAYERS = 265, 128, 512, 4  # grpo_dist.tiny_model, size="tiny" (checked below)
MAX_POSITIONS = ROWS * (5 + 8)  # make_batch: prompts of at most 5 tokens, completions of at most 8
GRAD_RTOL = (VOCAB + LAYERS * (HIDDEN + INTERMEDIATE) + MAX_POSITIONS) * U32  # ~1.7e-4

# Both refresh the reference after every step (after the update, so a first step still sees
# the initial reference). ZeRO-2: bnpo (token-normalised across ranks and micro-batches), TIS, mu = 1.
REF_SYNC = dict(ref_sync_every=1, ref_sync_alpha=0.5)
Z2 = dict(
    zero_stage=2,
    micro_batch_size=2,
    **SMOOTH_ADAM,
    **REF_SYNC,
    algorithm={"loss_type": "bnpo", "rollout_correction": {"max": 1.5}},
)
# ZeRO-3: GSPO (sequence ratio, grpo aggregation) with the entropy bonus (its gradient through the
# chunked LM head), mu = 2 (old log-probs, so the ratio moves), two optimizer steps per batch, one row
# per micro-batch; its first batch's 4 updates run through a 2-step warmup into the cosine decay.
Z3 = dict(
    zero_stage=3,
    micro_batch_size=1,
    optimizer_steps_per_batch=2,
    warmup_steps=2,
    lr_schedule="cosine",
    **SMOOTH_ADAM,
    **REF_SYNC,
    algorithm={"loss_type": "grpo", "num_iterations": 2, "importance_sampling_level": "sequence", "entropy_coef": 0.01},
)


@pytest.fixture(scope="module")
def z2(ray_cluster, tiny_model_dir):
    cfg = make_cfg(tiny_model_dir, **Z2)
    group = start_group(cfg, "z2")
    yield cfg, group
    group.shutdown()


@pytest.fixture(scope="module")
def z3(ray_cluster, tiny_model_dir):
    cfg = make_cfg(tiny_model_dir, **Z3)
    group = start_group(cfg, "z3")
    yield cfg, group
    group.shutdown()


# ---------------------------------------------------------------- single-process reference


def load_policy(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return model, tok.pad_token_id


def logp_of(model, t: dict, rows: list[int]) -> torch.Tensor:
    logits = model(input_ids=t["input_ids_BL"][rows], attention_mask=t["attention_mask_BL"][rows]).logits
    return completion_logprobs(logits, t["input_ids_BL"][rows], t["prompt_len_B"][rows], t["loss_mask_BT"][rows], 1.0)[
        0
    ]


def logp_and_entropy_of(model, t: dict, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=t["input_ids_BL"][rows], attention_mask=t["attention_mask_BL"][rows]).logits
    return completion_logprobs(
        logits, t["input_ids_BL"][rows], t["prompt_len_B"][rows], t["loss_mask_BT"][rows], 1.0, entropy="grad"
    )


def lr_schedule(cfg: Config):
    lc, ac = cfg.learner, cfg.algorithm
    total = TOTAL_STEPS * lc.optimizer_steps_per_batch * ac.num_iterations
    return partial(lr_multiplier, warmup_steps=lc.warmup_steps, total_steps=total, schedule=lc.lr_schedule)


def reference_update(model_dir: Path, cfg: Config, batch: RolloutBatch) -> tuple[float, float, dict[str, torch.Tensor]]:
    """The same GRPO step in one process: whole mini-batches, plain torch AdamW + grad clipping
    + the LR schedule. Returns the mean loss, the mean pre-clipping gradient norm and the weights.

    Mini-batch k is rows k*mini..(k+1)*mini of the batch, however the learner deals them to ranks."""
    model, pad_id = load_policy(model_dir)
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (
        VOCAB,
        HIDDEN,
        INTERMEDIATE,
        LAYERS,
    ), "GRAD_RTOL counts the tiny model's widths"
    ac, lc = cfg.algorithm, cfg.learner
    ref, _ = load_policy(model_dir)
    t = batch.to_tensors(pad_id)
    everything = list(range(len(batch)))
    with torch.no_grad():
        ref_logp = logp_of(ref, t, everything)
        old_logp = logp_of(model, t, everything) if ac.num_iterations > 1 else None
    opt = torch.optim.AdamW(
        model.parameters(), lr=lc.lr, betas=lc.adam_betas, eps=lc.adam_eps, weight_decay=lc.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg))
    mini = len(batch) // lc.optimizer_steps_per_batch
    losses, norms = [], []
    for _ in range(ac.num_iterations):
        for k in range(lc.optimizer_steps_per_batch):
            rows = list(range(k * mini, (k + 1) * mini))
            logp, ent = logp_and_entropy_of(model, t, rows)
            loss, _ = grpo_loss(
                logp,
                old_logp[rows] if old_logp is not None else None,
                ref_logp[rows],
                t["adv_B"][rows],
                t["loss_mask_BT"][rows],
                ac,
                sampling_logp_BT=t["sampling_logp_BT"][rows],
                ent_BT=ent,
            )
            opt.zero_grad()
            loss.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), lc.max_grad_norm).item())
            opt.step()
            sched.step()
            losses.append(loss.item())
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return sum(losses) / len(losses), sum(norms) / len(norms), weights


def assert_step_matches_reference(group: LearnerGroup, cfg: Config, model_dir: Path) -> dict:
    """One train step of ``group`` on batch 0 against the single-process reference, within the
    float32 bounds derived above (each optimizer step's error adds to the next's)."""
    assert cfg.learner.adam_eps >= cfg.learner.max_grad_norm, "the bound needs Adam's smooth regime"
    steps = cfg.learner.optimizer_steps_per_batch * cfg.algorithm.num_iterations
    batch = make_batch(0)
    before = group.gathered_state_dict()
    metrics = group.train_step(batch)
    after = group.gathered_state_dict()
    want_loss, want_norm, want = reference_update(model_dir, cfg, batch)
    # The loss is a mean of per-token terms of size ~|advantage| (the KL term is far smaller), plus
    # the entropy bonus's, at most entropy_coef * log(vocabulary).
    term = max(abs(a) for a in batch.advantages) + cfg.algorithm.entropy_coef * math.log(VOCAB)
    loss_atol = steps * GRAD_RTOL * term
    assert metrics["loss"] == pytest.approx(want_loss, abs=loss_atol)
    # The pre-clipping norm sees a wrong loss scale, which clipping hides from the update.
    assert metrics["grad_norm"] == pytest.approx(want_norm, rel=steps * GRAD_RTOL)
    assert set(after) == set(want) == set(before)
    err = sum(((after[n] - want[n]) ** 2).sum() for n in want) ** 0.5
    upd = sum(((want[n] - before[n]) ** 2).sum() for n in want) ** 0.5
    spacing = sum(((torch.nextafter(w.abs(), torch.tensor(float("inf"))) - w.abs()) ** 2).sum() for w in want.values())
    bound = 4 * steps * GRAD_RTOL * upd + steps * spacing**0.5
    assert err <= bound, f"update differs by {err:.3g} (relative {err / upd:.3g}), bound {bound:.3g}"
    # Not vacuous: the update is far above the bound.
    assert bound < 0.01 * upd
    return metrics


# ---------------------------------------------------------------- tests (file order matters)


@pytest.mark.parametrize("which", ["z2", "z3"])
def test_first_step_matches_single_process_reference(which, request, tiny_model_dir):
    cfg, group = request.getfixturevalue(which)
    metrics = assert_step_matches_reference(group, cfg, tiny_model_dir)
    steps = cfg.learner.optimizer_steps_per_batch * cfg.algorithm.num_iterations
    assert metrics["optimizer_steps"] == steps
    assert metrics["tokens"] == sum(len(c) for c in make_batch(0).completion_ids)
    assert metrics["lr"] == pytest.approx(cfg.learner.lr * lr_schedule(cfg)(steps - 1), rel=1e-9)
    expected = {
        "kl",
        "clip_low",
        "clip_high",
        "entropy",
        "tokens_per_s",
        "time/ref_logp",
        "time/old_logp",
        "time/train",
    }
    assert expected <= set(metrics)


@pytest.mark.parametrize("micro", [1, 4])
def test_micro_batch_times_grad_accum_gives_same_update(micro, ray_cluster, tiny_model_dir):
    # Same effective batch as z2 (micro 2 x GA 2): micro 1 x GA 4 and micro 4 x GA 1.
    cfg = make_cfg(tiny_model_dir, **{**Z2, "micro_batch_size": micro})
    step_matches_reference(cfg, f"micro{micro}", tiny_model_dir)


def step_matches_reference(cfg, name, model_dir) -> dict:
    """One train step of a fresh group on batch 0 matches the single-process reference."""
    group = start_group(cfg, name)
    try:
        return assert_step_matches_reference(group, cfg, model_dir)
    finally:
        group.shutdown()


# make_batch's rows have 7-13 tokens; with the shared-prompt forward (groups dealt whole) 18 packs the
# first batch unevenly: under ZeRO-2 rank 0's group greedily makes 4 one-row micro-batches and rank 1's
# 3 + 1 rows are split to match; under ZeRO-3 each rank runs 1 then 2 micro-batches in its 2 optimizer
# steps, so the accumulation changes between steps.
@pytest.mark.parametrize("which", ["z2", "z3"])
def test_token_budget_micro_batches_give_same_update(which, ray_cluster, tiny_model_dir):
    budget = {"max_tokens_per_micro_batch": 18, "data": {"max_prompt_length": 5}}
    cfg = make_cfg(tiny_model_dir, **{**(Z2 if which == "z2" else Z3), **budget})
    metrics = step_matches_reference(cfg, f"budget-{which}", tiny_model_dir)
    assert metrics["optimizer_steps"] == cfg.learner.optimizer_steps_per_batch * cfg.algorithm.num_iterations
    # Micro-batches this small (a budget of 18 positions, each prompt counted once) can hold no padding.
    assert 0 <= metrics["padding_fraction"] < 0.2 and 0 <= metrics["shared_prompt_saving"] < 1


def test_manifest_has_hf_names_full_shapes_and_no_tied_head(z3, tiny_model_dir):
    _, group = z3
    manifest = group.weight_manifest()
    model, _ = load_policy(tiny_model_dir)
    assert model.config.tie_word_embeddings
    want = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert {s.name: s.shape for s in manifest} == want
    assert "lm_head.weight" not in want and {s.dtype for s in manifest} == {"float32"}


@pytest.mark.parametrize("which", ["z2", "z3"])
def test_broadcast_delivers_exact_weights(which, request):
    _, group = request.getfixturevalue(which)
    manifest = group.weight_manifest()
    host, port = group.sync_address()
    bucket_bytes = int(group.learner_cfg.weight_sync_bucket_mb * 2**20)
    got, errors = {}, []

    def receive():
        try:
            pg = init_sync_group(host, port, 1, 2, timeout_s=60)
            got.update({n: t.clone() for n, t in recv_weights(pg, manifest, bucket_bytes)})
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    th = threading.Thread(target=receive)
    th.start()
    info = group.broadcast_weights(host, port, 2, version=7, timeout_s=30)
    th.join(timeout=60)
    assert not errors and not th.is_alive()
    want = group.gathered_state_dict()
    assert list(got) == [s.name for s in manifest]
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert info["version"] == 7 and info["bytes"] == sum(s.nbytes for s in manifest)


def test_broadcast_to_absent_receiver_times_out(z3):
    _, group = z3
    host, port = group.sync_address()
    with pytest.raises(TimeoutError, match="weight-sync group"):
        group.broadcast_weights(host, port, 2, version=1, timeout_s=3)
    # The group is still usable afterwards.
    assert group.gathered_state_dict()


def test_loss_decreases_on_repeated_batch(z2, tiny_model_dir):
    """The GRPO surrogate of a fixed batch, evaluated in-process from the gathered weights, drops."""
    cfg, group = z2
    batch = make_batch(1)
    model, pad_id = load_policy(tiny_model_dir)
    t = batch.to_tensors(pad_id)
    rows = list(range(ROWS))
    algo = cfg.algorithm.model_copy(update={"beta": 0.0, "rollout_correction": None})

    def surrogate(state: dict, old_logp: torch.Tensor | None) -> tuple[float, torch.Tensor]:
        model.load_state_dict(state, strict=False)
        with torch.no_grad():
            logp = logp_of(model, t, rows)
            loss, _ = grpo_loss(
                logp, old_logp if old_logp is not None else logp, None, t["adv_B"], t["loss_mask_BT"], algo
            )
        return loss.item(), logp

    start, old = surrogate(group.gathered_state_dict(), None)
    for _ in range(3):
        group.train_step(batch)
    end, _ = surrogate(group.gathered_state_dict(), old)
    assert end < start - 1e-3


@pytest.mark.parametrize("which", ["z2", "z3"])
def test_reference_refresh_mixes_policy_into_reference(which, request):
    cfg, group = request.getfixturevalue(which)
    ref_before = group.gathered_state_dict(reference=True)
    group.train_step(make_batch(5))
    policy, ref_after = group.gathered_state_dict(), group.gathered_state_dict(reference=True)
    a = cfg.learner.ref_sync_alpha
    for n, want in ref_before.items():
        torch.testing.assert_close(ref_after[n], a * policy[n] + (1 - a) * want, rtol=0, atol=1e-7)
    assert any(not torch.equal(ref_after[n], ref_before[n]) for n in ref_before)


@pytest.mark.parametrize("which", ["z2", "z3"])
def test_save_hf_loads_in_transformers(which, request, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, group = request.getfixturevalue(which)
    group.save_hf(str(tmp_path / "hf"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").pad_token_id is not None
    want = group.gathered_state_dict()
    got = dict(loaded.named_parameters())
    assert set(got) == set(want)
    assert all(torch.equal(got[n].detach(), want[n]) for n in want)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("which", ["z2", "z3"])
def test_checkpoint_resume_gives_same_next_step(which, request, tmp_path):
    _, group = request.getfixturevalue(which)
    group.train_step(make_batch(2))  # optimizer moments are non-trivial before saving
    group.save_checkpoint(str(tmp_path / "ds"))
    batch = make_batch(3)
    m1 = group.train_step(batch)
    w1 = group.gathered_state_dict()
    group.train_step(make_batch(4))  # drift away, then come back
    group.load_checkpoint(str(tmp_path / "ds"))
    m2 = group.train_step(batch)
    w2 = group.gathered_state_dict()
    for key in ("loss", "kl", "grad_norm", "lr", "optimizer_steps"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-6, abs=1e-9), key
    assert all(torch.equal(w1[n], w2[n]) for n in w1)


def test_batch_size_sets_gradient_accumulation(z2):
    _, group = z2
    before = group.train_step(make_batch(6))["optimizer_steps"]
    big = make_batch(7, rows=2 * ROWS)  # accumulation 2 -> 4 micro-batches, still one update
    metrics = group.train_step(big)
    assert metrics["optimizer_steps"] == before + 1
    assert metrics["tokens"] == sum(len(c) for c in big.completion_ids)
    with pytest.raises(ValueError, match=r"batch of 6 rows cannot be split"):
        group.train_step(make_batch(8, rows=6))
