"""Rules of the source's shape, checked from the source itself (``ast``, nothing imported).

No function in ``iotcls/``, ``bridge/`` or ``scorer/`` runs over :data:`MAX_LINES` lines (from
its ``def`` to its last line, docstring and comments included) unless its docstring says why,
in a sentence that starts with :data:`MARK`. A long vectorised function is cut along its own
phase comments into methods that return small dataclasses (see ``FlowBuilder._step``).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("iotcls", "bridge", "scorer")
MAX_LINES = 80
MARK = "Long on purpose:"  # followed by the reason, in the function's docstring

# Functions over the limit, for now, with why they may be (path:qualified name -> reason).
# An entry is refused once its function is short again: the list only shrinks.
ALLOWED: dict[str, str] = {}


def functions(path: Path):
    """(qualified name, node) of every function and method in ``path``, nested ones too."""

    def walk(node: ast.AST, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                yield name, child
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(ast.parse(path.read_text(), str(path)), "")


def length(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1  # type: ignore[attr-defined]


def says_why(node: ast.AST) -> bool:
    doc = ast.get_docstring(node) or ""  # type: ignore[arg-type]
    at = doc.find(MARK)
    return at >= 0 and len(doc[at + len(MARK) :].strip()) >= 10


@cache
def long_functions() -> dict[str, int]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for name, node in functions(path):
                if length(node) > MAX_LINES and not says_why(node):
                    out[f"{path.relative_to(ROOT)}:{name}"] = length(node)
    return out


def test_no_long_function():
    found = long_functions()
    bad = {k: n for k, n in found.items() if k not in ALLOWED}
    assert not bad, (
        f"functions over {MAX_LINES} lines (cut them along their phases, or say why in the "
        f"docstring after {MARK!r}):\n" + "\n".join(f"  {k}: {n} lines" for k, n in bad.items())
    )


def test_allowed_list_only_shrinks():
    found = long_functions()
    stale = [k for k in ALLOWED if k not in found]
    assert not stale, "no longer over the limit, remove from ALLOWED: " + ", ".join(stale)


def test_the_rule_sees_functions():
    """The walk is real: it finds methods and nested functions, and measures them."""
    names = dict(functions(ROOT / "iotcls" / "flows.py"))
    assert "FlowBuilder.add" in names and "capture_flows" in names
    assert len(names) > 30
    src = 'def f():\n    """Long on purpose: one pass over the bytes is the point."""\n'
    assert says_why(ast.parse(src).body[0])
    assert not says_why(ast.parse("def f():\n    'short'\n").body[0])
