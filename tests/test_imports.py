"""The project's modules import each other without a cycle: what two modules share lives one
level down (iotcls/splits.py, bridge/serve_bridge.py, rule 6's reasons in dhcp_identity.py).
Every import counts, at the top of a module or inside a function."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "iotcls": ROOT / "iotcls",
    "iotcls.bridge": ROOT / "bridge",
    "iotcls.scorer": ROOT / "scorer",
}


def modules() -> dict[str, Path]:
    out = {}
    for base, d in PACKAGES.items():
        for p in d.rglob("*.py"):
            parts = list(p.relative_to(d).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([base, *parts])] = p
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The project modules *name* imports (``from . import x`` counts as importing x)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        out |= {
            t for t in targets if t in known and t != name and not known[t].name == "__init__.py"
        }
    return out


def test_no_import_cycle():
    known = modules()
    graph = {m: imports(m, p, known) for m, p in known.items()}
    assert len(graph) > 40 and sum(map(len, graph.values())) > 80  # the graph is real
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = path[path.index(d) :] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
