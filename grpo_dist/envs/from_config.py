"""The environment factory and tool schemas a ``rollout.multi_turn`` config names (resolved where
they are used: preflight, data loading, each rollout worker)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from grpo_dist.config import MultiTurnConfig
from grpo_dist.envs.base import EnvError, as_messages, check_env, load_env_factory
from grpo_dist.envs.tools import ToolEnv, load_tools, tool_schema
from grpo_dist.errors import first_line


def env_factory(cfg: MultiTurnConfig) -> Callable[[dict], Any]:
    """``factory(row) -> environment``: the configured one, or a ``ToolEnv`` over the tools."""
    if cfg.env is not None:
        return load_env_factory(cfg.env)
    return partial(_tool_env, load_tools(cfg.tools), cfg.tool_timeout_s)


def _tool_env(tools: list[Callable], timeout_s: float, row: dict) -> ToolEnv:
    return ToolEnv(tools, tool_timeout_s=timeout_s)


def tool_schemas(cfg: MultiTurnConfig | None) -> list[dict] | None:
    """The tools' JSON schemas (None without tools)."""
    if cfg is None or not cfg.tools:
        return None
    return [tool_schema(fn) for fn in load_tools(cfg.tools)]


def check_env_on_row(cfg: MultiTurnConfig, row: dict) -> None:
    """Build one environment on a real prompt row, check its methods and its ``reset()``, close it:
    an environment that cannot run fails before launch (EnvError, one line)."""
    factory = env_factory(cfg)
    try:
        env = factory(row)
    except EnvError:
        raise
    except Exception as e:
        raise EnvError(
            f"rollout.multi_turn: the environment factory raised on the first prompt row: {first_line(e)}"
        ) from None
    try:
        check_env(env)
        as_messages(env.reset(), env, "reset()")
    except EnvError:
        raise
    except Exception as e:
        raise EnvError(
            f"rollout.multi_turn: {type(env).__name__}.reset() raised on the first prompt row: {first_line(e)}"
        ) from None
    finally:
        if callable(getattr(env, "close", None)):
            env.close()
