"""The package's layout, read from its source: no import circles, the engine-agnostic packages
never import SGLang, and the top level holds only the package's faces."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sglang_loopserve"
ENGINE_AGNOSTIC = ("attention", "cache_policy", "cpu_runtime")
MAX_TOP_LEVEL_MODULES = 6


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's modules ``path`` imports, at any depth of its code (lazy imports count: a
    circle closed inside a function is still a circle).  ``from . import x`` names module ``x``
    where it is one; importing a package's name counts as importing the package's ``__init__``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{alias.name}" for alias in node.names} & known
            out.update(subs or {target})
    return {m for m in out if m in known and m != name}


def _import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = _modules(root)
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            # A package's __init__ importing its submodules, which import siblings through the
            # package, is Python's normal shape: only circles between modules count.
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    inits = {name for name, path in _modules().items() if path.name == "__init__.py"}
    return {v: {w for w in ws if w not in inits} for v, ws in graph.items() if v not in inits}


def test_no_module_imports_one_that_imports_it_back():
    assert _circles(_without_package_inits(_import_graph())) == []


def test_the_circle_finder_finds_a_planted_circle(tmp_path):
    pkg = tmp_path / "sglang_loopserve"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from .b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from . import a\n")  # closed lazily
    (pkg / "sub" / "c.py").write_text("from ..sub import a\n")
    graph = _import_graph(pkg)
    assert graph["sglang_loopserve.sub.c"] == {"sglang_loopserve.sub.a"}
    assert _circles(graph) == [["sglang_loopserve.sub.a", "sglang_loopserve.sub.b"]]


@pytest.mark.parametrize("subpackage", ENGINE_AGNOSTIC)
def test_engine_agnostic_code_never_imports_sglang(subpackage):
    offenders = []
    for path in sorted((PACKAGE / subpackage).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(PACKAGE)}: {n}" for n in names if n.split(".")[0] == "sglang"]
    assert offenders == []


def test_the_top_level_holds_the_package_faces():
    modules = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules
