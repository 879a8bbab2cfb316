"""The dependency rule, checked on every module's imports (lazy ones inside functions included):

    core (schema, bundle, data, encoders, fusion, models, evaluate, train, ...)
      <- tasks  <- {experiments, runtime}  <- {serve, export}  <- cli

A module imports its own layer or lower ones; packages that share a layer never import each
other (serve and export compare models through ``runtime``, never through each other); no
module-level import cycle anywhere. The old module paths kept as aliases (``SHIMS``) are exempt
and nothing in ``src`` may import them. Also: no task-name switches outside ``tasks/`` and no
module over 600 lines.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: lowest first; a layer's packages may import any lower layer, not a sibling
LAYERS: list[tuple[str, ...]] = [
    ("", "schema", "errors", "files", "progress", "bundle", "bundle_format", "index", "client",
     "data", "encoders", "fusion", "models", "evaluate", "train", "llm"),
    ("tasks",),
    ("experiments", "runtime"),
    ("serve", "export"),
    ("cli",),
]  # fmt: skip
#: old paths that alias their new module until 0.3 (issue 16); never imported from src
SHIMS = {
    "modalforge.predictor",
    "modalforge.contrastive",
    "modalforge.caption",
    "modalforge.vqa",
    "modalforge.transcribe",
    "modalforge.serve.engine",
    "modalforge.serve.generation",
    "modalforge.encoders.onnx_runtime",
    "modalforge.export.runtime",
    "modalforge.train.run",
    "modalforge.train.sweep",
    "modalforge.train.crossval",
    "modalforge.train.ensemble",
}
MAX_LINES = 600


def modules(root: Path) -> dict[str, Path]:
    """``modalforge.x.y`` -> its file, for every module under ``root/modalforge``."""
    out = {}
    for path in sorted((root / "modalforge").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def imports(root: Path) -> dict[str, set[str]]:
    """module -> the modalforge modules it imports anywhere in its file (an ``import`` inside a
    function counts: it is a dependency all the same)."""
    known = modules(root)
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(_resolve(a.name, known) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    found.add(full if full in known else _resolve(base, known))
        edges[name] = {m for m in found if m.startswith("modalforge") and m != name}
    return edges


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, top-level package) of a ``modalforge`` module."""
    top = module.split(".")[1] if "." in module else ""
    for i, packages in enumerate(LAYERS):
        if top in packages:
            return i, top
    raise AssertionError(f"{module}: its package {top!r} is in no layer of LAYERS")


def violations(root: Path, shims: set[str] = SHIMS) -> list[str]:
    """Every import against the rule, and every cycle, as readable lines."""
    edges = imports(root)
    problems = []
    for module, targets in sorted(edges.items()):
        if module in shims:
            continue
        layer, top = layer_of(module)
        for target in sorted(targets):
            if target in shims:
                problems.append(f"{module} imports {target}, an old path kept for users only")
                continue
            their_layer, their_top = layer_of(target)
            if their_layer > layer:
                problems.append(f"{module} imports {target}: upwards ({LAYERS[layer]} < "
                                f"{LAYERS[their_layer]})")  # fmt: skip
            elif their_layer == layer and their_top != top and layer > 0:
                problems.append(f"{module} imports {target}: {top} and {their_top} share a "
                                "layer and must not import each other")  # fmt: skip
    graph = {m: t - shims for m, t in edges.items() if m not in shims}
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_dependency_rule_holds():
    assert violations(SRC) == []


def test_shims_only_alias_their_new_module():
    known = modules(SRC)
    for name in SHIMS:
        text = known[name].read_text(encoding="utf-8")
        assert text.startswith('"""Moved'), name
        assert len(text.splitlines()) <= 30, f"{name} is more than an alias"


def _plant(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of ``src`` with ``line`` added inside a function of ``module``."""
    import shutil

    root = tmp_path / "src"
    shutil.copytree(SRC / "modalforge", root / "modalforge")
    path = root / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")
    return root


@pytest.mark.parametrize(
    ("module", "line", "expected"),
    [
        ("modalforge.serve.app", "from modalforge.export import export_bundle", "share a layer"),
        ("modalforge.tasks.base", "from modalforge.runtime import Engine", "upwards"),
        ("modalforge.models.multimodal", "import modalforge.tasks", "upwards"),
        ("modalforge.runtime.engine", "from modalforge.predictor import FitConfig", "old path"),
        ("modalforge.data.manifest", "from modalforge.data import cache", "import cycle"),
    ],
)
def test_the_check_fails_on_a_planted_import(tmp_path, module, line, expected):
    problems = violations(_plant(tmp_path, module, line))
    assert any(expected in p for p in problems), problems


def test_no_task_name_switch_outside_tasks():
    switch = re.compile(r"task (==|!=|in )")
    found = [f"{path.relative_to(SRC)}:{i}: {line.strip()}"
             for name, path in modules(SRC).items() if not name.startswith("modalforge.tasks")
             for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if switch.search(line)]  # fmt: skip
    assert found == []


def test_no_module_over_600_lines():
    long = {name: n for name, path in modules(SRC).items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}  # fmt: skip
    assert long == {}
