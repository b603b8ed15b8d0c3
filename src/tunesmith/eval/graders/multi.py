"""OpenAI's `multi` grader: several named graders score the sample, and `calculate_output`, a formula over their
names, turns their scores into one reward, e.g. `(similarity_score + label_checker) / 2`.

`graders` is an object mapping each name to a grader, as OpenAI's guide shows. OpenAI's SDK types it as one grader;
that form is accepted too, and the formula then names it by its own `name`. As in OpenAI's types, a multi grader's
graders are not multi graders themselves.

The formula language is OpenAI's: numbers, the graders' names, + - * / and ^ (power), parentheses, and the functions
min, max, abs, floor, ceil, exp, sqrt and log (natural logarithm). It is parsed with Python's `ast` and evaluated by
walking that tree, allowing only those nodes: never `eval`, so a formula cannot reach attributes, other functions or
names. `**` is read as power too (Python's spelling). Each sub-grader's score is recorded in
`context.sub_rewards[name]` (the run's sub_rewards), and the reward is the formula's value, not clamped to 0..1.
"""

from __future__ import annotations

import ast
import math
import operator
from functools import lru_cache
from typing import Any, Callable

from tunesmith.errors import Problem, UserError, did_you_mean
from tunesmith.eval.graders import (
    Context,
    GraderFailure,
    Sample,
    check_keys,
    grade_sample,
    grader_templates,
    grader_type,
)
from tunesmith.registry import graders

# name -> (function, fewest arguments, most arguments or None)
FUNCTIONS: dict[str, tuple[Callable[..., float], int, int | None]] = {
    "min": (lambda *values: min(values), 1, None),
    "max": (lambda *values: max(values), 1, None),
    "abs": (abs, 1, 1),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "exp": (math.exp, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
    "log": (math.log, 1, 1),
}
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
BINARY[ast.Pow] = operator.pow  # a formula's ^, and Python's **
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
ALLOWED = "numbers, the graders' names, + - * / ^, parentheses and " + ", ".join(FUNCTIONS)


def named_graders(spec: dict[str, Any]) -> dict[str, Any]:
    """The graders by the names the formula uses: `graders` itself, or {its name: it} when it is one grader."""
    inner = spec.get("graders")
    if isinstance(inner, dict) and isinstance(inner.get("type"), str):
        return {str(inner.get("name")): inner}
    return {str(name): sub for name, sub in inner.items()} if isinstance(inner, dict) else {}


def grader_where(spec: dict[str, Any], name: str, where: str) -> str:
    inner = spec["graders"]
    return f"{where}.graders" if isinstance(inner.get("type"), str) else f"{where}.graders.{name}"


@lru_cache(maxsize=256)
def compile_formula(formula: str, names: tuple[str, ...]) -> tuple[ast.Expression | None, tuple[str, ...]]:
    """(the formula's tree, ()) or (None, a sentence with its fix for each thing wrong in it): what OpenAI flags as
    formula_parse_error. `^` is power, as in OpenAI's formulas."""
    try:
        tree = ast.parse(formula.replace("^", "**").strip(), mode="eval")
        errors = formula_errors(tree.body, names)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        reason = getattr(error, "msg", None) or str(error) or type(error).__name__
        fix = f"write an expression of {ALLOWED}, e.g. (a + b) / 2"
        return None, (f"{shown(formula)} does not parse ({reason}); fix: {fix}",)
    return (None, tuple(errors)) if errors else (tree, ())


def formula_errors(node: ast.AST, names: tuple[str, ...]) -> list[str]:
    """What is wrong in the formula below `node`; a node outside the formula language is reported whole, without
    what it holds (`__import__('os').system('x')` is one error, not four)."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return []
    if isinstance(node, ast.Name):
        return [] if node.id in names else [unknown_name(node.id, names)]
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return formula_errors(node.operand, names)
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        return formula_errors(node.left, names) + formula_errors(node.right, names)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
        return call_errors(node) or [error for argument in node.args for error in formula_errors(argument, names)]
    if isinstance(node, ast.Call):
        return [f"{shown(ast.unparse(node))} calls what a formula cannot; fix: call only {', '.join(FUNCTIONS)}"]
    return [f"{shown(ast.unparse(node))} is not allowed; fix: use only {ALLOWED}"]


def shown(text: str) -> str:
    """`text` quoted for a message, cut to 80 characters: a formula can be long."""
    return repr(text if len(text) <= 80 else text[:77] + "...")


def unknown_name(name: str, names: tuple[str, ...]) -> str:
    if name in FUNCTIONS:
        return f"'{name}' is a function, not a grader; fix: call it, e.g. {name}(a, b)"
    message = f"'{name}' is not one of the graders ({', '.join(names) or 'none'})"
    if any(not known.isidentifier() for known in names):
        return message + "; fix: a formula can name only graders whose names are letters, digits and _: rename them"
    return message + f"{did_you_mean(name, names)}; fix: name one of them"


def call_errors(call: ast.Call) -> list[str]:
    """The problems of calling one of FUNCTIONS: keyword or starred arguments, or too few or too many."""
    name, (_, fewest, most) = call.func.id, FUNCTIONS[call.func.id]
    if call.keywords or any(isinstance(argument, ast.Starred) for argument in call.args):
        return [f"{shown(ast.unparse(call))} names or unpacks its arguments; fix: give them plainly, {name}(a, b)"]
    if fewest <= len(call.args) and (most is None or len(call.args) <= most):
        return []
    wanted = f"{fewest} argument" if most == fewest else f"at least {fewest} argument"
    return [f"{shown(ast.unparse(call))}: {name} takes {wanted}, not {len(call.args)}; fix: give it {wanted}"]


def evaluate(node: ast.AST, values: dict[str, float]) -> float:
    """The value of a compiled formula's `node`, each name read from `values`, in floats: an int power such as
    9 ** 9 ** 9 would otherwise take forever where a float one overflows at once."""
    if isinstance(node, ast.Expression):
        return evaluate(node.body, values)
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.UnaryOp):
        return UNARY[type(node.op)](evaluate(node.operand, values))
    if isinstance(node, ast.BinOp):
        result = BINARY[type(node.op)](evaluate(node.left, values), evaluate(node.right, values))
        if isinstance(result, complex):  # (-8) ^ (1/3): Python answers a complex number
            raise ValueError(f"{shown(ast.unparse(node))} is not a real number")
        return result
    assert isinstance(node, ast.Call), ast.dump(node)  # compile_formula allowed nothing else
    return float(FUNCTIONS[node.func.id][0](*(evaluate(argument, values) for argument in node.args)))


def formula_value(formula: str, scores: dict[str, float]) -> float:
    """`formula` over the graders' `scores`. Raises GraderFailure: formula_parse_error for a formula that is not
    in the formula language, other_error for one that has no value here (a division by zero, sqrt of a negative)."""
    tree, errors = compile_formula(formula, tuple(scores))
    if tree is None:
        raise GraderFailure("formula_parse_error", "; ".join(errors))
    try:
        value = evaluate(tree, scores)
    except (ArithmeticError, ValueError, RecursionError) as error:
        raise GraderFailure("other_error", f"calculate_output {formula!r} with {scores}: {error}") from None
    if not math.isfinite(value):
        raise GraderFailure("other_error", f"calculate_output {formula!r} with {scores} is {value}")
    return value


def check_graders(spec: dict[str, Any], where: str) -> list[Problem]:
    """The problems of `graders`: its shape, and each grader's own problems at {where}.graders.{name}."""
    inner = spec.get("graders")
    if not isinstance(inner, dict) or not inner:
        fix = 'an object naming each grader, e.g. {"label_checker": {"type": "string_check", ...}}'
        return [Problem(f"{where}.graders", f"{inner!r} is not a grader or an object of graders; fix: give {fix}")]
    problems = []
    for name, sub in named_graders(spec).items():
        at = grader_where(spec, name, where)
        if isinstance(sub, dict) and sub.get("type") == "multi":
            fix = "combine all the graders in this grader's calculate_output"
            problems.append(Problem(f"{at}.type", f"a multi grader's graders cannot be multi graders; fix: {fix}"))
            continue
        try:
            problems += grader_type(sub, at).check(sub, at)
        except UserError as error:  # a grader that is not an object (with its problem), or of an unknown type
            problems += error.problems or [Problem(f"{at}.type", error.message)]
    return problems


@graders.register("multi")
class Multi:
    """`calculate_output` over the scores of the named `graders`."""

    @staticmethod
    def check(spec: dict[str, Any], where: str) -> list[Problem]:
        problems = check_keys(spec, where, ("name", "graders", "calculate_output"))
        if "graders" in spec:
            problems += check_graders(spec, where)
        formula = spec.get("calculate_output")
        if "calculate_output" in spec and not isinstance(formula, str):
            problems.append(Problem(f"{where}.calculate_output", f"{formula!r} is not a formula; fix: give text"))
        elif isinstance(formula, str):
            _, errors = compile_formula(formula, tuple(named_graders(spec)))
            problems += [Problem(f"{where}.calculate_output", error) for error in errors]
        return problems

    @staticmethod
    def templates(spec: dict[str, Any], where: str) -> list[tuple[str, str]]:
        return [
            found
            for name, sub in named_graders(spec).items()
            for found in grader_templates(sub, grader_where(spec, name, where))
        ]

    @staticmethod
    def grade(spec: dict[str, Any], sample: Sample, item: dict[str, Any], context: Context) -> float:
        scores = {}
        for name, sub in named_graders(spec).items():
            scores[name] = context.sub_rewards[name] = float(grade_sample(sub, sample, item, context))
        return formula_value(spec["calculate_output"], scores)
