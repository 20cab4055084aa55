"""Import layout of the package: modules import each other at module level only, and the import graph is a DAG.

`commands/` may defer imports (so `optimum-cli --help` does not wait for the engines) and `modeling/` holds
self-contained remote-code files; every other module states its dependencies at its top. A function-level import of
the package's own modules usually hides a cycle, which these tests find instead.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parent.parent / "optimum_prune"
DEFERRING = ("commands", "modeling")  # folders allowed to import the package inside functions


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imported_modules(node: ast.AST, path: Path) -> list[str]:
    """The package's modules an `import` / `from ... import` statement names (absolute names; `from . import x` names
    the submodule `x` when there is one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE.name]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level == 0:
        if not (node.module or "").startswith(PACKAGE.name):
            return []
        base = node.module
    else:
        package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
    names = [base]
    for alias in node.names:
        submodule = PACKAGE.parent.joinpath(*f"{base}.{alias.name}".split("."))
        if submodule.with_suffix(".py").is_file() or (submodule / "__init__.py").is_file():
            names.append(f"{base}.{alias.name}")
    return names


def _module_level_imports(path: Path) -> set[str]:
    """What importing `path` imports of the package: module-level statements (inside `if`/`try` too), each module
    with the packages above it, whose `__init__` runs first (a module's own ancestors excepted)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    inside = {id(sub) for f in functions for sub in ast.walk(f) if sub is not f}
    me = _module_name(path)
    found = set()
    for node in ast.walk(tree):
        if id(node) in inside:
            continue
        for name in _imported_modules(node, path):
            parts = name.split(".")
            for i in range(2, len(parts) + 1):  # the root package is left out: its __init__ imports everything
                ancestor = ".".join(parts[:i])
                if not (me == ancestor or me.startswith(ancestor + ".")):
                    found.add(ancestor)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_no_function_level_imports_of_the_package():
    found = []
    for path in _package_files():
        if set(path.relative_to(PACKAGE).parts[:-1]) & set(DEFERRING):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if _imported_modules(node, path) or (isinstance(node, ast.ImportFrom) and node.level):
                        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} in {function.name}()")
    assert not found, "Import these at module level (break the cycle that made them local):\n" + "\n".join(found)


def test_module_level_import_graph_has_no_cycles():
    graph = {_module_name(path): _module_level_imports(path) for path in _package_files()}
    assert _cycles(graph) == []


# Each module imported with the root package's `__init__` replaced by an empty package: otherwise `import
# optimum_prune.x` first imports everything `optimum_prune/__init__.py` lists, in its order, and a cycle only breaks
# when a module is imported first. Package modules are dropped from `sys.modules` between modules; torch and
# Transformers stay loaded, so the whole run takes seconds.
IMPORT_EACH = """
import importlib, json, sys, traceback, types
root, names = sys.argv[1], json.loads(sys.argv[2])
import torch, transformers  # noqa: F401 - loaded once for every module below
failures = {}
for name in names:
    for loaded in [m for m in sys.modules if m == "optimum_prune" or m.startswith("optimum_prune.")]:
        del sys.modules[loaded]
    package = types.ModuleType("optimum_prune")
    package.__path__ = [root]
    sys.modules["optimum_prune"] = package
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


def test_every_module_imports_on_its_own():
    names = [_module_name(path) for path in _package_files() if path.parent != PACKAGE or path.name != "__init__.py"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, str(PACKAGE), json.dumps(names)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert failures == {}, "\n".join(f"{name}:\n{trace}" for name, trace in failures.items())


MAX_FUNCTION_LINES = 100


def test_no_function_longer_than_a_screen_outside_modeling():
    """Functions fit on a screen (docstrings included); the self-contained modeling files mirror Transformers'."""
    too_long = []
    for path in _package_files():
        if "modeling" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{_module_name(path)}.{node.name}: {lines} lines")
    assert not too_long, too_long


def test_no_private_names_imported_across_modules():
    """A name with a leading underscore is its module's business: another module that needs it needs a public API."""
    offenders = []
    for path in _package_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PACKAGE.name)):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                offenders += [f"{path.relative_to(PACKAGE)}: {name}" for name in private]
    assert not offenders, offenders
