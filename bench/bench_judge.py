"""How far an LLM judge agrees with the exact-match reward, on the policy's own answers.

    grpo-dist get-model smollm2-135m-instruct --out runs/smollm2
    python -m bench.bench_judge [--config deploy/configs/smollm2_arith_judge_cpu.yaml] [--samples 256]

The config's policy answers ``--samples`` of its training prompts (one completion each, at its
sampling temperature, on vLLM); every answer is scored by the exact-match ``accuracy`` reward and
by each judge of ``rewards.models`` exactly as the served judge scores it (``JudgeScorer``: the
template as the judge's user turn, P(yes)/(P(yes)+P(no)) of its first token), in this process,
without Ray. Printed per judge: agreement at the 0.5 threshold, balanced accuracy (the mean of the
rates on right and on wrong answers, so a judge that says "yes" to everything gets 0.5), ROC AUC
(how well the score ranks right answers above wrong ones, threshold-free) and rows/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from grpo_dist.config import load_config
from grpo_dist.data import load_run_rows
from grpo_dist.reward_models import render
from grpo_dist.rewards import accuracy_reward
from reward_server.worker import JudgeScorer
from rollout_server.worker import engine_kwargs


def auc(scores: list[float], labels: list[bool]) -> float:
    """P(score of a right answer > score of a wrong one), ties counted half (Mann-Whitney)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def policy_answers(cfg, rows: list[dict]) -> list[str]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # The rollout workers' own engine settings (without their weight-sync extension).
    kw = engine_kwargs(cfg.rollout, cfg.model, cfg.max_model_len, cuda=torch.cuda.is_available())
    kw.pop("worker_extension_cls")
    llm = LLM(**kw)
    params = SamplingParams(
        temperature=cfg.algorithm.temperature, max_tokens=cfg.algorithm.max_completion_length, seed=0
    )
    outs = llm.generate([TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in rows], params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    del llm
    gc.collect()
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="deploy/configs/smollm2_arith_judge_cpu.yaml")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--out", default=None, help="also write the figures as JSON")
    args = ap.parse_args()
    cfg = load_config(args.config)
    judges = [m for m in cfg.rewards.models if m.kind == "judge"]
    if not judges:
        raise SystemExit(f"{args.config} serves no judge (rewards.models with kind: judge)")
    rows = load_run_rows(cfg)[0][: args.samples]
    t0 = time.perf_counter()
    answers = policy_answers(cfg, rows)
    gen_s = time.perf_counter() - t0
    exact = accuracy_reward([r["prompt"] for r in rows], answers, [r["answer"] for r in rows])
    right = [e == 1.0 for e in exact]
    print(f"{len(rows)} answers in {gen_s:.0f}s; exact match right on {sum(right)} ({sum(right) / len(rows):.1%})")
    figures = {"samples": len(rows), "exact_right": sum(right)}
    for spec in judges:
        scorer = JudgeScorer(spec)
        texts = [render(spec, r["question"], a, str(r["answer"]), r["prompt"]) for r, a in zip(rows, answers)]
        t0 = time.perf_counter()
        scores = scorer(texts)
        secs = time.perf_counter() - t0
        says = [s > 0.5 for s in scores]
        agree = sum(a == b for a, b in zip(says, right)) / len(rows)
        on_right = sum(s for s, y in zip(says, right) if y) / max(1, sum(right))
        on_wrong = sum(not s for s, y in zip(says, right) if not y) / max(1, len(rows) - sum(right))
        res = {
            "agreement": agree,
            "balanced_accuracy": (on_right + on_wrong) / 2,
            "auc": auc(scores, right),
            "says_yes": sum(says) / len(rows),
            "rows_per_s": len(rows) / secs,
        }
        figures[spec.name] = res
        print(
            f"judge {spec.name} ({spec.path}): agreement {res['agreement']:.1%}, balanced accuracy "
            f"{res['balanced_accuracy']:.1%} (yes on {on_right:.1%} of right, no on {on_wrong:.1%} of wrong), "
            f"AUC {res['auc']:.3f}, says yes to {res['says_yes']:.1%}; {res['rows_per_s']:.1f} rows/s"
        )
        del scorer
        gc.collect()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
