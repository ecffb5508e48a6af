"""docs/architecture.md's module table is the package's imports, read with `ast`; its walls
hold; no module is over ~400 lines without saying why in its docstring."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "dtlab"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
ENTRY_POINTS = ("train", "evaluate", "report", "export", "collect")  # pyproject's [project.scripts]
LINES = 420  # "about 400"


def imports(module: str) -> tuple[dict[str, set[str]], set[str]]:
    """({"top": dtlab modules imported at the top, "deferred": inside functions}, every
    top-level package any import names, third-party ones included)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: dict[str, set[str]] = {"top": set(), "deferred": set()}
    packages = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from dtlab import lock` names a module; `from dtlab import DTLabError` does not
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "dtlab" else [node.module]
        else:
            continue
        for name in names:
            packages.add(name.split(".")[0])
            parts = name.split(".")
            if parts[0] == "dtlab" and len(parts) > 1 and parts[1] in MODULES:
                found["top" if node.col_offset == 0 else "deferred"].add(parts[1])
    found["deferred"] -= found["top"]
    return found, packages


def documented() -> dict[str, dict[str, set[str]]]:
    """{module: {"top": ..., "deferred": ...}} from the table's rows: | `module` | holds | `a`, `b` | `c` |"""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \|[^|]*\| ([^|]*) \| ([^|]*) \|$", text, re.M)
    return {
        module: {"top": set(re.findall(r"`(\w+)`", top)), "deferred": set(re.findall(r"`(\w+)`", deferred))}
        for module, top, deferred in rows
    }


def test_the_docs_table_is_the_packages_imports():
    table = documented()
    assert sorted(table) == MODULES, "docs/architecture.md must list every module, once"
    for module in MODULES:
        assert imports(module)[0] == table[module], module


def test_the_walls_hold():
    graph = {m: (lambda f: f["top"] | f["deferred"])(imports(m)[0]) for m in MODULES}
    assert not [m for m in MODULES if graph[m] & set(ENTRY_POINTS)], "nothing imports an entry point"
    assert graph["model"] == set() and not imports("model")[1] & {"lightning", "hydra", "omegaconf"}
    assert "model" not in graph["rollout"] and not graph["rollout"] & {"module", "callbacks", "online"}
    assert "lightning" not in imports("rollout")[1] | imports("protocol")[1] | imports("policy")[1]
    assert graph["data"] == {"policy", "stats"} and "lightning" not in imports("data")[1]
    assert imports("stats")[1] <= {"__future__", "math", "collections", "numpy"}  # NumPy only
    for report_side in ("runs", "groups", "render", "stats"):
        assert not imports(report_side)[1] & {"torch", "lightning", "gymnasium"}, report_side

    def cycle(module: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        for other in sorted(graph[module]):
            if other in path:
                return (*path, other)
            found = cycle(other, (*path, other))
            if found:
                return found
        return None

    assert not [c for m in MODULES if (c := cycle(m, (m,)))], "imports go one way"


@pytest.mark.parametrize("module", MODULES)
def test_a_long_module_says_why(module):
    source = (PACKAGE / f"{module}.py").read_text()
    if len(source.splitlines()) > LINES:
        assert "Over 400 lines:" in ast.get_docstring(ast.parse(source)), f"{module}.py: say why it is one module"
