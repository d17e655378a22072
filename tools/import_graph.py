"""mlxgpt's import graph: module and folder cycles, and imports that climb a layer.

    python tools/import_graph.py            # counts, then each cycle and upward import

Every ``import``/``from ... import`` of an mlxgpt module counts, lazy ones (inside functions)
included. Folders are layered, lowest first (``LAYERS``); a module may import its own folder
and those below it, never above. Exit status 1 when there is a cycle or an upward import.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mlxgpt"
# lowest first: each may import only its own layer and those before it
LAYERS = [{"errors", "cachedir", "atomicio", "checks", "modules", "assets"}, {"cpu"}, {"core"},
          {"tokenizers", "checkpoints", "adapters"}, {"data", "generation"}, {"training"},
          {"serve"}, {"cli", "__main__", "__init__"}]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mlxgpt")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("mlxgpt"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def folder(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(f: str) -> int:
    return next((i for i, s in enumerate(LAYERS) if f in s), len(LAYERS))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in imports(path, name) if m in files and m != name}
    folders: dict[str, set[str]] = {}
    upward = []
    for a, targets in graph.items():
        for b in targets:
            fa, fb = folder(a), folder(b)
            if fa != fb and b != "mlxgpt":
                folders.setdefault(fa, set()).add(fb)
                if layer(fb) > layer(fa):
                    upward.append((a, b))
    mod_cycles = cycles({k: {m for m in v if m != "mlxgpt"} for k, v in graph.items()})
    dir_cycles = cycles(folders)
    print(f"modules {len(files)}, module cycles {len(mod_cycles)}, folder cycles "
          f"{len(dir_cycles)}, upward imports {len(upward)}")
    for c in mod_cycles:
        print("module cycle:", " <-> ".join(c))
    for c in dir_cycles:
        print("folder cycle:", " <-> ".join(c))
    for a, b in sorted(upward):
        print(f"upward: {a} -> {b}")
    return 1 if mod_cycles or dir_cycles or upward else 0


if __name__ == "__main__":
    sys.exit(main())
