"""The import rules of docs/architecture.md, checked over the package's source: each layer imports only the
layers below it (every import counts, also those inside functions and under TYPE_CHECKING), and no product
module imports bench (the `pdserve bench` subcommand in cli.py is the one way in)."""

from __future__ import annotations

import ast
from pathlib import Path

import pdserve

ROOT = Path(pdserve.__file__).parent

# unit -> the units it may import. A unit is a top-level module or subpackage of pdserve; disagg is two:
# its control plane (pure Python) and its data plane (transfer engines, the sender, the worker's plane).
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "native": {"config"},
    "messages": set(),
    "validation": set(),
    "piped_child": set(),
    "request": {"messages"},
    "pdserve": {"request", "engine"},  # the package root: `LLM` lazily
    "kvcache": {"messages", "request"},
    "store": {"config", "native"},
    "scheduler": {"config", "kvcache", "messages", "request"},
    "disagg.control": {"config", "kvcache", "messages", "request", "scheduler"},
    "layers": {"messages"},
    "disagg.data": {"config", "layers", "messages", "native", "piped_child"},
    "models": {"config", "layers"},
    "worker": {"config", "disagg.data", "kvcache", "layers", "messages", "models", "store"},
    "engine": {
        "config",
        "disagg.control",
        "kvcache",
        "messages",
        "models",
        "native",
        "request",
        "scheduler",
        "validation",
        "worker",
    },
    "http": set(),
    "server": {"engine", "http", "messages", "request", "validation"},
    "router": {"config", "http"},
    "procs": set(),
    "launcher": {"config", "http", "procs", "store"},
    "cli": {"*"},
    "bench": {"*"},
}
DATA_PLANE = ("pdserve.disagg.transfer", "pdserve.disagg.sender", "pdserve.disagg.plane")


def unit_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "pdserve"
    if parts[1] == "disagg":
        return "disagg.data" if module.startswith(DATA_PLANE) else "disagg.control"
    return parts[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "pdserve" or name.startswith("pdserve.")}


def edges() -> list[tuple[str, str, str]]:
    """(module, its unit, the unit it imports) for every import across units."""
    result = []
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        source = unit_of(module)
        for name in imports_of(path):
            target = unit_of(name)
            if target != source:
                result.append((module, source, target))
    return result


def test_every_module_has_a_layer() -> None:
    units = {unit_of(module_name(path)) for path in ROOT.rglob("*.py")}
    assert units <= set(ALLOWED), f"add these to ALLOWED and docs/architecture.md: {sorted(units - set(ALLOWED))}"


def test_layers_import_only_the_layers_below() -> None:
    bad = [
        f"{module} ({source}) imports {target}"
        for module, source, target in edges()
        if "*" not in ALLOWED[source] and target not in ALLOWED[source]
    ]
    assert bad == []


def test_product_code_never_imports_bench() -> None:
    bad = [module for module, source, target in edges() if target == "bench" and source not in ("bench", "cli")]
    assert bad == []
