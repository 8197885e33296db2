"""The house rules, checked on the source: small rooms, no import circle, one home for each rule."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 500
MAX_DEFINITION_LINES = 150


def project_modules() -> dict[str, Path]:
    """Importable name -> file, for every module of the `zoomvit` package (not tests, benchmarks or scripts)."""
    modules = {}
    for path in (REPO / "zoomvit").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        if not (path.parent / "__init__.py").is_file():
            continue  # not a module of a package (zoomvit/assets/make_examples.py is a script)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    modules["app"] = REPO / "app.py"  # the repository's launcher
    return modules


MODULES = project_modules()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_500_lines_and_no_definition_over_150(name):
    source = MODULES[name].read_text(encoding="utf-8")
    assert source.count("\n") <= MAX_MODULE_LINES, f"{name}: {source.count(chr(10))} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_DEFINITION_LINES, f"{name}.{node.name}: {length} lines"


def imports_of(name: str) -> set[str]:
    """The project modules `name` imports, at any depth of its code (lazy imports inside functions count too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(filter(None, [package if node.level else "", node.module or ""]))
            found.update(f"{base}.{alias.name}" for alias in node.names)  # from package import module
            if node.module:
                found.add(base)
    return {module for module in found if module in MODULES and module != name}


def test_no_import_circle():
    graph = {name: imports_of(name) for name in MODULES}
    # The CLI starts the app (lazily, in `zoomvit serve`); nothing the app needs may come back through the CLI.
    for name in graph:
        if name.startswith("zoomvit.app"):
            assert "zoomvit.cli" not in graph[name], name

    def circle_from(node, trail):
        if node in trail:
            return trail[trail.index(node) :] + [node]
        for nxt in sorted(graph[node]):
            found = circle_from(nxt, trail + [node])
            if found:
                return found
        return None

    for name in sorted(graph):
        circle = circle_from(name, [])
        assert circle is None, f"import circle: {' -> '.join(circle)}"


@pytest.mark.parametrize(
    "rule, pattern",
    [
        ("block numbers", r"must be in 1\.\.\{.*\(or -1 for the last\)"),
        ("after-block", r"nothing is left to prune"),
        ("keep", r"must be a fraction in"),
        ("port", r"must be a port number in 1\.\.65535"),
    ],
)
def test_each_rule_has_one_home(rule, pattern):
    homes = [name for name, path in MODULES.items() if re.search(pattern, path.read_text(encoding="utf-8"))]
    assert homes == ["zoomvit.checks"], f"the {rule} rule is written in {homes}"
