import json
import math
import threading
import time

import pytest

from grpo_dist.config import RewardSpec
from grpo_dist.data import SHIPPED_GSM8K
from grpo_dist.rewards import (
    REWARDS,
    build_reward_fns,
    extract_final_number,
    resolve_reward,
    score,
)

GSM8K_TEST = SHIPPED_GSM8K / "test.jsonl"


@pytest.mark.parametrize(
    "text, want",
    [
        ("so she makes 9 * 2 = $18 every day.\n#### 18", 18),
        ("<think>16-3-4=9</think><answer>72</answer>", 72),
        ("<start_working_out>x<end_working_out><SOLUTION>72</SOLUTION>", 72),
        (r"Thus the total is \boxed{72}.", 72),
        (r"\boxed{1{,}234}", 1234),
        ("The answer is 72.", 72),
        ("The final answer is: $1,234.", 1234),
        ("Q: what?\nA: 72", 72),
        ("It costs $1,234,567 in total", 1234567),
        ("72.0", 72),
        ("The temperature fell to -5 degrees", -5),
        ("answer: \u22123", -3),
        ("3 + 4 = 7, then 7 * 2 = 14", 14),
        ("<answer>12</answer> and later 99", 12),
        ("#### 3.5 (approx)", 3.5),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_final_number(text, want):
    assert extract_final_number(text) == want


def test_extract_does_not_take_hyphen_as_minus():
    assert extract_final_number("pages 10-12") == 12
    assert extract_final_number("version 1.2.3 costs 4") == 4


def _gsm8k_rows(n=200):
    with GSM8K_TEST.open() as f:
        return [json.loads(next(f)) for _ in range(n)]


def test_accuracy_on_real_gsm8k_answers_in_many_formats():
    rows = _gsm8k_rows()
    refs = [r["answer"] for r in rows]  # full GSM8K solution text: the reference is after ####
    finals = [r["answer"].rsplit("####", 1)[1].strip() for r in rows]
    assert any("," in f for f in finals)  # the sample includes thousands separators
    formats = [
        "#### {}",
        "<think>work</think><answer>{}</answer>",
        "<start_working_out>w<end_working_out><SOLUTION>{}</SOLUTION>",
        "So the result is \\boxed{{{}}}.",
        "The answer is {}.",
        "Q: ...\nA: {}",
        "After 2 steps of 3 each, we get ${}",
        "{}.0",
    ]
    prompts = [r["question"] for r in rows]
    for fmt in formats:
        completions = [fmt.format(f) for f in finals]
        assert REWARDS["accuracy"](prompts, completions, answer=refs) == [1.0] * len(rows), fmt
    # The reference solutions themselves are correct completions; off-by-one ones are not.
    assert REWARDS["accuracy"](prompts, refs, answer=refs) == [1.0] * len(rows)
    wrong = [f"#### {float(f.replace(',', '')) + 1}" for f in finals]
    assert REWARDS["accuracy"](prompts, wrong, answer=finals) == [0.0] * len(rows)


def test_accuracy_conversational_and_missing_reference():
    completions = [[{"role": "assistant", "content": "<answer>7</answer>"}], "8", "9"]
    assert REWARDS["accuracy"](["p"] * 3, completions, answer=["7", "7", "n/a"]) == [1.0, 0.0, None]


@pytest.mark.parametrize(
    "text, want",
    [
        ("<think>a</think><answer>1</answer>", 1.0),
        ("  <think>\nwork\n</think>\n<answer> 1 </answer>\n", 1.0),
        ("<start_working_out>w<end_working_out><SOLUTION>3</SOLUTION>", 1.0),
        ("<think>a</think><answer>1</answer> trailing text", 0.8),  # all 4 tags once, not exact
        ("<think></think><answer>1</answer>", 0.8),  # empty reasoning is not the format
        ("<answer>1</answer>", 0.4),
        ("<think>a</think><think>b</think><answer>1</answer>", 0.4),  # repeated tags earn nothing
        ("<SOLUTION>1</SOLUTION><think>", 0.4),  # best of the two formats
        ("just 1", 0.0),
    ],
)
def test_format_reward(text, want):
    assert REWARDS["format"](["p"], [text]) == [pytest.approx(want, abs=1e-12)]


def test_length_reward_dapo_soft_overlong():
    # max 100, buffer 20: 0 up to 80, linear to -1 at 100, -1 beyond.
    kw = dict(max_completion_length=100, overlong_buffer=20)
    got = REWARDS["length"](["p"] * 5, ["x"] * 5, completion_lengths=[10, 80, 90, 100, 130], **kw)
    assert got == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0], abs=1e-12)
    assert REWARDS["length"](["p"], ["x"], completion_ids=[[1] * 95], **kw) == [pytest.approx(-0.75)]
    assert REWARDS["length"](["p"], ["y" * 85], **kw) == [pytest.approx(-0.25)]  # characters


# ---------------------------------------------------------------- resolution


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        "def score(prompts, completions, answer, bonus=0.0, **kw):\n"
        "    return [float(c == a) + bonus for c, a in zip(completions, answer)]\n"
        "def strict(completions):\n"
        "    return [1.0 for _ in completions]\n"
        "class Holder:\n"
        "    @staticmethod\n"
        "    def fn(completions, **kw):\n"
        "        return [2.0] * len(completions)\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards_mod"


def test_resolve_by_name_and_import_path(user_module):
    assert resolve_reward("accuracy") is REWARDS["accuracy"]
    fn = resolve_reward(f"{user_module}:score")
    assert fn(["p"], ["a"], answer=["a"], bonus=0.5) == [1.5]
    assert resolve_reward(f"{user_module}:Holder.fn")(completions=["x"]) == [2.0]


@pytest.mark.parametrize(
    "name, match",
    [
        ("acuracy", "unknown reward function 'acuracy'"),
        ("no_such_mod_xyz:f", "cannot import module 'no_such_mod_xyz'"),
        ("my_rewards_mod:missing", "has no attribute 'missing'"),
        ("my_rewards_mod:NOT_CALLABLE", "is not callable"),
    ],
)
def test_resolve_errors(user_module, name, match):
    with pytest.raises(ValueError, match=match):
        build_reward_fns([RewardSpec(name=name)])


def test_build_checks_kwargs_at_config_time(user_module):
    with pytest.raises(ValueError, match="'length' needs kwargs"):
        build_reward_fns([RewardSpec(name="length")])
    with pytest.raises(ValueError, match="overlong_buffer=200"):
        build_reward_fns([RewardSpec(name="length", kwargs={"max_completion_length": 100, "overlong_buffer": 200})])
    with pytest.raises(ValueError, match="bad kwargs"):
        build_reward_fns([RewardSpec(name=f"{user_module}:strict", kwargs={"bonus": 1})])
    built = build_reward_fns(
        [RewardSpec(name="accuracy"), RewardSpec(name="accuracy", weight=2.0), RewardSpec(name=f"{user_module}:score")]
    )
    assert [b.key for b in built] == ["accuracy", "accuracy#2", f"{user_module}:score"]


# ---------------------------------------------------------------- containment


_release = threading.Event()


def _raises(prompts, completions, **kw):
    raise RuntimeError("reward server down")


def _hangs(prompts, completions, **kw):
    _release.wait(30)  # released at the end of the test; abandoned by score() long before
    return [1.0] * len(completions)


def _bad_values(prompts, completions, **kw):
    return [None, math.nan, math.inf, "x", 2.0][: len(completions)]


def _wrong_length(prompts, completions, **kw):
    return [1.0]


def _not_a_list(prompts, completions, **kw):
    return 1.0


def _ones(prompts, completions, **kw):
    return [1.0] * len(completions)


def test_score_contains_every_failure(monkeypatch):
    for fn in (_raises, _hangs, _bad_values, _wrong_length, _not_a_list, _ones):
        monkeypatch.setitem(REWARDS, fn.__name__.strip("_"), fn)
    weights = {"raises": 1, "hangs": 1, "bad_values": 3.0, "wrong_length": 1, "not_a_list": 1, "ones": 0.5}
    specs = [RewardSpec(name=n, weight=w) for n, w in weights.items()]
    built = build_reward_fns(specs)
    t0 = time.monotonic()
    try:
        res = score(built, 0.3, ["p"] * 5, ["c"] * 5, {"answer": ["1"] * 5})
    finally:
        _release.set()
    assert time.monotonic() - t0 < 5.0  # the hung call was abandoned, not awaited
    assert res.failures == {
        "raises/exception": 1,
        "hangs/timeout": 1,
        "bad_values/nan": 4,
        "wrong_length/wrong_length": 1,
        "not_a_list/wrong_length": 1,
    }
    assert all(math.isnan(v) for v in res.components["raises"] + res.components["hangs"])
    assert res.components["bad_values"][4] == 2.0 and all(math.isnan(v) for v in res.components["bad_values"][:4])
    # Combined = nansum of weighted components: 0.5 * 1 everywhere, + 3 * 2 on the last row.
    assert res.combined == pytest.approx([0.5, 0.5, 0.5, 0.5, 6.5], abs=1e-12)


def test_score_all_missing_gives_nan_and_specs_are_accepted(monkeypatch):
    monkeypatch.setitem(REWARDS, "raises", _raises)
    res = score([RewardSpec(name="raises")], 1.0, ["p"], ["c"], {})
    assert math.isnan(res.combined[0]) and res.failures == {"raises/exception": 1}


def test_score_weighted_builtins_and_kwargs():
    specs = [
        RewardSpec(name="accuracy", weight=1.0),
        RewardSpec(name="format", weight=0.2),
        RewardSpec(name="length", weight=1.0, kwargs={"max_completion_length": 10, "overlong_buffer": 4}),
    ]
    completions = ["<think>3+4</think><answer>7</answer>", "8"]
    columns = {"answer": ["7", "7"], "completion_lengths": [3, 8]}
    res = score(build_reward_fns(specs), 5.0, ["3+4", "3+4"], completions, columns)
    assert res.components["accuracy"] == [1.0, 0.0]
    assert res.components["format"] == [1.0, 0.0]
    assert res.components["length"] == pytest.approx([0.0, -0.5])
    assert res.combined == pytest.approx([1.2, -0.5], abs=1e-12)
    assert res.failures == {}


def test_score_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="column 'answer' has 1 rows, expected 2"):
        score(build_reward_fns([RewardSpec(name="accuracy")]), 1.0, ["a", "b"], ["c", "d"], {"answer": ["1"]})
