"""A calculator tool: arithmetic evaluated on the parsed syntax tree, never by ``eval``.

Only numbers, ``+ - * / // % **``, unary ``+ -`` and parentheses; results are bounded so that a
model's ``9**9**9`` is refused at once instead of computing for hours.
"""

from __future__ import annotations

import ast
import math
import operator

MAX_EXPRESSION_CHARS = 1000
# About 308 decimal digits, the float range: larger results help no arithmetic task.
MAX_RESULT_BITS = 1024

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_ALLOWED = "only numbers, + - * / // % **, unary + - and parentheses are allowed"


def _check_size(x: int | float) -> int | float:
    if isinstance(x, complex):
        raise ValueError("the result is not a real number")
    if isinstance(x, int) and x.bit_length() > MAX_RESULT_BITS:
        raise ValueError(f"the result is too large (more than {MAX_RESULT_BITS} bits)")
    if isinstance(x, float) and not math.isfinite(x):
        raise ValueError("the result is too large")
    return x


def _power(base: int | float, exp: int | float) -> int | float:
    # Estimated before computing: an exact int power is what would run for hours.
    exact = isinstance(base, int) and isinstance(exp, int) and abs(base) > 1 and exp > 0
    if exact and exp * math.log2(abs(base)) > MAX_RESULT_BITS:
        raise ValueError(f"{base}**{exp} is too large (more than {MAX_RESULT_BITS} bits)")
    return base**exp


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check_size(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        op = _power if isinstance(node.op, ast.Pow) else _BINARY[type(node.op)]
        return _check_size(op(left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    what = ast.unparse(node) if isinstance(node, ast.expr) else type(node).__name__
    raise ValueError(f"{what!r} is not arithmetic: {_ALLOWED}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return its value.

    Args:
        expression: The arithmetic expression, e.g. "(3 + 4) * 2 / 7"; numbers, + - * / // % ** and parentheses only.
    """
    if not isinstance(expression, str):
        raise ValueError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"not a valid expression ({e.msg if isinstance(e, SyntaxError) else e})") from None
    except (RecursionError, MemoryError):
        raise ValueError("expression is nested too deeply") from None
    try:
        return str(_eval(tree))
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except OverflowError:
        raise ValueError("the result is too large") from None
    except RecursionError:
        raise ValueError("expression is nested too deeply") from None
