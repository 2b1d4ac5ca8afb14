"""The import layers of src/unitrain: no cycle between modules, no import that runs backwards between layers or
between the stages of `unitrain.data`, and an epoch planned without torch.

Every import is read with `ast`, at module level and inside functions alike (a function-level import is still a
dependency; it only hides a cycle until the function runs). A module may import its own layer and the layers
before it; inside `unitrain.data`, its own stage, the shared records and the stages before it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# The layers of the package, bottom first; a module belongs to the entry naming it or its nearest package.
LAYERS = [
    ("unitrain", "unitrain.errors", "unitrain.files", "unitrain.text", "unitrain.config_sections"),
    ("unitrain.data",),
    ("unitrain.losses",),
    ("unitrain.model",),
    ("unitrain.config", "unitrain.config_docs"),
    ("unitrain.train",),
    ("unitrain.inference",),
    ("unitrain.commands",),
    ("unitrain.cli", "unitrain.__main__"),
]
# The stages of `unitrain.data`, bottom first (see src/unitrain/data/README.md); the package itself, which
# re-exports from several stages, sits on top.
STAGES = [
    ("unitrain.data.sample", "unitrain.data.batch"),
    ("unitrain.data.rows",),
    ("unitrain.data.memmap",),
    ("unitrain.data.prepare",),
    ("unitrain.data.epoch",),
    ("unitrain.data.batches",),
    ("unitrain.data",),
]


def module_names() -> dict[str, Path]:
    names = {}
    for path in (SRC / "unitrain").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(name: str, path: Path, names: dict[str, Path]) -> set[str]:
    """The unitrain modules `name` imports anywhere in its file (`from p import m` names module p.m if it is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base for alias in node.names
            ]
        else:
            continue
        found.update(target for target in targets if target in names and target != name)
    return found


def graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imports(name, path, names) for name, path in names.items()}


def rank(name: str) -> tuple[int, int]:
    """(layer, data stage) of a module: the order in which imports must point down."""

    def position(table) -> int | None:
        """The entry whose longest prefix is `name` or a package above it."""
        matches = [
            (len(prefix), index)
            for index, entry in enumerate(table)
            for prefix in entry
            if name == prefix or name.startswith(prefix + ".")
        ]
        return max(matches)[1] if matches else None

    layer = position(LAYERS)
    stage = position(STAGES) if name.startswith("unitrain.data") else 0
    assert None not in (layer, stage), f"{name} has no place in LAYERS/STAGES of tests/test_layers.py"
    return layer, stage


def backward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{source} imports {target}"
        for source, targets in edges.items()
        for target in targets
        if rank(target) > rank(source)
    )


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_no_backward_import():
    assert backward_imports(graph()) == []


def test_the_checks_catch_what_they_guard():
    edges = graph()
    edges["unitrain.data.epoch.plan"] = edges["unitrain.data.epoch.plan"] | {"unitrain.data.batches.collate"}
    edges["unitrain.data.rows.schemas"] = edges["unitrain.data.rows.schemas"] | {"unitrain.data.rows.groups"}
    assert backward_imports(edges) == ["unitrain.data.epoch.plan imports unitrain.data.batches.collate"]
    assert cycles(edges) == [["unitrain.data.rows.groups", "unitrain.data.rows.schemas"]]


def test_planning_an_epoch_does_not_import_torch():
    code = (
        "import sys, unitrain.data.epoch.plan, unitrain.data.epoch.plan_cache, unitrain.data.epoch.plan_kernel; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == "False\n"


def test_public_entry_points():
    from unitrain.data import GPTMemmapDataset, GPTSample, PackedBatch, write_dataset
    from unitrain.data.memmap import DatasetWriter
    from unitrain.data.memmap import GPTMemmapDataset as Reader
    from unitrain.data.memmap import write_dataset as write
    from unitrain.data.prepare import PrepareConfig, prepare

    assert (Reader, write) == (GPTMemmapDataset, write_dataset)
    assert all(callable(item) for item in (GPTSample, PackedBatch, DatasetWriter, PrepareConfig, prepare))


def test_no_long_file_or_crowded_folder():
    """Files under 400 lines; a folder of `src/unitrain` holds at most 9 modules (a package that grows past that
    splits by responsibility)."""
    names = module_names()
    assert [str(path) for path in names.values() if len(path.read_text().splitlines()) > 400] == []
    folders: dict[Path, int] = {}
    for path in names.values():
        folders[path.parent] = folders.get(path.parent, 0) + 1
    assert {str(folder): count for folder, count in folders.items() if count > 9} == {}
