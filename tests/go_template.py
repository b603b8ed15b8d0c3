"""A reader of Go's text/template for the constructs an Ollama TEMPLATE uses, to check Modelfiles without Ollama.

Covers what tunesmith writes and Ollama's own templates lean on: literal text, `{{-`/`-}}` whitespace trimming,
`{{ range $i, $m := PIPE }}`, `{{ if PIPE }} ... {{ else }} ... {{ end }}`, `{{ $x := PIPE }}`, fields
(`.Messages`, `$m.Role`, `$.Messages`), string and integer literals, parenthesised calls and the builtins
and, or, not, eq, ne, len, slice, index, with Go's truth rules (false, 0, "", empty list are false).
Anything else raises, so a test never passes on a construct this reader does not model.
"""

from __future__ import annotations

import json
import re
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+)')


def render(template: str, data: dict[str, Any]) -> str:
    nodes = _parse(_lex(template))
    out: list[str] = []
    _run(nodes, {"$": data}, data, out)
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with Go's trim markers applied to the neighbouring text."""
    items: list[tuple[str, str]] = []
    position = 0
    for match in _ACTION.finditer(template):
        text = template[position : match.start()]
        items.append(("text", text.rstrip() if match.group(1) else text))
        items.append(("action", match.group(2).strip()))
        position = match.end()
        if match.group(3):
            rest = template[position:]
            position += len(rest) - len(rest.lstrip())
    items.append(("text", template[position:]))
    return items


def _parse(items: list[tuple[str, str]]) -> list:
    """Nested nodes: ("text", s), ("out", expr), ("set", name, expr), ("if", expr, body, else_body),
    ("range", (index_var, value_var), expr, body)."""
    stack: list[list] = [[]]
    openers: list[list] = []
    for kind, text in items:
        if kind == "text":
            stack[-1].append(("text", text))
        elif text.startswith(("if ", "range ")):
            keyword, rest = text.split(" ", 1)
            names: tuple = ()
            if keyword == "range" and ":=" in rest:
                declared, rest = rest.split(":=", 1)
                names = tuple(name.strip() for name in declared.split(","))
            node = [keyword, names, rest.strip(), [], None]
            stack[-1].append(node)
            openers.append(node)
            stack.append(node[3])
        elif text == "else":
            stack.pop()
            openers[-1][4] = []
            stack.append(openers[-1][4])
        elif text == "end":
            stack.pop()
            openers.pop()
        elif re.match(r"^\$\w+\s*:=", text):
            name, expr = text.split(":=", 1)
            stack[-1].append(("set", name.strip(), expr.strip()))
        elif text.startswith(("with ", "template ", "define ", "block ", "break", "continue")) or "|" in text:
            raise NotImplementedError(f"Go template construct not modelled: {{{{ {text} }}}}")
        else:
            stack[-1].append(("out", text))
    assert len(stack) == 1, "unclosed {{ if }} or {{ range }}"
    return stack[0]


def _run(nodes: list, scope: dict[str, Any], dot: Any, out: list[str]) -> None:
    scope = dict(scope)  # variables declared inside a block end with it
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            out.append(_string(_evaluate(node[1], scope, dot)))
        elif kind == "set":
            scope[node[1]] = _evaluate(node[2], scope, dot)
        elif kind == "if":
            branch = node[3] if _truth(_evaluate(node[2], scope, dot)) else node[4] or []
            _run(branch, scope, dot, out)
        elif kind == "range":
            items = _evaluate(node[2], scope, dot)
            for index, item in enumerate(items):
                inner = dict(scope)
                if len(node[1]) == 2:
                    inner[node[1][0]], inner[node[1][1]] = index, item
                elif len(node[1]) == 1:
                    inner[node[1][0]] = item
                _run(node[3], inner, item, out)
            if not items and node[4] is not None:
                _run(node[4], scope, dot, out)


def _evaluate(expression: str, scope: dict[str, Any], dot: Any) -> Any:
    tokens = _TOKEN.findall(expression)
    value, rest = _command(tokens, scope, dot)
    assert not rest, f"unparsed: {rest}"
    return value


def _command(tokens: list[str], scope: dict[str, Any], dot: Any) -> tuple[Any, list[str]]:
    """A call `name arg...` or a single operand, up to a closing parenthesis."""
    if tokens and tokens[0] in _BUILTINS:
        name, tokens = tokens[0], tokens[1:]
        arguments = []
        while tokens and tokens[0] != ")":
            argument, tokens = _operand(tokens, scope, dot)
            arguments.append(argument)
        return _BUILTINS[name](*arguments), tokens
    return _operand(tokens, scope, dot)


def _operand(tokens: list[str], scope: dict[str, Any], dot: Any) -> tuple[Any, list[str]]:
    token, tokens = tokens[0], tokens[1:]
    if token == "(":
        value, tokens = _command(tokens, scope, dot)
        assert tokens and tokens[0] == ")", "unbalanced parenthesis"
        return value, tokens[1:]
    if token.startswith('"'):
        return json.loads(token), tokens  # a Go interpreted string: the escapes it shares with JSON
    if re.fullmatch(r"-?\d+", token):
        return int(token), tokens
    if token.startswith("$"):
        variable, _, fields = token.partition(".")
        return _fields(scope[variable], fields), tokens
    if token.startswith("."):
        return _fields(dot, token[1:]), tokens
    raise NotImplementedError(f"Go template operand not modelled: {token}")


def _fields(value: Any, path: str) -> Any:
    for field in filter(None, path.split(".")):
        value = value.get(field) if isinstance(value, dict) else getattr(value, field)
    return value


def _truth(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, (list, dict)) and not value)


def _string(value: Any) -> str:
    return "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


_BUILTINS = {
    "and": lambda *values: next((value for value in values if not _truth(value)), values[-1]),
    "or": lambda *values: next((value for value in values if _truth(value)), values[-1]),
    "not": lambda value: not _truth(value),
    "eq": lambda first, *others: any(first == other for other in others),
    "ne": lambda first, second: first != second,
    "len": len,
    "slice": lambda value, *bounds: value[bounds[0] if bounds else None : bounds[1] if len(bounds) > 1 else None],
    "index": lambda value, *keys: _index(value, keys),
}


def _index(value: Any, keys: tuple) -> Any:
    for key in keys:
        value = value[key]
    return value
