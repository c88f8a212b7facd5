"""The package's import graph: no cycles (also none hidden in function-local imports), no module
importing another's private name, every module importable first in a fresh process, and every declared
dependency used."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "nexttok"


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = ("nexttok", *f.relative_to(PACKAGE).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) of every nexttok import in ``path``, function-local ones included, except those
    under ``if TYPE_CHECKING:`` (which never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for node in ast.walk(branch)
    }
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nexttok"):
            found += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith("nexttok")]
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for module, name in imports(path):
            target = f"{module}.{name}" if f"{module}.{name}" in mods else module
            if target != m:
                edges[m].add(target)
    return edges


def test_the_import_graph_has_no_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(m: str, path: list[str]) -> None:  # path: the modules open above m, and m
        state[m] = "open"
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                cycles.append(" -> ".join(path[path.index(n) :] + [n]))
            elif n not in state:
                visit(n, [*path, n])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_module_imports_a_private_name_of_another():
    private = [
        f"{m}: {module}.{name}" if name else f"{m}: {module}"
        for m, path in modules().items()
        for module, name in imports(path)
        if (name or "").startswith("_") or any(p.startswith("_") for p in module.split("."))
    ]
    assert not private, private


def test_every_module_imports_first_in_a_fresh_process():
    # One process, the package's modules dropped from sys.modules before each (torch stays loaded): each
    # module is then the first of the package to load, as in a fresh process, without 40 interpreter starts.
    code = (
        "import importlib, sys\n"
        f"for name in {sorted(m for m in modules() if m != 'nexttok.__main__')!r}:\n"
        "    for m in [m for m in sys.modules if m == 'nexttok' or m.startswith('nexttok.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# Distribution name -> the module it is imported as, where they differ.
IMPORT_NAMES = {"pyyaml": "yaml"}


def test_every_declared_dependency_is_imported():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in declared]
    source = "\n".join(p.read_text(encoding="utf-8") for p in modules().values())
    unused = [
        n
        for n in names
        if not re.search(rf"^\s*(import|from) {IMPORT_NAMES.get(n, n).replace('-', '_')}\b", source, re.M)
    ]
    assert not unused, unused
