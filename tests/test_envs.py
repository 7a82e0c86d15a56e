"""The pure environment layer of multi-turn rollouts: protocol checks, tools, built-in environments."""

from __future__ import annotations

import json
import math
import textwrap
import threading
import time
from typing import Literal, Optional

import pytest

from grpo_dist.envs import (
    DEFAULT_MAX_ATTEMPTS,
    EnvError,
    ParseError,
    RetryEnv,
    Step,
    ToolCall,
    ToolEnv,
    as_step,
    calculator,
    check_env,
    load_env_factory,
    load_tools,
    make_retry_env,
    parse_tool_calls,
    tool_schema,
    tools_system_prompt,
)
from grpo_dist.errors import UserError


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------- tool_schema


def test_schema_of_calculator():
    assert tool_schema(calculator) == {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression and return its value.",
            "parameters": {
                "type": "object",
                "properties": {
                    "expression": {
                        "type": "string",
                        "description": 'The arithmetic expression, e.g. "(3 + 4) * 2 / 7"; numbers, '
                        "+ - * / // % ** and parentheses only.",
                    }
                },
                "required": ["expression"],
            },
        },
    }


def search(
    query: str,
    tags: list[str],
    mode: Literal["fast", "exact"] = "fast",
    limit: Optional[int] = None,  # noqa: UP045 (typing.Optional is what users write too)
    weights: dict | None = None,
) -> list:
    """Search the notes.

    Args:
        query: What to look for.
        tags: Only notes with all these tags.
        mode: How to match.
        limit: At most this many results.
        weights: Score weight per field.
    """
    return []


def test_schema_of_list_literal_optional_params():
    fn = tool_schema(search)["function"]
    assert fn["name"] == "search" and fn["description"] == "Search the notes."
    assert fn["parameters"] == {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "What to look for."},
            "tags": {"type": "array", "items": {"type": "string"}, "description": "Only notes with all these tags."},
            "mode": {"type": "string", "enum": ["fast", "exact"], "description": "How to match."},
            "limit": {"type": "integer", "nullable": True, "description": "At most this many results."},
            "weights": {"type": "object", "nullable": True, "description": "Score weight per field."},
        },
        "required": ["query", "tags"],
    }


def no_doc(x: int) -> int:
    return x


def no_annotation(x) -> int:
    """Double it.

    Args:
        x: A number.
    """
    return 2 * x


def undocumented_param(x: int, y: int) -> int:
    """Add them.

    Args:
        x: A number.
    """
    return x + y


def star_args(*xs: int) -> int:
    """Sum them.

    Args:
        xs: Numbers.
    """
    return sum(xs)


def no_params() -> str:
    """The time of day."""
    return "noon"


@pytest.mark.parametrize(
    "fn, words",
    [
        (no_doc, ["'no_doc'", "no docstring"]),
        (no_annotation, ["'no_annotation'", "'x'", "no type annotation"]),
        (undocumented_param, ["'undocumented_param'", "'y'", "no description"]),
        (star_args, ["'star_args'", "*xs", "by name"]),
    ],
)
def test_schema_refuses_unusable_functions_in_one_line(fn, words):
    with pytest.raises(EnvError) as e:
        tool_schema(fn)
    msg = _one_line(e)
    assert all(w in msg for w in words), msg


def test_schema_of_a_function_without_params_has_empty_required():
    assert tool_schema(no_params)["function"]["parameters"] == {"type": "object", "properties": {}, "required": []}


def test_tools_system_prompt_lists_schemas_and_call_format():
    schemas = [tool_schema(calculator), tool_schema(search)]
    text = tools_system_prompt(schemas, system="Solve the problem.")
    assert text.startswith("Solve the problem.\n\n# Tools")
    lines = text.splitlines()
    for s in schemas:
        assert json.dumps(s, ensure_ascii=False) in lines
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in text
    assert "tool message" in text
    assert tools_system_prompt(schemas).startswith("# Tools")


# ---------------------------------------------------------------- load_tools


def test_load_tools_resolves_and_checks(tmp_path, monkeypatch):
    (tmp_path / "my_tools.py").write_text(
        textwrap.dedent('''
            def bad(x):
                """Bad.

                Args:
                    x: Something.
                """
            NOT_A_TOOL = 3
        ''')
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_tools(["grpo_dist.envs.calculator:calculator"]) == [calculator]
    for path, words in [
        ("my_tools:bad", ["'my_tools:bad'", "'x'", "type annotation"]),
        ("my_tools:NOT_A_TOOL", ["'my_tools:NOT_A_TOOL'", "plain function"]),
        ("my_tools:missing", ["'my_tools:missing'", "no attribute"]),
        ("no_such_module_xyz:f", ["cannot import module"]),
        ("calculator", ["not a 'module:function' path"]),
    ]:
        with pytest.raises(EnvError) as e:
            load_tools([path])
        msg = _one_line(e)
        assert all(w in msg for w in words), msg


# ---------------------------------------------------------------- parse_tool_calls


def test_parse_one_call():
    text = 'Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>'
    assert parse_tool_calls(text) == [ToolCall("calculator", {"expression": "2+2"})]


def test_parse_several_calls_in_order():
    text = (
        '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call> then '
        '<tool_call>{"name": "b", "arguments": {}}</tool_call><tool_call>{"name": "c"}</tool_call>'
    )
    assert parse_tool_calls(text) == [ToolCall("a", {"x": 1}), ToolCall("b", {}), ToolCall("c", {})]


def test_parse_no_calls():
    assert parse_tool_calls("The answer is 4.") == []
    assert parse_tool_calls("") == []


def test_parse_malformed_and_nameless_become_errors():
    text = (
        '<tool_call>{"name": "a", "arguments": {"x": 1</tool_call>'
        '<tool_call>{"arguments": {"x": 1}}</tool_call>'
        '<tool_call>["a"]</tool_call>'
        '<tool_call>{"name": "b", "arguments": [1]}</tool_call>'
        '<tool_call>{"name": "ok", "arguments": {}}</tool_call>'
    )
    got = parse_tool_calls(text)
    assert [type(c) for c in got] == [ParseError] * 4 + [ToolCall]
    assert "not valid JSON" in got[0].error and got[0].name is None
    assert 'no "name"' in got[1].error
    assert "JSON object" in got[2].error
    assert "must be a JSON object" in got[3].error and got[3].name == "b"


def test_parse_takes_string_arguments_and_an_unclosed_last_block():
    # Generation stopped at the "</tool_call>" stop string leaves the last block unclosed.
    text = '<tool_call>{"name": "a", "arguments": "{\\"x\\": 2}"}</tool_call><tool_call>{"name": "b", "arguments": {}}'
    assert parse_tool_calls(text) == [ToolCall("a", {"x": 2}), ToolCall("b", {})]


# ---------------------------------------------------------------- ToolEnv


def _call(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def failing(x: int) -> str:
    """Always fails.

    Args:
        x: Ignored.
    """
    raise RuntimeError("disk on fire")


def lookup(key: str) -> dict:
    """Look a key up.

    Args:
        key: The key.
    """
    return {"key": key, "values": [1, 2]}


_release = threading.Event()


def slow(seconds: float) -> str:
    """Wait, then answer.

    Args:
        seconds: How long to wait.
    """
    _release.wait(seconds)
    return "late"


@pytest.fixture
def env():
    _release.clear()
    yield ToolEnv([calculator, failing, lookup, slow], tool_timeout_s=0.2)
    _release.set()  # lets an abandoned slow() thread end now


def test_tool_env_good_call_returns_the_result_as_a_tool_message(env):
    assert env.reset() == []
    step = env.step("I will compute. " + _call("calculator", expression="(1 + 2) * 4"))
    assert step.messages == [{"role": "tool", "name": "calculator", "content": "12"}]
    assert not step.done and step.reward == 0.0
    assert step.info["tool_calls"] == 1 and step.info["tool_errors"] == 0 and step.info["tool_seconds"] >= 0


def test_tool_env_json_result(env):
    step = env.step(_call("lookup", key="k"))
    assert json.loads(step.messages[0]["content"]) == {"key": "k", "values": [1, 2]}


def test_tool_env_no_call_ends_the_episode(env):
    step = env.step("The answer is 12.")
    assert step.done and step.reward == 0.0 and step.messages == []
    assert step.info["tool_calls"] == 0


@pytest.mark.parametrize(
    "text, name, words",
    [
        (_call("weather", city="Oslo"), "weather", ["unknown tool 'weather'", "calculator"]),
        ('<tool_call>{"name": "calculator", "arguments": {</tool_call>', None, ["not valid JSON"]),
        (_call("calculator", expr="1+1"), "calculator", ["bad arguments", "expr"]),
        (_call("calculator"), "calculator", ["bad arguments", "expression"]),
        (_call("calculator", expression="1/0"), "calculator", ["division by zero"]),
        (_call("calculator", expression="__import__('os')"), "calculator", ["not arithmetic"]),
        (_call("failing", x=1), "failing", ["RuntimeError", "disk on fire"]),
    ],
)
def test_tool_env_errors_become_counted_observations(env, text, name, words):
    step = env.step(text)
    assert not step.done
    (msg,) = step.messages
    assert msg["role"] == "tool" and msg.get("name") == name
    assert msg["content"].startswith("error: ") and all(w in msg["content"] for w in words), msg
    assert step.info["tool_calls"] == 1 and step.info["tool_errors"] == 1


def test_tool_env_timeout_returns_within_the_bound(env):
    start = time.monotonic()
    step = env.step(_call("slow", seconds=30))
    took = time.monotonic() - start
    assert took < env.tool_timeout_s + 2.0
    assert "timed out" in step.messages[0]["content"] and step.info["tool_errors"] == 1
    assert step.info["tool_seconds"] >= env.tool_timeout_s


def test_tool_env_counts_a_mixed_turn_and_caps_calls_per_turn():
    env = ToolEnv([calculator], max_calls_per_step=2)
    text = _call("calculator", expression="1+1") + _call("nope") + _call("calculator", expression="3")
    step = env.step(text)
    assert [m["content"] for m in step.messages[:2]] == [
        "2",
        "error: unknown tool 'nope'; the tools are ['calculator']",
    ]
    assert "1 more were not run" in step.messages[2]["content"]
    assert step.info["tool_calls"] == 3 and step.info["tool_errors"] == 2


def test_tool_env_refuses_bad_setup():
    with pytest.raises(EnvError, match="unique"):
        ToolEnv([calculator, calculator])
    with pytest.raises(EnvError, match="'no_doc'"):
        ToolEnv([calculator, no_doc])
    with pytest.raises(EnvError, match="tool_timeout_s"):
        ToolEnv([calculator], tool_timeout_s=0)


# ---------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    "expression, want",
    [
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("2 ** 3 ** 2", "512"),
        ("-3 ** 2", "-9"),
        ("(-3) ** 2", "9"),
        ("- -4 + +1", "5"),
        ("7 / 2", "3.5"),
        ("6 / 3", "2.0"),
        ("7 // 2", "3"),
        ("-7 % 3", "2"),
        ("1.5 * 4", "6.0"),
        ("2 ** -1", "0.5"),
        (" 12 ", "12"),
    ],
)
def test_calculator(expression, want):
    assert calculator(expression) == want


@pytest.mark.parametrize(
    "expression, words",
    [
        ("x + 1", "'x' is not arithmetic"),
        ("abs(-1)", "'abs(-1)' is not arithmetic"),
        ("__import__('os').system('true')", "not arithmetic"),
        ("(1).real", "not arithmetic"),
        ("True + 1", "'True' is not arithmetic"),
        ("'a' * 3", "not arithmetic"),
        ("2 ** 10000", "too large"),
        ("9 ** 9 ** 9", "too large"),
        ("2.0 ** 10000", "too large"),
        ("1e999", "too large"),
        ("(-8) ** 0.5", "not a real number"),
        ("1 / 0", "division by zero"),
        ("1 // 0", "division by zero"),
        ("1 % 0", "division by zero"),
        ("1 +", "not a valid expression"),
        ("", "not a valid expression"),
        ("1" * 1001, "longer than"),
    ],
)
def test_calculator_refuses(expression, words):
    start = time.monotonic()
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        calculator(expression)
    assert time.monotonic() - start < 1.0


# ---------------------------------------------------------------- RetryEnv


def test_retry_right_first_try():
    env = RetryEnv("18", max_attempts=3)
    assert env.reset() == []
    first_try = {"solved": 1.0, "solved_first_try": 1.0}
    assert env.step("So she makes $18 a day. #### 18") == Step(messages=[], reward=1.0, done=True, info=first_try)


def test_retry_right_after_feedback():
    env = RetryEnv("18", max_attempts=3, feedback="No.")
    env.reset()
    assert env.step("The answer is 17.") == Step(
        messages=[{"role": "user", "content": "No."}], info={"solved": 0.0, "solved_first_try": 0.0}
    )
    later = {"solved": 1.0, "solved_first_try": 0.0}
    assert env.step("The answer is 18.") == Step(messages=[], reward=1.0, done=True, info=later)


def test_retry_wrong_until_max_attempts_and_reset_starts_over():
    env = RetryEnv("18", max_attempts=2)
    for _ in range(2):
        env.reset()
        first = env.step("5")
        assert not first.done and first.messages[0]["content"] == "That is not right. Try again."
        assert env.step("6") == Step(messages=[], reward=0.0, done=True, info={"solved": 0.0, "solved_first_try": 0.0})


def test_retry_custom_check_and_refusals():
    env = RetryEnv("Paris", check=lambda text, answer: answer.lower() in text.lower(), max_attempts=1)
    assert env.step("It is paris.").reward == 1.0
    with pytest.raises(EnvError, match="has no number"):
        RetryEnv("Paris")
    with pytest.raises(EnvError, match="max_attempts"):
        RetryEnv("1", max_attempts=0)


def test_make_retry_env_from_a_row_and_partial(tmp_path, monkeypatch):
    env = load_env_factory("grpo_dist.envs.retry:make_retry_env")({"prompt": "p", "answer": "72", "question": "q"})
    assert isinstance(env, RetryEnv) and env.max_attempts == DEFAULT_MAX_ATTEMPTS and env.answer == "72"
    check_env(env)
    (tmp_path / "my_envs.py").write_text(
        "import functools\nfrom grpo_dist.envs.retry import make_retry_env\n"
        "make_env = functools.partial(make_retry_env, max_attempts=5)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_env_factory("my_envs:make_env")({"answer": "3"}).max_attempts == 5
    with pytest.raises(EnvError, match="no 'answer'"):
        make_retry_env({"question": "q"})


# ---------------------------------------------------------------- as_step


class DictEnv:
    """An environment written without any grpo_dist import."""

    def reset(self):
        return []

    def step(self, text):
        return {"messages": [{"role": "user", "content": "again"}], "reward": 1, "done": False}


def test_as_step_accepts_dict_and_step():
    env = DictEnv()
    step = as_step(env.step("x"), env)
    assert step == Step(messages=[{"role": "user", "content": "again"}], reward=1.0, done=False)
    assert isinstance(step.reward, float)
    assert as_step({"messages": []}) == Step(messages=[])
    tool_msg = {"role": "tool", "content": "4", "name": "calculator"}
    s = Step(messages=[tool_msg], reward=0.5, done=True, info={"tool_calls": 1})
    assert as_step(s, env) == s


@pytest.mark.parametrize(
    "result, words",
    [
        ("done", "must return a dict or a Step, got str"),
        (None, "got NoneType"),
        ({"messages": [], "score": 1}, "unknown keys ['score']"),
        ({"reward": 1}, "without 'messages'"),
        ({"messages": "hi"}, "messages must be a list"),
        ({"messages": ["hi"]}, "messages[0] must be a dict"),
        ({"messages": [{"content": "hi"}]}, "role must be one of"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "'assistant'"),
        ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
        ({"messages": [], "reward": math.nan}, "reward must be a finite number"),
        ({"messages": [], "reward": "1"}, "reward must be a finite number"),
        ({"messages": [], "reward": True}, "reward must be a finite number"),
        ({"messages": [], "done": 1}, "done must be True or False"),
        ({"messages": [], "info": {"n": "x"}}, "info must be a dict"),
        (Step(messages=[], reward=math.inf), "reward must be a finite number"),
    ],
)
def test_as_step_refuses_naming_the_env_class(result, words):
    with pytest.raises(EnvError) as e:
        as_step(result, DictEnv())
    msg = _one_line(e)
    assert "DictEnv" in msg and words in msg, msg
    assert isinstance(e.value, UserError)


# ---------------------------------------------------------------- factories and check_env


def make_dict_env(row):
    return DictEnv()


def two_args(row, extra):
    return DictEnv()


def test_load_env_factory(tmp_path, monkeypatch):
    (tmp_path / "factories.py").write_text(
        "class Env:\n    def __init__(self, row):\n        self.row = row\n"
        "    def reset(self):\n        return []\n    def step(self, text):\n        return {'messages': []}\n"
        "def none():\n    return None\ndef two(row, extra):\n    return None\nVALUE = 3\n"
    )
    (tmp_path / "broken_factories.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    env = load_env_factory("factories:Env")({"answer": "1"})
    assert env.row == {"answer": "1"}
    check_env(env)
    for path, words in [
        ("factories", "not a 'module:function' path"),
        ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
        ("broken_factories:make", "cannot import module 'broken_factories' (RuntimeError: boom)"),
        ("factories:missing", "has no attribute 'missing'"),
        ("factories:VALUE", "is not callable (int)"),
        ("factories:none", "one positional argument"),
        ("factories:two", "one positional argument"),
    ]:
        with pytest.raises(EnvError) as e:
            load_env_factory(path)
        msg = _one_line(e)
        assert path in msg and words in msg, msg


class NoStep:
    def reset(self):
        return []


class StepNoArg:
    def reset(self):
        return []

    def step(self):
        return {}


class ResetWithArg:
    def reset(self, row):
        return []

    def step(self, text):
        return {}


class BadClose(DictEnv):
    close = 3


@pytest.mark.parametrize(
    "env, words",
    [
        (NoStep(), "NoStep is not an environment: it has no callable step()"),
        (object(), "object is not an environment: it has no callable reset()"),
        (StepNoArg(), "StepNoArg.step must take one positional argument"),
        (ResetWithArg(), "ResetWithArg.reset must take no arguments"),
        (BadClose(), "BadClose.close is not callable"),
    ],
)
def test_check_env_refuses(env, words):
    with pytest.raises(EnvError) as e:
        check_env(env)
    assert words in _one_line(e)


def test_check_env_accepts_the_built_ins():
    check_env(ToolEnv([calculator]))
    check_env(RetryEnv("1"))
    check_env(DictEnv())
