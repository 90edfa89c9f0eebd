"""The shape of the code, read with `ast`: no import circles among the project's modules, the
library never imports gradio, and functions short enough to read whole."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
# Files not (yet) held to the length rule.
LENGTH_RULE_EXEMPT: set[str] = set()


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for vit_core/ (packages included), demo/ and train.py."""
    files = sorted((ROOT / "vit_core").rglob("*.py")) + sorted((ROOT / "demo").rglob("*.py")) + [ROOT / "train.py"]
    modules = {}
    for path in files:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement can bind: a module, or package.name for `from p import name`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (lazy imports count too).
    `from package import name` points at package.name when that is a module, else at the package."""
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = _imported_names(node, module, is_package)
            if isinstance(node, ast.ImportFrom):
                base, members = names[0], names[1:]
                for member in members:
                    if member in modules:
                        targets.add(member)
                    elif base in modules:
                        targets.add(base)
            else:
                targets |= {n for n in names if n in modules}
        graph[module] = targets - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert {"vit_core.model", "vit_core.rollout", "vit_core.checkpoints", "vit_core.images"} <= graph["vit_core"]
    assert "vit_core.cli" in graph["vit_core.cli.explain"]  # `from . import fail`
    assert "vit_core.viz" in graph["vit_core.cli.explain"]  # `from .. import viz`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_drawing_and_metrics_stay_apart_and_only_commands_import_commands():
    graph = import_graph()
    assert not graph["vit_core.viz"] & {"vit_core.faithfulness", "vit_core.evaluate"}
    library = [m for m in graph if m.startswith("vit_core") and not m.startswith("vit_core.cli")]
    for module in library:
        assert not {t for t in graph[module] if t.startswith("vit_core.cli")}, module


def test_the_maps_read_the_token_layout_not_the_wrappers_and_serving_stands_alone():
    graph = import_graph()
    for module in ("vit_core.layout", "vit_core.rollout", "vit_core.attribution"):
        assert "vit_core.adapters" not in graph[module], module
    assert graph["vit_core.layout"] == set()  # geometry only
    assert not {t for t in graph["demo.serving"] if t.startswith("demo")}  # machinery, no part of the app


def test_vit_core_never_imports_gradio():
    for module, path in project_modules().items():
        if not module.startswith("vit_core"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] in ("gradio", "gradio_client") for n in names), module


def test_functions_fit_on_a_screen():
    covered = sorted(str(p.relative_to(ROOT)) for folder in ("vit_core", "demo") for p in (ROOT / folder).rglob("*.py")
                     if str(p.relative_to(ROOT)) not in LENGTH_RULE_EXEMPT)
    print(f"function length rule (<= {MAX_FUNCTION_LINES} lines) covers: {', '.join(covered)}")
    too_long = []
    for name in covered:
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}; covered: {covered}"


# ------------------------------------------------------------------------------------------------
# One list of explanation methods: vit_core.methods.METHODS

REGISTRY = "vit_core/methods.py"


def _method_lists(tree: ast.AST, names: set[str]) -> list[ast.AST]:
    """The tuple, list and set literals of `tree` holding two or more of `names` as strings."""
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Tuple, ast.List, ast.Set))
            and sum(isinstance(e, ast.Constant) and e.value in names for e in node.elts) >= 2]


def method_lists_outside_the_registry(root: Path = ROOT) -> list[str]:
    """Every literal list of two or more registered method names in the project's code (vit_core,
    demo, benchmarks, train.py) outside REGISTRY, as file:line. Tests are not held to it: they pick
    methods as inputs and state what they expect, and deriving an expectation from the registry
    would only check the registry against itself; a test that means every method reads the registry
    (test_attribution, test_faithfulness)."""
    from vit_core.methods import METHOD_NAMES

    files = [p for folder in ("vit_core", "demo", "benchmarks") for p in (root / folder).rglob("*.py")]
    found = []
    for path in sorted(files + [root / "train.py"]):
        name = str(path.relative_to(root))
        if name != REGISTRY:
            found += [f"{name}:{node.lineno}" for node in _method_lists(ast.parse(path.read_text(), name),
                                                                          set(METHOD_NAMES))]
    return found


def test_the_method_list_check_sees_every_kind_of_list(tmp_path):
    for folder in ("vit_core", "demo", "benchmarks"):
        (tmp_path / folder).mkdir()
    (tmp_path / "train.py").write_text('for m in {"occlusion", "cp_lrp"}:\n    pass\n')
    (tmp_path / "vit_core" / "methods.py").write_text('NAMES = ("rollout", "grad_rollout")\n')
    (tmp_path / "demo" / "app.py").write_text('ok = ("rollout", "the rest")\n\nPICKER = ["rollout", "attnlrp"]\n')
    (tmp_path / "benchmarks" / "b.py").write_text('def f():\n    return g(("last_layer", "lrp_composite"))\n')
    assert method_lists_outside_the_registry(tmp_path) == ["benchmarks/b.py:2", "demo/app.py:3", "train.py:1"]


def test_method_names_are_listed_in_the_registry_only():
    found = method_lists_outside_the_registry()
    assert not found, (f"lists of method names outside {REGISTRY}: {found}; derive them from "
                       f"vit_core.methods.METHODS (its fields say cost, class, settings, models, picker)")
