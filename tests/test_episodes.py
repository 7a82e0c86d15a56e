"""The multi-turn turn loop (rollout_server.episodes) on a scripted engine: limits, stop reasons,
environment failures and the batch it makes. The real engine's exactness is in test_multi_turn.py."""

from __future__ import annotations

import math
import time

import pytest
from transformers import AutoTokenizer

from grpo_dist.config import MultiTurnConfig
from grpo_dist.envs import EnvError, Step, ToolEnv
from grpo_dist.transcript import encode, prompt_ids_with, render
from rollout_server.episodes import EpisodeRunner
from rollout_server.scoring import build_batch

SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": 0}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def rows(tok, k=2):
    out = []
    for q, a in [("What is 2 + 3?", "5"), ("Add 10 and 32.", "42"), ("7 + 8 =", "15")][:k]:
        messages = [{"role": "user", "content": q}]
        out.append({"prompt": q, "prompt_ids": prompt_ids_with(tok, messages), "messages": messages, "answer": a})
    return out


class ScriptedEngine:
    """Every request answers ``text`` (as tokens, then the end-of-turn token unless cut), at most
    ``max_tokens`` tokens; records the calls."""

    def __init__(self, tok, text="I think 5", stop=True):
        self.tok, self.text, self.stop, self.calls = tok, text, stop, []

    def __call__(self, prompts, params):
        self.calls.append((prompts, params))
        out = []
        for g, kw in enumerate(params):
            ids = encode(self.tok, self.text) + ([self.tok.eos_token_id] if self.stop else [])
            cut = ids[: kw["max_tokens"]]
            for _ in range(kw["n"]):
                out.append(
                    {
                        "group": g,
                        "ids": cut,
                        "logp": [-0.5] * len(cut),
                        "text": self.tok.decode(cut, skip_special_tokens=True),
                        "truncated": len(cut) < len(ids),
                    }
                )
        return out


class Nag:
    """Never done: answers every turn with "Again." and a reward of 1; counts its closes."""

    closed = 0

    def __init__(self, row):
        self.turns = 0

    def reset(self):
        return []

    def step(self, text):
        self.turns += 1
        return {"messages": [{"role": "user", "content": "Again."}], "reward": 1.0}

    def close(self):
        Nag.closed += 1


def runner(tok, make_env, max_model_tokens=64, **cfg):
    """An EpisodeRunner on ``make_env`` (the config's env path is never imported here)."""
    return EpisodeRunner(
        MultiTurnConfig(env="tests.test_episodes:Nag", **cfg),
        tok,
        make_env,
        max_model_tokens=max_model_tokens,
        max_model_len=256,
    )


def run(r, tok, engine, n=2, k=2):
    return r.run(rows(tok, k), n, SAMPLING, [100 * i for i in range(k)], engine)


def test_turns_stop_at_max_turns_and_every_environment_is_closed(tok):
    Nag.closed = 0
    engine = ScriptedEngine(tok)
    recs = run(runner(tok, Nag, max_turns=3, max_tokens_per_turn=16), tok, engine)
    assert [r["turns"] for r in recs] == [3] * 4 and {r["stop"] for r in recs} == {"max_turns"}
    assert [r["env_reward"] for r in recs] == [3.0] * 4  # the last turn's step counts too
    assert Nag.closed == 4
    # Turn 1 is one request per prompt with n=2; later turns one request per live episode.
    assert [len(p) for p, _ in engine.calls] == [2, 4, 4]
    assert [c[1][0]["n"] for c in engine.calls] == [2, 1, 1]
    # Later turns continue from the episode's own tokens: prompt, model turn, environment turn.
    r0 = recs[0]
    first_prompt = rows(tok)[0]["prompt_ids"]
    assert engine.calls[1][0][0] == first_prompt + r0["ids"][: len(engine.calls[1][0][0]) - len(first_prompt)]
    # The transcript is the chat template's render of the conversation (the scripted turns are canonical).
    convo = r0["messages"]
    assert first_prompt + r0["ids"] == encode(tok, render(tok, convo, add_generation_prompt=False))
    model = [i for i, m in zip(r0["ids"], r0["loss_mask"]) if m]
    assert model == 3 * (encode(tok, "I think 5") + [tok.eos_token_id])
    assert all(lp == 0.0 for lp, m in zip(r0["logp"], r0["loss_mask"]) if not m)


def test_turn_seeds_differ_by_turn_and_episode(tok):
    engine = ScriptedEngine(tok)
    run(runner(tok, Nag, max_turns=3), tok, engine)
    seeds = [kw["seed"] for _, params in engine.calls for kw in params]
    assert len(seeds) == len(set(seeds)) == 2 + 4 + 4


def test_model_budget_and_context_end_episodes(tok):
    engine = ScriptedEngine(tok, text="x" * 20)
    recs = run(runner(tok, Nag, max_turns=10, max_tokens_per_turn=16, max_model_tokens=40), tok, engine)
    assert {r["stop"] for r in recs} == {"max_model_tokens"}
    assert all(sum(r["loss_mask"]) <= 40 for r in recs)
    # Each turn asks for no more than what is left of the budget.
    assert [kw["max_tokens"] for kw in engine.calls[-1][1]] == [40 - 32] * 4
    mt = MultiTurnConfig(env="x:y", max_turns=10, max_tokens_per_turn=16)
    small = EpisodeRunner(mt, tok, Nag, max_model_tokens=1000, max_model_len=60)
    recs = small.run(rows(tok), 2, SAMPLING, [0, 100], ScriptedEngine(tok, text="x" * 20))
    assert {r["stop"] for r in recs} == {"context"}
    assert all(len(r["prompt_ids"]) + len(r["ids"]) <= 60 for r in recs)


def test_long_environment_messages_are_cut_and_counted(tok):
    class Verbose(Nag):
        def step(self, text):
            return {"messages": [{"role": "user", "content": "y" * 500}]}

    recs = run(runner(tok, Verbose, max_turns=2, max_env_tokens_per_turn=40), tok, ScriptedEngine(tok))
    for r in recs:
        env_run = [i for i, m in zip(r["ids"], r["loss_mask"]) if not m]
        assert 30 < len(env_run) <= 40 and r["env_messages_cut"] == 1


def sleepy(seconds: float) -> str:
    """Sleeps, then says so.

    Args:
        seconds: how long to sleep
    """
    time.sleep(seconds)
    return "slept"


def test_a_sleeping_tool_times_out_and_a_tool_loop_stops_at_max_turns(tok):
    call = '<tool_call>{"name": "sleepy", "arguments": {"seconds": 30}}</tool_call>'
    mt = MultiTurnConfig(tools=["tests.test_episodes:sleepy"], max_turns=2, tool_timeout_s=0.3)
    r = EpisodeRunner(
        mt, tok, lambda row: ToolEnv([sleepy], tool_timeout_s=0.3), max_model_tokens=200, max_model_len=512
    )
    t0 = time.monotonic()
    recs = r.run(rows(tok, 1), 2, SAMPLING, [0], ScriptedEngine(tok, text=call))
    # Two turns x two episodes, each with one call of 0.3 s, the episodes' steps side by side.
    assert time.monotonic() - t0 < 2 * 0.3 + 5
    assert {x["stop"] for x in recs} == {"max_turns"} and [x["info"]["tool_calls"] for x in recs] == [2.0, 2.0]
    assert [x["info"]["tool_errors"] for x in recs] == [2.0, 2.0]
    tool_msgs = [m for m in recs[0]["messages"] if m["role"] == "tool"]
    assert tool_msgs and "timed out after 0.3 s" in tool_msgs[0]["content"]


def test_environment_failures_end_the_episode_with_no_reward(tok):
    class Raises(Nag):
        def step(self, text):
            raise RuntimeError("boom")

    class Malformed(Nag):
        def step(self, text):
            return {"messages": "not a list"}

    class Slow(Nag):
        def step(self, text):
            time.sleep(30)

    for env, stop in ((Raises, "env_error"), (Malformed, "env_error"), (Slow, "timeout")):
        recs = run(runner(tok, env, tool_timeout_s=0.2), tok, ScriptedEngine(tok))
        assert {r["stop"] for r in recs} == {stop}, env
        assert all(r["turns"] == 1 for r in recs)
        assert all(math.isnan(r["env_reward"]) for r in recs)  # no verdict on the turn


def test_episode_time_runs_out(tok):
    class Dawdles(Nag):
        def step(self, text):
            time.sleep(0.15)
            return super().step(text)

    recs = run(runner(tok, Dawdles, max_turns=20, episode_timeout_s=0.4, tool_timeout_s=5), tok, ScriptedEngine(tok))
    assert {r["stop"] for r in recs} == {"timeout"} and all(2 <= r["turns"] <= 4 for r in recs)


def test_reset_messages_extend_the_prompt_and_must_agree_within_a_group(tok):
    class Briefs(Nag):
        def reset(self):
            return [{"role": "user", "content": "Use the calculator."}]

    engine = ScriptedEngine(tok)
    recs = run(runner(tok, Briefs, max_turns=1), tok, engine)
    convo = rows(tok)[0]["messages"] + [{"role": "user", "content": "Use the calculator."}]
    assert recs[0]["prompt_ids"] == prompt_ids_with(tok, convo) == engine.calls[0][0][0]

    class Random(Nag):
        count = 0

        def reset(self):
            Random.count += 1
            return [{"role": "user", "content": f"seed {Random.count}"}]

    with pytest.raises(EnvError, match="reset\\(\\) returned different messages for the 2 rollouts of prompt 0"):
        run(runner(tok, Random), tok, ScriptedEngine(tok))


def test_done_after_one_step_is_a_single_turn_batch(tok):
    class Once(Nag):
        def step(self, text):
            return Step(messages=[], reward=0.5, done=True)

    engine = ScriptedEngine(tok)
    recs = run(runner(tok, Once, max_tokens_per_turn=64), tok, engine)
    single = ScriptedEngine(tok)(
        [r["prompt_ids"] for r in rows(tok)], [dict(SAMPLING, n=2, max_tokens=64, seed=s) for s in (0, 100)]
    )
    assert [r["ids"] for r in recs] == [s["ids"] for s in single]
    assert [r["logp"] for r in recs] == [s["logp"] for s in single]
    assert all(r["loss_mask"] == [1] * len(r["ids"]) and r["stop"] == "done" and r["turns"] == 1 for r in recs)
    batch = build_batch(rows(tok), 2, recs, 0, [], 5.0, 0.0)
    plain = build_batch(rows(tok), 2, single, 0, [], 5.0, 0.0)
    assert batch.completion_ids == plain.completion_ids and batch.prompt_ids == plain.prompt_ids
    assert batch.sampling_logp == plain.sampling_logp
    t, u = batch.to_tensors(0), plain.to_tensors(0)
    assert all((t[k] == u[k]).all() for k in u if k != "adv_B")
    assert batch.reward_components == {"env": [0.5] * 4} and batch.rewards == [0.5] * 4
    assert batch.num_turns == [1] * 4 and batch.stop_reasons == ["done"] * 4


def test_episode_metrics_are_declared_and_count_the_model_tokens(tok):
    from grpo_dist.driver import batch_metrics
    from grpo_dist.metrics import undeclared

    recs = run(runner(tok, Nag, max_turns=3), tok, ScriptedEngine(tok))
    batch = build_batch(rows(tok), 2, recs, 0, [], 5.0, 0.0)
    m = batch_metrics(batch, 2)
    assert undeclared(m) == []
    assert m["rollout/turns_mean"] == 3 and m["rollout/stop/max_turns"] == 4 and m["rollout/stop/done"] == 0
    total = sum(len(c) for c in batch.completion_ids)
    assert m["rollout/env_token_fraction"] == pytest.approx(1 - sum(map(sum, batch.loss_mask)) / total)
    assert m["reward/env"] == 3.0 and m["rollout/tool_calls"] == 0
