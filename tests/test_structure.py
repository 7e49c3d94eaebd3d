"""The package DAG and function sizes, checked on the tree as it is.

The layer order is written once, in docs/structure.md; scripts/check_layers.py
reads it. These tests run the checker on this repository, prove on a planted
tree that it catches what it claims to (a lazy upward import, a relative one, a
cycle, an unplaced package), and hold the size limits of the house style.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60
# Argument parsers are one add_argument call per flag: long by nature, flat by nature.
PARSERS = {("disagg/cli.py", "build_parser"), ("disagg/bench/cli.py", "add_arguments")}


@pytest.fixture(scope="module")
def checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / "scripts/check_layers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_layers"] = module
    spec.loader.exec_module(module)
    return module


def test_repository_imports_follow_the_documented_layers(checker: ModuleType) -> None:
    assert checker.problems(ROOT) == []
    assert checker.main([]) == 0


def _plant(root: Path, files: dict[str, str], layers: str) -> None:
    (root / "docs").mkdir()
    (root / "docs/structure.md").write_text(f"# S\n\n## Layers\n\n```text\n{layers}```\n")
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_lazy_upward_import_and_cycle(checker: ModuleType, tmp_path: Path) -> None:
    _plant(
        tmp_path,
        {
            "disagg/__init__.py": "",
            "disagg/low/__init__.py": "def f():\n    from disagg.high import x  # lazy\n",
            "disagg/high/__init__.py": "from disagg.low import f\nx = 1\n",
        },
        "L0  disagg.low\nL1  disagg.high\n",
    )
    found = checker.problems(tmp_path)
    assert any(p.startswith("cycle: disagg.high <-> disagg.low") for p in found), found
    upward = [p for p in found if "upwards" in p]
    assert upward == [
        "disagg.low (L0) -> disagg.high (L1): upwards import at disagg/low/__init__.py:2"
    ]
    assert checker.main(["--root", str(tmp_path)]) == 1


def test_checker_resolves_relative_imports_and_flags_sideways(
    checker: ModuleType, tmp_path: Path
) -> None:
    _plant(
        tmp_path,
        {
            "disagg/__init__.py": "",
            "disagg/a/__init__.py": "",
            "disagg/a/m.py": "from ..b import y\n",
            "disagg/b/__init__.py": "y = 2\n",
        },
        "L0  disagg.a  disagg.b\n",
    )
    assert checker.problems(tmp_path) == [
        "disagg.a (L0) -> disagg.b (L0): sideways import at disagg/a/m.py:1"
    ]


def test_checker_requires_every_package_placed(checker: ModuleType, tmp_path: Path) -> None:
    _plant(
        tmp_path,
        {"disagg/__init__.py": "", "disagg/a/__init__.py": "", "services/x/__init__.py": ""},
        "L0  disagg.a\n",
    )
    assert checker.problems(tmp_path) == ["services.x: not placed in a layer in docs/structure.md"]


def _functions() -> list[tuple[str, str, int]]:
    """(file, qualified name, lines) of every function in disagg/ and services/ (not generated)."""
    out = []
    for top in ("disagg", "services"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel.startswith("disagg/v1/"):
                continue
            out += list(_walk(ast.parse(path.read_text()), rel, ""))
    return out


def _walk(node: ast.AST, rel: str, prefix: str):  # type: ignore[no-untyped-def]
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            assert child.end_lineno is not None
            yield rel, prefix + child.name, child.end_lineno - child.lineno + 1
            yield from _walk(child, rel, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from _walk(child, rel, f"{prefix}{child.name}.")


def test_no_function_over_the_size_limit() -> None:
    functions = _functions()
    assert len(functions) > 300  # the walk found the code
    long = [
        f"{rel}:{name} {n} lines"
        for rel, name, n in functions
        if n > MAX_FUNCTION_LINES and (rel, name.rsplit(".", 1)[-1]) not in PARSERS
    ]
    assert long == []


def test_a_request_path_reads_as_its_phases() -> None:
    sizes = {(rel, name): n for rel, name, n in _functions()}
    assert sizes[("services/scheduler/orchestrator.py", "Orchestrator._run")] <= 30
