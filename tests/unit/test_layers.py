"""The import graph of mmfm, read with `ast` (nothing is executed): dependencies point down
the layer table of mmfm/README.md, no module imports itself back through others, and imports
inside functions are left to the two entry points that keep start-up light."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "mmfm"

LAYERS: dict[str, set[str]] = {
    "core": set(),
    "config": {"core"},
    "tokenization": {"core", "config"},
    "data": {"core", "config", "tokenization"},
    "model": {"core", "config"},
    "parallel": {"core", "config", "model"},
    "decoding": {"core", "config", "tokenization", "data", "model"},
    "prepare": {"core", "config", "tokenization", "data"},
    "slurm": {"core", "config", "prepare"},
    "tasks": {"core", "config", "tokenization", "data", "model", "decoding", "prepare"},
    "train": {
        *("core", "config", "tokenization", "data", "model", "parallel", "prepare", "decoding"),
        "tasks",
    },
    "convert": {"core", "config", "tokenization", "model", "train"},
    "generate": {
        *("core", "config", "tokenization", "data", "model", "decoding", "train", "convert"),
    },
    "inspect": {"core", "config", "tokenization", "data", "decoding"},
    "testing": {"core", "config", "tokenization", "data", "model", "parallel", "train"},
    "cli": {
        *("core", "config", "tokenization", "data", "model", "parallel", "prepare", "slurm"),
        *("decoding", "train", "convert", "generate", "inspect"),
    },
    "main": {"cli"},
}
"""Layer -> the layers it may import. The layer of `mmfm.X...` is X (`mmfm/X.py` or
`mmfm/X/`); `mmfm/__main__.py` is `main`."""

LAZY_IMPORTS_ALLOWED = {"mmfm.cli", "mmfm.testing"}
"""`mmfm --help` and spawned test ranks import their commands when they run them."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    return "main" if parts[1] == "__main__" else parts[1]


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported mmfm module, inside a function, line) of every import in `path`; imports
    under `if TYPE_CHECKING:` (annotations only) are in `_annotation_imports`."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*up, *([child.module] if child.module else [])])
                if base.startswith("mmfm"):
                    for alias in child.names:  # `from mmfm.data import demo` imports a module
                        sub = f"{base}.{alias.name}"
                        target = sub if _path_of(sub) else base
                        found.append((target, nested, child.lineno))
            elif isinstance(child, ast.Import):
                names = [a.name for a in child.names if a.name.startswith("mmfm")]
                found.extend((name, nested, child.lineno) for name in names)
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return found


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in (
        "TYPE_CHECKING",
        "typing.TYPE_CHECKING",
    )


def _annotation_imports(path: Path) -> list[tuple[str, int]]:
    """(mmfm module, line) of the imports under `if TYPE_CHECKING:` in `path`: never run, so
    they make no import cycle, but they still point down the layers."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if _is_type_checking(node):
            for child in ast.walk(node):
                if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("mmfm"):
                    found.append((child.module, child.lineno))
    return found


def _path_of(module: str) -> Path | None:
    base = ROOT.parent / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_the_layer_table_covers_every_module_and_is_the_one_in_the_readme():
    assert {_layer(m) for m in MODULES} - {"package"} <= set(LAYERS)
    readme = (ROOT / "README.md").read_text()
    for layer, allowed in LAYERS.items():
        row = re.search(rf"^\| `{layer}` \| (.*?) \|", readme, re.MULTILINE)
        assert row, f"mmfm/README.md has no row for layer {layer!r}"
        named = set(re.findall(r"`(\w+)`", row.group(1)))
        assert named == allowed, f"layer {layer}: README says {named}, the test {allowed}"


def _violations(module: str, imports: list[tuple[str, bool, int]]) -> list[str]:
    layer, found = _layer(module), []
    for target, in_function, line in imports:
        other = _layer(target)
        if other not in (layer, "package") and other not in LAYERS.get(layer, set()):
            allowed = sorted(LAYERS.get(layer, set()))
            found.append(f"{module}:{line} imports {target}: layer {layer} may import {allowed}")
        if in_function and module not in LAZY_IMPORTS_ALLOWED:
            found.append(
                f"{module}:{line} imports {target} inside a function: import it at the top "
                "(in-function imports are for optional heavy dependencies)"
            )
    return found


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `edges` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (found := visit(module)):
            return found
    return None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    for target, _, line in GRAPH[module]:
        assert _path_of(target), f"{module}:{line} imports {target}, which does not exist"
    assert _violations(module, GRAPH[module]) == []
    annotations = [(t, False, line) for t, line in _annotation_imports(MODULES[module])]
    assert _violations(module, annotations) == []


def test_no_import_cycles():
    edges = {m: {t for t, _, _ in GRAPH[m] if t in MODULES and t != m} for m in MODULES}
    assert _cycle(edges) is None


def test_the_checks_catch_an_upward_edge_a_lazy_import_and_a_cycle():
    upward = _violations("mmfm.config.schema", [("mmfm.train.trainer", False, 3)])
    assert len(upward) == 1 and "layer config may import ['core']" in upward[0]
    lazy = _violations("mmfm.data.loader", [("mmfm.tokenization.vocab", True, 9)])
    assert len(lazy) == 1 and "inside a function" in lazy[0]
    assert _violations("mmfm.cli", [("mmfm.train.command", True, 1)]) == []
    # The runtime requeues through mmfm.parallel.requeue, never the job-submission code.
    submit = _violations("mmfm.train.trainer", [("mmfm.slurm", False, 1)])
    assert len(submit) == 1 and "layer train may import" in submit[0]
    cycle = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(cycle) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    # config/layout.py names Config in annotations only: no edge back to schema.py.
    assert "mmfm.config.schema" in {
        m for m, _ in _annotation_imports(ROOT / "config" / "layout.py")
    }
    assert "mmfm.config.schema" not in {t for t, _, _ in GRAPH["mmfm.config.layout"]}
