"""Tool calling: JSON schemas of plain Python functions, Hermes-style call parsing, ``ToolEnv``.

A tool is a plain function with type annotations and a Google-style docstring (a description,
then ``Args:`` describing every parameter); ``tool_schema`` turns it into the OpenAI/HF function
schema that chat templates take as ``tools=``. The model calls tools as Qwen2.5's template asks:
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks in its turn. For templates
that take no ``tools=`` (SmolLM2's ChatML), ``tools_system_prompt`` writes the same instructions
as a system message text.
"""

from __future__ import annotations

import inspect
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grpo_dist.envs.base import EnvError, Step, import_object
from grpo_dist.errors import first_line
from grpo_dist.timeouts import call_with_timeout

# vLLM's Hermes parser (vllm/tool_parsers/hermes_tool_parser.py) also takes an unclosed last block:
# generation stopped at "</tool_call>" (a stop string, not kept in the text) leaves one.
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.S)


# ---------------------------------------------------------------- schemas


def _tool_name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or repr(fn)


def tool_schema(fn: Callable) -> dict:
    """``{"type": "function", "function": {"name", "description", "parameters"}}`` for ``fn``, from
    its annotations (str, int, float, bool, list[...], dict, Literal, Optional) and Google-style
    docstring, by ``transformers.utils.get_json_schema``; EnvError naming the tool and the
    parameter when one lacks a type or a description."""
    return _schema(fn, repr(_tool_name(fn)))


def _schema(fn: Callable, label: str) -> dict:
    """``tool_schema``, with the tool called ``label`` in errors (its name, or its import path)."""
    # Imported here: transformers.utils takes ~1 s to import, and only tool users need it.
    from transformers.utils import get_json_schema
    from transformers.utils.chat_template_utils import parse_google_format_docstring

    if not callable(fn) or not hasattr(fn, "__name__"):
        raise EnvError(f"tool {label}: a tool must be a plain function, got {type(fn).__name__}")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError) as e:
        raise EnvError(f"tool {label}: no introspectable signature ({e})") from None
    doc = inspect.getdoc(fn)
    if not doc:
        raise EnvError(f"tool {label} has no docstring: give a description and an 'Args:' section")
    description, arg_docs, _ = parse_google_format_docstring(doc.strip())
    if not description:
        raise EnvError(f"tool {label}: its docstring has no description before 'Args:'")
    for p in params:
        # A JSON call passes arguments by name only.
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise EnvError(f"tool {label}: parameter {p} cannot be passed by name in a JSON tool call")
        if p.annotation is p.empty:
            raise EnvError(f"tool {label}: parameter {p.name!r} has no type annotation")
        if p.name not in (arg_docs or {}):
            raise EnvError(f"tool {label}: parameter {p.name!r} has no description in the docstring's 'Args:'")
    try:
        schema = get_json_schema(fn)
    except Exception as e:
        raise EnvError(f"tool {label}: cannot build its JSON schema ({first_line(e)})") from None
    function = schema["function"]
    # Chat templates ignore the return type; Qwen2.5's would still print it into every prompt.
    function.pop("return", None)
    function["parameters"].setdefault("required", [])
    return schema


def tools_system_prompt(schemas: list[dict], system: str = "") -> str:
    """A system message text offering the tools, for chat templates that take no ``tools=``;
    worded as Qwen2.5's template's tool preamble. ``system`` (a task prompt) goes first."""
    tools = "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
    head = f"{system}\n\n" if system else ""
    return (
        f"{head}# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call>\n\nEach function's result comes back to you in a tool message. "
        "When you have the final answer, reply without a tool call."
    )


def load_tools(paths: list[str]) -> list[Callable]:
    """The functions at ``"module:function"`` paths, each checked by building its schema."""
    tools = []
    for path in paths:
        fn = import_object(path, "tool")
        _schema(fn, repr(path))
        tools.append(fn)
    return tools


# ---------------------------------------------------------------- parsing calls


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


@dataclass(frozen=True)
class ParseError:
    """A ``<tool_call>`` block that is not a call; ``name`` when the block had a readable one."""

    error: str
    raw: str
    name: str | None = None


def _parse_block(raw: str) -> ToolCall | ParseError:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return ParseError(f"tool call is not valid JSON ({e})", raw)
    if not isinstance(obj, dict):
        return ParseError('tool call must be a JSON object {"name": ..., "arguments": {...}}', raw)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ParseError('tool call has no "name"', raw)
    args = obj.get("arguments", {})
    if isinstance(args, str):
        # OpenAI's wire format carries arguments as a JSON string; some models copy it.
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            return ParseError(f'"arguments" of {name!r} is not valid JSON ({e})', raw, name)
    if not isinstance(args, dict):
        return ParseError(f'"arguments" of {name!r} must be a JSON object', raw, name)
    return ToolCall(name, args)


def parse_tool_calls(text: str) -> list[ToolCall | ParseError]:
    """Every ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block of ``text``, in order;
    a block that is not a valid call becomes a ``ParseError`` entry."""
    return [_parse_block((closed or unclosed).strip()) for closed, unclosed in _TOOL_CALL.findall(text)]


# ---------------------------------------------------------------- the environment


def _result_text(result: Any) -> str:
    if isinstance(result, (dict, list)):
        return json.dumps(result, ensure_ascii=False, default=str)
    return str(result)


def _observation(content: str, name: str | None) -> dict:
    return {"role": "tool", "content": content} | ({"name": name} if name else {})


class ToolEnv:
    """An environment offering plain Python functions as tools.

    Each model turn's ``<tool_call>`` blocks run in order, each bounded by ``tool_timeout_s``;
    every call answers with one ``role=tool`` message (the result, or ``error: ...`` for an unknown
    tool, bad JSON, arguments that do not bind, an exception or a timeout). A turn with no call
    ends the episode with reward 0: the configured reward functions score the transcript. At most
    ``max_calls_per_step`` calls run per turn, so one turn waits at most that many timeouts.
    ``info`` counts ``tool_calls`` (call blocks in the turn), ``tool_errors`` (those that failed or
    were not run) and ``tool_seconds`` (time spent running them).
    """

    def __init__(self, tools: list[Callable], tool_timeout_s: float = 10.0, max_calls_per_step: int = 8):
        if not tools:
            raise EnvError("ToolEnv needs at least one tool")
        if not tool_timeout_s > 0:
            raise EnvError(f"ToolEnv: tool_timeout_s must be > 0, got {tool_timeout_s}")
        if max_calls_per_step < 1:
            raise EnvError(f"ToolEnv: max_calls_per_step must be >= 1, got {max_calls_per_step}")
        self.schemas = [tool_schema(fn) for fn in tools]
        names = [s["function"]["name"] for s in self.schemas]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise EnvError(f"ToolEnv: tool names must be unique, {dup} repeat")
        self.tools = dict(zip(names, tools))
        self.tool_timeout_s = tool_timeout_s
        self.max_calls_per_step = max_calls_per_step

    def reset(self) -> list[dict]:
        return []

    def _call(self, call: ToolCall | ParseError) -> tuple[str, bool]:
        """(observation text, whether it is an error) for one parsed call."""
        if isinstance(call, ParseError):
            return f"error: {call.error}", True
        fn = self.tools.get(call.name)
        if fn is None:
            return f"error: unknown tool {call.name!r}; the tools are {sorted(self.tools)}", True
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as e:
            return f"error: bad arguments for {call.name}: {e}", True
        status, out = call_with_timeout(fn, call.arguments, self.tool_timeout_s, name=f"tool-{_tool_name(fn)}")
        if status == "timeout":
            return f"error: {call.name} timed out after {self.tool_timeout_s:g} s", True
        if status == "exception":
            return f"error: {first_line(out)}", True
        return _result_text(out), False

    def step(self, text: str) -> Step:
        calls = parse_tool_calls(text)
        if not calls:
            return Step(messages=[], done=True, info={"tool_calls": 0, "tool_errors": 0, "tool_seconds": 0.0})
        messages, errors, start = [], 0, time.monotonic()
        for call in calls[: self.max_calls_per_step]:
            content, failed = self._call(call)
            errors += failed
            messages.append(_observation(content, call.name))
        skipped = len(calls) - self.max_calls_per_step
        if skipped > 0:
            errors += skipped
            note = f"error: at most {self.max_calls_per_step} tool calls run per turn; {skipped} more were not run"
            messages.append(_observation(note, None))
        info = {"tool_calls": len(calls), "tool_errors": errors, "tool_seconds": time.monotonic() - start}
        return Step(messages=messages, info=info)
