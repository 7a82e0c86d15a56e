"""Retry with feedback: for any task with a checkable answer, a wrong answer earns another try.

In a config, ``grpo_dist.envs.retry:make_retry_env`` builds one ``RetryEnv`` per prompt row from the
row's reference ``answer``, with ``DEFAULT_MAX_ATTEMPTS`` tries. Other settings go through a factory
in your own module, e.g. ``my_envs.py``::

    import functools
    from grpo_dist.envs.retry import make_retry_env

    make_env = functools.partial(make_retry_env, max_attempts=5, feedback="Wrong. Check your arithmetic.")

and name ``my_envs:make_env`` as the factory.
"""

from __future__ import annotations

from collections.abc import Callable

from grpo_dist.envs.base import EnvError, Step
from grpo_dist.rewards import accuracy_reward, extract_final_number

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_FEEDBACK = "That is not right. Try again."


def answer_matches(text: str, answer: str) -> bool:
    """Whether ``text``'s final number equals the reference's, exactly as the ``accuracy`` reward judges."""
    return accuracy_reward(prompts=[""], completions=[text], answer=[answer]) == [1.0]


class RetryEnv:
    """Up to ``max_attempts`` model turns at one question: a right answer ends the episode with
    reward 1.0; a wrong one gets ``feedback`` as a user message while attempts are left, and ends
    it with reward 0 on the last attempt. ``check(text, answer)`` judges a turn (default:
    ``answer_matches``, the ``accuracy`` reward's number comparison)."""

    def __init__(
        self,
        answer: str,
        *,
        check: Callable[[str, str], bool] = answer_matches,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        feedback: str = DEFAULT_FEEDBACK,
    ):
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise EnvError(f"RetryEnv: max_attempts must be an integer >= 1, got {max_attempts!r}")
        # With the default check no turn could ever be right: refuse rather than train on zeros.
        if check is answer_matches and extract_final_number(str(answer)) is None:
            raise EnvError(f"RetryEnv: reference answer {answer!r} has no number; pass check= for non-numeric answers")
        self.answer = str(answer)
        self.check = check
        self.max_attempts = max_attempts
        self.feedback = feedback
        self.attempts = 0

    def reset(self) -> list[dict]:
        self.attempts = 0
        return []

    def step(self, text: str) -> Step:
        self.attempts += 1
        # Summed over a step's episodes (rollout/env/solved, rollout/env/solved_first_try): accuracy
        # after the first turn and after the last.
        info = {"solved": 0.0, "solved_first_try": 0.0}
        if self.check(text, self.answer):
            return Step(
                messages=[], reward=1.0, done=True, info={"solved": 1.0, "solved_first_try": float(self.attempts == 1)}
            )
        if self.attempts >= self.max_attempts:
            return Step(messages=[], reward=0.0, done=True, info=info)
        return Step(messages=[{"role": "user", "content": self.feedback}], info=info)


def make_retry_env(
    row: dict, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS, feedback: str = DEFAULT_FEEDBACK
) -> RetryEnv:
    """The environment factory for configs: a ``RetryEnv`` on the row's reference ``answer``."""
    if row.get("answer") is None:
        raise EnvError(f"make_retry_env: the row has no 'answer' (its keys: {sorted(row)})")
    return RetryEnv(row["answer"], max_attempts=max_attempts, feedback=feedback)
