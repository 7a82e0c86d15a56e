"""Served reward models without Ray or a model: the config, the pure parts, the queue an actor admits
rows from, the retry loop, the caller's row bookkeeping under random completion order, the pool's
state machine and the checks before launch. The real actors are in test_reward_service.py."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from grpo_dist.config import Config, ConfigError, RewardModelSpec, RewardsConfig
from grpo_dist.errors import UserError
from grpo_dist.preflight import preflight
from grpo_dist.reward_models import (
    ScoreQueue,
    actor_index,
    actor_name,
    call_with_retries,
    choice_score,
    percentile,
    render,
)
from reward_server.worker import ScoreServer
from rollout_server.pool import AWAITING, DOWN, SERVING, STARTING, decide
from rollout_server.scoring import build_batch
from rollout_server.served_rewards import ServedRewards

JUDGE = dict(name="judge", kind="judge", path="m", prompt_template="Q: {question}\nA: {answer}\nRight?")


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "bad, needle",
    [
        (dict(JUDGE, name="accuracy"), "'accuracy' is taken"),
        (dict(JUDGE, name="env"), "'env' is taken"),
        (dict(JUDGE, prompt_template="Is {answer} right?"), "must contain {question}"),
        (dict(JUDGE, prompt_template=None), "must contain {question} and {answer}"),
        (dict(JUDGE, prompt_template="{question} {answer} {gold}"), "names ['gold']"),
        (dict(JUDGE, prompt_template="{question} {answer"), "prompt_template"),
        (dict(JUDGE, max_concurrency=0), "max_concurrency"),
        (dict(JUDGE, timeout_s=0), "timeout_s"),
        (dict(JUDGE, num_workers=0), "num_workers"),
        (dict(JUDGE, retries=-1), "retries"),
        (dict(JUDGE, backoff_s=-1), "backoff_s"),
        (dict(JUDGE, choices=("Yes", "Yes")), "two different answers"),
        (dict(JUDGE, name="bad name"), "name"),
        (dict(JUDGE, prompt_template="{question} {answer:d}"), "does not format with text"),
        (dict(JUDGE, weight=float("nan")), "weight"),
    ],
)
def test_config_refuses_bad_reward_models(bad, needle):
    with pytest.raises(ValueError) as e:
        RewardsConfig(models=[bad])
    assert needle in str(e.value)


def test_config_refuses_two_models_of_one_name():
    with pytest.raises(ValueError, match="'judge' is taken"):
        RewardsConfig(models=[JUDGE, dict(JUDGE, kind="classifier")])


def test_a_classifier_needs_no_template_and_reads_prompt_then_answer():
    spec = RewardModelSpec(name="rm", kind="classifier", path="m")
    assert render(spec, "q", " 42", "42", "<prompt>") == "<prompt> 42"
    judge = RewardModelSpec(**{**JUDGE, "prompt_template": "{question}|{answer}|{reference}"})
    assert render(judge, "q", "a", "r", "p") == "q|a|r"


# ---------------------------------------------------------------- pure parts


def test_choice_score_is_p_yes_over_p_yes_plus_p_no():
    # P(yes)=0.6, P(no)=0.2 (the rest on other tokens): 0.6 / 0.8 = 0.75.
    assert choice_score(math.log(0.6), math.log(0.2)) == pytest.approx(0.75, abs=1e-15)
    assert choice_score(0.0, 0.0) == 0.5
    assert choice_score(-1000.0, 0.0) == pytest.approx(0.0, abs=1e-300)  # no overflow either way
    assert choice_score(0.0, -1000.0) == 1.0
    assert math.isnan(choice_score(-math.inf, -math.inf))


def test_percentile_interpolates_order_statistics():
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.95) == pytest.approx(4.8, abs=1e-12)
    assert math.isnan(percentile([], 0.5))


def test_actor_names_round_trip():
    assert actor_name("judge", 3) == "reward-judge-3"
    assert actor_index("judge", "reward-judge-3") == 3
    assert actor_index("judge", "reward-judge2-3") is None
    assert actor_index("judge", "reward-judge-") is None
    assert actor_index("judge", "rollout-0") is None


def test_score_queue_bounds_rows_in_flight():
    q = ScoreQueue(3)
    futures = q.put(list(range(7)), timeout_s=60)
    first = q.take(0.1)
    assert [p.item for p in first] == [0, 1, 2] and q.stats.in_flight == 3
    assert q.take(0.01) == []  # full: nothing more is handed out
    q.finish(first, [10.0, 11.0, 12.0])
    assert [f.result(0) for f in futures[:3]] == [10.0, 11.0, 12.0]
    second = q.take(0.1)
    assert [p.item for p in second] == [3, 4, 5] and q.queue_depth() == 1
    q.finish(second, RuntimeError("model broke"))
    with pytest.raises(RuntimeError, match="model broke"):
        futures[3].result(0)
    assert q.stats.peak_in_flight == 3 and q.stats.rows == 6


def _done(value) -> Future:
    f: Future = Future()
    f.set_exception(value) if isinstance(value, BaseException) else f.set_result(value)
    return f


def test_call_with_retries_counts_each_failed_attempt_and_backs_off():
    answers = [RuntimeError("boom"), Future(), [1.0], [0.5, float("inf")]]  # raise, hang, wrong length, ok
    sleeps: list[float] = []
    values, failures = call_with_retries(
        lambda k: answers[k] if isinstance(answers[k], Future) else _done(answers[k]),
        2,
        timeout_s=0.05,
        retries=3,
        backoff_s=0.5,
        failure_kind=lambda e: "exception",
        sleep=sleeps.append,
    )
    assert values[0] == 0.5 and math.isnan(values[1])  # a non-finite score is a missing one
    assert failures == {"exception": 1, "timeout": 1, "wrong_length": 1}
    assert sleeps == [0.5, 1.0, 2.0]


def test_rows_whose_caller_gave_up_are_failed_unscored():
    """A row still queued at its deadline is not scored: its caller has sent it elsewhere."""
    q = ScoreQueue(1)
    late = q.put(["a", "b"], timeout_s=0.0)
    fresh = q.put(["c"], timeout_s=60)
    batch = q.take(0.1)
    assert [p.item for p in batch] == ["c"] and q.stats.expired == 2
    with pytest.raises(TimeoutError):
        late[0].result(0)
    q.finish(batch, [1.0])
    assert fresh[0].result(0) == 1.0


def test_an_attempt_that_cannot_even_be_sent_is_a_counted_failure():
    def submit(k):
        if k == 0:
            raise RuntimeError("listing failed")
        return _done([1.0])

    assert call_with_retries(submit, 1, 1.0, 1, 0.1, lambda e: "exception", sleep=lambda s: None) == (
        [1.0],
        {"exception": 1},
    )


def test_a_model_that_keeps_failing_stops_its_server_which_says_so():
    broken = []
    server = ScoreServer("bad", lambda texts: 1 / 0, max_concurrency=2, on_broken=lambda: broken.append(1))
    for _ in range(3):
        with pytest.raises(ZeroDivisionError):
            server.score(["x"], timeout_s=5.0)
    deadline = time.monotonic() + 5
    while not broken and time.monotonic() < deadline:
        time.sleep(0.01)
    assert broken == [1] and "failed 3 batches in a row" in server.broken
    with pytest.raises(RuntimeError, match="model thread stopped"):
        server.status()
    with pytest.raises(RuntimeError, match="model thread stopped"):
        server.score(["x"], timeout_s=1.0)


def test_a_classifier_without_a_pad_token_scores_rows_one_by_one(tmp_path, tiny_classifier_dir):
    """transformers refuses a batch of 2+ rows when the checkpoint names no pad token: the scorer runs
    such a checkpoint one row at a time, with the same scores as a lone forward."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification

    from reward_server.worker import ClassifierScorer

    path = tmp_path / "no-pad"
    shutil.copytree(tiny_classifier_dir, path)
    hf = json.loads((path / "config.json").read_text())
    hf["pad_token_id"] = None
    (path / "config.json").write_text(json.dumps(hf))
    scorer = ClassifierScorer(RewardModelSpec(name="rm", kind="classifier", path=str(path)))
    texts = ["abc", "xyz", "abcd"]  # two of equal length
    got = scorer(texts)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = [model(input_ids=torch.tensor([scorer.tokenizer.encode(t)])).logits[0, 0].item() for t in texts]
    assert got == want


def test_call_with_retries_gives_nan_rows_when_attempts_run_out():
    values, failures = call_with_retries(
        lambda k: _done(RuntimeError("x")), 3, 1.0, 2, 0.1, lambda e: "died", sleep=lambda s: None
    )
    assert all(math.isnan(v) for v in values) and failures == {"died": 3}


def test_score_server_with_a_slow_failing_scorer_bounds_concurrency_and_fails_rows():
    """Eight callers (rollout workers) send 5 rows each to one server that admits 4 rows at a time;
    the scorer is slow and raises on every batch holding a row marked 'bad'."""
    inside, peak, lock = [0], [0], threading.Lock()

    def scorer(texts):
        with lock:
            inside[0] += len(texts)
            peak[0] = max(peak[0], inside[0])
        time.sleep(random.uniform(0.001, 0.01))
        with lock:
            inside[0] -= len(texts)
        if any(t.startswith("bad") for t in texts):
            raise ValueError("bad row")
        return [float(t.split("-")[1]) for t in texts]

    server = ScoreServer("fake", scorer, max_concurrency=4)
    try:

        def caller(c: int):
            texts = [f"{'bad' if c == 7 and i == 0 else 'ok'}-{c * 10 + i}" for i in range(5)]
            return call_with_retries(
                lambda k: ThreadPoolExecutor(1).submit(server.score, texts, 5.0), 5, 5.0, 1, 0.01, lambda e: "exception"
            )

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(caller, range(8)))
    finally:
        server.close()
    assert peak[0] <= 4 and server.status()["peak_in_flight"] <= 4
    for c, (values, failures) in enumerate(results[:7]):
        if not failures:  # a batch shared with caller 7's bad row fails its rows too, and they are retried
            assert values == [float(c * 10 + i) for i in range(5)]
    assert all(math.isnan(v) for v in results[7][0]) and results[7][1] == {"exception": 2}


class FakeActors:
    """Two 'actors' answering in random order after random delays; actor 1 fails its first attempts."""

    def __init__(self, fail_first: int = 0) -> None:
        self.pool = ThreadPoolExecutor(8)
        self.fail_left = fail_first
        self.lock = threading.Lock()
        self.in_flight = self.peak = 0

    def count(self, model: str) -> int:
        return 2

    def send(self, model: str, k: int, rows: list[dict], timeout_s: float) -> Future:
        def run():
            with self.lock:
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
                fail = k % 2 == 1 and self.fail_left > 0
                self.fail_left -= fail
            time.sleep(random.uniform(0, 0.02))
            with self.lock:
                self.in_flight -= 1
            if fail:
                raise ConnectionError("actor restarting")
            return [float(r["answer"]) * (2.0 if model == "double" else 1.0) for r in rows]

        return self.pool.submit(run)


def test_served_scores_stay_with_their_rows_under_random_completion_order():
    specs = [
        RewardModelSpec(name="same", kind="classifier", path="m", backoff_s=0.001),
        RewardModelSpec(name="double", kind="classifier", path="m", backoff_s=0.001, weight=0.5),
    ]
    random.seed(0)
    served = ServedRewards(specs, FakeActors(fail_first=1))
    rows = [{"prompt": "p", "question": "q", "answer": str(i), "reference": ""} for i in range(13)]
    for _ in range(5):
        scores, failures = served.finish(served.start(rows))
        assert scores == {"same": [float(i) for i in range(13)], "double": [2.0 * i for i in range(13)]}
    assert sum(failures.values()) == 0  # only the first request met the failing actor
    served.close()


def test_a_missing_served_score_leaves_the_row_out_of_its_group():
    """build_batch with a served model that cannot score row 1: its combined reward is missing (NaN),
    so the advantage code leaves it out of the baseline; the failures are counted per model."""

    class HalfBroken(FakeActors):
        def send(self, model, k, rows, timeout_s):
            if any(r["answer"] == "1" for r in rows):
                return _done(RuntimeError("judge crashed"))
            return super().send(model, k, rows, timeout_s)

    spec = RewardModelSpec(name="judge", kind="judge", path="m", prompt_template=JUDGE["prompt_template"])
    spec = spec.model_copy(update={"retries": 1, "backoff_s": 0.001, "weight": 2.0})
    served = ServedRewards([spec], HalfBroken())
    rows = [{"prompt": "p0", "prompt_ids": [1], "question": "q0", "answer": "0"}]
    recs = [{"group": 0, "ids": [5], "logp": [-0.1], "truncated": False, "text": t} for t in ("3", "1", "5", "7")]
    batch = build_batch(rows, 4, recs, 0, [], 1.0, 0.1, served)
    # The two fake actors get two rows each; the chunk holding row 1 fails on both attempts.
    judge = batch.reward_components["judge"]
    assert math.isnan(judge[0]) and math.isnan(judge[1]) and judge[2:] == [5.0, 7.0]
    assert math.isnan(batch.rewards[0]) and math.isnan(batch.rewards[1]) and batch.rewards[2:] == [10.0, 14.0]
    assert batch.metrics["reward_failures/judge/exception"] == 2.0
    assert batch.metrics["reward_failures/judge/nan"] == 2.0
    served.close()


# ---------------------------------------------------------------- the pool's state machine


@pytest.mark.parametrize(
    "state, pid_node, answer, synced, gone, expect",
    [
        (
            SERVING,
            (1, "n"),
            {"pid": 1, "node_id": "n", "weight_version": 3, "awaiting_weights": False},
            3,
            False,
            (SERVING, None),
        ),
        (
            SERVING,
            (1, "n"),
            {"pid": 2, "node_id": "n", "weight_version": 0, "awaiting_weights": True},
            3,
            False,
            (AWAITING, "restarted"),
        ),
        (
            DOWN,
            (1, "n"),
            {"pid": 1, "node_id": "n", "weight_version": 3, "awaiting_weights": False},
            3,
            False,
            (SERVING, "up"),
        ),
        (
            STARTING,
            None,
            {"pid": 7, "node_id": "m", "weight_version": 0, "awaiting_weights": False},
            3,
            False,
            (AWAITING, "up"),
        ),
        (SERVING, (1, "n"), None, 3, False, (DOWN, "down")),
        (DOWN, (1, "n"), None, 3, False, (DOWN, None)),
        (STARTING, None, None, 3, False, (STARTING, None)),
        (SERVING, (1, "n"), "The actor is dead because it was killed", 3, True, (SERVING, "dropped")),
        (
            SERVING,
            (1, "n"),
            {"pid": 1, "node_id": "n", "weight_version": -1, "awaiting_weights": False},
            3,
            False,
            (DOWN, "down"),
        ),
        # a group without weights (reward models): any answer serves; a new pid is a restart
        (SERVING, (1, "n"), {"pid": 2, "node_id": "n"}, None, False, (SERVING, "restarted")),
        (STARTING, None, {"pid": 2, "node_id": "n"}, None, False, (SERVING, "up")),
    ],
)
def test_pool_decide_on_plain_data(state, pid_node, answer, synced, gone, expect):
    d = decide(state, pid_node, answer, synced, gone)
    assert (d.state, d.event) == expect


# ---------------------------------------------------------------- before launch


def _cfg(tmp_path, tiny_model_dir, **model):
    raw = {
        "model": {"path": str(tiny_model_dir)},
        "trainer": {"output_dir": str(tmp_path / "out")},
        "rewards": {"models": [model]},
    }
    return Config.model_validate(raw)


def test_preflight_names_a_path_that_is_not_a_model(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, name="rm", kind="classifier", path=str(tmp_path))
    with pytest.raises(ConfigError, match=r"rewards.models\[rm\].path=.* is not a model directory"):
        preflight(cfg, cuda=False)


def test_preflight_refuses_a_causal_lm_as_a_classifier(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, name="rm", kind="classifier", path=str(tiny_model_dir))
    with pytest.raises(ConfigError, match="without a score head"):
        preflight(cfg, cuda=False)


def test_preflight_refuses_a_classifier_of_two_labels(tmp_path, tiny_model_dir, tiny_classifier_dir):
    two = tmp_path / "two-labels"
    two.mkdir()
    for f in tiny_classifier_dir.iterdir():
        (two / f.name).write_bytes(f.read_bytes())
    hf = json.loads((two / "config.json").read_text())
    hf["id2label"] = {"0": "bad", "1": "good"}
    (two / "config.json").write_text(json.dumps(hf))
    cfg = _cfg(tmp_path, tiny_model_dir, name="rm", kind="classifier", path=str(two))
    with pytest.raises(ConfigError, match="has 2 labels"):
        preflight(cfg, cuda=False)


def test_preflight_refuses_a_classifier_as_a_judge(tmp_path, tiny_model_dir, tiny_classifier_dir):
    judge = dict(JUDGE, path=str(tiny_classifier_dir), choices=["Y", "N"])
    with pytest.raises(ConfigError, match="a judge is a causal language model"):
        preflight(_cfg(tmp_path, tiny_model_dir, **judge), cuda=False)


def test_preflight_accepts_the_tiny_classifier_and_refuses_multi_token_answers(
    tmp_path, tiny_model_dir, tiny_classifier_dir
):
    preflight(_cfg(tmp_path, tiny_model_dir, name="rm", kind="classifier", path=str(tiny_classifier_dir)), cuda=False)
    judge = dict(JUDGE, path=str(tiny_model_dir))  # "Yes" is three tokens in the tiny tokenizer
    with pytest.raises(ConfigError, match=r"choices: 'Yes' is 3 tokens"):
        preflight(_cfg(tmp_path, tiny_model_dir, **judge), cuda=False)
    preflight(_cfg(tmp_path, tiny_model_dir, **dict(judge, choices=["Y", "N"])), cuda=False)


def test_scale_parses_reward_workers():
    from deploy.control import parse_reward_workers, scale

    assert parse_reward_workers(["judge=2", "rm=1"]) == {"judge": 2, "rm": 1}
    with pytest.raises(UserError, match="expected NAME=COUNT"):
        parse_reward_workers(["judge"])
    with pytest.raises(UserError, match="--workers N and/or --reward-workers"):
        scale(None)


def test_join_keeps_each_groups_rows_in_place():
    """Streaming starts one request per finished group; the batch joins them in its group order."""
    spec = RewardModelSpec(name="same", kind="classifier", path="m")
    served = ServedRewards([spec], FakeActors())
    groups = [
        [{"prompt": "", "question": "", "answer": str(10 * g + i), "reference": ""} for i in range(3)] for g in range(4)
    ]
    started = [served.start(rows) for rows in reversed(groups)]  # finished in another order than the batch's
    scores, failures = served.finish(ServedRewards.join(started[::-1]))
    assert failures == {} and scores["same"] == [float(10 * g + i) for g in range(4) for i in range(3)]
    served.close()
