"""Prints wkvq_core's package-level import graph, layer by layer, and exits 1 on an import cycle (between modules or
between packages) or an import that runs upward (to a package of the same or a higher layer).

    python scripts/import_graph.py            the graph, then "ok" or the violations
    python scripts/import_graph.py --dot      the graph in Graphviz dot (render: dot -Tsvg)
    python scripts/import_graph.py --root DIR the same for the package in DIR (its tests use a made-up one)

Every import counts, those inside functions too. `wkvq_core/__init__.py`, the public facade that imports its names
lazily, is left out.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = "wkvq_core"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE  # --root replaces it

# lowest first; a unit may import only from units of lower layers (and within itself)
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("config", "atomic", "model_zoo"),
    ("quant",),
    ("targets",),
    ("model",),
    ("calib", "runtime"),
    ("artifact",),
    ("hf_quantizer",),
    ("evaluation", "export"),
    ("pipeline",),
    ("cli",),
]
LAYER = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The wkvq_core modules `path` imports (a name imported from a package counts as its submodule when it is one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            submodules = {f"{source}.{alias.name}" for alias in node.names} & modules
            found |= submodules or {source}
    return {module for module in found if module in modules and module != name}


def unit(module: str) -> str:
    """The layering unit of a module: its top-level package or module under wkvq_core."""
    return module.split(".")[1]


def module_graph() -> dict[str, set[str]]:
    paths = [p for p in ROOT.rglob("*.py") if "assets" not in p.relative_to(ROOT).parts]
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths if module_name(p) != PACKAGE}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    problems = [f"module cycle: {' <-> '.join(cycle)}" for cycle in cycles(graph)]
    units = {unit(m) for m in graph}
    problems += [f"{u}: not in LAYERS of scripts/import_graph.py" for u in sorted(units - LAYER.keys())]
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            a, b = unit(module), unit(dep)
            if a != b and a in LAYER and b in LAYER and LAYER[b] >= LAYER[a]:
                problems.append(f"upward import: {module} -> {dep} ({a} is layer {LAYER[a]}, {b} layer {LAYER[b]})")
    return problems


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    edges = defaultdict(set)
    for module, deps in graph.items():
        edges[unit(module)] |= {unit(d) for d in deps if unit(d) != unit(module)}
    return edges


def main(argv: list[str]) -> int:
    global ROOT
    if "--root" in argv:
        ROOT = Path(argv[argv.index("--root") + 1]).resolve()
    graph = module_graph()
    edges = unit_graph(graph)
    if "--dot" in argv:
        print("digraph wkvq_core {\n  rankdir=BT;")
        for rank, units in enumerate(LAYERS):
            quoted = "; ".join(f'"{u}"' for u in units)
            print(f"  {{ rank=same; {quoted} }}")
        for source in sorted(edges):
            for target in sorted(edges[source]):
                print(f'  "{source}" -> "{target}";')
        print("}")
    else:
        for rank in reversed(range(len(LAYERS))):
            for name in LAYERS[rank]:
                kind = "package" if (ROOT / name).is_dir() else "module"
                print(f"{rank:>2}  {name + '/' if kind == 'package' else name:<14} -> {', '.join(sorted(edges.get(name, ()))) or '-'}")
    problems = violations(graph)
    for problem in problems:
        print(problem, file=sys.stderr)
    if "--dot" not in argv:
        print("ok: no cycle, no upward import" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
