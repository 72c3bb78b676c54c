"""The package's imports point down the pipeline: no cycle between its units, and neither the CLI nor training
reaches into the benchmarks.

A unit is a sub-package (jetspec_trt/models/, ...) or a top-level module (cli.py, errors.py, ...); the package's
own __init__.py (the public facade) is the unit "jetspec_trt". Every `import jetspec_trt.X...` and
`from jetspec_trt.X... import ...` counts, function-local ones included, and so does a "jetspec_trt.X...:name"
string: the CLI loads its commands from such references through importlib.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "jetspec_trt"
ROOT = "jetspec_trt"
REFERENCE = re.compile(r"^jetspec_trt(?:\.\w+)+:\w+$")  # "module:attribute", as cli.COMMANDS lists them


def unit_of(path: Path, package_dir: Path) -> str:
    parts = path.relative_to(package_dir).parts
    if len(parts) == 1:
        return ROOT if parts[0] == "__init__.py" else parts[0].removesuffix(".py")
    return parts[0]


def _unit_of_module(module: str, package_dir: Path, imported: tuple[str, ...] = ()) -> list[str]:
    """Units a module path names; `from jetspec_trt import a, b` names a and b where they are units."""
    parts = module.split(".")
    if parts[0] != ROOT:
        return []
    if len(parts) > 1:
        return [parts[1]]
    units = [name for name in imported if (package_dir / f"{name}.py").is_file() or (package_dir / name).is_dir()]
    return units if units and len(units) == len(imported) else [ROOT] + units


def imported_units(path: Path, package_dir: Path) -> list[tuple[str, int]]:
    """(unit, line) for every reference from `path` to a unit of the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    module_parts = [ROOT, *path.relative_to(package_dir).with_suffix("").parts]
    package_parts = module_parts[:-1]  # the package a relative import starts from
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found += [(u, node.lineno) for u in _unit_of_module(alias.name, package_dir)]
        elif isinstance(node, ast.ImportFrom):
            names = tuple(alias.name for alias in node.names)
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found += [(u, node.lineno) for u in _unit_of_module(module, package_dir, names)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and REFERENCE.match(node.value):
            found += [(u, node.lineno) for u in _unit_of_module(node.value.split(":")[0], package_dir)]
    return found


def import_graph(package_dir: Path) -> dict[str, dict[str, list[str]]]:
    """unit -> {imported unit: ["file:line", ...]}, edges within a unit left out."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        source = unit_of(path, package_dir)
        edges = graph.setdefault(source, {})
        for target, line in imported_units(path, package_dir):
            if target != source:
                edges.setdefault(target, []).append(f"{path.relative_to(package_dir.parent)}:{line}")
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, then "done"
    stack: list[str] = []

    def visit(unit: str) -> list[str] | None:
        state[unit] = "open"
        stack.append(unit)
        for target in sorted(graph.get(unit, {})):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[unit] = "done"
        return None

    for unit in sorted(graph):
        if unit not in state and (cycle := visit(unit)):
            return cycle
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, list[str]]]) -> str:
    return "\n".join(f"  {a} -> {b}: {', '.join(graph[a][b])}" for a, b in zip(cycle, cycle[1:]))


def test_no_import_cycle_between_units():
    graph = import_graph(PACKAGE_DIR)
    assert {"models", "runtime", "tree", "builders", "export", "bench", "train", "cli"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle {' -> '.join(cycle)}:\n{describe(cycle, graph)}"


def test_cli_and_train_do_not_import_bench():
    offenders = [
        f"{path.relative_to(PACKAGE_DIR.parent)}:{line}"
        for path in [PACKAGE_DIR / "cli.py", *sorted((PACKAGE_DIR / "train").rglob("*.py"))]
        for unit, line in imported_units(path, PACKAGE_DIR) if unit == "bench"
    ]
    assert not offenders, f"jetspec_trt.bench imported from {', '.join(offenders)}"


def test_loading_the_cli_loads_no_bench_module():
    code = ("import sys, jetspec_trt.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] == ['jetspec_trt', 'bench']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE_DIR.parent).stdout
    assert out.strip() == "[]"


def test_the_scan_sees_cycles(tmp_path):
    """The check itself: a package with a function-local import cycle, and one through a command reference."""
    package = tmp_path / ROOT
    for rel, text in {
        "__init__.py": "",
        "low.py": "",
        "a/__init__.py": "from jetspec_trt.low import x\n",
        "a/one.py": "from jetspec_trt import low\n",
        "b/__init__.py": "",
        "b/two.py": "import jetspec_trt.low\n\n\ndef f():\n    from jetspec_trt.a.one import y\n",
    }.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(text)
    assert find_cycle(import_graph(package)) is None
    (package / "low.py").write_text("def g():\n    from .b import two\n")  # relative and function-local
    graph = import_graph(package)
    assert find_cycle(graph) == ["a", "low", "b", "a"]
    assert "jetspec_trt/low.py:2" in describe(find_cycle(graph), graph)
    (package / "low.py").write_text('COMMANDS = ["jetspec_trt.b.two:f"]\n')
    assert find_cycle(import_graph(package)) == ["a", "low", "b", "a"]
    (package / "low.py").write_text("from jetspec_trt import __version__\n")  # the facade is a unit too
    (package / "__init__.py").write_text("def __getattr__(name):\n    from jetspec_trt.low import z\n")
    cycle = find_cycle(import_graph(package))
    assert cycle[0] == cycle[-1] and sorted(cycle[1:]) == ["jetspec_trt", "low"]
