#!/usr/bin/env python3
"""Fails on an import against the layer order written in docs/structure.md.

A unit is a package under ``disagg/`` or ``services/`` (``disagg.engine``,
``services.prefill``) or a top-level module (``disagg.cli``). The order lives
in the ``text`` block under "## Layers" in docs/structure.md, one layer a line
(``L3  disagg.metastore  disagg.metrics``). A unit may import only units of a
strictly lower layer: nothing upwards, nothing sideways, so no cycle can form.
Every import counts, a lazy one inside a function too. A unit the document does
not name is an error, so a new package has to be placed before it lands.

    python scripts/check_layers.py            # check; exit 1 on any violation
    python scripts/check_layers.py --graph    # print the unit import graph
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("disagg", "services")
GENERATED = "disagg.v1"
_LAYER_LINE = re.compile(r"^L(\d+)\s+(.+)$")


def read_layers(doc: Path) -> dict[str, int]:
    """unit -> layer number, from the first ```text block after '## Layers'."""
    text = doc.read_text()
    section = text.split("## Layers", 1)
    if len(section) < 2:
        raise SystemExit(f"{doc}: no '## Layers' section")
    block = re.search(r"```text\n(.*?)```", section[1], re.S)
    if block is None:
        raise SystemExit(f"{doc}: no ```text block under '## Layers'")
    layers: dict[str, int] = {}
    for line in block.group(1).splitlines():
        m = _LAYER_LINE.match(line.strip())
        if m:
            for unit in m.group(2).split("#", 1)[0].split():
                layers[unit] = int(m.group(1))
    return layers


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] not in SOURCES:
        return None
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones resolved."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from disagg import cli` imports disagg.cli, not the package disagg
            out += [
                (f"{base}.{a.name}" if unit_of(base) == base else base, node.lineno)
                for a in node.names
            ]
    return out


def edges(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """unit -> imported unit -> ['file:line', ...]"""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for top in SOURCES:
        for path in sorted((root / top).rglob("*.py")):
            src = unit_of(module_name(path, root))
            if src is None or src == GENERATED or src in SOURCES:
                continue
            graph[src]  # a unit that imports nothing still shows in the graph
            for target, line in imports_of(path, root):
                dst = unit_of(target)
                if dst is not None and dst != src and dst not in SOURCES:
                    graph[src][dst].append(f"{path.relative_to(root)}:{line}")
    return graph


def violations(graph: dict[str, dict[str, list[str]]], layers: dict[str, int]) -> list[str]:
    out = []
    for src, targets in sorted(graph.items()):
        if src not in layers:
            out.append(f"{src}: not placed in a layer in docs/structure.md")
            continue
        for dst, where in sorted(targets.items()):
            if dst not in layers:
                out.append(f"{src} -> {dst}: {dst} is not placed in a layer ({where[0]})")
            elif layers[dst] >= layers[src]:
                kind = "sideways" if layers[dst] == layers[src] else "upwards"
                out.append(
                    f"{src} (L{layers[src]}) -> {dst} (L{layers[dst]}): {kind} import at "
                    + ", ".join(where)
                )
    return out


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected components with more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def problems(root: Path = ROOT) -> list[str]:
    """Every cycle and every import against the documented order; [] when the tree is clean."""
    graph = edges(root)
    found = [f"cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    return found + violations(graph, read_layers(root / "docs" / "structure.md"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graph", action="store_true", help="print the unit import graph")
    ap.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    args = ap.parse_args(argv)
    graph = edges(args.root)
    if args.graph:
        for src, targets in sorted(graph.items()):
            print(f"{src} -> {', '.join(sorted(targets)) or '(nothing)'}")
        return 0
    found = problems(args.root)
    for p in found:
        print(p, file=sys.stderr)
    if found:
        print(f"check_layers: {len(found)} problem(s)", file=sys.stderr)
        return 1
    print(f"check_layers: {len(graph)} units, no cycle, every import points down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
