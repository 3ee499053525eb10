"""Conditional sections, ``[section:EXPRESSION]``: the expression evaluated as zc.buildout does.

zc.buildout first reads the expression as a PEP 508 environment marker
(``python_version >= "3.11" and platform_system == "Linux"``); when it is not
one, it evaluates it as Python with the names of ``_default_globals()``:
``sys``, ``os``, ``platform``, ``re``, ``python2``, ``python3``, ``python27``
... ``python319``, ``cpython``, ``pypy``, ``jython``, ``ironpython``,
``linux``, ``windows``, ``cygwin``, ``solaris``, ``macosx``, ``posix``,
``bits32``, ``bits64``, ``little_endian``, ``big_endian``.

kvmtasks never hands a config value to ``eval``: the expression is walked
here, and what could change the machine (``os.system(...)``, a lambda, a
private attribute) or what this reader does not model (a marker with ``~=``
or a pre-release version) is refused in one line instead.
"""

from __future__ import annotations

import ast
import operator
import os
import platform
import re
import struct
import sys
from collections.abc import Callable
from typing import Any


class Refused(Exception):
    """Why an expression is not evaluated (the caller names the section)."""


def default_globals() -> dict[str, Any]:
    """The names zc.buildout gives a section expression (its ``_default_globals``)."""
    names: dict[str, Any] = {"sys": sys, "os": os, "platform": platform, "re": re}
    major, minor = platform.python_version_tuple()[:2]
    names["python2"], names["python3"] = major == "2", major == "3"
    versions = ["24", "25", "26", "27", *(f"3{n}" for n in range(10)), *(f"31{n}" for n in range(10))]
    for version in versions:
        names[f"python{version}"] = major + minor == version
    version = sys.version.lower()
    pypy, jython, ironpython = "pypy" in version, "java" in version, "iron" in version
    names.update(cpython=not (pypy or jython or ironpython), pypy=pypy, jython=jython, ironpython=ironpython)
    system = sys.platform.lower()
    names.update(linux="linux" in system, windows="win32" in system, cygwin="cygwin" in system,
                 solaris="sunos" in system, macosx="darwin" in system, posix="posix" in os.name.lower())
    bits = struct.calcsize("P") * 8
    names.update(bits32=bits == 32, bits64=bits == 64, little_endian=sys.byteorder == "little",
                 big_endian=sys.byteorder == "big")
    return names


def evaluate(expression: str) -> bool:
    """Whether the section is read."""
    marker = _marker_tokens(expression)
    if marker is not None:
        return _Marker(marker, expression).evaluate()
    try:
        # buildout evaluates "[EXPRESSION]" and keeps the first item.
        tree = ast.parse(f"[{expression}]", mode="eval")
    except SyntaxError:
        raise Refused("not a Python expression nor an environment marker") from None
    assert isinstance(tree.body, ast.List)
    items = [_Walker(default_globals()).value(item) for item in tree.body.elts]
    if not items:
        raise Refused("empty expression")
    return bool(items[0])


# -- Python expressions -------------------------------------------------------------------------

_MODULE_NAMES = {
    sys: {"platform", "version", "version_info", "byteorder", "maxsize", "implementation", "hexversion"},
    os: {"name", "sep", "pathsep", "linesep", "environ", "path", "getenv", "uname", "cpu_count"},
    os.path: {"exists", "isfile", "isdir", "islink", "isabs", "join", "basename", "dirname",
              "expanduser"},
    platform: {"machine", "system", "release", "version", "python_version", "python_version_tuple",
               "python_implementation", "node", "processor", "architecture", "platform", "uname",
               "libc_ver"},
    re: {"match", "search", "fullmatch", "IGNORECASE", "I", "MULTILINE", "M"},
}
_BUILTINS: dict[str, Callable[..., Any]] = {
    "len": len, "int": int, "str": str, "float": float, "bool": bool, "tuple": tuple, "list": list,
    "any": any, "all": all, "min": min, "max": max,
}
_CALLABLE_MODULES = (os.path, platform, re)
_METHOD_OWNERS = (str, bytes, tuple, list, int)
_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Mod: operator.mod,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv,
}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not,
}


class _Walker:
    def __init__(self, names: dict[str, Any]) -> None:
        self.names = names

    def value(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return self.names[node.id]
            if node.id in _BUILTINS:
                return _BUILTINS[node.id]
            raise Refused(f"unknown name {node.id!r}")
        if isinstance(node, ast.Tuple | ast.List):
            items = [self.value(item) for item in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.Attribute):
            return self._attribute(self.value(node.value), node.attr)
        if isinstance(node, ast.Call):
            return self._call(node)
        if isinstance(node, ast.BoolOp):
            result: Any = None
            for item in node.values:
                result = self.value(item)
                if bool(result) == isinstance(node.op, ast.Or):
                    return result
            return result
        if isinstance(node, ast.UnaryOp):
            operand = self.value(node.operand)
            if isinstance(node.op, ast.Not):
                return not operand
            return -operand if isinstance(node.op, ast.USub) else +operand
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return self._checked(_BINARY[type(node.op)], self.value(node.left), self.value(node.right))
        if isinstance(node, ast.Compare):
            left = self.value(node.left)
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = self.value(right_node)
                if not self._checked(_COMPARE[type(op)], left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Subscript):
            return self._checked(operator.getitem, self.value(node.value), self._index(node.slice))
        if isinstance(node, ast.IfExp):
            return self.value(node.body) if self.value(node.test) else self.value(node.orelse)
        raise Refused(f"{ast.unparse(node)!r} is not evaluated by kvmtasks "
                      "(names, attributes, calls of read-only functions, operators, comparisons)")

    def _index(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Slice):
            parts = (node.lower, node.upper, node.step)
            return slice(*(None if part is None else self.value(part) for part in parts))
        return self.value(node)

    @staticmethod
    def _checked(function: Callable[..., Any], *arguments: Any) -> Any:
        try:
            return function(*arguments)
        except Exception as error:
            raise Refused(f"{type(error).__name__}: {error}") from None

    @staticmethod
    def _attribute(owner: Any, name: str) -> Any:
        if name.startswith("_"):
            raise Refused(f"private attribute {name!r}")
        allowed = next((names for module, names in _MODULE_NAMES.items() if owner is module), None)
        if allowed is not None and name not in allowed:
            raise Refused(f"{owner.__name__}.{name} is not evaluated by kvmtasks")
        if allowed is None and type(owner).__name__ == "module":
            raise Refused(f"{owner.__name__}.{name} is not evaluated by kvmtasks")
        try:
            return getattr(owner, name)
        except AttributeError as error:
            raise Refused(f"AttributeError: {error}") from None

    def _call(self, node: ast.Call) -> Any:
        function = self.value(node.func)
        if not self._may_call(function):
            raise Refused(f"calling {ast.unparse(node.func)} is not evaluated by kvmtasks")
        starred = any(isinstance(item, ast.Starred) for item in node.args)
        if starred or any(k.arg is None for k in node.keywords):
            raise Refused("* and ** arguments are not evaluated by kvmtasks")
        arguments = [self.value(item) for item in node.args]
        keywords = {str(k.arg): self.value(k.value) for k in node.keywords}
        return self._checked(function, *arguments, **keywords)

    @staticmethod
    def _may_call(function: Any) -> bool:
        if any(function is builtin for builtin in _BUILTINS.values()):
            return True
        if function in (os.getenv, os.uname, os.cpu_count, os.environ.get):
            return True
        owner = getattr(function, "__self__", None)
        if isinstance(owner, _METHOD_OWNERS):
            # str.format would reach any attribute of its arguments, private ones too.
            return not function.__name__.startswith("_") and function.__name__ not in ("format", "format_map")
        module = getattr(function, "__module__", None)
        return any(
            module == candidate.__name__ and getattr(candidate, function.__name__, None) is function
            for candidate in _CALLABLE_MODULES
        )


# -- environment markers ------------------------------------------------------------------------

_MARKER_VARIABLE = re.compile(
    r"python_version|python_full_version|os_name|sys_platform|platform_release|platform_system"
    r"|platform_version|platform_machine|platform_python_implementation|implementation_name"
    r"|implementation_version|extra|os[._]name|sys[._]platform|platform\.version|platform\.machine"
    r"|platform\.python_implementation|python_implementation"
)
_MARKER_TOKEN = re.compile(
    r"\s*(?:(?P<paren>[()])|(?P<string>'[^']*'|\"[^\"]*\")|(?P<op>===|==|!=|<=|>=|~=|<|>|not\s+in\b|in\b)"
    r"|(?P<bool>and\b|or\b)|(?P<variable>[A-Za-z_][\w.]*))"
)
_RELEASE = re.compile(r"[0-9]+(\.[0-9]+)*")
_VERSION_VARIABLES = {"python_version", "python_full_version", "implementation_version"}


def _marker_tokens(expression: str) -> list[tuple[str, str]] | None:
    """The expression's tokens when it reads as a PEP 508 marker, else None."""
    tokens: list[tuple[str, str]] = []
    position = 0
    text = expression.rstrip()
    while position < len(text):
        match = _MARKER_TOKEN.match(text, position)
        if match is None or match.lastgroup is None:
            return None
        kind, value = match.lastgroup, match.group(match.lastgroup)
        if kind == "variable" and not _MARKER_VARIABLE.fullmatch(value):
            return None
        tokens.append((kind, value))
        position = match.end()
    return tokens if _is_marker(tokens) else None


def _is_marker(tokens: list[tuple[str, str]]) -> bool:
    """marker: atom (and|or atom)*; atom: ( marker ) | operand op operand."""
    position = 0

    def atom() -> bool:
        nonlocal position
        if position < len(tokens) and tokens[position] == ("paren", "("):
            position += 1
            if not marker() or position >= len(tokens) or tokens[position] != ("paren", ")"):
                return False
            position += 1
            return True
        kinds = [kind for kind, _ in tokens[position:position + 3]]
        operands = (["variable"], ["string"])
        if kinds[:1] in operands and kinds[1:2] == ["op"] and kinds[2:] in operands:
            position += 3
            return True
        return False

    def marker() -> bool:
        nonlocal position
        if not atom():
            return False
        while position < len(tokens) and tokens[position][0] == "bool":
            position += 1
            if not atom():
                return False
        return True

    return bool(tokens) and marker() and position == len(tokens)


def _environment() -> dict[str, str]:
    """PEP 508's marker variables, as packaging computes them."""
    implementation = sys.implementation
    info = implementation.version
    version = f"{info.major}.{info.minor}.{info.micro}"
    if info.releaselevel != "final":
        version += info.releaselevel[0] + str(info.serial)
    return {
        "implementation_name": implementation.name, "implementation_version": version,
        "os_name": os.name, "platform_machine": platform.machine(), "platform_release": platform.release(),
        "platform_system": platform.system(), "platform_version": platform.version(),
        "python_full_version": platform.python_version(),
        "platform_python_implementation": platform.python_implementation(),
        "python_version": ".".join(platform.python_version_tuple()[:2]), "sys_platform": sys.platform,
    }


class _Marker:
    def __init__(self, tokens: list[tuple[str, str]], expression: str) -> None:
        self.tokens, self.position, self.expression = tokens, 0, expression
        self.environment = _environment()

    def evaluate(self) -> bool:
        return self._any()

    def _any(self) -> bool:  # "or" binds looser than "and", as in packaging
        result = self._all()
        while self.position < len(self.tokens) and self.tokens[self.position] == ("bool", "or"):
            self.position += 1
            result = self._all() or result
        return result

    def _all(self) -> bool:
        result = self._atom()
        while self.position < len(self.tokens) and self.tokens[self.position] == ("bool", "and"):
            self.position += 1
            result = self._atom() and result
        return result

    def _atom(self) -> bool:
        if self.tokens[self.position] == ("paren", "("):
            self.position += 1
            result = self._any()
            self.position += 1
            return result
        (left_kind, left), (_, op), (right_kind, right) = self.tokens[self.position:self.position + 3]
        self.position += 3
        op = " ".join(op.split())
        if left_kind == "string" and right_kind == "variable" and op in ("in", "not in"):
            return (left[1:-1] in self._value(right)) == (op == "in")
        if left_kind != "variable" or right_kind != "string":
            raise Refused(f"marker {left} {op} {right}: kvmtasks evaluates VARIABLE OP \"VALUE\" "
                          "and \"VALUE\" in VARIABLE only")
        name = self._name(left)
        return self._compare(name, self._value(left), op, right[1:-1])

    @staticmethod
    def _name(variable: str) -> str:
        name = re.sub(r"^(os|sys|platform)\.", r"\1_", variable)
        return "platform_python_implementation" if name == "python_implementation" else name

    def _value(self, variable: str) -> str:
        name = self._name(variable)
        if name not in self.environment:
            raise Refused(f"marker variable {variable} is not evaluated by kvmtasks")
        return self.environment[name]


    @staticmethod
    def _compare(name: str, actual: str, op: str, wanted: str) -> bool:
        if op in ("in", "not in"):
            return (actual in wanted) == (op == "in")
        if name in _VERSION_VARIABLES or _RELEASE.fullmatch(wanted.removesuffix(".*")):
            return _compare_versions(name, actual, op, wanted)
        if op in ("==", "!="):
            return (actual == wanted) == (op == "==")
        raise Refused(f"marker {name} {op} {wanted!r}: kvmtasks compares only versions with {op}")


def _compare_versions(name: str, actual: str, op: str, wanted: str) -> bool:
    if not _RELEASE.fullmatch(actual) or op in ("~=", "==="):
        raise Refused(f"marker {name} {op} {wanted!r}: kvmtasks compares release versions with "
                      "==, !=, <, <=, >, >= only")
    if wanted.endswith(".*") and op in ("==", "!="):
        prefix = [int(n) for n in wanted[:-2].split(".")]
        numbers = [int(n) for n in actual.split(".")]
        numbers += [0] * (len(prefix) - len(numbers))
        return (numbers[:len(prefix)] == prefix) == (op == "==")
    if not _RELEASE.fullmatch(wanted):
        raise Refused(f"marker {name} {op} {wanted!r}: not a release version")
    left, right = [int(n) for n in actual.split(".")], [int(n) for n in wanted.split(".")]
    width = max(len(left), len(right))
    left, right = left + [0] * (width - len(left)), right + [0] * (width - len(right))
    return bool(_COMPARE_OPS[op](left, right))


_COMPARE_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge,
}
