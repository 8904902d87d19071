"""The import contract that keeps the tree's architecture true (DESIGN.md, docs/ARCHITECTURE.md).

- `storage` imports neither `inference` nor `dicom_node`;
- `inference` imports nothing from `dicom_node` and no networking library;
- the runtime parts of `inference` never import the offline ones (training,
  evaluation, synthetic), so a worker never loads training code.

Imports are read with `ast` from the source, including imports inside
functions, so a lazy import cannot slip past.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NETWORKING = {"pynetdicom", "socket", "ssl", "http", "urllib", "requests", "httpx", "uvicorn", "starlette", "fastapi"}
OFFLINE = ("inference.training", "inference.evaluation", "inference.synthetic")
RUNTIME = (
    "inference.imaging",
    "inference.model",
    "inference.outputs",
    "inference.pipeline",
    "inference.result",
    "inference.errors",
    "inference.uids",
    "inference.plausibility",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module name `path` imports, at any depth of the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def violations(package_prefixes: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for top in {p.split(".")[0] for p in package_prefixes}:
        for path in sources(top):
            name = module_name(path)
            if not name.startswith(package_prefixes):
                continue
            for imported in imports_of(path):
                if imported == name or imported.startswith(name + "."):
                    continue
                if any(imported == f or imported.startswith(f + ".") for f in forbidden):
                    found.append(f"{name} imports {imported}")
    return sorted(set(found))


def test_storage_imports_neither_inference_nor_dicom_node() -> None:
    assert violations(("storage",), ("inference", "dicom_node")) == []


def test_inference_imports_nothing_from_dicom_node_and_no_networking() -> None:
    assert violations(("inference",), ("dicom_node", *sorted(NETWORKING))) == []


def test_runtime_inference_never_imports_offline_tooling() -> None:
    assert violations(RUNTIME, OFFLINE) == []


@pytest.mark.parametrize("prefix", RUNTIME[:3])
def test_runtime_packages_exist(prefix: str) -> None:
    """The contract above would pass vacuously if a runtime package were renamed away."""
    assert sources(prefix.replace(".", "/")), f"{prefix} has no modules"


def test_the_checker_sees_a_lazy_import(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from inference.training import trainer\n    import socket\n")
    assert {"inference.training", "inference.training.trainer", "socket"} <= imports_of(sample)
