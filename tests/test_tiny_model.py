"""The synthetic task, the tiny-model factory and its tokenizer (vLLM check marked ``vllm``)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from grpo_dist.synthetic import (
    extract_answer,
    make_problems,
    make_split,
    num_problems,
    problem_at,
    worked_completion,
)
from grpo_dist.tiny_model import (
    SIZES,
    answer_accuracy,
    build_tiny_model,
    chat_prompt,
    encode_sft_example,
    generate_completions,
    make_tiny_model,
)

# The seeds' format reward (shared/seeds/002): completion must match this from its start.
SEED_FORMAT_RE = r"(<think>)[\s\S]*?(</think>)[\s\S]*?(<answer>)[\s\D]*(\d+)[\s\D]*(</answer>)"


# ---------------------------------------------------------------- synthetic task


def test_problem_at_enumerates_every_problem_once():
    probs = [problem_at(i, 2, ["+", "*"]) for i in range(num_problems(2, ["+", "*"]))]
    assert len(probs) == 18
    assert probs[0] == {"question": "0+0", "answer": "0"}
    assert probs[5] == {"question": "1+2", "answer": "3"}
    assert probs[17] == {"question": "2*2", "answer": "4"}
    assert len({p["question"] for p in probs}) == 18


def test_answers_are_exact_for_each_operator():
    for op, expect in (("+", 85), ("-", -11), ("*", 1776)):
        assert problem_at(37 * 100 + 48, 99, [op]) == {"question": f"37{op}48", "answer": str(expect)}


def test_make_problems_is_deterministic_and_distinct():
    a = make_problems(500, seed=3, max_operand=99, ops=["+", "-"])
    assert a == make_problems(500, seed=3, max_operand=99, ops=["+", "-"])
    assert a != make_problems(500, seed=4, max_operand=99, ops=["+", "-"])
    assert len({p["question"] for p in a}) == 500
    with pytest.raises(ValueError, match="only 4"):
        make_problems(5, seed=0, max_operand=1, ops=["+"])
    with pytest.raises(ValueError, match="unknown operator"):
        make_problems(1, seed=0, max_operand=9, ops=["/"])


def test_split_is_disjoint_and_test_ignores_num_train():
    test = make_split("test", 9000, 200, seed=1234)
    train = make_split("train", 9000, 200, seed=1234)
    assert len(test) == 200 and len(train) == 9000
    assert not {p["question"] for p in test} & {p["question"] for p in train}
    assert len({p["question"] for p in train}) == 9000
    assert make_split("test", 10, 200, seed=1234) == test


def test_split_covers_a_small_universe_exactly():
    test = make_split("test", 100, 3, seed=0, max_operand=2, ops=["+"])
    with pytest.warns(UserWarning, match="num_train=100 exceeds the 6 problems"):
        train = make_split("train", 100, 3, seed=0, max_operand=2, ops=["+"])
    assert sorted(p["question"] for p in test + train) == sorted(f"{a}+{b}" for a in range(3) for b in range(3))


def test_worked_completion_matches_seed_format_and_answer():
    c = worked_completion({"question": "7+48", "answer": "55"})
    assert c == "<think>7+8=15,0+4+1=5</think><answer>55</answer>"
    assert worked_completion({"question": "99+99", "answer": "198"}) == (
        "<think>9+9=18,9+9+1=19</think><answer>198</answer>"
    )
    assert re.match(SEED_FORMAT_RE, c)
    assert extract_answer(c) == "55"
    assert extract_answer("<answer> -3 </answer>") == "-3"
    assert extract_answer("<answer>12") is None


# ---------------------------------------------------------------- factory


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_build_is_deterministic(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", size="tiny", seed=0)
    assert _hashes(again) == _hashes(tiny_model_dir)
    other = build_tiny_model(tmp_path / "other", size="tiny", seed=1)
    assert _hashes(other)["model.safetensors"] != _hashes(tiny_model_dir)["model.safetensors"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(_hashes(other))


def test_config_is_vllm_cpu_compatible(tiny_model_dir):
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    assert cfg.model_type == "qwen2" and cfg.architectures == ["Qwen2ForCausalLM"]
    assert cfg.hidden_size // cfg.num_attention_heads in (32, 64)
    for spec in SIZES.values():
        assert spec["hidden_size"] // spec["num_attention_heads"] in (32, 64)


def test_tokenizer_vocab_matches_model(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    # AutoTokenizer must not add tokens beyond the embedding table (see tiny_model's module doc).
    assert len(tok) == cfg.vocab_size
    assert tok.eos_token_id == cfg.eos_token_id and tok.pad_token_id == cfg.pad_token_id
    assert tok.pad_token_id != tok.eos_token_id


@pytest.mark.parametrize(
    "text",
    [
        "<think>7+8=15,3+4+1=8</think><answer>85</answer>",
        "37*48-12=1764",
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
        "unicode: héllo 世界 — ½ €\n\ttabs  and  spaces",
    ],
)
def test_tokenizer_round_trips_text(tiny_model_dir, text):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < len(tok)
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_reasoning_tags_are_single_non_special_tokens(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        (tid,) = tok(tag, add_special_tokens=False)["input_ids"]
        assert tok.decode([tid], skip_special_tokens=True) == tag
    digits = tok("0123456789+-*=", add_special_tokens=False)["input_ids"]
    assert len(digits) == 14


def test_chat_template(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "37+48"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<|system|>Be brief.<|end|><|user|>37+48<|end|><|assistant|>"
    assert chat_prompt(tok, "37+48") == "<|user|>37+48<|end|><|assistant|>"
    ids = tok(chat_prompt(tok, "37+48"), add_special_tokens=False)["input_ids"]
    assert len(ids) == 8  # <|user|> 3 7 + 4 8 <|end|> <|assistant|>
    assert tok.decode(ids, skip_special_tokens=True) == "37+48"


def test_sft_example_masks_the_prompt(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, labels = encode_sft_example(tok, {"question": "37+48", "answer": "85"})
    assert len(ids) == len(labels) == 8 + 21  # 14 working characters, 5 tag tokens, "85", EOS
    assert labels[:8] == [-100] * 8 and labels[8:] == ids[8:]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[8:], skip_special_tokens=True) == "<think>7+8=15,3+4+1=8</think><answer>85</answer>"


def test_transformers_loads_and_generates(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n_params < 5e6
    problems = make_problems(3, seed=0)
    outs = generate_completions(model, tok, [p["question"] for p in problems], max_new_tokens=8)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    assert outs == generate_completions(model, tok, [p["question"] for p in problems], max_new_tokens=8)
    assert answer_accuracy(["<answer>85</answer>", "<answer>1</answer>"], [{"answer": "85"}, {"answer": "2"}]) == 0.5


def test_make_tiny_model_rejects_stray_options(tmp_path):
    with pytest.raises(TypeError, match="without warm_start=True"):
        make_tiny_model(tmp_path, max_steps=3)


def test_warm_start_writes_report(tmp_path):
    out = make_tiny_model(
        tmp_path,
        warm_start=True,
        max_steps=4,
        batch_size=4,
        num_sft_problems=16,
        num_val=4,
        eval_every=2,
        num_test=4,
    )
    report = json.loads((out / "warm_start.json").read_text())
    assert report["steps"] == 4 and report["num_test"] == 4 and 0.0 <= report["accuracy"] <= 1.0
    assert AutoModelForCausalLM.from_pretrained(out) is not None


# ---------------------------------------------------------------- vLLM-CPU


@pytest.mark.vllm
def test_vllm_loads_and_matches_transformers_greedy(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    # In-process engine core: no spawned process that would re-import the test module.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts = [chat_prompt(tok, p["question"]) for p in make_problems(4, seed=0)]
    # Token ids, not text: an untrained model emits partial UTF-8 bytes, which vLLM's incremental
    # detokenizer holds back while a one-shot decode does not.
    hf_ids = []
    for prompt in prompts:
        ids_1T = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out_1T = model.generate(ids_1T, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        hf_ids.append(out_1T[0, ids_1T.shape[1] :].tolist())
    llm = LLM(model=str(tiny_model_dir), dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
    assert [o.prompt_token_ids for o in outs] == [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert [list(o.outputs[0].token_ids) for o in outs] == hf_ids
