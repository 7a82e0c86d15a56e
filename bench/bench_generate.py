"""Generation alone: the rollout engine (vLLM, in-process, as a rollout worker runs it) against
transformers ``model.generate`` (what TRL's GRPOTrainer uses without a vLLM server) on the same
prompts, G, max tokens and sampling, at 1 and 2 threads.

    python -m bench.bench_generate [--model runs/tiny-model] [--prompts 16] [--G 8] [--max-tokens 48]
    python -m bench.bench_generate --model runs/smollm2 --data gsm8k --prompts 8 --G 4 --max-tokens 128 \
        --engines vllm --threads 1 --block-sizes 128 32     # vLLM-CPU's default KV block against 32

``--data gsm8k`` takes the shipped GSM8K train prompts as ``deploy/configs/smollm2_gsm8k_cpu.yaml``
formats them (system prompt, the model's chat template); the default is the synthetic task.
``--block-sizes`` runs vLLM once per KV-cache block size (prefix caching on, as the rollout worker
runs it): the G completions of a prompt share only its whole blocks.

Each engine/thread pair runs in its own subprocess (thread count fixed before torch starts);
figures are medians over ``--reps`` calls after one warm-up call. vLLM asks for the sampled
token's log-prob as the rollout worker does (``logprobs=0``); ``--no-logprobs`` shows its cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_rows(tok, n: int, data: str = "synthetic") -> list[dict]:
    """The first ``n`` rows of the train split the rollout workers are fed: the synthetic task, or
    GSM8K as the real-model config formats it."""
    from grpo_dist.config import DataConfig, load_config
    from grpo_dist.data import load_split

    cfg = DataConfig() if data == "synthetic" else load_config(ROOT / "deploy/configs/smollm2_gsm8k_cpu.yaml").data
    return load_split(cfg, tok, "train").rows[:n]


def run_vllm(args: argparse.Namespace) -> list[tuple[float, int]]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ids = [r["prompt_ids"] for r in train_rows(AutoTokenizer.from_pretrained(args.model), args.prompts, args.data)]
    llm = LLM(
        model=args.model,
        dtype="float32",
        max_model_len=max(map(len, ids)) + args.max_tokens,
        enforce_eager=True,
        distributed_executor_backend="uni",
        seed=0,
        enable_prefix_caching=True,
        **({"block_size": args.block_size} if args.block_size else {}),
    )
    out = []
    for rep in range(args.reps + 1):
        params = [
            SamplingParams(
                n=args.G,
                temperature=1.0,
                top_p=1.0,
                top_k=-1,
                max_tokens=args.max_tokens,
                logprobs=None if args.no_logprobs else 0,
                seed=1000 * rep + i,
            )
            for i in range(len(ids))
        ]
        llm.reset_prefix_cache()  # every call prefills its prompts again, as after a weight update
        t0 = time.perf_counter()
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
        out.append((time.perf_counter() - t0, sum(len(c.token_ids) for r in res for c in r.outputs)))
    return out[1:]


def run_hf(args: argparse.Namespace) -> list[tuple[float, int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    enc = tok(
        [r["prompt"] for r in train_rows(tok, args.prompts, args.data) for _ in range(args.G)],
        return_tensors="pt",
        padding=True,
    )
    out = []
    for rep in range(args.reps + 1):
        torch.manual_seed(rep)
        t0 = time.perf_counter()
        with torch.no_grad():
            seqs = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.max_tokens,
                pad_token_id=pad if pad is not None else eos,
            )
        dt = time.perf_counter() - t0
        comp = seqs[:, enc["input_ids"].shape[1] :]
        is_eos = comp == eos
        # Tokens up to and including the first EOS (what vLLM counts); rows without EOS are full.
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, comp.shape[1])
        out.append((dt, int(lengths.sum())))
    return out[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/tiny-model")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-logprobs", action="store_true")
    ap.add_argument("--data", default="synthetic", choices=["synthetic", "gsm8k"])
    ap.add_argument("--engines", nargs="+", default=["vllm", "hf"], choices=["vllm", "hf"])
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[32], help="vLLM KV-cache block sizes to run")
    ap.add_argument("--block-size", type=int, default=None, help=argparse.SUPPRESS)  # child process mode
    ap.add_argument("--one", choices=["vllm", "hf"], help=argparse.SUPPRESS)  # child process mode
    args = ap.parse_args()

    if args.one:
        runs = run_vllm(args) if args.one == "vllm" else run_hf(args)
        print(json.dumps(runs))
        return

    child_args = [
        "--model",
        args.model,
        "--prompts",
        str(args.prompts),
        "--G",
        str(args.G),
        "--data",
        args.data,
        "--max-tokens",
        str(args.max_tokens),
        "--reps",
        str(args.reps),
        *(["--no-logprobs"] if args.no_logprobs else []),
    ]
    print(
        f"{args.prompts} {args.data} prompts x G={args.G}, max {args.max_tokens} tokens, T=1, model {args.model}; "
        f"medians of {args.reps} calls after a warm-up"
    )
    print("| engine | threads | seconds per call | completions/s | tokens/s |")
    print("|---|---|---|---|---|")
    runs_of = [("vllm", b) for b in args.block_sizes] if "vllm" in args.engines else []
    runs_of += [("hf", None)] if "hf" in args.engines else []
    for engine, block in runs_of:
        for threads in args.threads:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
            extra = ["--block-size", str(block)] if block else []
            res = subprocess.run(
                [sys.executable, "-m", "bench.bench_generate", *child_args, *extra, "--one", engine],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            if res.returncode:
                sys.stderr.write(res.stderr[-3000:])
                raise SystemExit(f"{engine} with {threads} threads failed")
            runs = json.loads(res.stdout.strip().splitlines()[-1])
            secs = statistics.median(s for s, _ in runs)
            tokens = statistics.median(t for _, t in runs)
            if engine == "vllm":
                name = f"vLLM, {block}-token KV blocks" + (" (no log-probs)" if args.no_logprobs else "")
            else:
                name = "transformers generate"
            print(
                f"| {name} | {threads} | {secs:.3f} | {args.prompts * args.G / secs:.3g} | {tokens / secs:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
