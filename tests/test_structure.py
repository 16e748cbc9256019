"""The shape of the package, held: short modules and classes, the core free of the integrations, no import cycle,
no measurement quoted in a help string."""
import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "hf_contaccum"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "resources" not in p.parts)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set:
    """The hf_contaccum modules `path` imports, at any depth of the file (lazy imports included)."""
    name, found = _module_name(path), set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("hf_contaccum"):
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("hf_contaccum")}
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_classes_are_short(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= 300, f"{path.name}: {len(lines)} lines"
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno - node.lineno + 1 <= 250, f"class {node.name}: {node.end_lineno - node.lineno + 1}"


def test_the_core_imports_no_integration_and_no_module_cycles():
    graph = {_module_name(p): _imports(p) for p in MODULES}
    for module, targets in graph.items():
        if module.startswith("hf_contaccum.core"):
            outside = [t for t in targets if not t.startswith(("hf_contaccum.core", "hf_contaccum.settings"))]
            assert not outside, f"{module} imports {outside}"
    known = set(graph)

    def resolve(target):  # "hf_contaccum.core.loss" or a package's __init__
        return target if target in known else None

    state = {}

    def visit(module, path):
        state[module] = "visiting"
        for target in filter(None, map(resolve, graph[module])):
            if state.get(target) == "visiting":
                pytest.fail(f"import cycle: {' -> '.join(path + [target])}")
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in graph:
        if module not in state and module != "hf_contaccum":  # the package root re-exports everything
            visit(module, [module])


def test_help_strings_and_errors_quote_no_measurements():
    """A setting's help and an error say what and why, and point to the docs for the figures: numbers such as
    '18 percent', '0.4856' or 'H200' go stale in code."""
    measurement = re.compile(r"\b0\.\d{3,}\b|\b\d+ percent\b|H200|H100|nDCG@10 0\.\d")
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and measurement.search(node.value):
                pytest.fail(f"{path.name}:{node.lineno} quotes a measurement: {node.value[:120]!r}")
