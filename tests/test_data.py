import json
import logging
from pathlib import Path

import pytest

from grpo_dist.config import DataConfig, SyntheticTaskConfig
from grpo_dist.data import SHIPPED_GSM8K as GSM8K_DIR
from grpo_dist.data import DataError, PromptSampler, load_split
from grpo_dist.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def plain_tok():
    t = build_tokenizer()
    t.chat_template = None
    return t


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _write_jsonl(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def test_synthetic_splits_rows_and_chat_template(tok):
    cfg = DataConfig(source="synthetic", synthetic=SyntheticTaskConfig(num_train=40, num_test=10, max_operand=20))
    train = load_split(cfg, tok, "train")
    test = load_split(cfg, tok, "test")
    assert (len(train), len(test)) == (40, 10) and train.dropped == {}
    assert not {r["question"] for r in train.rows} & {r["question"] for r in test.rows}
    row = train[0]
    assert set(row) >= {"prompt", "prompt_ids", "answer", "question"}
    a, b = row["question"].split("+")
    assert int(row["answer"]) == int(a) + int(b)
    assert row["prompt"] == f"<|user|>{row['question']}<|end|><|assistant|>"
    assert row["prompt_ids"] == tok(row["prompt"], add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="not 'validation'"):
        load_split(cfg, tok, "validation")


def test_system_prompt_with_and_without_template(tok, plain_tok):
    cfg = DataConfig(
        source="synthetic", system_prompt="Be brief.", synthetic=SyntheticTaskConfig(num_train=5, num_test=2)
    )
    row = load_split(cfg, tok, "test")[0]
    assert row["prompt"] == f"<|system|>Be brief.<|end|><|user|>{row['question']}<|end|><|assistant|>"
    row = load_split(cfg, plain_tok, "test")[0]
    assert row["prompt"] == f"Be brief.\n\n{row['question']}"
    off = cfg.model_copy(update={"use_chat_template": False})
    assert load_split(off, tok, "test")[0]["prompt"] == f"Be brief.\n\n{row['question']}"
    # "" is a system turn of its own (it replaces a template's default system prompt); None adds none.
    empty = cfg.model_copy(update={"system_prompt": ""})
    assert load_split(empty, tok, "test")[0]["prompt"].startswith("<|system|><|end|><|user|>")


def test_prompt_template_builds_the_user_turn(tok):
    cfg = DataConfig(
        source="synthetic",
        prompt_template="What is {question}?",
        synthetic=SyntheticTaskConfig(num_train=5, num_test=2),
    )
    row = load_split(cfg, tok, "test")[0]
    assert row["prompt"] == f"<|user|>What is {row['question']}?<|end|><|assistant|>"


def test_gsm8k_shipped_copy_needs_no_path(tok):
    cfg = DataConfig(source="gsm8k", max_prompt_length=2048)
    assert len(load_split(cfg, tok, "train")) == 7473
    ds = load_split(cfg, tok, "test")
    assert len(ds) == 1319 and ds.dropped == {}
    assert (GSM8K_DIR / "LICENSE").read_text().startswith("MIT License")
    first = json.loads(GSM8K_DIR.joinpath("test.jsonl").open().readline())
    assert ds[0]["question"] == first["question"] and ds[0]["answer"] == "18"
    assert all("####" not in r["answer"] for r in ds.rows)


def test_gsm8k_malformed_rows_dropped_with_counts(tmp_path, tok, caplog):
    good = {"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}
    records = [
        good,
        {"answer": "#### 1"},  # no question
        {"question": "   ", "answer": "#### 1"},  # empty prompt
        {"question": "q?"},  # no answer
        {"question": "q?", "answer": "no marker 5"},  # no final answer
        {"question": "q?", "answer": "#### "},  # empty final answer
        {"question": "x" * 500, "answer": "#### 1"},  # too long
        "{not json",
        "[1, 2]",
        {"question": 7, "answer": "#### 7"},  # not text
    ]
    _write_jsonl(tmp_path / "train.jsonl", records)
    cfg = DataConfig(source="gsm8k", path=str(tmp_path), max_prompt_length=64)
    with caplog.at_level(logging.WARNING, logger="grpo_dist.data"):
        ds = load_split(cfg, tok, "train")
    assert [r["answer"] for r in ds.rows] == ["4"]
    assert ds.dropped == {
        "missing_question": 2,
        "empty_prompt": 1,
        "missing_answer": 1,
        "no_final_answer": 2,
        "prompt_too_long": 1,
        "malformed_record": 2,
    }
    assert "dropped 9 of 10 rows" in caplog.text and "prompt_too_long=1" in caplog.text


def test_empty_after_filtering_names_split_and_reasons(tmp_path, tok):
    _write_jsonl(tmp_path / "test.jsonl", [{"question": "x" * 100, "answer": "#### 1"}])
    cfg = DataConfig(source="gsm8k", path=str(tmp_path), max_prompt_length=8)
    with pytest.raises(
        DataError,
        match=r"gsm8k split 'test' has 0 usable rows, fewer than the 1 needed: 1 of 1 "
        r"rows dropped \(prompt_too_long=1\); raise data.max_prompt_length=8",
    ):
        load_split(cfg, tok, "test")
    with pytest.raises(DataError, match=r"train\.jsonl"):
        load_split(cfg, tok, "train")


def test_too_few_rows_for_one_step_names_the_filter(tmp_path, tok):
    _write_jsonl(tmp_path / "test.jsonl", [{"question": "1+1", "answer": "#### 2"}, {"question": "x", "answer": "3"}])
    cfg = DataConfig(source="gsm8k", path=str(tmp_path))
    with pytest.raises(
        DataError,
        match=r"has 1 usable rows, fewer than the 4 needed: 1 of 2 rows dropped "
        r"\(no_final_answer=1\); the answer column has no final answer",
    ):
        load_split(cfg, tok, "test", min_rows=4)


def test_hf_single_files_with_custom_columns(tmp_path, tok):
    _write_jsonl(tmp_path / "data.jsonl", [{"problem": "1+1", "solution": 2}, {"problem": "", "solution": 3}])
    cfg = DataConfig(source="hf", path=str(tmp_path / "data.jsonl"), prompt_column="problem", answer_column="solution")
    ds = load_split(cfg, tok, "train")
    assert [(r["question"], r["answer"]) for r in ds.rows] == [("1+1", "2")] and ds.dropped == {"empty_prompt": 1}
    with pytest.raises(ValueError, match="single file, which serves only split 'train'"):
        load_split(cfg, tok, "test")
    (tmp_path / "data.csv").write_text("problem,solution\n2+2,4\n3+3,6\n")
    ds = load_split(cfg.model_copy(update={"path": str(tmp_path / "data.csv")}), tok, "train")
    assert [r["answer"] for r in ds.rows] == ["4", "6"]


def test_hf_directory_splits(tmp_path, tok):
    _write_jsonl(tmp_path / "d" / "train.jsonl", [{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}])
    _write_jsonl(tmp_path / "d" / "test.jsonl", [{"question": "c", "answer": "3"}])
    cfg = DataConfig(source="hf", path=str(tmp_path / "d"))
    assert [r["question"] for r in load_split(cfg, tok, "train").rows] == ["a", "b"]
    assert [r["answer"] for r in load_split(cfg, tok, "test").rows] == ["3"]


# ---------------------------------------------------------------- sampler


def test_sampler_epochs_are_permutations_and_deterministic():
    s = PromptSampler(10, 5, seed=3)
    epoch0 = s.next_indices() + s.next_indices()
    epoch1 = s.next_indices() + s.next_indices()
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1  # reshuffled per epoch
    again = PromptSampler(10, 5, seed=3)
    assert again.next_indices() + again.next_indices() == epoch0
    assert PromptSampler(10, 5, seed=4).next_indices() != epoch0[:5]


def test_sampler_crosses_epoch_boundaries_without_skipping():
    s = PromptSampler(5, 3, seed=0)
    stream = [i for _ in range(5) for i in s.next_indices()]  # 15 indices = 3 epochs exactly
    assert [sorted(stream[k : k + 5]) for k in (0, 5, 10)] == [list(range(5))] * 3
    assert len(PromptSampler(2, 7, seed=0).next_indices()) == 7  # more prompts per step than rows


@pytest.mark.parametrize("n_before", [0, 1, 3, 7])
def test_sampler_save_restore_equals_straight_run(n_before):
    straight = PromptSampler(7, 3, seed=11)
    want = [straight.next_indices() for _ in range(n_before + 6)]
    first = PromptSampler(7, 3, seed=11)
    got = [first.next_indices() for _ in range(n_before)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = PromptSampler(7, 3, seed=11)
    resumed.load_state_dict(state)
    got += [resumed.next_indices() for _ in range(6)]
    assert got == want


def test_sampler_rejects_foreign_state():
    state = PromptSampler(7, 3, seed=11).state_dict()
    with pytest.raises(ValueError, match="num_rows=7 but this sampler has 8"):
        PromptSampler(8, 3, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="num_rows >= 1"):
        PromptSampler(0, 3, seed=0)
