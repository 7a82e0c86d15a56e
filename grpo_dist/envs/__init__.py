"""Environments of multi-turn (agentic) rollouts: the protocol, tool calling, built-in environments.

Pure: stdlib, grpo_dist's own pure modules and (lazily, for tool schemas) transformers; never
ray, vllm or deepspeed. The turn loop that drives an environment lives on the rollout side.
"""

from grpo_dist.envs.base import (
    EnvError,
    EnvFactory,
    Environment,
    Step,
    as_messages,
    as_step,
    check_env,
    import_object,
    load_env_factory,
)
from grpo_dist.envs.calculator import calculator
from grpo_dist.envs.retry import DEFAULT_MAX_ATTEMPTS, RetryEnv, answer_matches, make_retry_env
from grpo_dist.envs.tools import (
    ParseError,
    ToolCall,
    ToolEnv,
    load_tools,
    parse_tool_calls,
    tool_schema,
    tools_system_prompt,
)

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "EnvError",
    "EnvFactory",
    "Environment",
    "ParseError",
    "RetryEnv",
    "Step",
    "ToolCall",
    "ToolEnv",
    "answer_matches",
    "as_messages",
    "as_step",
    "calculator",
    "check_env",
    "import_object",
    "load_env_factory",
    "load_tools",
    "make_retry_env",
    "parse_tool_calls",
    "tool_schema",
    "tools_system_prompt",
]
