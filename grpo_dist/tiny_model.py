"""Tiny Qwen2 policies and their tokenizer, built from code (no hub, no downloads).

The tokenizer is byte-level with no merges: every ASCII character is one token and any text
(GSM8K prompts, unicode) still encodes. The chat markers and the reasoning tags are added tokens,
so a tag is one token; the tags are *not* special, so they survive ``skip_special_tokens=True``
decoding (what vLLM does) as their literal text.

``AutoTokenizer`` loads any ``qwen2`` checkpoint as ``Qwen2Tokenizer``, which re-creates the
normalizer and pre-tokenizer and adds ``<|endoftext|>`` as unk/pad. The tokenizer here already
has exactly those pieces, so every loader (transformers, vLLM, DeepSpeed scripts) sees the same
vocabulary of ``config.vocab_size`` tokens.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
)

from grpo_dist.synthetic import extract_answer, make_split, worked_completion

PAD, EOS = "<|endoftext|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

# One turn: <|role|>content<|end|>. Short on purpose: prompts stay a few tokens long.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# head_dim = hidden_size / num_attention_heads must be 32 or 64 (vLLM-CPU attention kernels).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512
    ),
    "small": dict(
        hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1024
    ),
    "base": dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, intermediate_size=2048
    ),
}
MAX_POSITIONS = 2048
_QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with pad/eos, role markers, reasoning tags and the chat template."""
    byte_vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    # Same normalizer and pre-tokenizer as Qwen2Tokenizer (see module doc); without merges the
    # split is irrelevant to the ids, but identical pieces keep every loader identical.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, EOS, *ROLE_TOKENS)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=PAD,
        eos_token=EOS,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def model_config(tokenizer: PreTrainedTokenizerFast, size: str = "tiny") -> Qwen2Config:
    if size not in SIZES:
        raise ValueError(f"unknown tiny-model size {size!r}; choose one of {sorted(SIZES)}")
    return Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        dtype="float32",
        **SIZES[size],
    )


def build_tiny_model(out_dir: str | Path, size: str = "tiny", seed: int = 0, classifier: bool = False) -> Path:
    """Write an untrained Qwen2 causal LM + tokenizer to ``out_dir``; same seed -> same bytes.

    ``classifier``: a ``Qwen2ForSequenceClassification`` with one label (a reward model's score head)
    on the same body instead."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = model_config(tokenizer, size)
    torch.manual_seed(seed)
    if classifier:
        config.num_labels = 1
        model = Qwen2ForSequenceClassification(config)
    else:
        model = Qwen2ForCausalLM(config)
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
        )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------- warm start


def chat_prompt(tokenizer: PreTrainedTokenizerFast, question: str) -> str:
    """The prompt the policy sees for a question: one user turn, then the assistant marker."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


def encode_sft_example(tokenizer: PreTrainedTokenizerFast, problem: dict[str, str]) -> tuple[list[int], list[int]]:
    """(input ids, labels) of prompt + worked completion + EOS; prompt positions are labelled -100."""
    prompt_ids = tokenizer(chat_prompt(tokenizer, problem["question"]), add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(worked_completion(problem), add_special_tokens=False)["input_ids"]
    target_ids = target_ids + [tokenizer.eos_token_id]
    return prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids_BL = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels_BL = torch.full((len(examples), width), -100, dtype=torch.long)
    mask_BL = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labels) in enumerate(examples):
        ids_BL[row, : len(ids)] = torch.tensor(ids)
        labels_BL[row, : len(labels)] = torch.tensor(labels)
        mask_BL[row, : len(ids)] = 1
    return {"input_ids": ids_BL, "labels": labels_BL, "attention_mask": mask_BL}


@torch.no_grad()
def generate_completions(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    questions: list[str],
    *,
    temperature: float = 0.0,
    max_new_tokens: int = 48,
    batch_size: int = 100,
    seed: int = 0,
) -> list[str]:
    """Completions (special tokens skipped) for each question; temperature 0 is greedy.

    Sampling (temperature > 0) reseeds torch's global RNG with ``seed`` so results repeat.
    """
    if temperature > 0:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    out: list[str] = []
    for start in range(0, len(questions), batch_size):
        prompts = [chat_prompt(tokenizer, q) for q in questions[start : start + batch_size]]
        enc = tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
            if temperature > 0
            else dict(do_sample=False)
        )
        ids_BL = model.generate(
            **enc.to(model.device),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        out += tokenizer.batch_decode(ids_BL[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return out


def answer_accuracy(completions: list[str], problems: list[dict[str, str]]) -> float:
    """Fraction of completions whose ``<answer>`` equals the reference answer."""
    hits = [extract_answer(c) == p["answer"] for c, p in zip(completions, problems, strict=True)]
    return sum(hits) / len(hits)


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    # Linear warmup, then cosine decay to 10% so the last steps settle rather than jump.
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def warm_start(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_steps: int = 600,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup_steps: int = 20,
    num_sft_problems: int = 2000,
    eval_every: int = 5,
    num_val: int = 200,
    target_accuracy: float = 0.3,
    num_test: int = 200,
    data_seed: int = 1234,
    max_operand: int = 99,
    ops: list[str] = ["+"],  # noqa: B006
) -> dict[str, float]:
    """Supervised warm start on the synthetic task, stopped early once the policy is *partly* right.

    Trains on ``num_sft_problems`` problems of the train split (a subset: GRPO later sees the
    rest) and every ``eval_every`` steps measures greedy accuracy on ``num_val`` further train
    problems it never trains on; stops once that reaches ``target_accuracy`` (or at ``max_steps``).
    The split arguments must match ``data.synthetic`` (seed, max_operand, ops) so the final
    greedy accuracy on the held-out test split is the number GRPO starts from. Writes the model,
    tokenizer and ``warm_start.json`` to ``out_dir``; returns that json's content.
    """
    if max_steps < 1 or eval_every < 1:
        raise ValueError(f"max_steps={max_steps} and eval_every={eval_every} must both be >= 1")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    train = make_split("train", num_sft_problems + num_val, num_test, data_seed, max_operand, ops)
    if len(train) < num_sft_problems + num_val:
        raise ValueError(f"the train split has {len(train)} problems, fewer than num_sft_problems + num_val")
    sft, val = train[:num_sft_problems], train[num_sft_problems:]
    examples = [encode_sft_example(tokenizer, p) for p in sft]
    # Generation budget for evaluation: the longest target completion plus slack (cheap evals).
    eval_tokens = max(sum(t != -100 for t in labels) for _, labels in examples) + 8
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    order = torch.Generator().manual_seed(seed)
    model.train()
    step, val_acc = 0, 0.0
    while step < max_steps and val_acc < target_accuracy:
        rows = torch.randint(len(examples), (batch_size,), generator=order).tolist()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, max_steps, lr, warmup_steps)
        loss = model(**_collate([examples[r] for r in rows], tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % eval_every == 0:
            completions = generate_completions(
                model, tokenizer, [p["question"] for p in val], max_new_tokens=eval_tokens
            )
            val_acc = answer_accuracy(completions, val)
    test = make_split("test", 1, num_test, data_seed, max_operand, ops)
    completions = generate_completions(model, tokenizer, [p["question"] for p in test], max_new_tokens=eval_tokens)
    test_acc = answer_accuracy(completions, test)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    report = {
        "accuracy": test_acc,
        "val_accuracy": val_acc,
        "num_test": num_test,
        "steps": step,
        "final_loss": float(loss.detach()),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "warm_start.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


_run_warm_start = warm_start  # make_tiny_model's ``warm_start`` flag shadows the function's name


def make_tiny_model(
    out_dir: str | Path, size: str = "tiny", seed: int = 0, warm_start: bool = False, classifier: bool = False, **kw
) -> Path:
    """Build the tiny model into ``out_dir`` and, with ``warm_start=True``, warm-start it in place.

    ``kw`` goes to :func:`warm_start` (e.g. ``data_seed``, ``max_operand``, ``ops``, ``target_accuracy``).
    ``classifier`` builds the reward-classifier variant (not warm-startable).
    """
    if classifier and warm_start:
        raise ValueError("make_tiny_model: the classifier variant has no warm start (it is not a language model)")
    out = build_tiny_model(out_dir, size=size, seed=seed, classifier=classifier)
    if warm_start:
        _run_warm_start(out, out, seed=seed, **kw)
    elif kw:
        raise TypeError(f"make_tiny_model got warm-start options {sorted(kw)} without warm_start=True")
    return out
