"""The code's shape, checked: nothing imports a command-line module, data/ and method/ never import
the engine, no import cycle between modules, no function longer than about a screen."""
import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "erw_fast")
CLIS = {"erw_fast." + n for n in ("train", "sample", "evaluate", "preprocess", "extract_features", "export",
                                  "convergence", "probe", "reuse_study")}
MAX_FUNCTION_LINES = 100


def _modules():
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def _imports(name: str, path: str):
    """Every erw_fast module ``name`` imports (module level and inside functions)."""
    is_pkg = path.endswith("__init__.py")
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("erw_fast")}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([mod] if mod else []))
            if mod.startswith("erw_fast"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}
    return out


MODULES = dict(_modules())
GRAPH = {m: {i for i in _imports(m, p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_no_module_imports_a_command_line_module():
    bad = sorted((m, i) for m, deps in GRAPH.items() for i in deps if i in CLIS)
    assert not bad, f"CLI modules imported by: {bad}"


@pytest.mark.parametrize("layer", ["erw_fast.data", "erw_fast.method"])
def test_data_and_method_never_import_the_engine(layer):
    bad = sorted((m, i) for m, deps in GRAPH.items() if m.startswith(layer) for i in deps
                 if i.startswith("erw_fast.engine"))
    assert not bad, bad


def test_no_import_cycles():
    """Between modules (a package's __init__ re-exporting its own modules is not a cycle)."""
    def deps(m):
        return {i for i in GRAPH[m] if not (m in MODULES and MODULES[m].endswith("__init__.py")
                                            and i.startswith(m + "."))
                and not (MODULES[i].endswith("__init__.py") and m.startswith(i + "."))}

    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in deps(m):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles[:5]


def test_no_function_longer_than_a_screen():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long


def test_the_train_command_line_module_is_not_shadowed():
    """``from erw_fast import train`` is the CLI module in a fresh interpreter (no lazy export takes its name)."""
    import subprocess
    import sys

    code = "from erw_fast import train; import erw_fast; print(hasattr(train, 'main'), erw_fast.TrainConfig.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "TrainConfig"]


def test_the_repository_root_offers_no_import_name_but_erw_fast():
    """``python -m pytest`` / ``python -m erw_fast.…`` from a checkout put its root on sys.path: a
    top-level package there shadows any installed distribution of that name (a top-level ``kernels/``
    folder shadowed the PyPI ``kernels`` that transformers imports, and every ``import transformers``
    failed)."""
    root = os.path.dirname(PKG)
    names = {f[:-3] if f.endswith(".py") else f for f in os.listdir(root)
             if (f.endswith(".py") and f != "setup.py")
             or os.path.isfile(os.path.join(root, f, "__init__.py"))}
    assert names == {"erw_fast"}, f"import names in the repository root besides erw_fast: {sorted(names - {'erw_fast'})}"
