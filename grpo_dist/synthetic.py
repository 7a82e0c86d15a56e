"""The synthetic arithmetic task: ``"37+48"`` -> ``"85"``.

Every problem ``a <op> b`` with ``a, b`` in ``[0, max_operand]`` has an index in
``[0, len(ops) * (max_operand + 1) ** 2)``; sampling indices without replacement gives distinct
problems, and the train split samples only from indices the test split did not take, so the two
are disjoint by construction. The test split depends only on ``(seed, num_test, max_operand, ops)``,
never on ``num_train``.
"""

from __future__ import annotations

import bisect
import random
import warnings
from typing import Literal

OPS = ("+", "-", "*")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def _check(max_operand: int, ops: list[str]) -> None:
    if max_operand < 0:
        raise ValueError(f"max_operand must be >= 0, got {max_operand}")
    if not ops:
        raise ValueError("ops must list at least one operator")
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise ValueError(f"unknown operator(s) {bad}; supported: {list(OPS)}")
    if len(set(ops)) != len(ops):
        raise ValueError(f"ops has duplicates: {ops}")


def num_problems(max_operand: int, ops: list[str]) -> int:
    """Size of the problem universe."""
    _check(max_operand, ops)
    return len(ops) * (max_operand + 1) ** 2


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def problem_at(index: int, max_operand: int, ops: list[str]) -> dict[str, str]:
    """The problem with this index in the universe (a bijection onto all ``a op b``)."""
    m = max_operand + 1
    op = ops[index // (m * m)]
    a, b = divmod(index % (m * m), m)
    return {"question": f"{a}{op}{b}", "answer": str(_apply(a, op, b))}


def make_problems(n: int, seed: int, max_operand: int = 99, ops: list[str] = ["+"]) -> list[dict[str, str]]:  # noqa: B006
    """``n`` distinct problems, deterministic from ``seed``. Raises if fewer than ``n`` exist."""
    total = num_problems(max_operand, ops)
    if not 0 <= n <= total:
        raise ValueError(f"asked for {n} distinct problems but max_operand={max_operand}, ops={ops} give only {total}")
    return [problem_at(i, max_operand, ops) for i in random.Random(seed).sample(range(total), n)]


def _nth_not_in(j: int, shifted_sorted: list[int]) -> int:
    # The j-th index (0-based) outside a sorted set T is j + #{i : T[i] - i <= j}.
    return j + bisect.bisect_right(shifted_sorted, j)


def make_split(
    split: Literal["train", "test"],
    num_train: int,
    num_test: int,
    seed: int,
    max_operand: int = 99,
    ops: list[str] = ["+"],  # noqa: B006
) -> list[dict[str, str]]:
    """One split of the task; train and test never share a problem.

    ``test`` holds ``num_test`` problems. ``train`` holds ``num_train`` problems drawn from the rest;
    if fewer than ``num_train`` remain, it holds all of them (with a warning naming the numbers).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    total = num_problems(max_operand, ops)
    if not 0 < num_test < total:
        raise ValueError(
            f"num_test={num_test} must be in [1, {total - 1}]: max_operand={max_operand}, ops={ops} give {total} problems"
        )
    test_idx = random.Random(f"test-{seed}").sample(range(total), num_test)
    if split == "test":
        return [problem_at(i, max_operand, ops) for i in test_idx]
    remaining = total - num_test
    if num_train > remaining:
        warnings.warn(
            f"num_train={num_train} exceeds the {remaining} problems left after the test split "
            f"(max_operand={max_operand}, ops={ops}); the train split holds all {remaining}",
            stacklevel=2,
        )
    shifted = [t - i for i, t in enumerate(sorted(test_idx))]
    train_j = random.Random(f"train-{seed}").sample(range(remaining), min(num_train, remaining))
    return [problem_at(_nth_not_in(j, shifted), max_operand, ops) for j in train_j]


def _column_addition(a: int, b: int) -> str:
    # Least significant column first, carrying explicitly: the order a small model can follow.
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for k in range(max(len(da), len(db))):
        x = int(da[k]) if k < len(da) else 0
        y = int(db[k]) if k < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}" if carry else f"{x}+{y}={s}")
        carry = s // 10
    return ",".join(steps)


def _split_question(question: str) -> tuple[int, str, int]:
    for k, ch in enumerate(question):
        if ch in OPS and k > 0:
            return int(question[:k]), ch, int(question[k + 1 :])
    raise ValueError(f"not a synthetic arithmetic question: {question!r}")


def worked_completion(problem: dict[str, str]) -> str:
    """Target completion for supervised warm start: ``<think>working</think><answer>N</answer>``.

    Additions show column-by-column working; other operators restate the question.
    """
    a, op, b = _split_question(problem["question"])
    working = _column_addition(a, b) if op == "+" else problem["question"]
    return f"{THINK_OPEN}{working}{THINK_CLOSE}{ANSWER_OPEN}{problem['answer']}{ANSWER_CLOSE}"


def extract_answer(completion: str) -> str | None:
    """The text between the first ``<answer>`` and the following ``</answer>``, stripped; None if absent."""
    start = completion.find(ANSWER_OPEN)
    if start < 0:
        return None
    end = completion.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
    if end < 0:
        return None
    return completion[start + len(ANSWER_OPEN) : end].strip()
