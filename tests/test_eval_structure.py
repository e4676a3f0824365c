"""vtoken.eval's modules form a layered package: every module imports on its own, and no chain of
imports between them comes back to where it started (cli -> runner -> table -> shared modules, never
back). The graph is read from the sources, so an import inside a function counts too."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import vtoken.eval

PACKAGE = "vtoken.eval"
ROOT = Path(vtoken.eval.__file__).parent


def _modules(root: Path = ROOT, package: str = PACKAGE) -> dict:
    """{dotted module name: source path} of every module of the package (sub-packages included)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _resolve(node: ast.ImportFrom, name: str, path: Path) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``name``)."""
    if not node.level:
        return node.module or ""
    base = name.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict:
    """{module: set of package modules it imports anywhere in its source}."""
    modules = _modules(root, package)
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                mod = _resolve(node, name, path)
                # ``from pkg import module`` imports the module; ``from pkg import name``, the package
                targets.update(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names)
        edges = set()
        for t in targets:
            while t and t not in modules:  # ``import vtoken.eval.runner.x`` -> vtoken.eval.runner
                t = t.rpartition(".")[0]
            if t and t != name:
                edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: dict):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_sees_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_reads_every_import_form(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "from pkg.a import A\n",
        "a.py": "import os\nfrom pkg import b\nA = 1\n",
        "b.py": "def f():\n    from .c import C  # inside a function\n",
        "c.py": "import pkg.sub.d\nC = 1\n",
        "e.py": "from pkg import A\nfrom . import c, b\n",
        "f.py": "F = 1\n",
        "sub/__init__.py": "",
        "sub/d.py": "from .. import f\nfrom ..f import F\n",
    }
    for name, text in sources.items():
        (pkg / name).write_text(text)
    assert import_graph(pkg, "pkg") == {
        "pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.sub.d"},
        "pkg.e": {"pkg", "pkg.b", "pkg.c"}, "pkg.f": set(), "pkg.sub": set(), "pkg.sub.d": {"pkg.f"},
    }
    assert find_cycle(import_graph(pkg, "pkg")) is None
    (pkg / "f.py").write_text("from pkg.e import x\n")  # f -> e -> the package -> a -> b -> c -> sub.d -> f
    assert find_cycle(import_graph(pkg, "pkg")) == ["pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.sub.d", "pkg.f", "pkg.e",
                                                    "pkg"]


def test_layers_go_one_way():
    graph = import_graph()
    assert f"{PACKAGE}.runner" in graph[f"{PACKAGE}.cli"]  # cli -> runner -> table, the report never back
    assert f"{PACKAGE}.table" in graph[f"{PACKAGE}.runner"]


def test_no_import_cycle_among_eval_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in vtoken.eval: " + " -> ".join(cycle)


@pytest.mark.slow
def test_each_module_imports_in_a_fresh_interpreter():
    names = [n for n in _modules() if not n.endswith(".__main__")]  # __main__ runs the CLI
    procs = {n: subprocess.Popen([sys.executable, "-c", f"import {n}"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for n in names}
    failed = {}
    for n, p in procs.items():
        out, _ = p.communicate(timeout=300)
        if p.returncode:
            failed[n] = out.strip().splitlines()[-1:] or [f"exit {p.returncode}"]
    assert not failed, failed
