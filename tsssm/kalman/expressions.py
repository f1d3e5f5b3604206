"""Arithmetic expressions of named parameters, parsed safely (no ``eval``).

A config may write a matrix entry as ``-k/m`` or ``2*sqrt(k*m)*zeta``. The text is parsed with
:func:`ast.parse` and every node is checked against a whitelist: numbers, parameter names, the
constants ``pi`` and ``e``, ``+ - * / **`` and unary minus, and calls of a few functions
(:data:`FUNCTIONS`). Anything else (attributes, subscripts, comprehensions, lambdas, strings,
keyword arguments, unknown names) is refused with a ConfigError naming the key and the piece.
The checked tree is compiled into a closure over torch operations, so an expression evaluates
on parameter tensors of any batch shape and is differentiable.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from tsssm.errors import ConfigError

Value = Tensor | float
#: functions an expression may call (one argument each)
FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "sin": torch.sin,
    "cos": torch.cos, "tanh": torch.tanh, "abs": torch.abs,
}
CONSTANTS = {"pi": math.pi, "e": math.e}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Pow: operator.pow}
#: longest expression accepted (a config entry, not a program)
MAX_LENGTH = 500


@dataclass(frozen=True)
class Expression:
    """A parsed expression: its text, the parameter names it uses, and how to evaluate it."""

    text: str
    names: frozenset[str]
    evaluate: Callable[[Mapping[str, Value]], Value]

    def __call__(self, values: Mapping[str, Value]) -> Value:
        return self.evaluate(values)

    @property
    def is_constant(self) -> bool:
        return not self.names


def parse(text: str | int | float, allowed: set[str] | frozenset[str], key: str) -> Expression:
    """Parse one entry: a number or an expression of the ``allowed`` parameter names.

    key: the config key, for messages (e.g. ``model.net.physical.A[1][0]``).
    """
    if isinstance(text, bool):
        raise ConfigError(f"{key}: {text!r} is not a number or an expression")
    if isinstance(text, (int, float)):
        value = float(text)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: {text!r} is not a finite number")
        return Expression(str(text), frozenset(), lambda _v: value)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{key}: expected a number or an expression, got {text!r}")
    if len(text) > MAX_LENGTH:
        raise ConfigError(f"{key}: the expression is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise ConfigError(f"{key}: cannot parse {text!r} ({err.msg}); write an arithmetic "
                          f"expression such as -k/m") from err
    used: set[str] = set()
    fn = _compile(tree.body, allowed, used, key, text)
    return Expression(text, frozenset(used), fn)


def _compile(node: ast.AST, allowed, used: set[str], key: str, text: str
             ) -> Callable[[Mapping[str, Value]], Value]:
    def refuse(what: str) -> ConfigError:
        return ConfigError(f"{key}: {what} is not allowed in {text!r}; use numbers, parameter "
                           f"names, + - * / **, and {', '.join(FUNCTIONS)}")

    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise refuse(f"the constant {node.value!r}")
        value = float(node.value)
        return lambda _v: value
    if isinstance(node, ast.Name):
        name = node.id
        if name in allowed:
            used.add(name)
            return lambda v: v[name]
        if name in CONSTANTS:
            value = CONSTANTS[name]
            return lambda _v: value
        known = ", ".join(sorted(allowed)) or "none declared"
        raise ConfigError(f"{key}: unknown name {name!r} in {text!r}; declare it under "
                          f"model.net.physical.params (parameters: {known})")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _compile(node.operand, allowed, used, key, text)
        if isinstance(node.op, ast.USub):
            return lambda v: -inner(v)
        return inner
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        op = _BINARY[type(node.op)]
        left = _compile(node.left, allowed, used, key, text)
        right = _compile(node.right, allowed, used, key, text)
        return lambda v: op(left(v), right(v))
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise refuse("calling " + (node.func.id if isinstance(node.func, ast.Name)
                                       else "this"))
        if node.keywords or len(node.args) != 1:
            raise refuse(f"{node.func.id}() with other than one plain argument")
        f = FUNCTIONS[node.func.id]
        arg = _compile(node.args[0], allowed, used, key, text)

        def call(v: Mapping[str, Value]) -> Value:
            x = arg(v)
            return f(x) if isinstance(x, Tensor) else float(f(torch.tensor(x, dtype=torch.float64)))

        return call
    raise refuse(type(node).__name__)


def parse_matrix(rows, allowed: set[str] | frozenset[str], key: str,
                 shape: tuple[int, int] | None = None) -> list[list[Expression]]:
    """A matrix given as a list of rows of entries (numbers or expressions)."""
    if not isinstance(rows, (list, tuple)) or not rows or not all(
            isinstance(r, (list, tuple)) and r for r in rows):
        raise ConfigError(f"{key}: write the matrix as a list of rows, e.g. [[0, 1], [-k/m, "
                          f"-b/m]]; got {rows!r}")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ConfigError(f"{key}: the rows have different lengths {sorted(widths)}")
    got = (len(rows), len(rows[0]))
    if shape is not None and got != shape:
        raise ConfigError(f"{key}: the matrix is {got[0]}x{got[1]}, expected "
                          f"{shape[0]}x{shape[1]}")
    return [[parse(x, allowed, f"{key}[{i}][{j}]") for j, x in enumerate(r)]
            for i, r in enumerate(rows)]


def parse_vector(entries, allowed: set[str] | frozenset[str], key: str,
                 length: int | None = None) -> list[Expression]:
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ConfigError(f"{key}: write the vector as a list, e.g. [0, x0]; got {entries!r}")
    if length is not None and len(entries) != length:
        raise ConfigError(f"{key}: {len(entries)} entries, expected {length}")
    return [parse(x, allowed, f"{key}[{i}]") for i, x in enumerate(entries)]


def evaluate_matrix(matrix: list[list[Expression]], values: Mapping[str, Value],
                    batch: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(..., r, c) from parameter values of batch shape ``batch``."""
    def entry(e: Expression) -> Tensor:
        x = e(values)
        x = x if isinstance(x, Tensor) else torch.tensor(x, dtype=dtype, device=device)
        return x.to(dtype).expand(batch)

    return torch.stack([torch.stack([entry(e) for e in row], -1) for row in matrix], -2)


def evaluate_vector(vector: list[Expression], values: Mapping[str, Value], batch: torch.Size,
                    dtype: torch.dtype, device: torch.device) -> Tensor:
    return evaluate_matrix([vector], values, batch, dtype, device)[..., 0, :]
