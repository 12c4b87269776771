"""The arithmetic of a ``multi`` grader's ``calculate_output``, parsed and evaluated without ``eval``.

The formula is parsed with :mod:`ast` and only these nodes are accepted: numbers (int or float, not bool),
names of the multi grader's sub-graders, ``+ - * / **``, unary ``+ -``, parentheses (they leave no node) and
calls of the functions in :data:`FUNCTIONS` with positional arguments. Everything else (attributes,
subscripts, keywords, lambdas, comparisons, strings, calls of any other name such as ``__import__``) is
refused at validation, so evaluation walks a tree that can only do float arithmetic.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_FORMULA_CHARS = 1000
MAX_FORMULA_NODES = 256


def _clip(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


# name -> (function, fewest arguments, most arguments or None for any number)
FUNCTIONS: dict[str, tuple[Callable[..., float], int, int | None]] = {
    "min": (min, 2, None),
    "max": (max, 2, None),
    "abs": (abs, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
    "log": (math.log, 1, 1),
    "exp": (math.exp, 1, 1),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "clip": (_clip, 3, 3),
}
_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
ALLOWED = "numbers, grader names, + - * / **, parentheses and " + ", ".join(FUNCTIONS)


class FormulaError(ValueError):
    """A formula refused at validation, or one that failed to evaluate (division by zero, overflow...)."""


@dataclass(frozen=True)
class Formula:
    source: str
    tree: ast.expr
    names: frozenset[str]


def _check_call(node: ast.Call) -> None:
    if not isinstance(node.func, ast.Name):
        raise FormulaError("Calling anything but the listed functions by name is not allowed.")
    name = node.func.id
    if name not in FUNCTIONS:
        raise FormulaError(f"Function '{name}' is not allowed; allowed: {', '.join(FUNCTIONS)}.")
    if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
        raise FormulaError(f"'{name}' takes positional arguments only.")
    _, fewest, most = FUNCTIONS[name]
    if len(node.args) < fewest or (most is not None and len(node.args) > most):
        wanted = str(fewest) if most == fewest else f"at least {fewest}"
        raise FormulaError(f"'{name}' takes {wanted} argument(s), got {len(node.args)}.")


def _check(node: ast.expr, allowed_names: frozenset[str], names: set[str]) -> None:
    """Walk the value positions only (a call's function name is checked by _check_call, not as a name)."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise FormulaError(f"Only numbers are allowed as constants, not {node.value!r}.")
        try:
            float(node.value)
        except OverflowError:
            raise FormulaError("A number in the formula is too large.") from None
    elif isinstance(node, ast.Name):
        if node.id in FUNCTIONS:
            raise FormulaError(f"'{node.id}' is a function: call it, e.g. {node.id}(a, b).")
        if node.id not in allowed_names:
            known = ", ".join(sorted(allowed_names)) or "none"
            raise FormulaError(f"Unknown name '{node.id}'; the sub-graders are: {known}.")
        names.add(node.id)
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            hint = " (use ** for powers)" if isinstance(node.op, ast.BitXor) else ""
            raise FormulaError(
                f"Operator '{type(node.op).__name__}' is not allowed{hint}; allowed: {ALLOWED}."
            )
        _check(node.left, allowed_names, names)
        _check(node.right, allowed_names, names)
    elif isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            raise FormulaError(f"Operator '{type(node.op).__name__}' is not allowed; allowed: {ALLOWED}.")
        _check(node.operand, allowed_names, names)
    elif isinstance(node, ast.Call):
        _check_call(node)
        for argument in node.args:
            _check(argument, allowed_names, names)
    elif isinstance(node, ast.Attribute):
        raise FormulaError("Attribute access is not allowed in calculate_output.")
    else:
        raise FormulaError(f"'{type(node).__name__}' is not allowed in calculate_output; allowed: {ALLOWED}.")


def parse_formula(source: str, allowed_names: frozenset[str]) -> Formula:
    """Parse and check ``source``; ``allowed_names`` are the sub-graders' names. Raises FormulaError."""
    if not source.strip():
        raise FormulaError("calculate_output is empty.")
    if len(source) > MAX_FORMULA_CHARS:
        raise FormulaError(f"calculate_output has {len(source)} characters; at most {MAX_FORMULA_CHARS}.")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise FormulaError(f"calculate_output is not a valid expression: {exc}") from None
    size = sum(1 for _ in ast.walk(tree))
    if size > MAX_FORMULA_NODES:
        raise FormulaError(f"calculate_output is too complex ({size} nodes; at most {MAX_FORMULA_NODES}).")
    names: set[str] = set()
    _check(tree.body, allowed_names, names)
    return Formula(source=source, tree=tree.body, names=frozenset(names))


def _evaluate(node: ast.expr, values: Mapping[str, float]) -> float:
    # Only the node kinds _check accepted reach here.
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, int | float)  # checked at parse time
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.BinOp):
        return float(_BINARY[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values)))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, values))
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    function: Any = FUNCTIONS[node.func.id][0]
    return float(function(*(_evaluate(arg, values) for arg in node.args)))


def evaluate(formula: Formula, values: Mapping[str, float]) -> float:
    """The formula's value for the sub-graders' rewards; raises FormulaError when it has none."""
    try:
        result = _evaluate(formula.tree, values)
    except ZeroDivisionError:
        raise FormulaError("calculate_output divided by zero.") from None
    except (OverflowError, ValueError, TypeError) as exc:  # math domain, overflow, complex from (-x) ** 0.5
        raise FormulaError(f"calculate_output could not be evaluated: {exc}") from None
    if not math.isfinite(result):
        raise FormulaError(f"calculate_output gave {result}, not a finite number.")
    return result
