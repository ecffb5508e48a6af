"""The package's shape: no import circle, light modules stay light."""

import ast
import subprocess
import sys
from pathlib import Path

import dtlab

SRC = Path(dtlab.__file__).parent


def dtlab_imports() -> dict[str, set[str]]:
    """Module -> the dtlab modules it imports anywhere in its file (lazy imports included)."""
    graph = {}
    for path in SRC.rglob("*.py"):
        name = "dtlab" if path.name == "__init__.py" else f"dtlab.{path.stem}"
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dtlab"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("dtlab")}
        graph[name] = found - {name, "dtlab"}  # every module may import the package's DTLabError
    return graph


def test_no_import_circle():
    graph = dtlab_imports()
    assert {"dtlab.train", "dtlab.cli", "dtlab.checkpoint", "dtlab.policy"} <= set(graph)

    def visit(module: str, stack: list[str]) -> None:
        for dep in graph.get(module, ()):
            assert dep not in stack, f"import circle: {' -> '.join([*stack, dep])}"
            visit(dep, [*stack, dep])

    for module in graph:
        visit(module, [module])
    entry_points = {"dtlab.train", "dtlab.evaluate"}
    for module, deps in graph.items():  # library modules never import the entry points
        assert module in entry_points or not deps & entry_points, module


def test_weight_conversion_needs_no_simulator():
    code = "import sys, dtlab.hf; print(sorted(m for m in ('gymnasium', 'mujoco', 'lightning') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
