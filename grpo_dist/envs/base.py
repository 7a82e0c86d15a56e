"""The environment protocol of multi-turn rollouts, and the checks on what an environment returns.

An environment is any object with ``reset()`` and ``step(text)`` (``Environment``); it needs no
import of grpo_dist. A config names a factory ``"module:function"`` that builds one environment
per prompt row (``factory(row) -> env``); every rollout of the row gets its own instance.

The rollout side drives it: ``reset()`` messages go after the row's prompt, then the model speaks,
``step(model_text)`` answers with messages to append (or ends the episode), and so on until done
or the turn budget runs out; ``close()`` is called at the end when the environment has one.
Whatever ``step`` returns goes through ``as_step``, which refuses malformed results in one line.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from grpo_dist import imports
from grpo_dist.errors import UserError

# An environment's messages are observations; "assistant" turns are the model's own.
ENV_ROLES = ("user", "tool", "system")
_STEP_KEYS = {"messages", "reward", "done", "info"}


class EnvError(UserError):
    """An environment, its factory or a tool is unusable; the message names it and says why."""


@dataclass(frozen=True)
class Step:
    """What an environment answers to one model turn.

    ``messages``: chat messages appended after the model's turn (``{"role": "user", "content": ...}``,
    ``{"role": "tool", "content": ..., "name": ...}``). ``reward``: added to the episode's reward.
    ``done``: the episode ends (no further model turn). ``info``: numeric counters (e.g.
    ``tool_calls``, ``tool_errors``, ``tool_seconds``) that the rollout side sums into metrics.
    """

    messages: list[dict]
    reward: float = 0.0
    done: bool = False
    info: dict = field(default_factory=dict)


class Environment(Protocol):
    """One episode of a multi-turn task, built per prompt row by a factory ``factory(row) -> env``.

    - ``reset() -> list[dict]``: messages added after the row's prompt before the first model
      turn (may be empty).
    - ``step(text: str) -> dict | Step``: the model's turn as text; a dict has keys ``messages``
      (required), ``reward`` (default 0), ``done`` (default False), ``info`` (default {}).
    - ``close()`` (optional): called once when the episode ends, to release resources.
    """

    def reset(self) -> list[dict]: ...

    def step(self, text: str) -> dict | Step: ...


EnvFactory = Callable[[dict], Environment]


def _env_name(env: object) -> str:
    return "environment" if env is None else type(env).__name__


def as_messages(messages: Any, env: object = None, where: str = "step()") -> list[dict]:
    """``messages`` as a new list, checked: dicts with a string ``role`` (not "assistant") and
    string ``content``; other keys (``name``, ``tool_call_id``) pass through."""
    name = _env_name(env)
    if not isinstance(messages, list):
        raise EnvError(f"{name}.{where}: messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise EnvError(f"{name}.{where}: messages[{i}] must be a dict, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ENV_ROLES:
            raise EnvError(f"{name}.{where}: messages[{i}] role must be one of {list(ENV_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise EnvError(f"{name}.{where}: messages[{i}] content must be a string, got {type(content).__name__}")
    return list(messages)


def _finite_number(x: Any) -> bool:
    # bool is an int to Python but never a meaningful reward or counter here.
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def as_step(result: Any, env: object = None) -> Step:
    """A ``Step`` from what ``env.step`` returned (a dict or a Step), checked; raises EnvError
    naming the environment's class for anything else."""
    name = _env_name(env)
    if isinstance(result, dict):
        unknown = set(result) - _STEP_KEYS
        if unknown:
            raise EnvError(f"{name}.step() returned unknown keys {sorted(unknown)}; allowed: {sorted(_STEP_KEYS)}")
        if "messages" not in result:
            raise EnvError(f"{name}.step() returned a dict without 'messages' (use [] for none)")
        messages, reward = result["messages"], result.get("reward", 0.0)
        done, info = result.get("done", False), result.get("info", {})
    elif isinstance(result, Step):
        messages, reward, done, info = result.messages, result.reward, result.done, result.info
    else:
        raise EnvError(f"{name}.step() must return a dict or a Step, got {type(result).__name__}")
    messages = as_messages(messages, env, "step()")
    if not _finite_number(reward):
        raise EnvError(f"{name}.step(): reward must be a finite number, got {reward!r}")
    if not isinstance(done, bool):
        raise EnvError(f"{name}.step(): done must be True or False, got {done!r}")
    if not isinstance(info, dict) or not all(isinstance(k, str) and _finite_number(v) for k, v in info.items()):
        raise EnvError(f"{name}.step(): info must be a dict of str -> finite number, got {info!r}")
    return Step(messages=messages, reward=float(reward), done=done, info=dict(info))


# ---------------------------------------------------------------- loading and checking


def import_object(path: str, what: str) -> Any:
    """The object at ``"pkg.module:attr"``; a bad path is an EnvError naming ``what``."""
    return imports.import_object(path, what, EnvError)


def _binds(fn: Callable, *args: Any) -> bool:
    """Whether ``fn`` can be called with ``args`` (positionally), judged by its signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True  # no introspectable signature (a builtin): the call itself will tell
    try:
        sig.bind(*args)
    except TypeError:
        return False
    return True


def load_env_factory(path: str) -> EnvFactory:
    """The environment factory at ``"module:function"``: a callable ``factory(row: dict) -> env``."""
    factory = import_object(path, "environment factory")
    if not callable(factory):
        raise EnvError(f"environment factory {path!r} is not callable ({type(factory).__name__})")
    if not _binds(factory, {}):
        raise EnvError(
            f"environment factory {path!r} must take one positional argument (the row dict): "
            f"its signature is {inspect.signature(factory)}"
        )
    return factory


def check_env(env: object) -> None:
    """Refuse (EnvError) an object that is not an environment: ``reset()`` callable with no arguments,
    ``step(text)`` taking one positional argument, ``close`` callable if present. Preflight runs
    it on the environment built from one real row."""
    name = _env_name(env)
    reset, step, close = (getattr(env, m, None) for m in ("reset", "step", "close"))
    for method, fn in (("reset", reset), ("step", step)):
        if not callable(fn):
            raise EnvError(f"{name} is not an environment: it has no callable {method}()")
    if not _binds(reset):
        raise EnvError(f"{name}.reset must take no arguments: its signature is {inspect.signature(reset)}")
    if not _binds(step, ""):
        raise EnvError(
            f"{name}.step must take one positional argument (the model's text): its signature is {inspect.signature(step)}"
        )
    if hasattr(env, "close") and not callable(close):
        raise EnvError(f"{name}.close is not callable")
